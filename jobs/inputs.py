"""Where a stage's inputs come from, shared by the stage specs (plan time, no I/O):
an earlier stage of the same run, or what the config's [pool] names."""

from __future__ import annotations

from dcslurm.core.errors import UserError
from dcslurm.core.shards import UnitSet
from dcslurm.core.stages import PlanContext


def shard_units(ctx: PlanContext) -> UnitSet:
    """Webdataset shards: the download stage's outputs when it is in the run,
    else the pool's own shards ([pool] shards)."""
    up = ctx.steps.get("download")
    if up is not None:
        return UnitSet(count=up.n_tasks, upstream="download", label="download tasks")
    if ctx.inputs.shards is not None:
        return ctx.inputs.shards
    raise UserError(f"{ctx.config.path}: no image shards: add the download stage or set [pool] shards")


def metadata_units(ctx: PlanContext) -> UnitSet:
    """Metadata parquet files (with .npz embeddings beside them): the embed
    stage's outputs when it is in the run, else the pool's ([pool] metadata)."""
    up = ctx.steps.get("embed")
    if up is not None:
        return UnitSet(count=up.n_tasks, upstream="embed", label="embed tasks")
    if ctx.inputs.metadata_files:
        return UnitSet(count=len(ctx.inputs.metadata_files), names=ctx.inputs.metadata_files, label="parquet files")
    raise UserError(f"{ctx.config.path}: no metadata: add the embed stage or set [pool] metadata")


def filter_in_run(steps) -> bool:
    """True when the filter stage is planned in this run (its subset.npy is then the subset)."""
    return any(s.stage == "filter" for s in steps)


def check_subset_source(ctx: PlanContext, stage: str) -> None:
    """A stage reading a subset takes it from the filter stage in the same run or
    from its `subset` param: exactly one of the two."""
    in_run = filter_in_run(ctx.steps.values())
    if in_run and ctx.params.subset:
        raise UserError(f"{ctx.config.path}: [stages.{stage}] subset: the filter stage is in this run and writes "
                        "the subset; remove `subset` or the filter stage")
    if not in_run and not ctx.params.subset:
        raise UserError(f"{ctx.config.path}: [stages.{stage}] subset: no subset: set `subset` to a .npy URL "
                        "or add the filter stage to the run")
