"""Gather evaluation results (RUN/eval/results.jsonl) from run folders on local
disk or object storage, and aggregate them exactly as DataComp does.

DataComp's aggregate (aggregate_scores.py): ImageNet = ImageNet 1k's main
metric; "ImageNet dist. shifts", "VTAB" and "Retrieval" = unweighted means of
their tasks' main metrics; "Average" = mean over the 38 scored tasks. Where
DataComp asserts all 38 are present, we report a group with a missing task as
missing (None) and name the missing tasks; a missing task is never a zero.
Light module (no torch).
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from dcslurm.core.errors import StorageError, UserError
from dcslurm.core.plan import PLAN_FILE, RUN_TOML
from dcslurm.core.storage import DataFolder, is_remote
from dcslurm.datacomp.tasks import AGGREGATE_GROUPS, datacomp_tasks, scored_tasks

RESULTS_FILE = "eval/results.jsonl"
COLUMNS = ("ImageNet", "ImageNet dist. shifts", "VTAB", "Retrieval", "Average")


def parse_results(text: str, source: str = "results.jsonl") -> dict[str, dict]:
    """Records of a DataComp results file by dataset name; a later line for the
    same dataset replaces an earlier one (a rerun appended again)."""
    records: dict[str, dict] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{source}: line {n} is not JSON ({exc.msg})") from None
        if not isinstance(rec, dict) or "dataset" not in rec or not isinstance(rec.get("metrics"), dict):
            raise UserError(f"{source}: line {n} lacks 'dataset' or 'metrics'")
        records[rec["dataset"]] = rec
    return records


def main_metrics(records: dict[str, dict]) -> dict[str, float]:
    """Dataset name -> main metric, for records whose main metric is a number."""
    out = {}
    for name, rec in records.items():
        value = rec["metrics"].get("main_metric")
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            out[name] = float(value)
    return out


@dataclass
class Aggregate:
    """DataComp's five numbers (None where a task they need is missing)."""

    scores: dict[str, float | None]
    missing: list[str]  # scored tasks (names) the run selected that have no result
    n_scored: int  # how many of the 38 have a result
    extras: dict[str, float] = field(default_factory=dict)  # registered extra tasks' main metrics
    n_selected: int = 38  # how many of the 38 the run was asked to evaluate

    def to_dict(self) -> dict:
        return {"scores": self.scores, "missing": self.missing, "n_scored": self.n_scored, "extras": self.extras}


def aggregate(records: dict[str, dict], selected: set[str] | None = None) -> Aggregate:
    """DataComp's aggregate of one run's results (see the module docstring).

    `selected`: the task names the run was asked to evaluate (its plan's eval step);
    a scored task it never selected is not "missing" (a run of the demo's own tasks
    is not 38 of 38 missing). None: unknown, so all 38 are expected."""
    values = main_metrics(records)
    scored_names = [t.name for t in scored_tasks()]
    expected = scored_names if selected is None else [n for n in scored_names if n in selected]
    missing = [n for n in expected if n not in values]
    scores: dict[str, float | None] = {}
    for group, names in AGGREGATE_GROUPS.items():
        scores[group] = None if any(n not in values for n in names) else _mean(values[n] for n in names)
    scores["Average"] = None if any(n not in values for n in scored_names) else _mean(values[n] for n in scored_names)
    # Anything not one of DataComp's 40 (e.g. the demo's tiny sets) is reported beside
    # the aggregates; it need not be registered in this process.
    datacomp_names = {t.name for t in datacomp_tasks().values()}
    extras = {n: v for n, v in values.items() if n not in datacomp_names}
    n_scored = sum(1 for n in scored_names if n in values)
    return Aggregate(scores=scores, missing=missing, n_scored=n_scored, extras=extras, n_selected=len(expected))


def _mean(xs) -> float:
    xs = list(xs)
    return math.fsum(xs) / len(xs)


# -- run folders ------------------------------------------------------------

FINISHED = "finished"


@dataclass
class RunResults:
    """One run's results and what describes it in a leaderboard. A run folder whose
    eval step has not written results.jsonl yet has `status` saying how far it got
    and no records."""

    url: str  # the run folder (or the results file itself)
    name: str
    scale: str | None
    filter: str | None  # the filter spec text (the leaderboard's grouping key)
    subset_size: int | None
    records: dict[str, dict]
    aggregate: Aggregate
    seed: int | None = None
    status: str = FINISHED
    tasks: list[str] = field(default_factory=list)  # names of the tasks its eval step selected, in order
    chance: dict[str, float | None] = field(default_factory=dict)  # task name -> chance score
    train_samples: int | None = None  # samples in the shards it trained on

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    def to_dict(self) -> dict:
        return {"run": self.name, "url": self.url, "scale": self.scale, "filter": self.filter,
                "seed": self.seed, "status": self.status, "subset_size": self.subset_size,
                "train_samples": self.train_samples, **self.aggregate.to_dict(),
                "tasks": {n: r["metrics"].get("main_metric") for n, r in self.records.items()}}


@dataclass
class _RunInfo:
    """What a run folder says about itself (plan.json, else run.toml), results aside."""

    name: str
    scale: str | None = None
    filter: str | None = None
    seed: int | None = None
    subset_size: int | None = None
    train_samples: int | None = None
    has_eval: bool = False
    eval_tasks: int = 0  # units of its eval step
    tasks: list[str] = field(default_factory=list)
    chance: dict[str, float | None] = field(default_factory=dict)


def chance_of(task: dict) -> float | None:
    """A task's chance score: its `random_score`, else 1/num_classes for a
    classification task (a uniform guess), else unknown."""
    if isinstance(task.get("random_score"), (int, float)):
        return float(task["random_score"])
    n = task.get("num_classes")
    if task.get("kind", "classification") == "classification" and isinstance(n, int) and n > 0:
        return 1.0 / n
    return None


def _selected_tasks(eval_params: dict, unit_names: list[str] | None) -> tuple[list[str], dict[str, float | None]]:
    """(names in selection order, name -> chance) of the tasks a run's eval step selected:
    the step's units (task keys) when the plan has them, else its `tasks` param. Read
    from the plan alone: nothing is registered in this process."""
    extras = [d for d in eval_params.get("extra_tasks") or [] if isinstance(d, dict) and "key" in d]
    by_key = {t.key: {"name": t.name, "random_score": t.random_score, "num_classes": t.num_classes,
                      "kind": t.kind} for t in datacomp_tasks().values()}
    by_key.update({d["key"]: {"name": d.get("name", d["key"]), **d} for d in extras})
    by_name = {v["name"]: k for k, v in by_key.items()}
    selection = unit_names
    if selection is None:
        sel = eval_params.get("tasks", "scored")
        if sel == "scored":
            selection = [t.key for t in scored_tasks()]
        elif sel == "all":
            selection = list(datacomp_tasks())
        elif sel == "extra":
            selection = [d["key"] for d in extras]
        else:
            selection = [s.strip() for s in sel.split(",")] if isinstance(sel, str) else list(sel)
    names, chance = [], {}
    for item in selection:
        key = item if item in by_key else by_name.get(item)
        if key is None:
            continue
        info = by_key[key]
        names.append(info["name"])
        chance[info["name"]] = chance_of(info)
    return names, chance


def _read_info(run: DataFolder) -> _RunInfo:
    """A run's name, scale, seed, filter spec, selected tasks and sizes, from its
    resolved plan (plan.json), else the run.toml in the folder."""
    name = posixpath.basename(run.url.rstrip("/"))
    info = _RunInfo(name=name)
    plan: dict = {}
    if run.exists(PLAN_FILE):
        plan = run.read_json(PLAN_FILE)
    elif run.exists(RUN_TOML):
        plan = _plan_like_from_toml(run)
    params = plan.get("stage_params") or {}
    info.name = plan.get("run_name") or name
    info.scale = plan.get("scale")
    info.seed = plan.get("seed") if isinstance(plan.get("seed"), int) else None
    info.filter = _filter_name(params)
    eval_step = next((s for s in plan.get("steps") or [] if s.get("stage") == "eval"), None)
    info.has_eval = eval_step is not None or "eval" in params
    if info.has_eval:
        units = (eval_step or {}).get("units") or {}
        info.eval_tasks = int(units.get("count") or 0)
        info.tasks, info.chance = _selected_tasks(params.get("eval") or {}, units.get("names"))
    # The subset's size: the filter stage's kept rows (repeats counted), else what
    # the reshard stage wrote (a run that reshards a given subset file).
    for rel, key in (("filter/stats.json", "kept_rows"), ("reshard/stats.json", "samples_written")):
        if info.subset_size is None and run.exists(rel):
            info.subset_size = _first_int(run.read_json(rel), (key,))
    # Samples trained on: the shard size table of the folder training read, this run's
    # reshard or [stages.train] data (a later seed trains on the first seed's reshard).
    data = ((params.get("train") or {}).get("data") or "") if isinstance(params.get("train"), dict) else ""
    data_folder = run.child("reshard") if not data or run.exists("reshard/sizes.json") else \
        DataFolder(data if "://" in data or data.startswith("/") else run.url_of(data), run.storage_options)
    if not data_folder.url.endswith(".tar") and data_folder.exists("sizes.json"):
        info.train_samples = _first_int(data_folder.read_json("sizes.json"), ())
    # A run that trains on another run's reshard without naming a filter: that run's filter.
    if info.filter is None and data.rstrip("/").endswith("/reshard"):
        source = DataFolder(data.rstrip("/")[: -len("/reshard")], run.storage_options)
        if source.url.rstrip("/") != run.url.rstrip("/") and source.exists(PLAN_FILE):
            info.filter = _filter_name(source.read_json(PLAN_FILE).get("stage_params") or {})
    return info


def _plan_like_from_toml(run: DataFolder) -> dict:
    """The fields of a plan.json that a run.toml (not yet submitted) also gives."""
    import tomllib

    try:
        raw = tomllib.loads(run.read_text(RUN_TOML))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{run.url_of(RUN_TOML)}: not valid TOML ({exc})") from None
    section = raw.get("run") or {}
    stages = {k: v for k, v in (raw.get("stages") or {}).items() if isinstance(v, dict)}
    selected = section.get("stages", "all")
    has_eval = selected == "all" or (isinstance(selected, list) and "eval" in selected)
    return {"scale": section.get("scale"), "seed": section.get("seed", 0), "stage_params": stages,
            "steps": [{"stage": "eval", "units": {}}] if has_eval else []}


def _filter_name(params: dict) -> str | None:
    flt = params.get("filter")
    if isinstance(flt, dict):
        for key in ("spec", "name", "method", "baseline", "filter", "kind"):  # `spec`: the filter stage's param
            if isinstance(flt.get(key), str):
                return flt[key]
        return "filter"
    subset = (params.get("reshard") or {}).get("subset") if isinstance(params.get("reshard"), dict) else None
    if isinstance(subset, str) and subset:
        return posixpath.basename(subset)
    return None


def _first_int(obj: Any, keys: tuple[str, ...]) -> int | None:
    if isinstance(obj, dict):
        for k in keys:
            if isinstance(obj.get(k), int):
                return obj[k]
        if obj and all(isinstance(v, int) for v in obj.values()):  # a size table: shard -> samples
            return sum(obj.values())
    return None


def _results_of(url: str, info: _RunInfo, records: dict[str, dict], status: str = FINISHED) -> RunResults:
    selected = set(info.tasks) if info.tasks or info.has_eval else None
    return RunResults(url=url, name=info.name, scale=info.scale, filter=info.filter, subset_size=info.subset_size,
                      records=records, aggregate=aggregate(records, selected), seed=info.seed, status=status,
                      tasks=info.tasks, chance=info.chance, train_samples=info.train_samples)


def read_run(run: DataFolder) -> RunResults:
    """The results of one run folder (RUN/eval/results.jsonl must exist)."""
    text = run.read_text(RESULTS_FILE)
    records = parse_results(text, run.url_of(RESULTS_FILE))
    return _results_of(run.url, _read_info(run), records)


def _unfinished_run(run: DataFolder, info: _RunInfo) -> RunResults:
    """A run with an eval step and no results.jsonl yet: how many eval tasks committed."""
    done = len(run.list("eval/tasks", suffix=".json"))
    status = f"not finished: {done} of {info.eval_tasks or '?'} eval tasks done"
    return _results_of(run.url, info, {}, status)


def gather(urls: list[str], storage_options: dict | None = None, max_depth: int = 3,
           unfinished: bool = False) -> list[RunResults]:
    """Every run with results under `urls`: a URL may be a run folder, a folder of
    run folders (searched `max_depth` levels down: SWEEP/runs/RUN is 2), or a
    results .jsonl file. `unfinished`: also the run folders whose plan has an eval
    step that has not written results yet (status says how far it got)."""
    runs: list[RunResults] = []
    for url in urls:
        found_before = len(runs)
        if url.endswith(".jsonl"):
            parent, name = url.rstrip("/").rsplit("/", 1)
            folder = DataFolder(parent, storage_options)
            if not folder.exists(name):
                raise UserError(f"{url}: no such results file")
            records = parse_results(folder.read_text(name), url)
            runs.append(RunResults(url=url, name=name, scale=None, filter=None, subset_size=None,
                                   records=records, aggregate=aggregate(records)))
            continue
        _collect(DataFolder(url, storage_options), max_depth, runs, unfinished)
        if len(runs) == found_before:
            raise UserError(f"{url}: no {RESULTS_FILE} in this folder or its sub-folders (depth {max_depth})")
    return runs


def _collect(folder: DataFolder, depth: int, out: list[RunResults], unfinished: bool = False) -> None:
    if folder.exists(RESULTS_FILE):
        out.append(read_run(folder))
        return
    if folder.exists(PLAN_FILE) or folder.exists(RUN_TOML):  # a run folder: never searched further down
        if unfinished:
            info = _read_info(folder)
            if info.has_eval:
                out.append(_unfinished_run(folder, info))
        return
    if depth <= 0:
        return
    for sub in _subfolders(folder):
        _collect(folder.child(sub), depth - 1, out, unfinished)


def _subfolders(folder: DataFolder) -> list[str]:
    path = folder.url.split("://", 1)[1] if is_remote(folder.url) else folder.url
    try:
        entries = folder.fs.ls(path, detail=True, refresh=True) if is_remote(folder.url) else \
            folder.fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    except Exception as exc:  # noqa: BLE001 - storage errors become one line
        raise StorageError(f"{folder.url}: cannot list ({type(exc).__name__}: {exc})") from None
    names = [posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory"]
    return sorted(n for n in names if not n.startswith(("_", ".")))


# -- the leaderboard: mean ± std over seeds per filter -----------------------------

@dataclass
class LeaderRow:
    """One filter (at one scale) over its runs: each seed is a replicate. With
    `by="run"` every run is its own row."""

    filter: str  # the filter spec text ("-": none recorded)
    scale: str | None
    label: str  # a short name for tables and the plot legend
    runs: list[RunResults]  # finished runs, by seed
    unfinished: list[RunResults]
    values: dict[str, list[float]]  # column (group or task name) -> one value per finished run

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    @property
    def train_samples(self) -> int | None:
        """Samples in the training shards of the first seed (later seeds train on the same)."""
        return next((r.train_samples for r in self.runs + self.unfinished if r.train_samples is not None), None)

    @property
    def subset_size(self) -> int | None:
        return next((r.subset_size for r in self.runs + self.unfinished if r.subset_size is not None), None)

    def n(self, column: str) -> int:
        return len(self.values.get(column, ()))

    def mean(self, column: str) -> float | None:
        xs = self.values.get(column)
        return _mean(xs) if xs else None

    def std(self, column: str) -> float | None:
        """Sample standard deviation over seeds (n - 1); 0 for one seed."""
        xs = self.values.get(column)
        if not xs:
            return None
        if len(xs) < 2:
            return 0.0
        m = _mean(xs)
        return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    def cell(self, column: str) -> str:
        """"mean±std" (one run: the value alone; fewer values than runs: n says how many)."""
        m = self.mean(column)
        if m is None:
            return "-"
        text = f"{m:.3f}" if len(self.runs) < 2 else f"{m:.3f}±{self.std(column):.3f}"
        if 1 < len(self.runs) and self.n(column) < len(self.runs):
            text += f" n={self.n(column)}"
        return text

    def to_dict(self) -> dict:
        return {"filter": self.filter, "label": self.label, "scale": self.scale, "seeds": self.seeds,
                "runs": [r.name for r in self.runs], "train_samples": self.train_samples,
                "subset_size": self.subset_size,
                "unfinished": [{"run": r.name, "seed": r.seed, "status": r.status} for r in self.unfinished],
                "scores": {c: {"mean": self.mean(c), "std": self.std(c), "n": self.n(c), "values": xs}
                           for c, xs in self.values.items()}}


@dataclass
class Leaderboard:
    """Rows (filters or runs), the DataComp groups and tasks any row has a number for,
    and each column's chance score (a group's: the mean of its tasks', where all known)."""

    rows: list[LeaderRow]
    groups: list[str]  # DataComp aggregate columns present, in COLUMNS order
    tasks: list[str]  # task names present: DataComp's in tasklist order, then the others as selected
    chance: dict[str, float | None]
    by: str = "filter"

    def columns(self, per_task: bool = False) -> list[str]:
        """The groups, then the tasks no shown group covers (all tasks with per_task)."""
        if per_task:
            return self.groups + self.tasks
        covered: set[str] = set()
        for g in self.groups:
            covered |= {t.name for t in scored_tasks()} if g == "Average" else set(AGGREGATE_GROUPS[g])
        return self.groups + [t for t in self.tasks if t not in covered]

    @property
    def scales(self) -> list[str | None]:
        return list(dict.fromkeys(r.scale for r in self.rows))

    def to_dict(self) -> dict:
        return {"by": self.by, "groups": self.groups, "tasks": self.tasks, "chance": self.chance,
                "rows": [r.to_dict() for r in self.rows]}


_SEED_SUFFIX = re.compile(r"-seed\d+$")


def leaderboard(source: str | list[str] | list[RunResults], storage_options: dict | None = None,
                by: str = "filter") -> Leaderboard:
    """The leaderboard of a folder of runs, a list of run folders (or results files),
    or gathered runs: with by="filter", one row per (scale, filter spec), each seed a
    replicate (mean ± sample std over the finished ones; unfinished runs listed);
    with by="run", one row per run."""
    if isinstance(source, str):
        source = [source]
    runs = [r for r in source if isinstance(r, RunResults)]
    urls = [u for u in source if isinstance(u, str)]
    if urls:
        runs += gather(urls, storage_options, unfinished=True)
    from dcslurm.core.scales import SCALES

    scale_order = list(SCALES)
    keyed: dict[tuple, list[RunResults]] = {}
    for r in runs:
        key = (r.scale, r.filter or "-") if by == "filter" else (r.scale, r.url)
        keyed.setdefault(key, []).append(r)
    datacomp = datacomp_tasks()
    dc_order = [t.name for t in datacomp.values()]
    chance: dict[str, float | None] = {t.name: chance_of(t.__dict__) for t in datacomp.values()}
    rows, present, others = [], set(), []
    for (scale, flt), group in keyed.items():
        done = sorted((r for r in group if r.finished), key=lambda r: (r.seed is None, r.seed or 0, r.name))
        values: dict[str, list[float]] = {}
        for r in done:
            for g in COLUMNS:
                if r.aggregate.scores.get(g) is not None:
                    values.setdefault(g, []).append(r.aggregate.scores[g])
            for name, v in main_metrics(r.records).items():
                values.setdefault(name, []).append(v)
        for r in group:
            for name in r.tasks or main_metrics(r.records):
                if name not in dc_order and name not in others:
                    others.append(name)
            for name, c in r.chance.items():
                if chance.get(name) is None:
                    chance[name] = c
        present |= set(values)
        label = group[0].name if by == "run" else _label(flt, group)
        flt = flt if by == "filter" else group[0].filter or "-"
        rows.append(LeaderRow(filter=flt, scale=scale, label=label, runs=done,
                              unfinished=[r for r in group if not r.finished], values=values))
    rows.sort(key=lambda r: (scale_order.index(r.scale) if r.scale in scale_order else len(scale_order), r.label))
    _unique_labels(rows)
    groups = [g for g in COLUMNS if g in present]
    tasks = [n for n in dc_order if n in present] + [n for n in others if n in present]
    for g in groups:
        members = [t.name for t in scored_tasks()] if g == "Average" else sorted(AGGREGATE_GROUPS[g])
        cs = [chance.get(n) for n in members]
        chance[g] = None if any(c is None for c in cs) else _mean(cs)
    return Leaderboard(rows=rows, groups=groups, tasks=tasks,
                       chance={c: chance.get(c) for c in groups + tasks}, by=by)


def _label(spec: str, runs: list[RunResults]) -> str:
    """A filter's short name: its runs' common name without "-seedN" (the demo's and a
    sweep's naming), else the spec itself or, if long, its filter's name."""
    stems = {_SEED_SUFFIX.sub("", r.name) for r in runs}
    if len(stems) == 1:
        return stems.pop()
    # else the spec, or its filter's name when long (tables print the whole spec below)
    return spec if len(spec) <= 16 else spec.split("(", 1)[0].strip()[:16]


def _unique_labels(rows: list[LeaderRow]) -> None:
    seen: dict[tuple, int] = {}
    for r in rows:
        key = (r.scale, r.label)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            r.label = f"{r.label} ({seen[key]})"


def leaderboard_csv(board: Leaderboard, per_task: bool = True) -> str:
    """One line per row: scale, filter, label, seeds, samples, then mean, std and n per column."""
    cols = board.columns(per_task)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["scale", "filter", "label", "seeds", "runs_not_finished", "train_samples",
                     *(f"{c} {k}" for c in cols for k in ("mean", "std", "n"))])
    writer.writerow(["", "chance", "", "", "", "", *(v for c in cols for v in (_blank(board.chance.get(c)), "", ""))])
    for r in board.rows:
        writer.writerow([r.scale or "", r.filter, r.label, " ".join(str(s) for s in r.seeds), len(r.unfinished),
                         _blank(r.train_samples),
                         *(v for c in cols for v in (_blank(r.mean(c)), _blank(r.std(c)), r.n(c)))])
    return buf.getvalue()


def _blank(v: Any) -> Any:
    return "" if v is None else v


def leaderboard_markdown(board: Leaderboard, per_task: bool = False) -> str:
    """The README's table: filter, samples, seeds, "mean±std" per column, then chance."""
    cols = board.columns(per_task)
    lines = ["| filter | scale | training samples | seeds | " + " | ".join(cols) + " |",
             "|" + "---|" * (4 + len(cols))]
    for r in board.rows:
        seeds = f"{len(r.runs)}" + (f" ({len(r.unfinished)} not finished)" if r.unfinished else "")
        samples = "-" if r.train_samples is None else f"{r.train_samples:,}"
        lines.append(f"| {r.label} | {r.scale or '-'} | {samples} | {seeds} | "
                     + " | ".join(r.cell(c) for c in cols) + " |")
    lines.append("| chance | | | | " + " | ".join(_chance_text(board.chance.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _chance_text(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


# -- the plot ------------------------------------------------------------------------

# One colour per filter, the same in every panel (matplotlib's tab10, then tab20).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94")


def plot_data(board: Leaderboard, columns: list[str] | None = None) -> list[dict]:
    """What the PNG draws, one panel per column: its chance score and, per row with a
    number, the bar (mean), error bar (sample std over seeds), n, scale and colour."""
    columns = board.columns() if columns is None else columns
    labels = list(dict.fromkeys(r.label for r in board.rows))
    colour = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    panels = []
    for c in columns:
        bars = [{"label": r.label, "filter": r.filter, "scale": r.scale, "mean": r.mean(c), "std": r.std(c),
                 "n": r.n(c), "color": colour[r.label]} for r in board.rows if r.n(c)]
        panels.append({"column": c, "chance": board.chance.get(c), "bars": bars})
    return panels


def plot_leaderboard(board: Leaderboard, path: str, columns: list[str] | None = None) -> None:
    """A PNG for a paper: a panel per group / task, a bar per filter (one colour per
    filter, the same in every panel; grouped by scale when there are several), error
    bars = sample std over seeds, a dashed line at the task's chance score."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = plot_data(board, columns)
    if not any(p["bars"] for p in panels):
        raise UserError(f"{path}: nothing to plot (no finished run has a result)")
    scales = board.scales
    nrows = -(-len(panels) // 4)
    ncols = -(-len(panels) // nrows)  # balanced: 5 panels are 3 + 2, not 4 + 1
    legend_in = 0.45  # inches below the panels for the legend
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows + legend_in), squeeze=False)
    labels = list(dict.fromkeys(r.label for r in board.rows))
    for i, (ax, panel) in enumerate(zip(axes.flat, panels)):
        width = 0.8 / max(len(labels), 1)
        for b in panel["bars"]:
            x = scales.index(b["scale"]) + (labels.index(b["label"]) - (len(labels) - 1) / 2) * width
            ax.bar(x, b["mean"], width=width * 0.9, color=b["color"],
                   yerr=b["std"] if b["n"] > 1 else None, capsize=3, error_kw={"elinewidth": 1})
        if panel["chance"] is not None:
            ax.axhline(panel["chance"], color="0.3", linestyle="--", linewidth=1)
        ax.set_title(panel["column"], fontsize=9)
        if len(scales) > 1:
            ax.set_xticks(range(len(scales)), [s or "?" for s in scales])
        else:
            ax.set_xticks([])
        ax.tick_params(labelsize=8)
        ax.set_ylim(bottom=0)
        ax.spines[["top", "right"]].set_visible(False)
        if i % ncols == 0:
            ax.set_ylabel("main metric", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = []
    for i, label in enumerate(labels):
        counts = sorted({len(r.runs) for r in board.rows if r.label == label})
        n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        handles.append(Patch(color=PALETTE[i % len(PALETTE)], label=f"{label} (n={n} seeds)"))
    handles.append(plt.Line2D([], [], color="0.3", linestyle="--", label="chance"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    height = 2.6 * nrows + legend_in
    fig.tight_layout(rect=(0, (legend_in + 0.2 * ((len(handles) - 1) // 5)) / height, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150)
    plt.close(fig)
    _write_bytes(path, buf.getvalue())


def _write_bytes(path: str, data: bytes) -> None:
    if is_remote(path):
        parent, name = path.rsplit("/", 1)
        DataFolder(parent).write_bytes(name, data)
    else:
        import os

        folder = DataFolder(os.path.dirname(os.path.abspath(path)))
        folder.write_bytes(os.path.basename(path), data)


# -- exports -------------------------------------------------------------------

def _extra_names(runs: list[RunResults]) -> list[str]:
    return sorted({n for r in runs for n in r.aggregate.extras})


def table_rows(runs: list[RunResults]) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) of the leaderboard: run, scale, filter, subset size, the
    five numbers (None = missing), the extra tasks, and what is missing."""
    extras = _extra_names(runs)
    header = ["run", "scale", "filter", "subset_size", *COLUMNS, *extras, "missing"]
    from dcslurm.core.scales import SCALES

    order = list(SCALES)
    rows = []
    for r in sorted(runs, key=lambda r: (order.index(r.scale) if r.scale in order else len(order), r.name)):
        rows.append([r.name, r.scale, r.filter, r.subset_size, *(r.aggregate.scores[c] for c in COLUMNS),
                     *(r.aggregate.extras.get(e) for e in extras), missing_text(r.aggregate)])
    return header, rows


def missing_text(agg: Aggregate) -> str:
    if not agg.missing:
        return ""
    shown = ", ".join(agg.missing[:3]) + (f", +{len(agg.missing) - 3} more" if len(agg.missing) > 3 else "")
    return f"{len(agg.missing)} of {agg.n_selected} missing: {shown}"


def to_json(runs: list[RunResults]) -> str:
    return json.dumps([r.to_dict() for r in runs], indent=1)


def to_csv(runs: list[RunResults]) -> str:
    header, rows = table_rows(runs)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def format_score(v: Any) -> str:
    if v is None:
        return "missing"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def to_markdown(runs: list[RunResults]) -> str:
    header, rows = table_rows(runs)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [format_score(v) if i >= 4 and i < len(row) - 1 else ("-" if v is None else str(v))
                 for i, v in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[RunResults], path: str, by: str = "filter", per_task: bool = False) -> None:
    """The leaderboard's PNG (plot_leaderboard) of gathered runs."""
    board = leaderboard(runs, by=by)
    plot_leaderboard(board, path, board.columns(per_task))
