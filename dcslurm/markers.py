"""Task commit markers: the one place that says whether a task is done.

A task is done iff `_markers/STEP/NNNNNN.json` exists in the run folder. The
marker is written last, atomically (DataFolder.write_json), after every
output of the task is committed, and it records those outputs and the
task's stats, so downstream steps and `status` read one small file per task
and one listing per step (never one object per shard).
"""

from __future__ import annotations

import socket
import time

from dcslurm.storage import DataFolder

MARKERS_DIR = "_markers"
FAILURES_DIR = "_failures"


def marker_rel(step: str, index: int) -> str:
    return f"{MARKERS_DIR}/{step}/{index:06d}.json"


def failure_rel(step: str, index: int) -> str:
    return f"{FAILURES_DIR}/{step}/{index:06d}.json"


def _indexes(names: list[str]) -> set[int]:
    out = set()
    for n in names:
        stem = n[: -len(".json")]
        if stem.isdigit():
            out.add(int(stem))
    return out


def done_indexes(run: DataFolder, step: str) -> set[int]:
    """Indexes of the committed tasks of `step` (one listing)."""
    return _indexes(run.list(f"{MARKERS_DIR}/{step}", suffix=".json"))


def is_done(run: DataFolder, step: str, index: int) -> bool:
    return run.exists(marker_rel(step, index))


def read_marker(run: DataFolder, step: str, index: int) -> dict | None:
    rel = marker_rel(step, index)
    try:
        return run.read_json(rel)
    except FileNotFoundError:
        return None


def commit_marker(run: DataFolder, step: str, index: int, outputs: list[str], stats: dict,
                  started: float) -> dict:
    """Commit task `index` of `step`: the last write of a successful task."""
    record = {
        "step": step, "index": index, "outputs": list(outputs), "stats": stats,
        "started": started, "finished": time.time(), "host": socket.gethostname(),
    }
    run.write_json(marker_rel(step, index), record)
    run.remove(failure_rel(step, index))
    return record


def record_failure(run: DataFolder, step: str, index: int, error: str, log_path: str) -> None:
    """Best effort: a task that dies by signal or kill -9 cannot write this."""
    run.write_json(failure_rel(step, index), {
        "step": step, "index": index, "error": error, "log": log_path,
        "host": socket.gethostname(), "time": time.time(),
    })


def failed_indexes(run: DataFolder, step: str) -> set[int]:
    return _indexes(run.list(f"{FAILURES_DIR}/{step}", suffix=".json"))


def read_failure(run: DataFolder, step: str, index: int) -> dict | None:
    try:
        return run.read_json(failure_rel(step, index))
    except FileNotFoundError:
        return None
