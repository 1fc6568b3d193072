"""The body of one task, run by `python -m dcslurm.core.runner` in its supervised child.

It reads the run's plan, skips the task if its marker is committed, runs the
step's function with a TaskContext, then commits the marker. Storage options
(endpoint, profile: never credentials) arrive in DCSLURM_STORAGE as JSON.
Returns the exit code: 0 done or skipped, 2 bad input (one-line error), 1 crash,
or a checkpointable step stopped on the scheduler's request (resumable; see dcslurm.core.task).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback

from dcslurm.core import slurm
from dcslurm.core.environment import World, world_from_env
from dcslurm.core.errors import UserError
from dcslurm.core.markers import commit_marker, marker_covers, marker_matches, read_marker, record_failure
from dcslurm.core.plan import PLAN_FILE, read_plan
from dcslurm.core.runner import STORAGE_ENV
from dcslurm.core.stages import bind_params, import_path
from dcslurm.core.storage import DataFolder
from dcslurm.core.task import Preempted, StopRequest, TaskContext, TaskResult


def run_task(run_url: str, step_name: str, index: int, log_path: str = "",
             storage_options: dict | None = None) -> int:
    """Run one task; returns the process exit code."""
    log = logging.getLogger(f"dcslurm.{step_name}[{index}]")
    if storage_options is None:
        storage_options = json.loads(os.environ.get(STORAGE_ENV) or "{}")
    run = DataFolder(run_url, storage_options)
    try:
        plan = read_plan(run)
        step = plan.step(step_name)
        if not 0 <= index < step.n_tasks:
            raise UserError(f"{run.url}: step {step_name} has tasks 0..{step.n_tasks - 1}, not {index}")
        world = world_from_env()
        marker = read_marker(run, step_name, index)
        if marker is not None and marker_matches(marker, step, index):
            log.info("task %s[%d] is already committed: skipping", step_name, index)
            return 0
        if marker is not None:
            # Committed under another split or pool: not this task's commit. Redo it;
            # its new marker replaces the old one.
            log.warning("task %s[%d]: its marker covers units %s..%s of another plan (now %d..%d): redoing it",
                        step_name, index, marker.get("start"), marker.get("stop"),
                        step.shards(index).start, step.shards(index).stop)
        func = import_path(step.entry)
        params = bind_params(import_path(step.params_class) if step.params_class else None,
                             plan.stage_params.get(step.stage) or {},
                             f"{run.url_of(PLAN_FILE)}: stage_params {step.stage}")
    except UserError as exc:
        log.error("%s", exc)
        return 2
    stop = StopRequest()
    if step.checkpointable:
        # Only a step that can checkpoint catches the scheduler's signals; any other keeps
        # their default action (the task dies, the scheduler's state says why).
        stop = StopRequest.from_env()
        stop.install()
    scratch = tempfile.mkdtemp(prefix=f"dcslurm-{step_name}-{index}-")
    started = time.time()
    try:
        ctx = TaskContext(
            run=run, plan=plan, step=step, index=index, shards=step.shards(index),
            params=params, world=world, scratch=scratch, log=log, stop=stop,
        )
        # the interpreter shows whether a task ran in its container image or on the host
        log.info("task %s[%d]: units %d..%d of %d (rank %d/%d, python %s)", step_name, index, ctx.shards.start,
                 ctx.shards.stop, step.units.count, world.rank, world.world_size, sys.executable)
        result = func(ctx)
        if result is None:
            result = TaskResult()
        elif isinstance(result, dict):
            result = TaskResult(outputs=result.get("outputs", []), stats=result.get("stats", {}))
        if world.rank == 0:
            stats = dict(result.stats)
            stats.setdefault("seconds", round(time.time() - started, 3))
            commit_marker(run, step_name, index, result.outputs, stats, started,
                          covers=marker_covers(step, index))
            log.info("task %s[%d] committed: %d outputs", step_name, index, len(result.outputs))
        return 0
    except UserError as exc:
        log.error("%s", exc)
        _record(run, step_name, index, str(exc), log_path, world.rank)
        return 2
    except Preempted as exc:
        if not step.checkpointable:  # not a step that may stop unfinished: a crash like any other
            return _crashed(exc, run, step_name, index, log_path, world.rank, log)
        line = f"Preempted: {exc}{_requeue(world, stop, log)}"
        log.warning("task %s[%d] stopped on request (%s): %s", step_name, index,
                    ", ".join(stop.signals) or "no signal here", line)
        _record(run, step_name, index, line, log_path, world.rank)
        return 1
    except Exception as exc:  # noqa: BLE001 - the log keeps the traceback, status the last line
        return _crashed(exc, run, step_name, index, log_path, world.rank, log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _crashed(exc: Exception, run: DataFolder, step_name: str, index: int, log_path: str, rank: int,
             log: logging.Logger) -> int:
    traceback.print_exception(exc)
    line = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    log.error("task failed: %s", line)
    _record(run, step_name, index, line, log_path, rank)
    return 1


def _requeue(world: World, stop: StopRequest, log: logging.Logger) -> str:
    """After a checkpointable step stopped: on the time-limit warning, requeue this SLURM
    job (rank 0 only: one requeue per job). After SIGTERM the scheduler has decided
    already (preemption requeues, scancel cancels); under the local executor a rerun
    resumes. Returns what the task's record adds."""
    if not (stop.requeue and world.slurm) or world.rank != 0:
        return ""
    try:
        slurm.requeue(world.job_id)
    except UserError as exc:  # the job then ends failed: resubmitting resumes it
        log.error("%s", exc)
        return f"; requeue failed: {exc}"
    return "; job requeued"


def _record(run: DataFolder, step: str, index: int, error: str, log_path: str, rank: int) -> None:
    if rank != 0:
        return
    try:
        record_failure(run, step, index, error, log_path)
    except Exception:  # noqa: BLE001 - storage may be what failed
        pass
