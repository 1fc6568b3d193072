"""What a task is handed: `TaskContext`. Stages see this, never the scheduler."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from dcslurm.environment import World
from dcslurm.markers import read_marker
from dcslurm.plan import Plan, StepPlan
from dcslurm.scales import SCALES, ScaleConfig
from dcslurm.shards import ShardRange
from dcslurm.storage import DataFolder


@dataclass
class TaskResult:
    """What a task returns: its committed outputs (paths relative to the run
    folder, or full URLs) and its stats (counts, samples/s, ...)."""

    outputs: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskContext:
    run: DataFolder  # the run folder
    plan: Plan
    step: StepPlan
    index: int  # task index within the step
    shards: ShardRange  # the units of this task
    params: dict  # the stage's [stages.NAME] params (after defaults)
    world: World
    scratch: str  # local temporary folder, removed after the task
    log: logging.Logger

    @property
    def scale(self) -> ScaleConfig:
        return SCALES[self.plan.scale]

    @property
    def seed(self) -> int:
        return self.plan.seed

    @property
    def n_tasks(self) -> int:
        return self.step.n_tasks

    @property
    def output(self) -> DataFolder:
        """The stage's own folder in the run folder: RUN/<stage>/."""
        return self.run.child(self.step.stage)

    def folder(self, url: str) -> DataFolder:
        """A DataFolder for any URL, with the run's storage options."""
        return DataFolder(url, self.plan.storage_options)

    def input_names(self) -> list[str]:
        """This task's units by name: URLs for named units; for units that are
        an upstream step's tasks, the outputs those tasks committed."""
        units = self.step.units
        if units.upstream is not None:
            return self.upstream_outputs(units.upstream, list(self.shards))
        return units.names_in(self.shards)

    def upstream_outputs(self, step: str, indexes: list[int] | None = None) -> list[str]:
        """Full URLs of the outputs committed by tasks of `step` (all if None)."""
        upstream = self.plan.step(step)
        out: list[str] = []
        for i in indexes if indexes is not None else range(upstream.n_tasks):
            marker = read_marker(self.run, step, i)
            if marker is None:
                raise RuntimeError(f"{self.run.url}: upstream task {step}[{i}] is not committed")
            out.extend(o if "://" in o or o.startswith("/") else self.run.url_of(o) for o in marker["outputs"])
        return out

    def upstream_stats(self, step: str) -> list[dict]:
        """The stats of every committed task of `step`, in task order."""
        upstream = self.plan.step(step)
        stats = []
        for i in range(upstream.n_tasks):
            marker = read_marker(self.run, step, i)
            if marker is None:
                raise RuntimeError(f"{self.run.url}: upstream task {step}[{i}] is not committed")
            stats.append(marker["stats"])
        return stats
