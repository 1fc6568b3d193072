"""Submission records: which jobs ran which tasks, kept in the run folder.

`_submissions/NNNN.json` per submit, so `status` and `cancel` work from any
login node with only the run folder's URL.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from dcslurm.storage import DataFolder

SUBMISSIONS_DIR = "_submissions"


@dataclass
class JobChunk:
    """One scheduler job: an array chunk (task index = array id + offset) or a single job."""

    job_id: str
    indexes: list[int]
    offset: int = 0
    array: bool = True
    script: str = ""


@dataclass
class StepSubmission:
    step: str
    log_dir: str  # where this step's task logs go
    chunks: list[JobChunk] = field(default_factory=list)


@dataclass
class Submission:
    executor: str  # "slurm" | "local"
    time: float = field(default_factory=time.time)
    steps: dict[str, StepSubmission] = field(default_factory=dict)
    pid: int = 0  # local executor: the process running the tasks
    host: str = ""
    finished: float = 0.0  # local executor: when the foreground run ended

    def job_ids(self) -> list[str]:
        return [c.job_id for s in self.steps.values() for c in s.chunks if c.job_id]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Submission:
        steps = {
            name: StepSubmission(step=s["step"], log_dir=s["log_dir"],
                                 chunks=[JobChunk(**c) for c in s["chunks"]])
            for name, s in d["steps"].items()
        }
        return cls(executor=d["executor"], time=d["time"], steps=steps, pid=d.get("pid", 0),
                   host=d.get("host", ""), finished=d.get("finished", 0.0))


def save_submission(run: DataFolder, sub: Submission, rel: str | None = None) -> str:
    """Write a new submission record (or rewrite `rel`); returns its path."""
    if rel is not None:
        run.write_json(rel, sub.to_dict())
        return rel
    existing = run.list(SUBMISSIONS_DIR, suffix=".json")
    number = max((int(n.split(".")[0]) for n in existing if n.split(".")[0].isdigit()), default=0) + 1
    rel = f"{SUBMISSIONS_DIR}/{number:04d}.json"
    run.write_json(rel, sub.to_dict())
    return rel


def load_submissions(run: DataFolder) -> list[Submission]:
    """All submissions of the run, oldest first."""
    return [Submission.from_dict(run.read_json(f"{SUBMISSIONS_DIR}/{n}"))
            for n in run.list(SUBMISSIONS_DIR, suffix=".json")]
