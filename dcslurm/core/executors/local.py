"""Run the tasks on this machine: the same runner, the same markers, no scheduler.

Steps run in plan order; a step's tasks run as subprocesses, up to
`max_parallel` at once (default: cores / cpus_per_task). A failed task stops
the run after its step, as `afterok` does on SLURM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

from dcslurm.core import proctree
from dcslurm.core.errors import UserError
from dcslurm.core.executors.base import Executor, TaskState
from dcslurm.core.plan import Plan
from dcslurm.core.plantypes import StepPlan
from dcslurm.core.runner import STORAGE_ENV
from dcslurm.core.submission import JobChunk, StepSubmission, Submission


class _Stopped(Exception):
    """The run was cancelled before this task started."""


def _task_log(log_dir: str, index: int) -> str:
    """A local task's log file: one per task index, appended to across resubmits."""
    return os.path.join(log_dir, f"local-{index:06d}.log")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalExecutor(Executor):
    kind = "local"

    def _parallel(self, step: StepPlan) -> int:
        if self.settings.executor.max_parallel:
            return self.settings.executor.max_parallel
        return max(1, (os.cpu_count() or 1) // max(1, step.resources.cpus_per_task))

    def _argv(self, plan: Plan, step: StepPlan, index: int, log: str) -> list[str]:
        launcher = self.launcher(step.gpu)
        return [*launcher.prefix, launcher.python, "-m", "dcslurm.core.runner", plan.run_url, step.name,
                str(index), "--log", log]

    def _env(self, plan: Plan, step: StepPlan) -> dict:
        env = dict(os.environ)
        env[STORAGE_ENV] = json.dumps(plan.storage_options, sort_keys=True)
        env.update(self.launcher(step.gpu).env)
        return env

    def _run_one(self, plan: Plan, step: StepPlan, index: int, ssub: StepSubmission) -> int | None:
        """The task's exit code, kept in the submission record for `status`; None if it was
        stopped before it started (it then shows as not started, not as failed)."""
        try:
            code = self._run_task(plan, step, index, ssub.log_dir)
        except _Stopped:
            log = _task_log(ssub.log_dir, index)
            with contextlib.suppress(OSError):
                if os.path.getsize(log) == 0:
                    os.unlink(log)
            return None
        if code:  # 0 leaves a marker; only failures need a record
            ssub.exit_codes[index] = code
        return code

    def _run_task(self, plan: Plan, step: StepPlan, index: int, log_dir: str) -> int:
        log = _task_log(log_dir, index)
        env = self._env(plan, step)
        world = step.resources.nodes * step.resources.tasks_per_node if step.layout == "distributed" else 1
        # The runner reads DCSLURM_* as it reads srun's variables, and before them: a run
        # started inside an salloc/srun session is still a local run, rank by rank.
        port = _free_port() if world > 1 else 29500
        with open(log, "ab") as out:
            procs = []
            for rank in range(world):
                penv = dict(env, DCSLURM_RANK=str(rank), DCSLURM_WORLD_SIZE=str(world),
                            DCSLURM_LOCAL_RANK=str(rank), DCSLURM_MASTER_ADDR="127.0.0.1",
                            DCSLURM_MASTER_PORT=str(port), DCSLURM_JOB_ID=f"local-{os.getpid()}")
                procs.append(self._spawn(self._argv(plan, step, index, log), out, penv))
            return self._wait(procs)

    def _spawn(self, argv: list[str], out, env: dict) -> subprocess.Popen:
        with self._lock:
            if self._stopping:
                raise _Stopped
            # Each task leads its own session: when its main process exits, however it
            # exits, _wait kills what is left of the group (nothing a task starts outlives it).
            # If this process dies (even by SIGKILL) the task gets SIGKILL, and its supervisor's
            # watchdog kills the rest of its group: see proctree.parent_env. A graceful stop
            # (TERM, INT, HUP: _terminate_children) passes TERM on and waits for the tasks first.
            proc = proctree.spawn_session(argv, stdout=out, stderr=subprocess.STDOUT,
                                          env={**env, **proctree.parent_env()})
            self._children.add(proc)
        return proc

    def _wait(self, procs: list[subprocess.Popen]) -> int:
        # As srun --kill-on-bad-exit=1 does on SLURM: when one rank of a job fails, the others
        # are killed; else they wait for it in the rendezvous or a collective until the
        # process-group timeout, and the whole run with them.
        codes: dict[int, int] = {}
        lock = threading.Lock()

        def watch(proc: subprocess.Popen) -> None:
            code = proctree.wait_then_kill_group(proc)
            with lock:
                codes[proc.pid] = code
                if code != 0:
                    for other in procs:
                        if other.pid not in codes:  # not reaped yet: its group id is still its own
                            proctree.kill_group(other.pid)

        if len(procs) == 1:
            watch(procs[0])
        else:
            watchers = [threading.Thread(target=watch, args=(p,), daemon=True) for p in procs]
            for t in watchers:
                t.start()
            for t in watchers:
                t.join()
        self._children.difference_update(procs)
        return next((codes[p.pid] for p in procs if codes[p.pid] != 0), 0)

    def _terminate_children(self, signum, frame) -> None:
        # `dcslurm cancel` sends SIGTERM to this process: start nothing more, pass it on to the tasks.
        with self._lock:
            self._stopping = True
            for proc in list(self._children):
                proctree.kill_group(proc.pid, signal.SIGTERM)
        raise SystemExit(128 + signum)

    def submit(self, plan: Plan, pending: dict[str, list[int]], dry_run: bool = False,
               script_dir: str | None = None, progress=None, on_queued=None,
               after: list[str] | None = None) -> Submission:
        # `after` (job ids to wait for) means nothing here: a local run starts when its caller runs it.
        log_root = self.log_dir()
        sub = Submission(executor="local", pid=os.getpid(), host=socket.gethostname())
        for step in plan.steps:
            indexes = pending.get(step.name, [])
            if not indexes:
                continue
            step_logs = os.path.join(log_root, step.name)
            if not dry_run:
                self.prepare_log_dir(step_logs)
            sub.steps[step.name] = StepSubmission(step.name, step_logs, [JobChunk(
                job_id=f"local-{os.getpid()}", indexes=list(indexes), array=step.layout == "array")])
        if dry_run:
            if script_dir:
                os.makedirs(script_dir, exist_ok=True)
                with open(os.path.join(script_dir, "run-local.sh"), "w") as f:
                    f.write("#!/bin/bash\nset -euo pipefail\n")
                    for step in plan.steps:
                        for i in pending.get(step.name, []):
                            argv = self._argv(plan, step, i, _task_log(os.path.join(log_root, step.name), i))
                            f.write(" ".join(shlex.quote(a) for a in argv) + "\n")
            return sub
        return sub

    def runs_in_foreground(self, sub: Submission) -> bool:
        return True

    def _run_foreground(self, plan: Plan, sub: Submission, progress=None) -> dict[str, list[int]]:
        failed: dict[str, list[int]] = {}
        self._children: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._stopping = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._terminate_children)
            # Ctrl-C and a closed terminal reach only this process (each task has its own
            # session): pass them on too, so that tasks stop as after `dcslurm cancel`.
            signal.signal(signal.SIGINT, self._terminate_children)
            signal.signal(signal.SIGHUP, self._terminate_children)
        for step in plan.steps:
            ssub = sub.steps.get(step.name)
            if ssub is None:
                continue
            indexes = ssub.chunks[0].indexes
            done = 0
            if progress:
                progress(step.name, done, len(indexes))
            with ThreadPoolExecutor(max_workers=self._parallel(step)) as pool:
                futures = {i: pool.submit(self._run_one, plan, step, i, ssub) for i in indexes}
                for i, fut in futures.items():
                    code = fut.result()
                    done += 1
                    if code:  # None: stopped before it started
                        failed.setdefault(step.name, []).append(i)
                    if progress:
                        progress(step.name, done, len(indexes))
            if step.name in failed:
                break
        return failed

    def active_tasks(self, sub: Submission) -> dict[tuple[str, int], TaskState]:
        if sub.finished or not proctree.alive(sub.pid) or sub.host != socket.gethostname():
            return {}
        # The local run is still going: its unfinished tasks are running or waiting.
        return {(name, i): TaskState.PENDING for name, s in sub.steps.items() for c in s.chunks for i in c.indexes}

    def log_path(self, sub: Submission, step: str, chunk: JobChunk, index: int) -> str:
        return _task_log(sub.steps[step].log_dir, index)

    def cancel(self, sub: Submission) -> list[str]:
        if sub.host and sub.host != socket.gethostname():
            raise UserError(f"this run's local executor runs on {sub.host}; cancel it there")
        if proctree.alive(sub.pid):
            os.kill(sub.pid, signal.SIGTERM)
        return [f"local pid {sub.pid}"]
