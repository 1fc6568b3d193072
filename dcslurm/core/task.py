"""What a task is handed: `TaskContext`. Stages see this, never the scheduler.

Checkpoint and requeue is a protocol between a step and the runner, as submitit's
Checkpointable is: a step declared `StepSpec(checkpointable=True)` polls
`ctx.should_stop()` between units of work; once it is true it saves what it needs
to resume and raises `Preempted`. The runner owns the rest: the signal handlers
(`StopRequest`), and on SLURM the job's requeue when the time-limit warning asked
for it. A step never learns which scheduler runs it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from dcslurm.core.environment import World
from dcslurm.core.markers import read_marker
from dcslurm.core.plan import Plan
from dcslurm.core.plantypes import StepPlan
from dcslurm.core.scales import SCALES, ScaleConfig
from dcslurm.core.shards import ShardRange
from dcslurm.core.storage import DataFolder


@dataclass
class TaskResult:
    """What a task returns: its committed outputs (paths relative to the run
    folder, or full URLs) and its stats (counts, samples/s, ...)."""

    outputs: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


class Preempted(Exception):
    """Raised by a checkpointable step that stopped on `ctx.should_stop()` after saving
    its checkpoint: the task is unfinished but resumable (a rerun continues from the
    checkpoint). The message says where it stopped; the runner records it as the task's
    last error and adds whether it requeued the job."""


# Test-only knobs, read here and nowhere else, so that no run.toml can set them: they
# stand in for the scheduler in tests of checkpointable steps (the trainer's included).
STOP_AFTER_ENV = "DCSLURM_TEST_STOP_AFTER"  # N: should_stop() is true from its N-th call, as if preempted
POLL_SLEEP_ENV = "DCSLURM_TEST_POLL_SLEEP"  # seconds each should_stop() call sleeps, to signal a step mid-run


class StopRequest:
    """Whether the scheduler asked this task to stop. The runner installs it (for
    checkpointable steps only) as the handler of:

    - SIGUSR2 / SIGUSR1: the warning before the time limit (`--signal=USR2@N`; USR1 from
      hand-written scripts). SLURM will not requeue a job that times out, so the job
      must requeue itself: `requeue` is set.
    - SIGTERM: preemption, `scontrol requeue`, `scancel`, the time limit itself. Whether
      the job comes back is the scheduler's decision already: stop, do not requeue.

    Handlers only set flags: the step decides where to stop (a consistent checkpoint),
    and the runner acts on `requeue` after the step has saved it.
    """

    REQUEUE = (signal.SIGUSR2, signal.SIGUSR1)
    STOP = (signal.SIGTERM,)

    def __init__(self, stop_after: int = 0, poll_sleep: float = 0.0):
        self.requested = False
        self.requeue = False
        self.signals: list[str] = []
        self._stop_after = stop_after
        self._poll_sleep = poll_sleep
        self._polls = 0

    @classmethod
    def from_env(cls, env: dict | None = None) -> StopRequest:
        env = os.environ if env is None else env
        return cls(int(env.get(STOP_AFTER_ENV) or 0), float(env.get(POLL_SLEEP_ENV) or 0.0))

    def install(self) -> None:
        for signum in (*self.REQUEUE, *self.STOP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True
        self.requeue = self.requeue or signum in self.REQUEUE
        self.signals.append(signal.Signals(signum).name)

    def poll(self) -> bool:
        self._polls += 1
        if self._poll_sleep:
            time.sleep(self._poll_sleep)
        return self.requested or 0 < self._stop_after <= self._polls


@dataclass
class TaskContext:
    run: DataFolder  # the run folder
    plan: Plan
    step: StepPlan
    index: int  # task index within the step
    shards: ShardRange  # the units of this task
    params: Any  # the stage's params dataclass, bound from the plan (stages.bind_params); None: none
    world: World
    scratch: str  # local temporary folder, removed after the task
    log: logging.Logger
    # Set by the runner's signal handlers for checkpointable steps; never true otherwise.
    stop: StopRequest = field(default_factory=StopRequest)

    def should_stop(self) -> bool:
        """True once the scheduler asked this task to stop (the time-limit warning, or
        preemption): a checkpointable step then saves its checkpoint and raises
        `Preempted`. Cheap: poll it between units of work. Each rank of a multi-process
        job answers for itself; agreeing on one step to stop at is the step's business."""
        return self.stop.poll()

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
