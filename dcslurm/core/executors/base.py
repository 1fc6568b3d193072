"""The executor seam: code that submits never branches on the cluster kind."""

from __future__ import annotations

import errno
import os
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum

from dcslurm.core.config import ContainerSection, ExecutorSection, RunConfig, SlurmSection
from dcslurm.core.errors import UserError
from dcslurm.core.plan import Plan
from dcslurm.core.sbatch import TaskLauncher
from dcslurm.core.storage import join_url
from dcslurm.core.submission import JobChunk, Submission


class TaskState(str, Enum):
    DONE = "done"
    RUNNING = "running"
    PENDING = "pending"
    FAILED = "failed"
    NOT_STARTED = "not started"  # never submitted, cancelled while queued, or after a failed step
    UNKNOWN = "unknown"  # submitted, no marker, and the scheduler cannot be asked (squeue failed)


@dataclass
class ExecutorSettings:
    """What an executor is made of: the [executor], [slurm] and [container] sections.
    Status and cancel need nothing else (the submission record names the jobs); the
    defaults do for them when the run's config is not at hand."""

    executor: ExecutorSection = field(default_factory=ExecutorSection)
    slurm: SlurmSection = field(default_factory=SlurmSection)
    container: ContainerSection = field(default_factory=ContainerSection)

    @classmethod
    def of(cls, config: RunConfig) -> ExecutorSettings:
        return cls(config.executor, config.slurm, config.container)


class Executor(ABC):
    kind: str
    # True where a scheduler runs the tasks after `submit` returns (nothing to wait for
    # here); False where `wait` runs them in the foreground.
    queues: bool = False

    def __init__(self, settings: ExecutorSettings | None = None, run: RunConfig | None = None):
        """`run`: the config of the run to submit; only `submit` needs it (its folder, its
        pool and stage paths bound into a container). Status and cancel build an executor
        from `settings` alone."""
        if settings is not None and not isinstance(settings, ExecutorSettings):
            raise TypeError(f"settings: expected ExecutorSettings, got {type(settings).__name__} (a run's config "
                            "goes in run=)")
        self.settings = settings or (ExecutorSettings.of(run) if run is not None else ExecutorSettings())
        self.run = run
        if run is not None and self.settings.container.enabled and self.settings.container.check_host:
            from dcslurm.core.containers import check_host

            check_host(run)  # before anything is queued or written: apptainer and images present

    @property
    def config(self) -> RunConfig:
        """The run being submitted."""
        if self.run is None:
            raise ValueError(f"the {self.kind} executor was built from settings alone: it cannot submit")
        return self.run

    @abstractmethod
    def submit(self, plan: Plan, pending: dict[str, list[int]], dry_run: bool = False,
               script_dir: str | None = None, progress=None, on_queued=None,
               after: list[str] | None = None) -> Submission:
        """Run or queue the `pending` task indexes of each step, in plan order,
        each step after the previous one succeeded. `on_queued(sub)` is called
        after each job is queued, so the caller can record it before the next
        one (a later failure must not lose jobs already queued). `after`: job ids
        of another run that the first step waits for (a scheduler's afterok)."""

    @abstractmethod
    def active_tasks(self, sub: Submission) -> dict[tuple[str, int], TaskState]:
        """(step, index) -> RUNNING/PENDING for the tasks of `sub` still queued or running."""

    def wait(self, plan: Plan, sub: Submission, progress=None, on_finished=None) -> dict[str, list[int]]:
        """Wait for the tasks of `sub` where this executor runs them in the foreground;
        returns the failed task indexes per step. A scheduler's jobs run on their own:
        nothing to wait for, nothing known to have failed yet. `on_finished(sub)` is
        called once a foreground run has ended (however it ended), to record that."""
        if not self.runs_in_foreground(sub):
            return {}
        try:
            return self._run_foreground(plan, sub, progress)
        finally:
            sub.finished = time.time()
            if on_finished is not None:
                on_finished(sub)

    def runs_in_foreground(self, sub: Submission) -> bool:
        """Whether `wait` runs `sub`'s tasks here (else a scheduler runs them)."""
        return False

    def _run_foreground(self, plan: Plan, sub: Submission, progress) -> dict[str, list[int]]:
        """Run `sub`'s tasks here, step by step; the failed task indexes per step."""
        raise NotImplementedError

    def final_states(self, sub: Submission) -> dict[tuple[str, int], str] | None:
        """(step, index) -> the scheduler's final state (FAILED, TIMEOUT, ...) where it
        keeps them; None when it does not (or cannot be asked)."""
        return None

    @abstractmethod
    def log_path(self, sub: Submission, step: str, chunk: JobChunk, index: int) -> str:
        """Where task `index` of `step` (in `chunk` of `sub`) writes its log."""

    @abstractmethod
    def cancel(self, sub: Submission) -> list[str]:
        """Stop whatever of `sub` is still queued or running; returns what was stopped
        (job ids, or the local run's pid), each once."""

    def prepare_log_dir(self, path: str, what: str = "task logs") -> None:
        """Create a folder for task logs (or sbatch scripts), or refuse in one line before
        anything is queued: a task whose log cannot be written fails with no trace of why."""
        try:
            os.makedirs(path, exist_ok=True)
            probe = os.path.join(path, f".dcslurm-write-test-{os.getpid()}")
            with open(probe, "wb"):
                pass
            os.unlink(probe)
        except OSError as exc:
            why = "read-only file system" if exc.errno == errno.EROFS else (exc.strerror or str(exc))
            raise UserError(f"{path}: cannot write {what} here ({why}); "
                            "set [executor] log_dir to a writable folder") from None

    def log_dir(self) -> str:
        """Task logs: [executor] log_dir, else RUN/logs for a local run folder,
        else ./dcslurm-logs/<run name> (SLURM writes logs to a filesystem, not S3)."""
        if self.settings.executor.log_dir:
            return self.settings.executor.log_dir
        if "://" not in self.config.run_url:
            return join_url(self.config.run_url, "logs")
        return os.path.abspath(os.path.join("dcslurm-logs", self.config.run_name))

    def launcher(self, step_gpu: bool = False) -> TaskLauncher:
        """How a task starts: this interpreter, or `apptainer exec IMAGE python3`
        when [container] enabled (the GPU image with --nv for GPU steps)."""
        if self.settings.container.enabled:
            from dcslurm.core.containers import exec_prefix

            prefix, env = exec_prefix(self.config, step_gpu)
            return TaskLauncher(python=self.settings.container.python, prefix=prefix, env=env)
        return TaskLauncher(python=self.settings.slurm.python or sys.executable)
