"""A sweep: one pool and scale, a shared upstream (download, embed: done once), and N
branches (a filter x seeds), each filter -> reshard -> train -> eval.

    SWEEP/sweep.toml                 the resolved sweep (what was submitted)
    SWEEP/upstream/                  an ordinary run: the upstream stages
    SWEEP/runs/<branch>-seed<S>/     ordinary runs; the first seed filters and reshards,
                                     later seeds train + eval on its reshard folder

Every piece is an ordinary run folder with its own run.toml beside its plan, so
`dcslurm submit -c SWEEP/runs/X/run.toml` redoes one piece by hand and markers stay the
truth: a resubmitted sweep skips whatever is committed. Filter and reshard depend on
the filter only, not on the seed, hence one reshard per branch.

On SLURM every piece is queued at once: a branch's first jobs wait (afterok) on the
upstream's last jobs, a later seed's on its first seed's reshard. Their inputs do not
exist yet, so branches are planned over the inputs the upstream will write (see
_branch_inputs) and checked beforehand as one run with the upstream (check_sweep). The
local executor runs the pieces one after another.

The sweep file is a run.toml (the same sections, read by dcslurm.core.config) plus:

    [sweep]
    seeds = [0, 1]                   # each branch's seeds unless it names its own
    upstream = ["download", "embed"] # default: download (unless [pool] shards), embed if [stages.embed]

    [[branches]]
    name = "clip30"
    filter = "clip_score(score=clip_b32_similarity_score, fraction=0.3)"
    # seeds = [0, 1, 2]

[run] folder is the sweep folder; [run] stages and seed are the sweep's to set.
"""

from __future__ import annotations

import copy
import math
import re
import tomllib
from dataclasses import dataclass, field

from dcslurm.core.config import RunConfig, parse_config
from dcslurm.core.errors import ConfigError, UserError
from dcslurm.core.plan import PLAN_FILE, RUN_TOML, discover_inputs, read_plan
from dcslurm.core.plantypes import PlanInputs
from dcslurm.core.storage import DataFolder, join_url
from dcslurm.core.tables import load_dataclass, read_toml
from dcslurm.core.tomlfile import dumps

SWEEP_FILE = "sweep.toml"
WRITTEN_BY = "Written by dcslurm sweep."  # the head of the files write_sweep writes
UPSTREAM = "upstream"
UPSTREAM_STAGES = ("download", "embed")
DERIVED = "filter-derived"  # the branches' shared derived-column folder, in the upstream (else the sweep) folder
BRANCH_STAGES = ["filter", "reshard", "train", "eval"]
SEED_STAGES = ["train", "eval"]  # a later seed reuses its branch's reshard
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass
class SweepSection:
    seeds: list[int] = field(default_factory=lambda: [0])
    upstream: list[str] | None = None  # None: derived from [pool] and [stages.embed]

    def validate(self) -> None:
        _check_seeds(self.seeds)
        for s in self.upstream or []:
            if s not in UPSTREAM_STAGES:
                raise ValueError(f"upstream: {s!r} is not an upstream stage (choose from {', '.join(UPSTREAM_STAGES)})")


@dataclass
class BranchSection:
    name: str
    filter: str
    seeds: list[int] | None = None

    def validate(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"name: {self.name[:40]!r} is not a folder-safe name (letters, digits, '_', '-', '.'; "
                             "at most 64, not starting with '.' or '-')")
        if self.seeds is not None:
            _check_seeds(self.seeds)


def _check_seeds(seeds: list[int]) -> None:
    if not seeds:
        raise ValueError("seeds: needs at least one seed")
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError("seeds: expected distinct integers >= 0")


@dataclass
class Piece:
    """One run folder of the sweep."""

    name: str  # "upstream" or "<branch>-seed<S>"
    raw: dict  # its run.toml document
    config: RunConfig
    branch: str = ""  # "" for the upstream
    seed: int = 0
    first: bool = True  # a branch's first seed: it filters and reshards

    @property
    def folder(self) -> str:
        return self.config.run_url


@dataclass
class Sweep:
    path: str
    folder: str
    raw: dict  # the resolved sweep document (SWEEP/sweep.toml)
    upstream_stages: list[str]
    branches: list[BranchSection]
    upstream: Piece | None
    pieces: list[Piece]  # upstream first, then each branch's seeds in order
    storage_options: dict

    def branch_pieces(self, branch: str) -> list[Piece]:
        return [p for p in self.pieces if p.branch == branch]


# -- reading a sweep file ------------------------------------------------------

def load_sweep(path: str, executor: str | None = None) -> Sweep:
    return parse_sweep(read_toml(path, "sweep file"), path, executor=executor)


def read_sweep(sweep_url: str, storage_options: dict | None = None) -> Sweep:
    """The sweep a sweep folder was submitted with (its SWEEP/sweep.toml)."""
    folder = DataFolder(sweep_url, storage_options)
    if not folder.exists(SWEEP_FILE):
        raise UserError(f"{folder.url}: not a dcslurm sweep folder (no {SWEEP_FILE}); submit a sweep first")
    try:
        raw = tomllib.loads(folder.read_text(SWEEP_FILE))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{folder.url_of(SWEEP_FILE)}: not valid TOML ({exc})") from None
    return parse_sweep(raw, folder.url_of(SWEEP_FILE))


def parse_sweep(raw: dict, path: str, executor: str | None = None) -> Sweep:
    """Validate a sweep document into its pieces' configs (no I/O: check_sweep does that)."""
    name = path.rsplit("/", 1)[-1]
    raw = copy.deepcopy(raw)
    section = load_dataclass(SweepSection, raw.pop("sweep", {}), f"{name}: [sweep]")
    tables = raw.pop("branches", None)
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{name}: no [[branches]]: a sweep needs at least one branch (name, filter)")
    branches = [load_dataclass(BranchSection, t, f"{name}: [[branches]] #{i + 1}") for i, t in enumerate(tables)]
    seen: dict[str, int] = {}
    for i, b in enumerate(branches):
        if b.name in seen:
            raise ConfigError(f"{name}: [[branches]] #{i + 1} name: {b.name!r} is also branch #{seen[b.name] + 1}'s")
        seen[b.name] = i
        b.seeds = list(b.seeds if b.seeds is not None else section.seeds)
    run = raw.get("run")
    if not isinstance(run, dict):
        raise ConfigError(f"{name}: missing section [run] (folder = the sweep folder, scale)")
    for key in ("stages", "seed"):
        if key in run:
            raise ConfigError(f"{name}: [run] {key}: set by the sweep ([sweep] seeds, [[branches]]); remove it")
    stage_tables = raw.get("stages", {})
    if isinstance(stage_tables, dict) and isinstance(stage_tables.get("filter"), dict) \
            and "spec" in stage_tables["filter"]:
        raise ConfigError(f"{name}: [stages.filter] spec: each [[branches]] filter sets it; remove it")
    # The shared sections, validated (and paths resolved) once by the run loader.
    shared = parse_config({**raw, "run": {**run, "stages": []}}, path, executor=executor)
    folder = shared.run_url
    upstream_stages = section.upstream
    if upstream_stages is None:
        upstream_stages = ([] if shared.pool.shards else ["download"]) + \
            (["embed"] if isinstance(stage_tables, dict) and "embed" in stage_tables else [])
    upstream_stages = [s for s in UPSTREAM_STAGES if s in upstream_stages]
    if "download" in upstream_stages and not shared.pool.metadata:
        raise ConfigError(f"{name}: [pool] metadata: the upstream downloads the pool: set it")
    if "download" not in upstream_stages and not shared.pool.shards:
        raise ConfigError(f"{name}: [pool] shards: without the download stage upstream the branches need "
                          "the pool's shards")

    # The resolved document: absolute paths, every default spelled out.
    resolved = copy.deepcopy(raw)
    resolved["run"] = {**run, "folder": folder}
    resolved["pool"] = {k: v for k, v in (("metadata", shared.pool.metadata), ("shards", shared.pool.shards)) if v}
    resolved["executor"] = {**raw.get("executor", {}), "kind": shared.executor.kind}
    if shared.executor.log_dir:
        resolved["executor"]["log_dir"] = shared.executor.log_dir
    resolved["sweep"] = {"seeds": section.seeds, "upstream": upstream_stages}
    resolved["branches"] = [{"name": b.name, "filter": b.filter, "seeds": b.seeds} for b in branches]

    run_name = run.get("name") or folder.rstrip("/").rsplit("/", 1)[-1] or "sweep"
    upstream_url = join_url(folder, UPSTREAM)

    def piece_raw(piece: str, url: str, stages: list[str], seed: int, pool: dict, extra: dict) -> dict:
        doc = {k: copy.deepcopy(v) for k, v in resolved.items() if k not in ("sweep", "branches", "stages", "pool")}
        doc["run"] = {**resolved["run"], "folder": url, "name": f"{run_name}.{piece}", "stages": stages,
                      "seed": seed}
        if shared.executor.log_dir:  # one folder per piece: local task logs are named by step and index
            doc["executor"]["log_dir"] = join_url(shared.executor.log_dir, piece)
        if pool:
            doc["pool"] = pool
        tables = {s: copy.deepcopy(t) for s, t in (stage_tables or {}).items() if s in stages or s in extra}
        for s, values in extra.items():
            tables[s] = {**tables.get(s, {}), **values}
        if tables:
            doc["stages"] = tables
        return doc

    def make(piece: str, doc: dict, where: str, **kw) -> Piece:
        try:
            cfg = parse_config(doc, join_url(doc["run"]["folder"], RUN_TOML))
        except ConfigError as exc:  # name the sweep file and the branch, not the piece's run.toml
            raise ConfigError(f"{name}: {where}: {str(exc).removeprefix(RUN_TOML + ': ')}") from None
        return Piece(piece, doc, cfg, **kw)

    pieces: list[Piece] = []
    upstream = None
    if upstream_stages:
        upstream = make(UPSTREAM, piece_raw(UPSTREAM, upstream_url, upstream_stages, 0, resolved["pool"], {}),
                        "the upstream")
        pieces.append(upstream)
    branch_pool = {
        "metadata": join_url(upstream_url, "embed") if "embed" in upstream_stages else shared.pool.metadata,
        "shards": join_url(upstream_url, "download") if "download" in upstream_stages else shared.pool.shards,
    }
    branch_pool = {k: v for k, v in branch_pool.items() if v}
    # One derived-column folder for every branch's filter (language ID, caption lengths, ... of the
    # pool: computed by the first filter that needs a row, read by the others), unless the file sets one.
    filter_table = stage_tables.get("filter") if isinstance(stage_tables, dict) else None
    derived_cache = (filter_table or {}).get("derived_cache") or join_url(upstream_url if upstream_stages else folder,
                                                                          DERIVED)
    for n, b in enumerate(branches):
        first_url = ""
        for i, seed in enumerate(b.seeds):
            piece = f"{b.name}-seed{seed}"
            url = join_url(folder, "runs", piece)
            if i == 0:
                first_url = url
                doc = piece_raw(piece, url, BRANCH_STAGES, seed, branch_pool,
                                {"filter": {"spec": b.filter, "derived_cache": derived_cache}})
            else:
                # [stages.filter] is not run here: it names the data's filter in `dcslurm results`.
                doc = piece_raw(piece, url, SEED_STAGES, seed, {},
                                {"filter": {"spec": b.filter}, "train": {"data": join_url(first_url, "reshard")}})
            pieces.append(make(piece, doc, f"[[branches]] #{n + 1} ({b.name})", branch=b.name, seed=seed,
                               first=i == 0))
    return Sweep(path=path, folder=folder, raw=resolved, upstream_stages=upstream_stages, branches=branches,
                 upstream=upstream, pieces=pieces, storage_options=shared.storage_options)


# -- checking and planning ---------------------------------------------------------

def check_sweep(sweep: Sweep) -> None:
    """Every input check, before anything is queued: the upstream's own, and each
    branch's as one run with the upstream (so the filter is checked against what the
    upstream's embed writes, the pool's columns, the eval sets, ...)."""
    from dcslurm.core.runs import plan_run, preflight_run
    from dcslurm.core.stages import get_stage

    if sweep.upstream is not None:
        preflight_run(sweep.upstream.config, plan_run(sweep.upstream.config))
    for b in sweep.branches:
        first = sweep.branch_pieces(b.name)[0]
        doc = copy.deepcopy(first.raw)
        doc["run"]["stages"] = [*sweep.upstream_stages, *BRANCH_STAGES]
        doc["pool"] = sweep.raw["pool"]
        if sweep.upstream is not None:
            for s, t in (sweep.upstream.raw.get("stages") or {}).items():
                doc.setdefault("stages", {})[s] = t
        whole = parse_config(doc, first.config.path)
        plan = plan_run(whole)
        for stage in dict.fromkeys(s.stage for s in plan.steps if s.stage in BRANCH_STAGES):
            check = get_stage(stage).preflight
            if check is not None:
                check(whole)


def upstream_complete(sweep: Sweep) -> bool:
    """Every task of the upstream's plan is committed (its outputs can be listed)."""
    from dcslurm.core.runs import pending_tasks

    if sweep.upstream is None:
        return True
    run = sweep.upstream.config.folder()
    if not run.exists(PLAN_FILE):
        return False
    return not any(pending_tasks(run, read_plan(run)).values())


def branch_inputs(sweep: Sweep) -> PlanInputs:
    """What a branch's first seed will read once the upstream ran: the shards download
    writes (img2dataset numbers them over the pool's files in order, ceil(rows /
    samples_per_shard) each: jobs/download/stage.py) and embed's {stem}.parquet of each.
    The same URLs a listing of the finished upstream gives (the slow test checks it),
    so the plan's unit digests do not change when the branch is resubmitted later."""

    up = sweep.upstream
    pool_cfg = parse_config({**{k: v for k, v in sweep.raw.items() if k not in ("sweep", "branches")},
                             "run": {**sweep.raw["run"], "stages": []}}, sweep.path)
    pool = discover_inputs(pool_cfg)
    if "download" in sweep.upstream_stages:
        from dcslurm.datacomp.pool import read_footer

        sps = up.config.stages["download"].params.samples_per_shard
        meta = pool_cfg.folder(pool_cfg.pool.metadata)
        count = sum(math.ceil(read_footer(meta, u.rsplit("/", 1)[-1]).rows / sps) for u in pool.metadata_files)
        from dcslurm.core.shards import UnitSet

        download = join_url(up.folder, "download")
        shards = UnitSet(count=count, names=tuple(join_url(download, f"{i:08d}.tar") for i in range(count)),
                         label="shards")
    else:
        shards = pool.shards
    metadata = pool.metadata_files
    if "embed" in sweep.upstream_stages:
        embed = join_url(up.folder, "embed")
        stems = [shards.name(i).rsplit("/", 1)[-1].rsplit(".tar", 1)[0] for i in range(shards.count)]
        metadata = tuple(join_url(embed, f"{s}.parquet") for s in sorted(stems))
    return PlanInputs(metadata_files=metadata, shards=shards, pool_rows=pool.pool_rows)


@dataclass
class PiecePlan:
    piece: Piece
    plan: object  # dcslurm.core.plan.Plan
    waits_for: str  # the piece it waits for ("" = none)


def plan_sweep(sweep: Sweep) -> list[PiecePlan]:
    """Each piece's plan, over the inputs it will have (nothing is written)."""
    from dcslurm.core.runs import plan_run

    ready = upstream_complete(sweep)
    inputs = None if ready else branch_inputs(sweep)
    out = []
    for p in sweep.pieces:
        if p.branch == "":
            out.append(PiecePlan(p, plan_run(p.config), ""))
        elif p.first:
            out.append(PiecePlan(p, plan_run(p.config, inputs), UPSTREAM if sweep.upstream else ""))
        else:
            out.append(PiecePlan(p, plan_run(p.config, PlanInputs()), sweep.branch_pieces(p.branch)[0].name))
    return out


# -- submitting -----------------------------------------------------------------------

@dataclass
class PieceResult:
    piece: str
    jobs: list[str] = field(default_factory=list)  # SLURM job ids queued
    failed: dict[str, list[int]] = field(default_factory=dict)  # local: failed tasks per step
    skipped: str = ""  # why it did not run (local: a piece it needs failed)


def write_sweep(sweep: Sweep) -> None:
    """SWEEP/sweep.toml and each piece's run.toml (read by `dcslurm submit -c` by hand)."""
    DataFolder(sweep.folder, sweep.storage_options).write_text(SWEEP_FILE, dumps(sweep.raw, WRITTEN_BY))
    for p in sweep.pieces:
        p.config.folder().write_text(RUN_TOML, dumps(p.raw, WRITTEN_BY))


def submit_sweep(sweep: Sweep, progress=None, log=print) -> list[PieceResult]:
    """Check everything, write the configs, then queue (SLURM) or run (local) every piece."""
    from dcslurm.core.runs import submit_run

    check_sweep(sweep)
    plan_sweep(sweep)  # every piece plans before anything is queued
    write_sweep(sweep)
    from dcslurm.core.executors import queues_jobs

    slurm = queues_jobs(sweep.pieces[0].config)  # a scheduler runs the pieces: chain them with afterok
    results: list[PieceResult] = []
    up_jobs: list[str] = []
    up_failed = False
    if sweep.upstream is not None:
        log(f"{UPSTREAM}: dcslurm submit -c {sweep.upstream.config.path}")
        r = submit_run(sweep.upstream.config, progress=progress)
        up_jobs = _last_jobs(r, r.plan.steps[-1].stage) if slurm else []
        up_failed = bool(r.failed)
        results.append(PieceResult(UPSTREAM, r.submission.job_ids() if slurm else [], r.failed))
    inputs = branch_inputs(sweep) if slurm and not upstream_complete(sweep) else None
    for b in sweep.branches:
        first_jobs: list[str] = []
        first_failed = up_failed
        for p in sweep.branch_pieces(b.name):
            if first_failed:
                what = UPSTREAM if up_failed else b.name + " first seed"
                results.append(PieceResult(p.name, skipped=f"{what} failed"))
                continue
            log(f"{p.name}: dcslurm submit -c {p.config.path}")
            if p.first:
                after = up_jobs
                r = submit_run(p.config, progress=progress, after=after or None,
                               inputs=inputs if after else None, checks=not after)
                first_jobs = _last_jobs(r, "reshard") if slurm else []
                first_failed = bool(r.failed) and not _has_markers(p, "reshard", r)
            else:
                r = submit_run(p.config, progress=progress, after=first_jobs or None, checks=not first_jobs)
            results.append(PieceResult(p.name, r.submission.job_ids() if slurm else [], r.failed))
    return results


def _last_jobs(result, stage: str) -> list[str]:
    """Job ids of the last step of `stage` this submission queued (none: it is committed)."""
    steps = [s.name for s in result.plan.steps if s.stage == stage]
    sub = result.submission.steps.get(steps[-1]) if steps else None
    return [c.job_id for c in sub.chunks if c.job_id] if sub is not None else []


def _has_markers(piece: Piece, stage: str, result) -> bool:
    """The first seed's `stage` committed every task (its later seeds can still run)."""
    from dcslurm.core.runs import pending_tasks

    pending = pending_tasks(piece.config.folder(), result.plan)
    return not any(v for name, v in pending.items() if result.plan.step(name).stage == stage)


# -- status and cancel --------------------------------------------------------------

@dataclass
class PieceStatus:
    piece: str
    folder: str
    state: str  # done | failed | running | pending | not started | not submitted | unknown
    done: int = 0
    tasks: int = 0
    failed_steps: list[str] = field(default_factory=list)


def sweep_status(sweep_url: str, storage_options: dict | None = None) -> list[PieceStatus]:
    from dcslurm.core.runs import run_status

    sweep = read_sweep(sweep_url, storage_options)
    out = []
    for p in sweep.pieces:
        if not p.config.folder().exists(PLAN_FILE):
            out.append(PieceStatus(p.name, p.folder, "not submitted"))
            continue
        _plan, steps = run_status(p.folder, p.config.storage_options, p.config, with_logs=False)
        total = {k: sum(s.counts.get(k, 0) for s in steps) for k in
                 ("done", "running", "pending", "failed", "not started", "unknown")}
        tasks = sum(s.n_tasks for s in steps)
        state = next((k for k in ("failed", "running", "pending", "unknown") if total[k]), None)
        if state is None:
            state = "done" if total["done"] == tasks else "not started"
        out.append(PieceStatus(p.name, p.folder, state, total["done"], tasks,
                               [s.name for s in steps if s.counts.get("failed")]))
    return out


def cancel_sweep(sweep_url: str, storage_options: dict | None = None) -> dict[str, list[str]]:
    """Cancel every piece's queued and running jobs: piece -> what was cancelled."""
    from dcslurm.core.runs import cancel_run

    sweep = read_sweep(sweep_url, storage_options)
    out = {}
    # Later pieces first: their jobs wait on earlier ones, so none starts while we go.
    for p in reversed(sweep.pieces):
        if p.config.folder().exists(PLAN_FILE):
            cancelled = cancel_run(p.folder, p.config.storage_options)
            if cancelled:
                out[p.name] = cancelled
    return out
