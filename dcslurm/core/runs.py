"""Operations on a run folder: submit, status, cancel. This module plans with
dcslurm.core.plan, queues with an executor, and reads markers; it computes nothing
a task does."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field

from dcslurm.core.config import RunConfig
from dcslurm.core.errors import UserError
from dcslurm.core.executors import Executor, ExecutorSettings, TaskState, make_executor
from dcslurm.core.markers import done_indexes, failed_indexes, read_failure
from dcslurm.core.plan import PLAN_FILE, Plan, discover_inputs, make_plan, plan_changes, read_plan
from dcslurm.core.plantypes import PlanInputs
from dcslurm.core.slurm import SchedulerUnreachable
from dcslurm.core.storage import DataFolder
from dcslurm.core.submission import Submission, load_submissions, save_submission

RUN_FILE = "run.json"  # the config fingerprint the run folder was created with


def plan_run(config: RunConfig, inputs: PlanInputs | None = None) -> Plan:
    """`inputs`: what the pool will hold when it is another run's output that does not
    exist yet (a sweep's branches are planned before their shared upstream ran)."""
    return make_plan(config, inputs if inputs is not None else discover_inputs(config))


def check_run_folder(run: DataFolder, config: RunConfig, plan: Plan | None = None) -> None:
    """Refuse a run folder created by a different configuration, or whose committed
    tasks `plan` would split or feed differently (see _check_plan)."""
    if not run.exists(RUN_FILE):
        return
    stored = run.read_json(RUN_FILE)
    if stored.get("fingerprint_hash") == config.fingerprint_hash():
        if plan is not None:
            _check_plan(run, plan)
        return
    ours, theirs = config.fingerprint(), stored.get("fingerprint", {})
    # One run, whatever stages a submit selects (--stages): compare the stages both have.
    diffs = _diff_keys(_shared_stages(ours, theirs), _shared_stages(theirs, ours))
    if not diffs:
        if plan is not None:
            _check_plan(run, plan)
        return
    raise UserError(
        f"{run.url}: this run folder was created by another config ({stored.get('config_path', '?')}); "
        f"differs in {', '.join(diffs[:5]) or 'its fingerprint'}; use a new run folder"
    )


def _check_plan(run: DataFolder, plan: Plan) -> None:
    """Refuse `plan` if a step with committed tasks covers other units than when they
    were committed (another units_per_task, pool file list, or upstream split): task i's
    marker would be taken for work it did not do, and units lost or done twice.

    One read of plan.json, and one listing per changed step: markers are never read
    one by one here (a step may have 10^5). Steps that plan.json lacks (a run submitted
    with fewer stages since) are checked against their first marker instead; a marker
    without units (older dcslurm) then cannot be checked and is accepted.
    """
    from dcslurm.core.markers import marker_matches, read_marker

    if not run.exists(PLAN_FILE):
        return
    stored = read_plan(run)
    changed = plan_changes(stored, plan)
    known = {s.name for s in stored.steps}
    for step in plan.steps:
        if step.name not in known:
            done = done_indexes(run, step.name)
            first = min(done, default=None)
            marker = read_marker(run, step.name, first) if first is not None else None
            if marker is not None and (first >= step.n_tasks or not marker_matches(marker, step, first)):
                changed[step.name] = (f"task {first} was committed for units "
                                      f"{marker.get('start')}..{marker.get('stop')} "
                                      "of another plan")
    bad = [(name, what) for name, what in changed.items() if done_indexes(run, name)]
    if bad:
        name, what = bad[0]
        more = f" (and {len(bad) - 1} later steps)" if len(bad) > 1 else ""
        raise UserError(
            f"{run.url}: step {name} has committed tasks but its split changed: {what}{more}; "
            f"use a new run folder, or remove {run.url_of('_markers/' + name)} (and later steps' markers) to redo it"
        )


def _shared_stages(fingerprint: dict, other: dict) -> dict:
    """`fingerprint` with only the stages `other` has too."""
    theirs = other.get("stages") or {}
    return {**fingerprint, "stages": {k: v for k, v in (fingerprint.get("stages") or {}).items() if k in theirs}}


def _run_record(run: DataFolder, config: RunConfig) -> dict:
    """run.json: the fingerprint of every stage the run has had (check_run_folder
    passed, so stages both have are equal), so that a submit of other stages later
    is compared with all of them."""
    fingerprint = config.fingerprint()
    if run.exists(RUN_FILE):
        stored = run.read_json(RUN_FILE).get("fingerprint") or {}
        fingerprint["stages"] = {**(stored.get("stages") or {}), **fingerprint["stages"]}
    # The same digest as RunConfig.fingerprint_hash, over the union.
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    return {"fingerprint": fingerprint, "fingerprint_hash": digest,
            "config_path": os.path.abspath(config.path), "created": time.time()}


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
               progress=None, checks: bool = True, after: list[str] | None = None,
               inputs: PlanInputs | None = None) -> SubmitResult:
    """Plan the run, then queue (slurm) or run (local) every unfinished task.

    `checks=False` (dry runs only) skips the stages' input checks. `after`: SLURM job ids
    the run's first jobs wait for (afterok), e.g. the jobs making its inputs, which do not
    exist yet: then `inputs` says what they will be, and the caller has checked them
    (dcslurm.core.sweep checks the branch as one run with its upstream)."""
    if not checks and not dry_run and not after:
        raise ValueError("a real submission always checks its inputs")
    plan = plan_run(config, inputs)
    if checks:
        preflight_run(config, plan)
    run = config.folder()
    executor = make_executor(config.executor.kind, run=config)
    if dry_run:
        pending = {s.name: list(range(s.n_tasks)) for s in plan.steps}
        if run.exists(PLAN_FILE):
            pending = pending_tasks(run, plan)
        script_dir = script_dir or os.path.abspath(f"dcslurm-sbatch-{plan.run_name}")
        sub = executor.submit(plan, pending, dry_run=True, script_dir=script_dir, progress=progress,
                              after=after)
        return SubmitResult(plan, sub, pending, script_dir=script_dir)
    run.check_reachable()
    # From the checks to the record (and, locally, to the end of the run) one submit
    # at a time: two at once would both pass the checks and queue every task twice.
    with submit_lock(run):
        check_run_folder(run, config, plan)
        _refuse_if_active(run, config)
        run.write_json(RUN_FILE, _run_record(run, config))
        run.write_text(PLAN_FILE, plan.to_json())
        pending = pending_tasks(run, plan)
        record: str | None = None

        def record_jobs(sub: Submission) -> None:
            # After every sbatch: if a later one fails (or this process dies), status,
            # cancel and the next submit still see the jobs already queued.
            nonlocal record
            try:
                record = save_submission(run, sub, record)
            except UserError as exc:
                ids = sub.job_ids()
                raise UserError(f"{exc}; jobs already queued and not recorded: {' '.join(ids)} "
                                f"(scancel {' '.join(ids)})" if ids else str(exc)) from None

        sub = executor.submit(plan, pending, dry_run=False, script_dir=script_dir, progress=progress,
                              on_queued=record_jobs, after=after)
        record_jobs(sub)
        result = SubmitResult(plan, sub, pending, script_dir=script_dir or "")
        result.failed = executor.wait(plan, sub, progress=progress, on_finished=record_jobs)
    return result


LOCK_FILE = "_submit.lock"


@contextlib.contextmanager
def submit_lock(run: DataFolder):
    """Hold the run folder's submit lock: an exclusive create of LOCK_FILE (local:
    O_EXCL; S3: a conditional PUT), naming its holder. A lock left by a dead submit on
    this host is taken over; one from another host is refused with how to clear it."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), "token": uuid.uuid4().hex}
    for _ in range(5):
        if run.create_exclusive(LOCK_FILE, json.dumps(me).encode()):
            break
        holder = _read_lock(run)
        if holder is None:
            continue  # released between our create and the read: try again
        if not _lock_is_stale(holder):
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(holder.get("time", 0))))
            raise UserError(
                f"{run.url}: another submit of this run folder is under way: {run.url_of(LOCK_FILE)} is held by "
                f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} since {since}; wait for it to end, "
                f"or, if that process is gone, remove {run.url_of(LOCK_FILE)} and submit again")
        _break_stale_lock(run, holder)
    else:
        raise UserError(f"{run.url}: could not take the submit lock {run.url_of(LOCK_FILE)}; submit again")
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # the error that ended the submit is the one to show
            _release_lock(run, me)
        raise
    _release_lock(run, me)


def _release_lock(run: DataFolder, me: dict) -> None:
    if (_read_lock(run) or {}).get("token") == me["token"]:
        run.remove(LOCK_FILE)


def _read_lock(run: DataFolder) -> dict | None:
    try:
        holder = json.loads(run.read_bytes(LOCK_FILE))
    except FileNotFoundError:
        return None
    except ValueError:  # half written by a process killed at that instant
        return {"host": "?", "pid": 0, "time": 0}
    return holder if isinstance(holder, dict) else {"host": "?", "pid": 0, "time": 0}


def _lock_is_stale(holder: dict) -> bool:
    """Held by a process of this host that no longer runs (e.g. a SIGKILLed submit)."""
    from dcslurm.core.proctree import alive

    return holder.get("host") == socket.gethostname() and not alive(int(holder.get("pid") or 0))


def _break_stale_lock(run: DataFolder, stale: dict) -> None:
    """Remove the stale lock `stale`, never a fresh one another submit took meanwhile."""
    path = run.local_path(LOCK_FILE)
    if path is None:
        # S3 has no atomic compare-and-delete: re-read just before deleting leaves a
        # window of one request in which two submits racing over a dead one's lock both win.
        if _read_lock(run) == stale:
            run.remove(LOCK_FILE)
        return
    aside = f"{path}.stale-{uuid.uuid4().hex}"
    try:
        os.rename(path, aside)  # atomic: whatever lock is there now is ours to check
    except FileNotFoundError:
        return
    try:
        with open(aside, "rb") as f:
            moved = json.loads(f.read() or b"null")
    except ValueError:
        moved = {"host": "?", "pid": 0, "time": 0}
    if moved != stale:  # a live submit's fresh lock: put it back (unless yet another was taken)
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    os.unlink(aside)


def preflight_run(config: RunConfig, plan: Plan) -> None:
    """Each planned stage's own input checks (e.g. download validates the pool) before anything is
    queued; `plan` runs them too, so it fails on the same bad input as `submit`."""
    from dcslurm.core.stages import get_stage

    for stage in dict.fromkeys(s.stage for s in plan.steps):
        check = get_stage(stage).preflight
        if check is not None:
            check(config)


def _refuse_if_active(run: DataFolder, config: RunConfig) -> None:
    """Two live submissions of one run would race on the same tasks."""
    for sub in load_submissions(run)[-3:]:
        if sub.executor != "local" and config.executor.kind == "local":
            continue  # a scheduler's jobs; this machine may have no squeue to ask
        try:
            active = make_executor(sub.executor, ExecutorSettings.of(config)).active_tasks(sub)
        except SchedulerUnreachable as exc:
            # Unknown is not "nothing": queueing now could run every task twice.
            raise UserError(f"{run.url}: cannot tell whether the jobs of an earlier submission "
                            f"({', '.join(sub.job_ids()[:4])}) are still queued or running ({exc}); "
                            "submit again when SLURM answers") from None
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
    unknown_reason: str = ""  # why some tasks' state is unknown (SLURM could not be asked)


def run_status(run_url: str, storage_options: dict | None = None, config: RunConfig | None = None,
               with_logs: bool = True) -> tuple[Plan, list[StepStatus]]:
    """Per step: tasks done / running / pending / failed / not started. `config` is not
    needed: the submission records name the jobs (its executor settings are used if given)."""
    run = DataFolder(run_url, storage_options)
    plan = read_plan(run)
    subs = load_submissions(run)
    latest: dict[str, Submission] = {}
    for sub in subs:
        for name in sub.steps:
            latest[name] = sub
    active: dict[tuple[str, int], TaskState] = {}
    final: dict[tuple[str, int], str] = {}
    settings = ExecutorSettings.of(config) if config is not None else ExecutorSettings()
    executors: dict[int, Executor] = {}  # id(sub) -> the executor that ran it
    unreachable: dict[int, str] = {}  # id(sub) -> why its queue could not be read
    for sub in latest.values():
        if id(sub) in executors:
            continue
        executor = executors[id(sub)] = make_executor(sub.executor, settings)
        try:
            active.update(executor.active_tasks(sub))
            final.update(executor.final_states(sub) or {})
        except SchedulerUnreachable as exc:
            unreachable[id(sub)] = f"cannot reach SLURM ({exc}): running/pending unknown"
    out = []
    for step in plan.steps:
        # Set arithmetic, not a loop over every task: a step may have 10^5 tasks.
        done = {i for i in done_indexes(run, step.name) if i < step.n_tasks}
        failures = failed_indexes(run, step.name) - done
        sub = latest.get(step.name)
        submitted: dict[int, str] = {}  # index -> log path
        if sub is not None:
            executor = executors[id(sub)]
            for chunk in sub.steps[step.name].chunks:
                for i in chunk.indexes:
                    submitted[i] = executor.log_path(sub, step.name, chunk, i)
        here = {i: st for (name, i), st in active.items() if name == step.name and i not in done}
        candidates = (set(submitted) | failures) - done - set(here)
        unknown_reason = unreachable.get(id(sub), "") if sub is not None else ""
        # A finished foreground run (local, submitit's local) recorded each failed task's exit
        # code: tasks it never started (stopped by a cancel, or after a failed step) are not failures.
        exit_codes = sub.steps[step.name].exit_codes if sub is not None and sub.finished else None
        if unknown_reason:
            failed_idx = sorted(candidates & failures)
        elif exit_codes is not None:
            failed_idx = sorted(i for i in candidates if i in failures or i in exit_codes)
        else:
            failed_idx = sorted(i for i in candidates if i in failures or _started(submitted.get(i, "")))
        unknown_idx = (candidates & set(submitted)) - failures if unknown_reason else set()
        counts = {s.value: 0 for s in TaskState}
        counts[TaskState.DONE.value] = len(done)
        for st in here.values():
            counts[st.value] += 1
        counts[TaskState.FAILED.value] = len(failed_idx)
        counts[TaskState.UNKNOWN.value] = len(unknown_idx)
        counts[TaskState.NOT_STARTED.value] = (step.n_tasks - len(done) - len(here) - len(failed_idx)
                                               - len(unknown_idx))
        failed: list[TaskStatus] = []
        if with_logs:
            for i in failed_idx:
                rec = read_failure(run, step.name, i) if i in failures else None
                log = submitted.get(i, "") or (rec or {}).get("log", "")
                error = (rec or {}).get("error") or _exit_code_text((exit_codes or {}).get(i)) or _last_error_line(log)
                sacct = final.get((step.name, i))
                if sacct and not (rec or {}).get("error"):
                    error = f"{sacct}: {error}" if error else sacct
                failed.append(TaskStatus(i, TaskState.FAILED, log, error))
        out.append(StepStatus(step.name, step.n_tasks, counts, failed, unknown_reason=unknown_reason))
    return plan, out


def _exit_code_text(code: int | None) -> str:
    """What a local task's exit code says: a signal (negative, or 128+N from the
    runner, as a shell reports it) or a plain exit status."""
    if not code:
        return ""
    signum = -code if code < 0 else code - 128 if 128 < code < 128 + signal.NSIG else 0
    if signum:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"killed by signal {signum} ({name})"
    return f"exited with code {code}"


def _started(log_path: str) -> bool:
    """A task that left a log started; one cancelled while queued did not."""
    return bool(log_path) and os.path.exists(log_path)


def _last_error_line(log_path: str) -> str:
    """The last line of a task log that looks like an error (else the last line)."""
    if not log_path or not os.path.exists(log_path):
        return "no log (the task may have been killed before it started)"
    with open(log_path, "rb") as f:
        f.seek(max(0, os.path.getsize(log_path) - 65536))
        lines = [s.strip() for s in f.read().decode("utf-8", "replace").splitlines() if s.strip()]
    if not lines:
        return "empty log"
    for line in reversed(lines):
        if any(w in line for w in ("Error", "error", "CANCELLED", "Killed", "killed", "Traceback", "DUE TO")):
            return line[-300:]
    return lines[-1][-300:]


def cancel_run(run_url: str, storage_options: dict | None = None) -> list[str]:
    """Cancel every queued or running job of the run; returns what was cancelled."""
    run = DataFolder(run_url, storage_options)
    read_plan(run)
    cancelled: dict[str, None] = {}  # ordered, each job once
    for sub in load_submissions(run):
        executor = make_executor(sub.executor, ExecutorSettings())  # the record names the jobs
        if executor.active_tasks(sub):
            cancelled.update(dict.fromkeys(executor.cancel(sub)))
    return list(cancelled)
