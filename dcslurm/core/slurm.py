"""The one place that calls SLURM's commands (sbatch, squeue, scancel, sacct, scontrol)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from dcslurm.core.errors import UserError

DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's default MaxArraySize


class SchedulerUnreachable(UserError):
    """SLURM could not be asked (no squeue here, squeue failed or timed out): what is
    queued or running is unknown, which is not the same as "nothing"."""


def _run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    if shutil.which(args[0]) is None:
        raise UserError(f"{args[0]}: not found on PATH; is this a SLURM login node? (use --executor local to run here)")
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"{args[0]}: no answer from SLURM in {timeout:g} s (is slurmctld up?)") from None


def sbatch(script_path: str, extra_args: list[str] | None = None) -> str:
    """Submit a script; return the job id."""
    proc = _run(["sbatch", "--parsable", *(extra_args or []), script_path])
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise UserError(f"sbatch {script_path}: {msg[-1] if msg else 'failed with exit code %d' % proc.returncode}")
    return proc.stdout.strip().split(";")[0]


def max_array_size() -> int:
    """MaxArraySize of the cluster (`scontrol show config`)."""
    try:
        proc = _run(["scontrol", "show", "config"])
    except UserError:
        return DEFAULT_MAX_ARRAY_SIZE
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", proc.stdout, re.M)
    return int(m.group(1)) if m else DEFAULT_MAX_ARRAY_SIZE


@dataclass(frozen=True)
class QueuedTask:
    job_id: str  # the array's job id (or the job id)
    array_id: int | None  # None for a non-array job
    state: str  # PENDING, RUNNING, ...
    reason: str


def squeue(job_ids: list[str]) -> list[QueuedTask]:
    """Queued and running tasks of these jobs, arrays expanded (works without accounting)."""
    if not job_ids:
        return []
    try:
        proc = _run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i|%T|%r"])
    except UserError as exc:
        raise SchedulerUnreachable(str(exc)) from None
    if proc.returncode != 0:
        # squeue fails with "Invalid job id" once every listed job has left the queue.
        if "Invalid job id" in proc.stderr:
            return []
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise SchedulerUnreachable(f"squeue: {msg[-1] if msg else f'exit code {proc.returncode}'}")
    out = []
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3:
            continue
        jid, state, reason = parts[0], parts[1], parts[2]
        out.extend(QueuedTask(base, arr, state, reason) for base, arr in _split_job_id(jid))
    return out


def sacct_states(job_ids: list[str]) -> dict[tuple[str, int | None], str] | None:
    """Final states from accounting, or None where the cluster has no accounting."""
    if not job_ids or shutil.which("sacct") is None:
        return None
    try:
        proc = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "-o", "JobID,State"])
    except (UserError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    out: dict[tuple[str, int | None], str] = {}
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) < 2:
            continue
        jid, state = parts[0], parts[1].split()[0] if parts[1] else ""
        for key in _split_job_id(jid):
            out[key] = state
    return out


def _split_job_id(jid: str) -> list[tuple[str, int | None]]:
    """`12` -> [(12, None)]; `12_3` -> [(12, 3)]; `12_[3-5%2]` -> [(12, 3), (12, 4), (12, 5)]."""
    from dcslurm.core.shards import expand_indexes

    if "_" not in jid:
        return [(jid, None)]
    base, arr = jid.split("_", 1)
    if arr.isdigit():
        return [(base, int(arr))]
    return [(base, a) for a in expand_indexes(arr.strip("[]"))]


def scancel(job_ids: list[str]) -> None:
    if not job_ids:
        return
    proc = _run(["scancel", *job_ids])
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise UserError(f"scancel: {proc.stderr.strip()}")


def requeue(job_id: str) -> None:
    """Requeue job `job_id` (a running job asking for its own requeue: the runner, after a
    checkpointable step stopped on the time-limit warning). One-line UserError on failure."""
    proc = _run(["scontrol", "requeue", job_id])
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise UserError(f"scontrol requeue {job_id}: {msg[-1] if msg else 'exit code %d' % proc.returncode}")


def available() -> bool:
    return shutil.which("sbatch") is not None and bool(os.environ.get("SLURM_CONF")
                                                       or os.path.exists("/etc/slurm/slurm.conf"))
