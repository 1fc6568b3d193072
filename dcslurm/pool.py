"""A pool: a folder (local or s3://) of DataComp metadata parquet files, maybe with
`.npz` embeddings beside them. This module inspects and validates one, reading
parquet footers (rows, columns) and, unless told not to, the `uid` column.

Every problem is one line that names the file: "URL: problem".
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dcslurm.errors import UserError
from dcslurm.storage import DataFolder

REQUIRED_COLUMNS = ("uid", "url", "text")
DATACOMP_COLUMNS = ("uid", "url", "text", "original_width", "original_height", "clip_b32_similarity_score",
                    "clip_l14_similarity_score", "face_bboxes", "sha256")
BYTES_PER_SAMPLE = 35_000  # SPEC section 1: image shards are about 35 KB a sample
_UID = re.compile(r"[0-9a-fA-F]{32}")


@dataclass
class PoolFile:
    """One parquet file of a pool, as its footer describes it."""

    name: str
    url: str
    rows: int = 0
    columns: tuple[str, ...] = ()
    bytes: int = 0
    has_npz: bool = False
    problems: list[str] = field(default_factory=list)


@dataclass
class PoolReport:
    url: str
    files: list[PoolFile]
    uids_checked: bool = False
    problems: list[str] = field(default_factory=list)  # every problem, "URL: what", files first

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def metadata_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def columns(self) -> tuple[str, ...]:
        """Columns every file has, in the first file's order."""
        if not self.files:
            return ()
        common = set.intersection(*(set(f.columns) for f in self.files))
        return tuple(c for c in self.files[0].columns if c in common)

    @property
    def estimated_shard_bytes(self) -> int:
        return self.rows * BYTES_PER_SAMPLE

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_first(self) -> None:
        """Raise the first problem as a one-line UserError (naming the file)."""
        if self.problems:
            more = len(self.problems) - 1
            raise UserError(self.problems[0] + (f" (and {more} more problems: dcslurm pool inspect)" if more else ""))


def read_footer(folder: DataFolder, name: str) -> PoolFile:
    """Rows, columns and size of one parquet file (its footer only)."""
    import pyarrow.parquet as pq

    pf = PoolFile(name=name, url=folder.url_of(name))
    try:
        with folder.open(name) as fh:
            meta = pq.ParquetFile(fh)
            pf.rows = meta.metadata.num_rows
            pf.columns = tuple(meta.schema_arrow.names)
        pf.bytes = folder.size(name)
    except FileNotFoundError:
        pf.problems.append(f"{pf.url}: file disappeared while reading it")
        return pf
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad footer
        pf.problems.append(f"{pf.url}: not a readable parquet file ({_first_line(exc)})")
        return pf
    missing = [c for c in REQUIRED_COLUMNS if c not in pf.columns]
    if missing:
        pf.problems.append(f"{pf.url}: missing required column{'s' if len(missing) > 1 else ''} "
                           f"{', '.join(repr(c) for c in missing)} (has {', '.join(pf.columns) or 'none'})")
    return pf


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def read_uids(folder: DataFolder, name: str) -> list[str]:
    """The uid column of one parquet file, as Python strings (None for nulls)."""
    import pyarrow.parquet as pq

    with folder.open(name) as fh:
        return pq.read_table(fh, columns=["uid"]).column("uid").to_pylist()


def check_uids(url: str, uids: list) -> str | None:
    """The first problem with one file's uids (format, duplicates inside the file), or None."""
    for row, uid in enumerate(uids):
        if not isinstance(uid, str) or not _UID.fullmatch(uid):
            return f"{url}: malformed uid {uid!r} in row {row} (expected 32 hex characters)"
    seen: dict[str, int] = {}
    for row, uid in enumerate(uids):
        low = uid.lower()
        if low in seen:
            return f"{url}: duplicate uid {uid} in rows {seen[low]} and {row}"
        seen[low] = row
    return None


def inspect_pool(url: str, storage_options: dict | None = None, uids: bool = True,
                 max_workers: int = 8) -> PoolReport:
    """Inspect every parquet file of the pool at `url`.

    Footers are always read; with `uids`, the uid column of every file is read
    too and checked for format and for duplicates within and across files.
    Problems are collected, not raised (see `PoolReport.raise_first`).
    """
    folder = DataFolder(url, storage_options)
    if not folder.exists():
        raise UserError(f"{folder.url}: pool folder does not exist")
    names = folder.list(suffix=".parquet")
    if not names:
        raise UserError(f"{folder.url}: no .parquet files in the pool folder")
    npz = set(folder.list(suffix=".npz"))
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        files = list(pool.map(lambda n: read_footer(folder, n), names))
    for f in files:
        f.has_npz = f.name[: -len(".parquet")] + ".npz" in npz
    report = PoolReport(url=folder.url, files=files)
    for f in files:
        report.problems.extend(f.problems)
    if uids:
        readable = [f for f in files if not f.problems]
        with ThreadPoolExecutor(max_workers=max_workers) as pool:
            columns = list(pool.map(lambda f: read_uids(folder, f.name), readable))
        owner: dict[str, str] = {}
        for f, column in zip(readable, columns):
            problem = check_uids(f.url, column)
            if problem:
                f.problems.append(problem)
                report.problems.append(problem)
                continue
            for uid in column:
                low = uid.lower()
                other = owner.get(low)
                if other is not None:
                    problem = f"{f.url}: duplicate uid {uid} (also in {other})"
                    f.problems.append(problem)
                    report.problems.append(problem)
                    break
                owner[low] = f.name
        report.uids_checked = True
    return report


def validate_pool(url: str, storage_options: dict | None = None, uids: bool = True) -> PoolReport:
    """`inspect_pool`, raising the first problem as a one-line UserError."""
    report = inspect_pool(url, storage_options, uids=uids)
    report.raise_first()
    return report


def row_counts(urls: list[str], storage_options: dict | None = None, max_workers: int = 16) -> list[int]:
    """Rows of each parquet file (footers only), in order."""
    def rows(u: str) -> int:
        parent, name = u.rstrip("/").rsplit("/", 1)
        f = read_footer(DataFolder(parent, storage_options), name)
        if f.problems:
            raise UserError(f.problems[0])
        return f.rows

    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=min(max_workers, len(urls))) as pool:
        return list(pool.map(rows, urls))
