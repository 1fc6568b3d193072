"""Executors: where tasks run. One seam (`Executor`): local, slurm (rendered sbatch
scripts) and submitit (the same arrays through submitit, the `submitit` extra)."""

from __future__ import annotations

from dcslurm.core.executors.base import Executor, ExecutorSettings, TaskState

KINDS = ("local", "slurm", "submitit")


def make_executor(kind: str, settings: ExecutorSettings | None = None, run=None) -> Executor:
    """The executor of `kind`, made from the [executor], [slurm] and [container]
    `settings` (default: `run`'s, else the defaults). `run`, the RunConfig of the run
    to submit, is needed only to submit; status and cancel pass settings alone."""
    if kind == "slurm":
        from dcslurm.core.executors.slurm import SlurmExecutor

        return SlurmExecutor(settings, run)
    if kind == "local":
        from dcslurm.core.executors.local import LocalExecutor

        return LocalExecutor(settings, run)
    if kind == "submitit":
        from dcslurm.core.executors.submitit import SubmititExecutor

        return SubmititExecutor(settings, run)
    from dcslurm.core.errors import UserError

    raise UserError(f"unknown executor {kind!r}: choose one of {', '.join(KINDS)}")


def queues_jobs(config) -> bool:
    """Whether `config`'s executor leaves its tasks to a scheduler (submit returns once
    they are queued: job ids to chain with afterok) or runs them here before returning."""
    return make_executor(config.executor.kind, ExecutorSettings.of(config)).queues


__all__ = ["KINDS", "Executor", "ExecutorSettings", "TaskState", "make_executor", "queues_jobs"]
