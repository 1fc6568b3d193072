"""The filter stage's step functions: thin wrappers that hand engine.py its inputs."""

from __future__ import annotations

from dcslurm.core.task import TaskContext, TaskResult
from jobs.filter import engine
from jobs.filter.filterspec import parse_spec


def _inputs(ctx: TaskContext, units) -> list[engine.InputFile]:
    """The metadata parquet files of `units`, each named by its position in the whole pool."""
    unitset = ctx.step.units
    out = []
    for i in units:
        if unitset.upstream is not None:
            urls = [u for u in ctx.upstream_outputs(unitset.upstream, [i]) if u.endswith(".parquet")]
            out.extend(engine.InputFile(f"{i:08d}-{j:04d}", u) for j, u in enumerate(urls))
        else:
            out.append(engine.InputFile(f"{i:08d}", unitset.name(i)))
    return out


def _all(ctx: TaskContext) -> list[engine.InputFile]:
    return _inputs(ctx, range(ctx.step.units.count))


def _spec(ctx: TaskContext):
    return parse_spec(ctx.params.spec)


def _reader(ctx: TaskContext) -> engine.Reader:
    # derived columns: [stages.filter] derived_cache (a sweep sets its upstream's), else RUN/filter/_derived
    cache = ctx.params.derived_cache or ctx.output.url_of(engine.DERIVED)
    return engine.Reader(ctx.plan.storage_options, cache, ctx.params.lid_model)


def _rel(ctx: TaskContext, rel: str) -> str:
    return f"{ctx.step.stage}/{rel}"


def prepare(ctx: TaskContext) -> TaskResult:
    stats = engine.prepare(_spec(ctx), _all(ctx), ctx.output, _reader(ctx), ctx.seed)
    return TaskResult(outputs=[_rel(ctx, f"_prepared/{k}.npz") for k in stats], stats=stats)


def map_files(ctx: TaskContext) -> TaskResult:
    spec, reader = _spec(ctx), _reader(ctx)
    files = _inputs(ctx, ctx.shards)
    totals = {"files": len(files), "rows": 0, "null_text": 0, "derived": engine.add_counts([])}
    for f in files:
        s = engine.map_file(spec, f, ctx.output, reader)
        totals["rows"] += s["rows"]
        totals["null_text"] += s.get("null_text", 0)
        totals["derived"] = engine.add_counts([totals["derived"], s.get("derived") or {}])
    return TaskResult(outputs=[_rel(ctx, f"{d}/{f.pid}.{ext}") for f in files
                               for d, ext in (("_parts", "npz"), ("_uids", "npy"))], stats=totals)


def reduce(ctx: TaskContext) -> TaskResult:
    params = engine.reduce(_spec(ctx), _all(ctx), ctx.output, _reader(ctx), ctx.seed, ctx.scratch)
    return TaskResult(outputs=[_rel(ctx, engine.PARAMS)], stats=engine.json_safe(params))


def apply(ctx: TaskContext) -> TaskResult:
    spec, reader = _spec(ctx), _reader(ctx)
    params = ctx.output.read_json(engine.PARAMS)
    files = _inputs(ctx, ctx.shards)
    totals: dict = {"files": len(files), "rows": 0, "kept": 0, "null_text": 0, "term_kept": {},
                    "derived": engine.add_counts([])}
    for f in files:
        s = engine.apply_file(spec, f, ctx.output, reader, params, ctx.seed)
        totals["derived"] = engine.add_counts([totals["derived"], s["derived"]])
        totals["rows"] += s["rows"]
        totals["kept"] += s["kept"]
        totals["null_text"] += s["null_text"]
        for k, v in s["term_kept"].items():
            totals["term_kept"][k] = totals["term_kept"].get(k, 0) + v
    return TaskResult(outputs=[_rel(ctx, f"_kept/{f.pid}.npy") for f in files], stats=totals)


def write(ctx: TaskContext) -> TaskResult:
    spec, files = _spec(ctx), _all(ctx)
    total = engine.write_subset(files, ctx.output, ctx.output)
    stage = ctx.step.stage
    stats = engine.summary(spec, ctx.upstream_stats(f"{stage}.apply"),
                           [{"rows": s["rows"], "null_text": s["null_text"], "derived": s.get("derived")}
                            for s in ctx.upstream_stats(f"{stage}.map")],
                           ctx.output.read_json(engine.PARAMS), ctx.seed)
    stats = engine.json_safe(stats)
    assert stats["kept_rows"] == total
    ctx.output.write_json(engine.STATS, stats)
    return TaskResult(outputs=[_rel(ctx, engine.SUBSET), _rel(ctx, engine.STATS)],
                      stats={"kept_rows": total, "input_rows": stats["input_rows"]})
