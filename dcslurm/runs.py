"""Operations on a run folder: submit, status, cancel. This module plans with
dcslurm.plan, queues with an executor, and reads markers; it computes nothing
a task does."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from dcslurm.config import RunConfig
from dcslurm.errors import UserError
from dcslurm.executors import TaskState, make_executor
from dcslurm.markers import done_indexes, failed_indexes, read_failure
from dcslurm.plan import PLAN_FILE, Plan, discover_inputs, make_plan, read_plan
from dcslurm.storage import DataFolder
from dcslurm.submission import Submission, load_submissions, save_submission

RUN_FILE = "run.json"  # the config fingerprint the run folder was created with


def plan_run(config: RunConfig) -> Plan:
    return make_plan(config, discover_inputs(config))


def check_run_folder(run: DataFolder, config: RunConfig) -> None:
    """Refuse a run folder created by a different configuration."""
    if not run.exists(RUN_FILE):
        return
    stored = run.read_json(RUN_FILE)
    if stored.get("fingerprint_hash") == config.fingerprint_hash():
        return
    ours, theirs = config.fingerprint(), stored.get("fingerprint", {})
    diffs = _diff_keys(ours, theirs)
    raise UserError(
        f"{run.url}: this run folder was created by another config ({stored.get('config_path', '?')}); "
        f"differs in {', '.join(diffs[:5]) or 'its fingerprint'}; use a new run folder"
    )


def _diff_keys(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix or "value"]


def pending_tasks(run: DataFolder, plan: Plan) -> dict[str, list[int]]:
    """Task indexes without a committed marker, per step."""
    out = {}
    for step in plan.steps:
        done = done_indexes(run, step.name)
        out[step.name] = [i for i in range(step.n_tasks) if i not in done]
    return out


@dataclass
class SubmitResult:
    plan: Plan
    submission: Submission
    pending: dict[str, list[int]]
    failed: dict[str, list[int]] = field(default_factory=dict)
    script_dir: str = ""


def submit_run(config: RunConfig, dry_run: bool = False, script_dir: str | None = None,
               progress=None) -> SubmitResult:
    """Plan the run, then queue (slurm) or run (local) every unfinished task."""
    plan = plan_run(config)
    _preflight(config, plan)
    run = config.folder()
    executor = make_executor(config.executor.kind, config)
    if dry_run:
        pending = {s.name: list(range(s.n_tasks)) for s in plan.steps}
        if run.exists(PLAN_FILE):
            pending = pending_tasks(run, plan)
        script_dir = script_dir or os.path.abspath(f"dcslurm-sbatch-{plan.run_name}")
        sub = executor.submit(plan, pending, dry_run=True, script_dir=script_dir, progress=progress)
        return SubmitResult(plan, sub, pending, script_dir=script_dir)
    run.check_reachable()
    check_run_folder(run, config)
    _refuse_if_active(run, config)
    run.write_json(RUN_FILE, {"fingerprint": config.fingerprint(), "fingerprint_hash": config.fingerprint_hash(),
                              "config_path": os.path.abspath(config.path), "created": time.time()})
    run.write_text(PLAN_FILE, plan.to_json())
    pending = pending_tasks(run, plan)
    sub = executor.submit(plan, pending, dry_run=False, script_dir=script_dir, progress=progress)
    record = save_submission(run, sub)
    result = SubmitResult(plan, sub, pending, script_dir=script_dir or "")
    if executor.kind == "local":
        try:
            result.failed = executor.run(plan, sub, progress=progress)
        finally:
            sub.finished = time.time()
            save_submission(run, sub, record)
    return result


def _preflight(config: RunConfig, plan: Plan) -> None:
    """Each planned stage's own input checks (e.g. download validates the pool) before anything is queued."""
    from dcslurm.stages import get_stage

    for stage in dict.fromkeys(s.stage for s in plan.steps):
        check = get_stage(stage).preflight
        if check is not None:
            check(config)


def _refuse_if_active(run: DataFolder, config: RunConfig) -> None:
    """Two live submissions of one run would race on the same tasks."""
    for sub in load_submissions(run)[-3:]:
        if sub.executor == "slurm" and config.executor.kind != "slurm":
            continue
        try:
            active = make_executor(sub.executor, config).active_tasks(sub)
        except UserError:
            continue
        if active:
            raise UserError(f"{run.url}: {len(active)} tasks of an earlier submission are still queued or "
                            "running; wait for them or run `dcslurm cancel` first")


@dataclass
class TaskStatus:
    index: int
    state: TaskState
    log: str = ""
    error: str = ""


@dataclass
class StepStatus:
    name: str
    n_tasks: int
    counts: dict[str, int]
    failed: list[TaskStatus]
    stats: dict = field(default_factory=dict)


def run_status(run_url: str, storage_options: dict | None = None, config: RunConfig | None = None,
               with_logs: bool = True) -> tuple[Plan, list[StepStatus]]:
    """Per step: tasks done / running / pending / failed / not started."""
    run = DataFolder(run_url, storage_options)
    plan = read_plan(run)
    subs = load_submissions(run)
    latest: dict[str, Submission] = {}
    for sub in subs:
        for name in sub.steps:
            latest[name] = sub
    active: dict[tuple[str, int], TaskState] = {}
    final: dict[tuple[str, int], str] = {}
    from dcslurm.config import parse_config

    cfg = config or parse_config({"run": {"folder": run_url, "stages": []}}, "status")
    checked: set[int] = set()
    for sub in latest.values():
        if id(sub) in checked:
            continue
        checked.add(id(sub))
        try:
            executor = make_executor(sub.executor, cfg)
            active.update(executor.active_tasks(sub))
            states = getattr(executor, "final_states", lambda s: None)(sub)
            if states:
                final.update(states)
        except UserError:
            pass  # no squeue here: report from markers alone
    out = []
    for step in plan.steps:
        # Set arithmetic, not a loop over every task: a step may have 10^5 tasks.
        done = {i for i in done_indexes(run, step.name) if i < step.n_tasks}
        failures = failed_indexes(run, step.name) - done
        sub = latest.get(step.name)
        submitted: dict[int, str] = {}  # index -> log path
        if sub is not None:
            ssub = sub.steps[step.name]
            for chunk in ssub.chunks:
                for i in chunk.indexes:
                    if sub.executor == "slurm":
                        submitted[i] = (f"{ssub.log_dir}/{chunk.job_id}_{i - chunk.offset}.log" if chunk.array
                                        else f"{ssub.log_dir}/{chunk.job_id}.log")
                    else:
                        submitted[i] = f"{ssub.log_dir}/local-{i:06d}.log"
        here = {i: st for (name, i), st in active.items() if name == step.name and i not in done}
        candidates = (set(submitted) | failures) - done - set(here)
        failed_idx = sorted(i for i in candidates if i in failures or _started(submitted.get(i, "")))
        counts = {s.value: 0 for s in TaskState}
        counts[TaskState.DONE.value] = len(done)
        for st in here.values():
            counts[st.value] += 1
        counts[TaskState.FAILED.value] = len(failed_idx)
        counts[TaskState.NOT_STARTED.value] = step.n_tasks - len(done) - len(here) - len(failed_idx)
        failed: list[TaskStatus] = []
        if with_logs:
            for i in failed_idx:
                rec = read_failure(run, step.name, i) if i in failures else None
                log = submitted.get(i, "") or (rec or {}).get("log", "")
                error = (rec or {}).get("error") or _last_error_line(log)
                sacct = final.get((step.name, i))
                if sacct and not (rec or {}).get("error"):
                    error = f"{sacct}: {error}" if error else sacct
                failed.append(TaskStatus(i, TaskState.FAILED, log, error))
        out.append(StepStatus(step.name, step.n_tasks, counts, failed))
    return plan, out


def _started(log_path: str) -> bool:
    """A task that left a log started; one cancelled while queued did not."""
    return bool(log_path) and os.path.exists(log_path)


def _last_error_line(log_path: str) -> str:
    """The last line of a task log that looks like an error (else the last line)."""
    if not log_path or not os.path.exists(log_path):
        return "no log (the task may have been killed before it started)"
    with open(log_path, "rb") as f:
        f.seek(max(0, os.path.getsize(log_path) - 65536))
        lines = [l.strip() for l in f.read().decode("utf-8", "replace").splitlines() if l.strip()]
    if not lines:
        return "empty log"
    for line in reversed(lines):
        if any(w in line for w in ("Error", "error", "CANCELLED", "Killed", "killed", "Traceback", "DUE TO")):
            return line[-300:]
    return lines[-1][-300:]


def cancel_run(run_url: str, storage_options: dict | None = None) -> list[str]:
    """Cancel every queued or running job of the run; returns what was cancelled."""
    from dcslurm.config import parse_config

    run = DataFolder(run_url, storage_options)
    read_plan(run)
    cfg = parse_config({"run": {"folder": run_url, "stages": []}}, "cancel")
    cancelled = []
    for sub in load_submissions(run):
        executor = make_executor(sub.executor, cfg)
        if executor.active_tasks(sub):
            executor.cancel(sub)
            cancelled += sub.job_ids() or [f"local pid {sub.pid}"]
    return cancelled
