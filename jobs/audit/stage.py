"""The audit stages' step functions: thin wrappers handing filteraudit.py / bias.py their inputs."""

from __future__ import annotations

from dcslurm.core.task import TaskContext, TaskResult
from jobs.audit import bias, filteraudit
from jobs.audit.groups import load_groups
from jobs.filter.stage import _inputs as metadata_inputs  # parquet units named by pool position, as the filter does
from jobs.reshard.stage import load_run_subset


def _groups(ctx: TaskContext):
    return load_groups(ctx.params.groups, ctx.params.columns)


def _rel(ctx: TaskContext, rel: str) -> str:
    return f"{ctx.step.stage}/{rel}"


# -- filter audit ---------------------------------------------------------------

def count(ctx: TaskContext) -> TaskResult:
    """Per metadata file of this task: raw and kept rows per group -> _counts/PID.json."""
    subset, cfg = load_run_subset(ctx), _groups(ctx)
    files = metadata_inputs(ctx, ctx.shards)
    totals = {"files": len(files), "rows": 0, "kept": 0}
    for f in files:
        c = filteraudit.map_file(f, subset, cfg, ctx.output, ctx.plan.storage_options)
        totals["rows"] += c["rows"]
        totals["kept"] += c["kept"]
    return TaskResult(outputs=[_rel(ctx, f"{filteraudit.COUNTS_DIR}/{f.pid}.json") for f in files], stats=totals)


def report(ctx: TaskContext) -> TaskResult:
    """Sum the counts; report.md, report.csv, report.json and the charts in RUN/audit/."""
    files = metadata_inputs(ctx, range(ctx.step.units.count))
    rep = filteraudit.reduce_counts(files, ctx.output, _groups(ctx), ctx.params.alpha,
                                    ctx.params.rare_share)
    names = filteraudit.write_report(rep, ctx.output)
    flagged = [f"{r['dimension']}/{r['group']}" for r in rep["groups"] if r["exclusion_amplification"]]
    return TaskResult(outputs=[_rel(ctx, n) for n in names],
                      stats={"rows": rep["rows_raw"], "kept": rep["rows_kept"], "flagged": flagged})


# -- bias probe -----------------------------------------------------------------

def run_sources(ctx: TaskContext) -> list[dict]:
    """The default sources: the run's metadata (embed outputs, else the [pool] metadata folder) as "pool",
    and the same restricted to RUN/filter/subset.npy as "kept"."""
    embed = next((s for s in ctx.plan.steps if s.stage == "embed"), None)
    if embed is not None:
        metadata = ctx.run.url_of("embed")
    else:
        up = next(s for s in ctx.plan.steps if s.stage == "filter" and s.units.names)
        metadata = up.units.names[0].rstrip("/").rsplit("/", 1)[0]  # the pool folder the planner listed
    return [{"name": "pool", "metadata": metadata},
            {"name": "kept", "metadata": metadata, "subset": ctx.run.url_of("filter/subset.npy")}]


def _bias_setup(ctx: TaskContext):
    p = ctx.params
    sources = bias.sources_from(p.sources or run_sources(ctx))
    options = ctx.plan.storage_options
    features = list(p.features)
    return sources, options, features, p.samples


def bias_sample(ctx: TaskContext) -> TaskResult:
    sources, options, features, samples = _bias_setup(ctx)
    files = bias.task_share(bias.metadata_files(sources, options), ctx.n_tasks, ctx.index)
    stats = bias.sample_task(sources, files, samples, ctx.seed, ctx.params.model, features,
                             ctx.output, ctx.scratch, options)
    return TaskResult(outputs=[_rel(ctx, f"{bias.CANDIDATES}/{s:03d}-{f.pid}.npz") for s, f in files], stats=stats)


def bias_images(ctx: TaskContext) -> TaskResult:
    sources, options, features, samples = _bias_setup(ctx)
    transforms = [f for f in features if f in bias.TRANSFORMS]
    tars = bias.task_share(bias.shard_files(sources, options), ctx.n_tasks, ctx.index) if transforms else []
    stats = bias.images_task(sources, bias.metadata_files(sources, options), tars, samples, transforms, ctx.output,
                             ctx.scratch, options)
    return TaskResult(outputs=[_rel(ctx, f"{bias.IMAGES}/{s:03d}-{pid}.npz") for s, pid, _ in tars], stats=stats)


def bias_probe(ctx: TaskContext) -> TaskResult:
    sources, options, features, samples = _bias_setup(ctx)
    transforms = [f for f in features if f in bias.TRANSFORMS]
    tars = bias.shard_files(sources, options) if transforms else []
    rep = bias.probe(sources, bias.metadata_files(sources, options), tars, samples, features,
                     ctx.params.test_fraction, ctx.seed, ctx.output)
    names = bias.write_report(rep, ctx.output)
    return TaskResult(outputs=[_rel(ctx, n) for n in names],
                      stats={f: r.get("accuracy") for f, r in rep["features"].items()})
