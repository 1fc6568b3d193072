"""Task commit markers: the one place that says whether a task is done.

A task is done iff `_markers/STEP/NNNNNN.json` exists in the run folder. The
marker is written last, atomically (DataFolder.write_json), after every
output of the task is committed, and it records those outputs and the
task's stats, so downstream steps and `status` read one small file per task
and one listing per step (never one object per shard).

A marker also records which units it covers: the task's [start, stop) and its
step's units digest (plan.StepPlan.units_digest). A marker that covers other
units than the current plan gives the task is not this task's commit: the
runner redoes the task, and `submit` refuses a changed plan before queueing
(runs.check_run_folder). Markers written before these fields existed carry
none; they are taken as matching, which is right only while the plan is the
one they were made under: `submit` checks exactly that against plan.json.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

from dcslurm.core.storage import DataFolder

if TYPE_CHECKING:
    from dcslurm.core.plantypes import StepPlan

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


def read_marker(run: DataFolder, step: str, index: int) -> dict | None:
    rel = marker_rel(step, index)
    try:
        return run.read_json(rel)
    except FileNotFoundError:
        return None


def marker_covers(step: StepPlan, index: int) -> dict:
    """What a marker of task `index` of `step` records about the units it covers."""
    shards = step.shards(index)
    return {"start": shards.start, "stop": shards.stop, "units_digest": step.units_digest}


def marker_matches(marker: dict, step: StepPlan, index: int) -> bool:
    """True if `marker` commits task `index` of `step` as the plan splits it now.
    A marker without the fields (older dcslurm) matches: see the module docstring."""
    if "units_digest" not in marker:
        return True
    covers = marker_covers(step, index)
    return all(marker.get(k) == v for k, v in covers.items())


def commit_marker(run: DataFolder, step: str, index: int, outputs: list[str], stats: dict,
                  started: float, covers: dict | None = None) -> dict:
    """Commit task `index` of `step`: the last write of a successful task.
    `covers` (marker_covers) says which units it covers."""
    record = {
        "step": step, "index": index, "outputs": list(outputs), "stats": stats,
        "started": started, "finished": time.time(), "host": socket.gethostname(),
        **(covers or {}),
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
