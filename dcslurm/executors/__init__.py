"""Executors: where tasks run. One seam (`Executor`), a SLURM and a local kind."""

from __future__ import annotations

from dcslurm.executors.base import Executor, TaskState


def make_executor(kind: str, config) -> Executor:
    if kind == "slurm":
        from dcslurm.executors.slurm import SlurmExecutor

        return SlurmExecutor(config)
    if kind == "local":
        from dcslurm.executors.local import LocalExecutor

        return LocalExecutor(config)
    from dcslurm.errors import UserError

    raise UserError(f"unknown executor {kind!r}: choose slurm or local")


__all__ = ["Executor", "TaskState", "make_executor"]
