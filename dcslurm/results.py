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
from dataclasses import dataclass, field
from typing import Any

from dcslurm.errors import StorageError, UserError
from dcslurm.storage import DataFolder, is_remote
from dcslurm.tasks import AGGREGATE_GROUPS, datacomp_tasks, scored_tasks

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
    missing: list[str]  # scored tasks (names) with no result
    n_scored: int  # how many of the 38 have a result
    extras: dict[str, float] = field(default_factory=dict)  # registered extra tasks' main metrics

    def to_dict(self) -> dict:
        return {"scores": self.scores, "missing": self.missing, "n_scored": self.n_scored, "extras": self.extras}


def aggregate(records: dict[str, dict]) -> Aggregate:
    """DataComp's aggregate of one run's results (see the module docstring)."""
    values = main_metrics(records)
    scored_names = [t.name for t in scored_tasks()]
    missing = [n for n in scored_names if n not in values]
    scores: dict[str, float | None] = {}
    for group, names in AGGREGATE_GROUPS.items():
        scores[group] = None if any(n not in values for n in names) else _mean(values[n] for n in names)
    scores["Average"] = None if missing else _mean(values[n] for n in scored_names)
    # Anything not one of DataComp's 40 (e.g. the demo's tiny sets) is reported beside
    # the aggregates; it need not be registered in this process.
    datacomp_names = {t.name for t in datacomp_tasks().values()}
    extras = {n: v for n, v in values.items() if n not in datacomp_names}
    return Aggregate(scores=scores, missing=missing, n_scored=len(scored_names) - len(missing), extras=extras)


def _mean(xs) -> float:
    xs = list(xs)
    return math.fsum(xs) / len(xs)


# -- run folders ------------------------------------------------------------

@dataclass
class RunResults:
    """One run's results and what describes it in a leaderboard."""

    url: str  # the run folder (or the results file itself)
    name: str
    scale: str | None
    filter: str | None
    subset_size: int | None
    records: dict[str, dict]
    aggregate: Aggregate

    def to_dict(self) -> dict:
        return {"run": self.name, "url": self.url, "scale": self.scale, "filter": self.filter,
                "subset_size": self.subset_size, **self.aggregate.to_dict(),
                "tasks": {n: r["metrics"].get("main_metric") for n, r in self.records.items()}}


def _describe_run(run: DataFolder) -> tuple[str, str | None, str | None, int | None]:
    """(name, scale, filter, subset size) from the run folder's plan and stats."""
    name = posixpath.basename(run.url.rstrip("/"))
    scale = filter_name = None
    subset_size = None
    if run.exists("plan.json"):
        plan = run.read_json("plan.json")
        name = plan.get("run_name") or name
        scale = plan.get("scale")
        params = plan.get("stage_params") or {}
        filter_name = _filter_name(params)
    # The subset's size: the filter stage's kept rows (repeats counted), else what
    # the reshard stage wrote (a run that reshards a given subset file).
    for rel, key in (("filter/stats.json", "kept_rows"), ("reshard/stats.json", "samples_written")):
        if subset_size is None and run.exists(rel):
            subset_size = _first_int(run.read_json(rel), (key,))
    return name, scale, filter_name, subset_size


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


def read_run(run: DataFolder) -> RunResults:
    """The results of one run folder (RUN/eval/results.jsonl must exist)."""
    text = run.read_text(RESULTS_FILE)
    records = parse_results(text, run.url_of(RESULTS_FILE))
    name, scale, filter_name, subset_size = _describe_run(run)
    return RunResults(url=run.url, name=name, scale=scale, filter=filter_name, subset_size=subset_size,
                      records=records, aggregate=aggregate(records))


def gather(urls: list[str], storage_options: dict | None = None, max_depth: int = 2) -> list[RunResults]:
    """Every run with results under `urls`: a URL may be a run folder, a folder of
    run folders (searched `max_depth` levels down), or a results .jsonl file."""
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
        _collect(DataFolder(url, storage_options), max_depth, runs)
        if len(runs) == found_before:
            raise UserError(f"{url}: no {RESULTS_FILE} in this folder or its sub-folders (depth {max_depth})")
    return runs


def _collect(folder: DataFolder, depth: int, out: list[RunResults]) -> None:
    if folder.exists(RESULTS_FILE):
        out.append(read_run(folder))
        return
    if depth <= 0:
        return
    for sub in _subfolders(folder):
        _collect(folder.child(sub), depth - 1, out)


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


# -- exports -------------------------------------------------------------------

def _extra_names(runs: list[RunResults]) -> list[str]:
    return sorted({n for r in runs for n in r.aggregate.extras})


def table_rows(runs: list[RunResults]) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) of the leaderboard: run, scale, filter, subset size, the
    five numbers (None = missing), the extra tasks, and what is missing."""
    extras = _extra_names(runs)
    header = ["run", "scale", "filter", "subset_size", *COLUMNS, *extras, "missing"]
    from dcslurm.scales import SCALES

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
    return f"{len(agg.missing)} of 38 missing: {shown}"


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


def plot(runs: list[RunResults], path: str) -> None:
    """A PNG: left, the 38-task average against scale, one line per filter;
    right, the five numbers per run as grouped bars (missing ones left out)."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dcslurm.scales import SCALES

    scale_order = list(SCALES)
    fig, (ax_line, ax_bars) = plt.subplots(1, 2, figsize=(13, 4.8))
    by_filter: dict[str, list[tuple[int, float]]] = {}
    for r in runs:
        avg = r.aggregate.scores["Average"]
        if avg is not None and r.scale in scale_order:
            by_filter.setdefault(r.filter or "-", []).append((scale_order.index(r.scale), avg))
    for name, points in sorted(by_filter.items()):
        points.sort()
        ax_line.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax_line.set_xticks(range(len(scale_order)), scale_order)
    ax_line.set_xlabel("scale")
    ax_line.set_ylabel("average over 38 tasks")
    ax_line.set_title("Average vs scale" if by_filter else "Average vs scale (no run has all 38 tasks)")
    if by_filter:
        ax_line.legend(fontsize=8)
    width = 0.8 / max(len(runs), 1)
    for i, r in enumerate(runs):
        xs = [j + i * width for j, c in enumerate(COLUMNS) if r.aggregate.scores[c] is not None]
        ys = [r.aggregate.scores[c] for c in COLUMNS if r.aggregate.scores[c] is not None]
        ax_bars.bar(xs, ys, width=width, label=f"{r.name} ({r.scale or '?'})")
        for j, c in enumerate(COLUMNS):  # a missing number is labelled, never drawn as zero
            if r.aggregate.scores[c] is None:
                ax_bars.text(j + i * width, 0, "missing", rotation=90, ha="center", va="bottom", fontsize=7)
    ax_bars.set_xticks([j + 0.4 - width / 2 for j in range(len(COLUMNS))], COLUMNS, rotation=15, fontsize=8)
    ax_bars.set_title("Per group")
    ax_bars.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    if is_remote(path):
        parent, name = path.rsplit("/", 1)
        DataFolder(parent).write_bytes(name, buf.getvalue())
    else:
        import os

        folder = DataFolder(os.path.dirname(os.path.abspath(path)))
        folder.write_bytes(os.path.basename(path), buf.getvalue())
