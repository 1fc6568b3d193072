"""Submission records: which jobs ran which tasks, kept in the run folder.

`_submissions/NNNN.json` per submit, so `status` and `cancel` work from any
login node with only the run folder's URL.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from dcslurm.core.errors import StorageError
from dcslurm.core.storage import DataFolder

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
    # Local executor, once the run has ended: the exit code of each task that failed
    # (negative: killed by that signal). A task neither here nor committed was
    # stopped before it started.
    exit_codes: dict[int, int] = field(default_factory=dict)


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
                                 chunks=[JobChunk(**c) for c in s["chunks"]],
                                 exit_codes={int(i): c for i, c in s.get("exit_codes", {}).items()})
            for name, s in d["steps"].items()
        }
        return cls(executor=d["executor"], time=d["time"], steps=steps, pid=d.get("pid", 0),
                   host=d.get("host", ""), finished=d.get("finished", 0.0))


def save_submission(run: DataFolder, sub: Submission, rel: str | None = None) -> str:
    """Write a new submission record (or rewrite `rel`); returns its path."""
    if rel is None:
        existing = run.list(SUBMISSIONS_DIR, suffix=".json")
        number = max((int(n.split(".")[0]) for n in existing if n.split(".")[0].isdigit()), default=0) + 1
        rel = f"{SUBMISSIONS_DIR}/{number:04d}.json"
    try:
        run.write_json(rel, sub.to_dict())
    except OSError as exc:  # a full disk, a read-only folder: one line naming the record
        raise StorageError(f"{run.url_of(rel)}: cannot save the submission record: {exc.strerror or exc}") from None
    return rel


def load_submissions(run: DataFolder) -> list[Submission]:
    """All submissions of the run, oldest first."""
    return [Submission.from_dict(run.read_json(f"{SUBMISSIONS_DIR}/{n}"))
            for n in run.list(SUBMISSIONS_DIR, suffix=".json")]
