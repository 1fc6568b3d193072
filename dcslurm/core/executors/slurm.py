"""Queue the tasks on SLURM: one array per step (split above MaxArraySize),
`afterok` between steps, `%N` throttles, `--requeue` and a warning signal.

Scripts are rendered by dcslurm.core.sbatch and kept beside the logs, so every
submitted job can be read, and resubmitted by hand, after the fact.
"""

from __future__ import annotations

import os

from dcslurm.core import slurm
from dcslurm.core.errors import UserError
from dcslurm.core.executors.base import Executor, TaskState
from dcslurm.core.plan import Plan
from dcslurm.core.sbatch import render_step_script, render_submit_script
from dcslurm.core.shards import chunk_for_max_array_size
from dcslurm.core.submission import JobChunk, StepSubmission, Submission

_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"}


def queue_failed(sub: Submission, exc: Exception) -> Exception:
    """The error for a job that could not be queued: `exc`, naming the jobs queued before it."""
    queued = sub.job_ids()
    if not queued:
        return exc if isinstance(exc, UserError) else UserError(str(exc))
    return UserError(f"{exc}; the {len(queued)} jobs queued before it ({', '.join(queued[:8])}"
                     f"{' ...' if len(queued) > 8 else ''}) are recorded: `dcslurm status` and "
                     "`dcslurm cancel` see them, and a resubmit is refused while they are queued")


class SlurmExecutor(Executor):
    kind = "slurm"
    queues = True

    def task_index(self, chunk: JobChunk, array_id: int | None) -> int:
        """The task index that array task `array_id` of `chunk` runs (None: not an array):
        the rendered scripts run `SLURM_ARRAY_TASK_ID + offset`."""
        return array_id + chunk.offset if (chunk.array and array_id is not None) else chunk.indexes[0]

    def submit(self, plan: Plan, pending: dict[str, list[int]], dry_run: bool = False,
               script_dir: str | None = None, progress=None, on_queued=None,
               after: list[str] | None = None) -> Submission:
        """`after`: job ids (another run's) that this run's first jobs wait for (afterok)."""
        log_root = self.log_dir()
        script_dir = script_dir or os.path.join(log_root, "sbatch")
        self.prepare_log_dir(script_dir, "sbatch scripts")
        max_array = self.settings.slurm.max_array_size or (
            slurm.DEFAULT_MAX_ARRAY_SIZE if dry_run else slurm.max_array_size())
        sub = Submission(executor="slurm")
        previous_jobs: list[str] = list(after or [])
        entries: list[tuple[str, str, list[int]]] = []  # for the hand-submission script
        previous_entries: list[int] = []
        log_dirs: list[str] = []
        for step in plan.steps:
            indexes = pending.get(step.name, [])
            if not indexes:
                continue
            step_logs = f"{log_root.rstrip('/')}/{step.name}"
            if not dry_run:  # a dry run (render) makes nothing but its scripts: submit.sh makes these
                self.prepare_log_dir(step_logs)
            log_dirs.append(step_logs)
            launcher = self.launcher(step.gpu)
            chunks = chunk_for_max_array_size(indexes, max_array) if step.layout == "array" else [None]
            ssub = StepSubmission(step.name, step_logs)
            sub.steps[step.name] = ssub  # before any sbatch: on_queued must see this step's jobs
            this_jobs: list[str] = []
            this_entries: list[int] = []
            for n, chunk in enumerate(chunks):
                script = render_step_script(plan, step, launcher, log_root, chunk)
                fname = f"{step.name}.{n:04d}.sbatch" if chunk is not None else f"{step.name}.sbatch"
                path = os.path.join(script_dir, fname)
                with open(path, "w") as f:
                    f.write(script)
                entries.append((f"JOB_{len(entries)}", fname, list(previous_entries)))
                this_entries.append(len(entries) - 1)
                job_id = ""
                if not dry_run:
                    extra = [f"--dependency=afterok:{':'.join(previous_jobs)}"] if previous_jobs else []
                    try:
                        job_id = slurm.sbatch(path, extra)
                    except UserError as exc:
                        raise queue_failed(sub, exc) from None
                    this_jobs.append(job_id)
                ssub.chunks.append(JobChunk(
                    job_id=job_id, indexes=list(chunk.indexes) if chunk else [0],
                    offset=chunk.offset if chunk else 0, array=chunk is not None, script=path))
                if job_id and on_queued is not None:
                    on_queued(sub)
                if progress:
                    progress(step.name, n + 1, len(chunks))
            previous_jobs, previous_entries = this_jobs, this_entries
        with open(os.path.join(script_dir, "submit.sh"), "w") as f:
            f.write(render_submit_script(entries, log_dirs, list(after or [])))
        return sub

    def active_tasks(self, sub: Submission) -> dict[tuple[str, int], TaskState]:
        by_job = {}
        for name, ssub in sub.steps.items():
            for chunk in ssub.chunks:
                if chunk.job_id:
                    by_job[chunk.job_id] = (name, chunk)
        out: dict[tuple[str, int], TaskState] = {}
        for q in slurm.squeue(list(by_job)):
            if q.job_id not in by_job:
                continue
            name, chunk = by_job[q.job_id]
            state = TaskState.RUNNING if q.state in _RUNNING else TaskState.PENDING
            out[(name, self.task_index(chunk, q.array_id))] = state
        return out

    def final_states(self, sub: Submission) -> dict[tuple[str, int], str] | None:
        """Accounting states (FAILED, CANCELLED, TIMEOUT, ...) where sacct works."""
        by_job = {c.job_id: (name, c) for name, s in sub.steps.items() for c in s.chunks if c.job_id}
        states = slurm.sacct_states(list(by_job))
        if states is None:
            return None
        out = {}
        for (jid, arr), state in states.items():
            if jid in by_job:
                name, chunk = by_job[jid]
                if chunk.array and arr is None:
                    continue  # the array as a whole, not one of its tasks
                out[(name, self.task_index(chunk, arr))] = state
        return out

    def log_path(self, sub: Submission, step: str, chunk: JobChunk, index: int) -> str:
        log_dir = sub.steps[step].log_dir
        # The names the scripts' --output gives: %A_%a for an array task, %j for a job.
        if chunk.array:
            return f"{log_dir}/{chunk.job_id}_{index - chunk.offset}.log"
        return f"{log_dir}/{chunk.job_id}.log"

    def cancel(self, sub: Submission) -> list[str]:
        ids = sub.job_ids()
        slurm.scancel(ids)
        return ids
