"""Queue the tasks through submitit (`[executor] kind = "submitit"`, the `submitit` extra).

Each task is `python -m dcslurm.core.runner RUN STEP INDEX`, wrapped in submitit's
`CommandFunction`; a step's pending tasks go to SLURM as arrays through `map_array`,
cut at MaxArraySize as the sbatch executor cuts them (dcslurm.core.shards), with the same
resources, the `afterok` chain between steps, the `%N` throttle and the Apptainer
prefix (dcslurm.core.containers). Markers stay the truth: status reads them and asks squeue
and sacct about the recorded job ids, as for the sbatch executor.

`submitit_cluster = "local"` runs the tasks through submitit's LocalExecutor on this
machine instead: it knows no dependencies, so steps run one after the other in the
foreground (`wait`), as with the local executor.

submitit names the logs: `LOG_DIR/STEP/<job>_<array task>_0_log.err` (the runner logs to
stderr), `.out` beside it; and pickles each task's call there (the folder must be on a
filesystem the nodes share, as for the sbatch executor's logs).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import re
import signal
import socket
import sys
import threading

from dcslurm.core import slurm
from dcslurm.core.config import slurm_time_hours
from dcslurm.core.errors import UserError
from dcslurm.core.executors.base import TaskState
from dcslurm.core.executors.slurm import SlurmExecutor, queue_failed
from dcslurm.core.plan import Plan
from dcslurm.core.plantypes import StepPlan
from dcslurm.core.runner import STORAGE_ENV
from dcslurm.core.shards import chunk_for_max_array_size
from dcslurm.core.submission import JobChunk, StepSubmission, Submission

_EXIT = re.compile(r"returned non-zero exit status (-?\d+)|died with <Signals\.\w+: (\d+)>")


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise UserError('[executor] kind = "submitit" needs the submitit package: '
                        "pip install 'dcslurm[submitit]'") from None
    return submitit


def _sbatch_option(option: str) -> tuple[str, object]:
    """An [slurm] extra_sbatch entry (`--key=value`, `--key value`, `--flag`) as a key of
    submitit's additional_parameters, which writes `#SBATCH --key=value` back."""
    text = option.strip()
    if not text.startswith("--") or "\n" in text:
        raise UserError(f"[slurm] extra_sbatch: {option!r}: the submitit executor takes long options only "
                        "(--key=value)")
    key, sep, value = text[2:].partition("=")
    if not sep:
        key, _, value = key.partition(" ")
    key = key.strip()
    return key, (value.strip() or True)


class SubmititExecutor(SlurmExecutor):
    kind = "submitit"

    @property
    def cluster(self) -> str:
        return self.settings.executor.submitit_cluster

    @property
    def queues(self) -> bool:
        return self.cluster == "slurm"

    # -- how submitit runs one task ----------------------------------------------------

    def _function(self, submitit, plan: Plan, step: StepPlan):
        """The task's command without its index: CommandFunction appends the index."""
        launcher = self.launcher(step.gpu)
        # `env` sets what the sbatch scripts export: CommandFunction's own `env` would replace
        # the node's whole environment (SLURM_*, PATH) by this host's.
        env = {STORAGE_ENV: json.dumps(plan.storage_options, sort_keys=True), **launcher.env}
        words = ["env", *(f"{k}={v}" for k, v in sorted(env.items())), *launcher.prefix, launcher.python,
                 "-m", "dcslurm.core.runner", plan.run_url, step.name]
        return submitit.helpers.CommandFunction(words, verbose=True)

    def _executor(self, submitit, plan: Plan, step: StepPlan, folder: str, after: list[str], n: int):
        """A submitit executor for one job (or array of `n`) of `step`, resources as the
        sbatch executor asks for them (dcslurm.core.sbatch.render_step_script)."""
        if "%" in folder:
            raise UserError(f"{folder}: the submitit executor's log folder must not contain '%' "
                            "(submitit expands %j, %A, %a in it); set [executor] log_dir")
        res = step.resources
        python = self.settings.slurm.python or sys.executable
        ex = submitit.AutoExecutor(folder=folder, cluster=self.cluster, slurm_python=python, local_python=python)
        distributed = step.layout == "distributed"
        additional: dict[str, object] = {
            "time": res.time,  # exactly as written; timeout_min (whole minutes) is submitit's own bookkeeping
            "kill-on-invalid-dep": "yes",
        }
        if res.requeue:
            additional["requeue"] = True
        if res.mem:
            additional["mem"] = res.mem
        if after:
            additional["dependency"] = "afterok:" + ":".join(after)
        for option in res.extra_sbatch:
            key, value = _sbatch_option(option)
            additional[key] = value
        params: dict[str, object] = {
            "name": f"dcslurm.{plan.run_name}.{step.name}",
            "timeout_min": max(1, math.ceil(slurm_time_hours(res.time) * 60)),
            "cpus_per_task": res.cpus_per_task,
            "nodes": res.nodes if distributed else 1,
            "tasks_per_node": res.tasks_per_node if distributed else 1,
            "slurm_signal_delay_s": res.signal_seconds,
            "slurm_array_parallelism": res.array_throttle or max(1, n),
            "slurm_setup": list(res.setup),
            "slurm_additional_parameters": additional,
        }
        if distributed:
            params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
        if res.gpus_per_node and not res.gres:
            params["gpus_per_node"] = res.gpus_per_node
        for key in ("partition", "account", "qos", "constraint", "gres"):
            if getattr(res, key):
                params[f"slurm_{key}"] = getattr(res, key)
        ex.update_parameters(**params)
        return ex

    # -- SLURM: queue every step at once, afterok between them ----------------------------

    def submit(self, plan: Plan, pending: dict[str, list[int]], dry_run: bool = False,
               script_dir: str | None = None, progress=None, on_queued=None,
               after: list[str] | None = None) -> Submission:
        if dry_run:
            # submitit writes its scripts as it submits: a dry run renders the sbatch
            # executor's scripts, the same jobs for submission by hand.
            return SlurmExecutor.submit(self, plan, pending, dry_run=True, script_dir=script_dir,
                                        progress=progress, after=after)
        submitit = import_submitit()
        log_root = self.log_dir()
        if self.cluster == "local":
            return self._submit_local(plan, pending, log_root, on_queued)
        max_array = self.settings.slurm.max_array_size or slurm.max_array_size()
        sub = Submission(executor=self.kind)
        previous: list[str] = list(after or [])
        for step in plan.steps:
            indexes = pending.get(step.name, [])
            if not indexes:
                continue
            step_logs = f"{log_root.rstrip('/')}/{step.name}"
            self.prepare_log_dir(step_logs)
            func = self._function(submitit, plan, step)
            ssub = sub.steps[step.name] = StepSubmission(step.name, step_logs)
            chunks = chunk_for_max_array_size(indexes, max_array) if step.layout == "array" else [None]
            this: list[str] = []
            for n, chunk in enumerate(chunks):
                task_indexes = list(chunk.indexes) if chunk else [0]
                try:
                    ex = self._executor(submitit, plan, step, step_logs, previous, len(task_indexes))
                    # map_array: one array job; a single task is queued as a plain job.
                    jobs = ex.map_array(func, task_indexes)
                except UserError as exc:
                    raise queue_failed(sub, exc) from None
                except Exception as exc:  # noqa: BLE001 - submitit raises sbatch's failure as it comes
                    raise queue_failed(sub, UserError(f"submitit could not queue step {step.name}: "
                                                      f"{_first_line(exc)}")) from None
                job_id = jobs[0].job_id.split("_")[0]
                this.append(job_id)
                ssub.chunks.append(JobChunk(job_id=job_id, indexes=task_indexes, array="_" in jobs[0].job_id,
                                            script=os.path.join(step_logs, f"{job_id}_submission.sh")))
                if on_queued is not None:
                    on_queued(sub)
                if progress:
                    progress(step.name, n + 1, len(chunks))
            previous = this
        return sub

    def task_index(self, chunk: JobChunk, array_id: int | None) -> int:
        # map_array numbers a chunk's tasks 0..n-1 in the order of its indexes.
        return chunk.indexes[array_id] if (chunk.array and array_id is not None) else chunk.indexes[0]

    def log_path(self, sub: Submission, step: str, chunk: JobChunk, index: int) -> str:
        if not chunk.job_id:
            return ""  # not started yet (the local cluster launches a step when it comes)
        log_dir = sub.steps[step].log_dir
        if chunk.array:
            return f"{log_dir}/{chunk.job_id}_{bisect.bisect_left(chunk.indexes, index)}_0_log.err"
        return f"{log_dir}/{chunk.job_id}_0_log.err"

    def active_tasks(self, sub: Submission) -> dict[tuple[str, int], TaskState]:
        if sub.pid:  # submitit's local cluster: a foreground run, as the local executor's
            if sub.finished or not _alive(sub.pid) or sub.host != socket.gethostname():
                return {}
            return {(name, i): TaskState.PENDING for name, s in sub.steps.items() for c in s.chunks
                    for i in c.indexes}
        return super().active_tasks(sub)

    def final_states(self, sub: Submission) -> dict[tuple[str, int], str] | None:
        return None if sub.pid else super().final_states(sub)

    def cancel(self, sub: Submission) -> list[str]:
        if not sub.pid:
            return super().cancel(sub)
        if sub.host and sub.host != socket.gethostname():
            raise UserError(f"this run's submitit local executor runs on {sub.host}; cancel it there")
        if _alive(sub.pid):
            os.kill(sub.pid, signal.SIGTERM)  # its handler stops the tasks (_stop)
        return [f"submitit local pid {sub.pid}"]

    # -- submitit's local cluster: steps in order, in the foreground ------------------------

    def _submit_local(self, plan: Plan, pending: dict[str, list[int]], log_root: str, on_queued) -> Submission:
        sub = Submission(executor=self.kind, pid=os.getpid(), host=socket.gethostname())
        for step in plan.steps:
            indexes = pending.get(step.name, [])
            if not indexes:
                continue
            if step.layout == "distributed" and step.resources.nodes * step.resources.tasks_per_node > 1:
                raise UserError(f"step {step.name}: submitit's local cluster runs one process per task; "
                                "use [executor] kind = \"local\" for a multi-process step")
            step_logs = f"{log_root.rstrip('/')}/{step.name}"
            self.prepare_log_dir(step_logs)
            # Launched when the step's turn comes (wait); until then no job id.
            sub.steps[step.name] = StepSubmission(step.name, step_logs, [JobChunk("", list(indexes), array=False)])
        self._on_queued = on_queued
        return sub

    def runs_in_foreground(self, sub: Submission) -> bool:
        return bool(sub.pid)  # submitit's local cluster; on SLURM the scheduler runs the jobs

    def _run_foreground(self, plan: Plan, sub: Submission, progress) -> dict[str, list[int]]:
        submitit = import_submitit()
        self._live: list = []
        self._lock = threading.Lock()
        self._stopping = False
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, self._stop)
        failed: dict[str, list[int]] = {}
        for step in plan.steps:
            ssub = sub.steps.get(step.name)
            if ssub is None:
                continue
            indexes = ssub.chunks[0].indexes
            func = self._function(submitit, plan, step)
            parallel = self.settings.executor.max_parallel or step.resources.array_throttle or max(
                1, (os.cpu_count() or 1) // max(1, step.resources.cpus_per_task))
            done = 0
            if progress:
                progress(step.name, done, len(indexes))
            for start in range(0, len(indexes), parallel):
                batch = indexes[start:start + parallel]
                with self._lock:
                    if self._stopping:
                        break
                    ex = self._executor(submitit, plan, step, ssub.log_dir, [], len(batch))
                    jobs = ex.map_array(func, batch)
                    self._live = list(jobs)
                for i, job in zip(batch, jobs):
                    ssub.chunks.append(JobChunk(job_id=job.job_id, indexes=[i], array=False))
                ssub.chunks[0].indexes = [i for i in ssub.chunks[0].indexes if i not in batch]
                if self._on_queued is not None:
                    self._on_queued(sub)
                for i, job in zip(batch, jobs):
                    code = _exit_code(job)
                    if code:
                        ssub.exit_codes[i] = code
                        failed.setdefault(step.name, []).append(i)
                    done += 1
                    if progress:
                        progress(step.name, done, len(indexes))
            if not ssub.chunks[0].indexes:
                del ssub.chunks[0]  # every task launched: no placeholder left
            if step.name in failed or self._stopping:
                break
        return failed

    def _stop(self, signum, frame) -> None:
        # `dcslurm cancel` (SIGTERM), Ctrl-C, a closed terminal: launch nothing more, and pass
        # TERM to the runners of the jobs under way (each stops its task, then exits; submitit's
        # controller then ends). submitit's own cancel would SIGKILL its process past the runner.
        with self._lock:
            self._stopping = True
            for job in self._live:
                with contextlib.suppress(ValueError):
                    for pid in _descendants(int(job.job_id)):
                        if _is_runner(pid):
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGTERM)
        raise SystemExit(128 + signum)


def _exit_code(job) -> int:
    """0 if submitit's local job succeeded, else the runner's exit code (1 if unknown)."""
    job.wait()
    error = job.exception()
    if error is None:
        return 0
    m = _EXIT.search(str(error))
    if m and m.group(1):
        return int(m.group(1))
    if m:
        return -int(m.group(2))
    return 1


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def _alive(pid: int) -> bool:
    from dcslurm.core.proctree import alive

    return alive(pid)


def _descendants(pid: int) -> list[int]:
    """Every process under `pid` (Linux /proc), children first."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError), open(f"/proc/{p}/task/{tid}/children") as f:
                kids = [int(c) for c in f.read().split()]
                out += kids
                todo += kids
    return out


def _is_runner(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"dcslurm.core.runner" in f.read()
    except OSError:
        return False
