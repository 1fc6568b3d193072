"""Reshard: write a subset of the image shards as new training shards.

Four steps, because output shard ids must be global and independent of how
the work is split:

  reshard.count    array over the input shards: per shard, how many samples
                   the subset keeps (sum of each uid's multiplicity), and where
                   each kept sample's members lie in its tar (_counts/*.npz);
  reshard.index    one task: the global order of the kept samples (input
                   shard starts), the number of output shards, uids found/missing;
  reshard.write    array over `tasks` parts: part p writes output shards
                   split_evenly(n_shards, tasks, p), shard s holding global
                   samples [s * samples_per_shard, (s + 1) * samples_per_shard),
                   copied from the spans count recorded (no second walk);
  reshard.finalize one task: sizes.json (the size table training reads) and stats.json.

Inputs: shard_units (download outputs or [pool] shards) and the subset:
RUN/filter/subset.npy when the filter stage is in the run, else params `subset`.
Outputs: RUN/reshard/{shard:08d}.tar, {shard:08d}_stats.json, sizes.json, stats.json.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcslurm.shards import UnitSet
from dcslurm.stages import Estimate, PlanContext, StageSpec, StepSpec, check_subset_source, shard_units

BYTES_PER_SAMPLE = 35_000  # DataComp: about 35 KB a sample (jpg + txt + json)


@dataclass
class ReshardParams:
    subset: str = ""  # subset .npy URL; leave empty when the filter stage is in the run
    samples_per_shard: int = 10_000
    tasks: int = 0  # write parts (one write task each at units_per_task = 1); 0 = one per count task
    shuffle: bool = False  # seeded order: input shards permuted, then samples within each output shard
    shuffle_seed: int = 0

    def validate(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError("samples_per_shard: must be >= 1")
        if self.tasks < 0:
            raise ValueError("tasks: must be >= 0 (0 = one write task per count task)")


def _count_units(ctx: PlanContext) -> UnitSet:
    check_subset_source(ctx, "reshard")
    return shard_units(ctx)


def _single(ctx: PlanContext) -> UnitSet:
    return UnitSet(count=1, label="task")


def _write_units(ctx: PlanContext) -> UnitSet:
    tasks = ctx.params.tasks or ctx.steps["reshard.count"].n_tasks
    return UnitSet(count=max(1, tasks), label="output parts")


def _estimate(ctx: PlanContext, units: dict) -> Estimate:
    n = units["count"].count
    return Estimate(bytes_written=n * ctx.params.samples_per_shard * BYTES_PER_SAMPLE,
                    basis="upper bound: every input sample kept once, 35 KB a sample")


STAGES = [
    StageSpec(
        name="reshard",
        description="write the subset's samples as new webdataset shards (repeats, size table)",
        order=40,
        params=ReshardParams,
        default_resources={"cpus_per_task": 2, "time": "04:00:00"},
        estimate=_estimate,
        steps=(
            StepSpec("count", "jobs.reshard.stage:count", _count_units, default_units_per_task=1),
            StepSpec("index", "jobs.reshard.stage:index", _single, layout="single"),
            StepSpec("write", "jobs.reshard.stage:write", _write_units, default_units_per_task=1),
            StepSpec("finalize", "jobs.reshard.stage:finalize", _single, layout="single"),
        ),
    ),
]
