"""Test-only stages: deterministic files per shard, to exercise the orchestrator
(arrays, dependencies, kills, resubmission) without any heavy dependency.

synth  : array over `units` anonymous shards; writes one file per shard.
digest : array over synth's tasks; hashes what each synth task committed.
summary: one task; combines every digest into one file.
ticker : one checkpointable task counting `ticks`; stops on ctx.should_stop() with a
         checkpoint and resumes from it (the runner's stop/requeue protocol).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dcslurm.core.plantypes import Estimate
from dcslurm.core.shards import UnitSet
from dcslurm.core.stages import PlanContext, StageSpec, StepSpec


@dataclass
class SynthParams:
    units: int = 100
    bytes_per_unit: int = 4096
    sleep: float = 0.0  # seconds per task, so tests can kill tasks mid-run
    fail_tasks: list[int] = field(default_factory=list)  # tasks that raise, to test failure reports

    def validate(self) -> None:
        if self.units < 0:
            raise ValueError("units: must be >= 0")


@dataclass
class DigestParams:
    sleep: float = 0.0


@dataclass
class TickerParams:
    ticks: int = 5

    def validate(self) -> None:
        if self.ticks < 1:
            raise ValueError("ticks: must be >= 1")


def _synth_units(ctx: PlanContext) -> UnitSet:
    return UnitSet(count=ctx.params.units, label="test shards")


def _upstream(step: str):
    def units(ctx: PlanContext) -> UnitSet:
        up = ctx.steps.get(step)
        if up is None:
            raise ValueError(f"stage needs {step!r} earlier in the same run")
        return UnitSet(count=up.n_tasks, upstream=step, label=f"{step} tasks")

    return units


def _single(ctx: PlanContext) -> UnitSet:
    return UnitSet(count=1, label="task")


def _estimate(ctx: PlanContext, units: dict) -> Estimate:
    return Estimate(bytes_written=ctx.params.units * ctx.params.bytes_per_unit, basis="bytes_per_unit x units")


STAGES = [
    StageSpec(
        name="synth", description="test: one deterministic file per shard", order=1, test_only=True,
        params=SynthParams, estimate=_estimate,
        steps=(StepSpec("run", "jobs.testing.stage:synth", _synth_units, default_units_per_task=1),),
    ),
    StageSpec(
        name="digest", description="test: hash the files of each synth task", order=2, test_only=True,
        params=DigestParams,
        steps=(StepSpec("run", "jobs.testing.stage:digest", _upstream("synth"), default_units_per_task=1),),
    ),
    StageSpec(
        name="summary", description="test: one file combining every digest", order=3, test_only=True,
        steps=(StepSpec("run", "jobs.testing.stage:summary", _single, layout="single"),),
    ),
    StageSpec(
        name="ticker", description="test: a checkpointable task that stops on request and resumes", order=4,
        test_only=True, params=TickerParams,
        steps=(StepSpec("run", "jobs.testing.stage:ticker", _single, layout="single", checkpointable=True),),
    ),
]
