"""Reading the download stage's per-shard `_stats.json` files (img2dataset's
format: count, successes, failed_to_download, failed_to_resize, duration,
start_time, end_time, status_dict). Light: used by the stage and by
`dcslurm report download` / `status` on login nodes."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field

from dcslurm.core.storage import DataFolder
from jobs.wds import split_key

OOM_SHARD_COUNT = 8  # shard names {:08d} (DataComp's setting)
STATS_SUFFIX = "_stats.json"
TOO_LARGE = "image too large"  # the failure of an image refused from its header (max_image_pixels)


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


def read_stats(folder: DataFolder, shard_id: int) -> dict | None:
    """A shard's _stats.json if it is committed (exists and parses), else None."""
    return read_stats_file(folder, f"{shard_name(shard_id)}{STATS_SUFFIX}")


def shard_done(folder: DataFolder, shard_id: int) -> dict | None:
    """A shard's stats if the shard is done, else None (redo it).

    Done: its _stats.json parses (img2dataset's own rule) AND what the shard holds
    agrees with it: the parquet is readable with one row per sample tried, and the
    tar is readable, not cut short, with one sample per success. A stats file beside
    a partial or foreign tar (a worker that outlived its task, a redo killed midway)
    is not trusted.
    """
    import pyarrow as pa  # here: this module stays light for login nodes
    import pyarrow.parquet as pq

    stats = read_stats(folder, shard_id)
    if stats is None:
        return None
    name = shard_name(shard_id)
    try:
        with folder.open(f"{name}.parquet") as fh:
            rows = pq.ParquetFile(fh).metadata.num_rows
        size = folder.size(f"{name}.tar")
        with folder.open(f"{name}.tar") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            members = tar.getmembers()
    except (OSError, EOFError, tarfile.TarError, pa.ArrowException):
        return None  # missing or unreadable
    if members and members[-1].offset_data + members[-1].size > size:
        return None  # the last member was cut short
    # distinct keys by webdataset's rule (KEY.jpg, KEY.txt, KEY.json: one sample)
    samples = len({key_ext[0] for m in members if (key_ext := split_key(m.name)) is not None})
    if rows != int(stats.get("count", -1)) or samples != int(stats.get("successes", -1)):
        return None
    return stats


def read_stats_file(folder: DataFolder, name: str) -> dict | None:
    try:
        stats = json.loads(folder.read_bytes(name))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None  # a torn write of a killed task: the shard is redone
    return stats if isinstance(stats, dict) and "count" in stats else None


def failure_reason(message: str) -> str:
    """A short reason for one of img2dataset's error messages (status_dict keys)."""
    m = message.lower()
    if m.startswith("http error "):
        return "http " + m.split()[2].rstrip(":")
    if "timed out" in m or "timeout" in m:
        return "timeout"
    if "refused" in m:
        return "connection refused"
    if m.startswith(TOO_LARGE) or "cv_io_max_image_pixels" in m or "image area too large" in m:
        # the stage's header check (TOO_LARGE), or OpenCV's own limit for formats Pillow cannot read
        return TOO_LARGE
    if "image decoding error" in m or "cannot identify" in m:
        # img2dataset's one message for bytes OpenCV cannot decode: HTML pages, truncated or corrupt files
        return "undecodable image"
    if "name or service not known" in m or "nodename nor servname" in m or "getaddrinfo" in m:
        return "dns failure"
    if "hash mismatch" in m:
        return "hash mismatch"
    if "x-robots-tag" in m:
        return "disallowed by x-robots-tag"
    if "remote end closed" in m or "connection reset" in m or "incompleteread" in m:
        return "connection dropped"
    return "other: " + message[:80]


@dataclass
class DownloadTotals:
    """The sum of some shards' stats."""

    shards: int = 0
    samples: int = 0
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    failures: Counter = field(default_factory=Counter)  # short reason -> samples
    messages: Counter = field(default_factory=Counter)  # img2dataset's message -> samples
    shard_seconds: float = 0.0  # sum of per-shard durations
    start: float = 0.0
    end: float = 0.0

    def add(self, stats: dict) -> None:
        self.shards += 1
        self.samples += int(stats.get("count", 0))
        self.successes += int(stats.get("successes", 0))
        self.failed_to_download += int(stats.get("failed_to_download", 0))
        self.failed_to_resize += int(stats.get("failed_to_resize", 0))
        self.shard_seconds += float(stats.get("duration", 0.0))
        for msg, n in (stats.get("status_dict") or {}).items():
            if msg != "success":
                self.failures[failure_reason(msg)] += int(n)
                self.messages[msg] += int(n)
        s, e = float(stats.get("start_time", 0.0)), float(stats.get("end_time", 0.0))
        if s and (not self.start or s < self.start):
            self.start = s
        if e > self.end:
            self.end = e

    def add_task(self, stats: dict, started: float, finished: float) -> None:
        """Add a committed task's marker stats (already summed over its shards)."""
        self.shards += int(stats.get("shards", 0))
        self.samples += int(stats.get("samples", 0))
        self.successes += int(stats.get("successes", 0))
        self.failed_to_download += int(stats.get("failed_to_download", 0))
        self.failed_to_resize += int(stats.get("failed_to_resize", 0))
        self.shard_seconds += float(stats.get("download_seconds", 0.0))
        self.failures.update({k: int(v) for k, v in (stats.get("failures") or {}).items()})
        if started and (not self.start or started < self.start):
            self.start = started
        if finished > self.end:
            self.end = finished

    @property
    def success_rate(self) -> float:
        return self.successes / self.samples if self.samples else 0.0

    @property
    def wall_seconds(self) -> float:
        return max(0.0, self.end - self.start)

    @property
    def samples_per_second(self) -> float:
        """Samples tried per second of wall time, first shard start to last shard end."""
        return self.samples / self.wall_seconds if self.wall_seconds else 0.0
