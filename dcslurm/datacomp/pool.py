"""A pool: a folder (local or s3://) of DataComp metadata parquet files, maybe with
`.npz` embeddings beside them. This module inspects and validates one, reading
parquet footers (rows, columns, column types) and, unless told not to, the `uid`
column.

Every problem is one line that names the file: "URL: problem".

Uid uniqueness across a pool is checked in bounded memory (`find_duplicate`):
each file's uids are checked on their own and their upper halves sorted
(`sorted_uid_run`, which also finds duplicates inside the file), and the sorted
runs are merged one uid range at a time. The same code serves `pool inspect` / the download preflight and the
filter stage's map (per-file runs) and reduce (the merge).
"""

from __future__ import annotations

import binascii
import io
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from dcslurm.core.errors import UserError
from dcslurm.core.storage import DataFolder

# Required, and strings: img2dataset writes str(value) of what pyarrow hands it, so a
# binary `text` becomes "b'...'" captions, and non-UTF-8 bytes gave shards that claim
# successes and hold no samples.
REQUIRED_COLUMNS = ("uid", "url", "text")
DATACOMP_COLUMNS = ("uid", "url", "text", "original_width", "original_height", "clip_b32_similarity_score",
                    "clip_l14_similarity_score", "face_bboxes", "sha256")
BYTES_PER_SAMPLE = 35_000  # SPEC section 1: image shards are about 35 KB a sample


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
            schema = meta.schema_arrow
            pf.columns = tuple(schema.names)
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
    for c in REQUIRED_COLUMNS:
        problem = column_type_problem(folder, name, pf.url, c, schema.field(c).type)
        if problem:
            pf.problems.append(problem)
            break  # one line per file; the first bad column
    return pf


def column_type_problem(folder: DataFolder, name: str, url: str, column: str, arrow_type) -> str | None:
    """What is wrong with a required column's type, from the schema; for a binary column the
    values are read too, to name the first row that is not UTF-8 (the row a user must fix)."""
    import pyarrow as pa

    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type):
        return None
    expected = "strings of 32 hex characters" if column == "uid" else "UTF-8 strings"
    if not (pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)
            or pa.types.is_binary_view(arrow_type)):
        return f"{url}: column {column!r} has type {arrow_type}, expected {expected}"
    row, value = _first_non_utf8(folder, name, column)
    if row is None:
        return f"{url}: column {column!r} has type {arrow_type} (valid UTF-8, but stored as bytes); store it as strings"
    return (f"{url}: column {column!r} row {row}: not UTF-8 ({value[:40]!r}); the column has type {arrow_type}, "
            f"expected {expected}")


def _first_non_utf8(folder: DataFolder, name: str, column: str) -> tuple[int | None, bytes]:
    """The first row of a binary column whose bytes are not UTF-8, one row group at a time
    (memory: one row group); (None, b"") if every value decodes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    start = 0
    with folder.open(name) as fh:
        meta = pq.ParquetFile(fh)
        for g in range(meta.num_row_groups):
            values = meta.read_row_group(g, columns=[column]).column(column)
            try:  # one C pass that validates the whole row group; Python only to name the row
                values.cast(pa.large_string())
            except pa.ArrowInvalid:
                for i, v in enumerate(values.to_pylist()):
                    if v is not None:
                        try:
                            v.decode("utf-8")
                        except UnicodeDecodeError:
                            return start + i, v
            start += len(values)
    return None, b""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def check_uids(url: str, uids: list) -> str | None:
    """The first problem with one file's uids (format, duplicates inside the file), or None.
    The download task's per-file check: the same parser and duplicate test as everything else."""

    for row, uid in enumerate(uids):
        if uid is not None and not isinstance(uid, str):  # pyarrow would refuse the list, not name the row
            return f"{url}: column 'uid' row {row}: malformed uid {uid!r} (expected 32 hex characters)"
    try:
        sorted_uid_run(*parse_uids(uids, url), url)
    except UserError as exc:
        return str(exc)
    return None


def inspect_pool(url: str, storage_options: dict | None = None, uids: bool = True,
                 max_workers: int = 8) -> PoolReport:
    """Inspect every parquet file of the pool at `url`.

    Footers are always read (rows, columns, column types; a binary column's values
    too, to name its first non-UTF-8 row); with `uids`, the uid column of every
    file is read too and checked for format and for duplicates within and across
    files, in bounded memory: each file's sorted upper halves are spilled to a local
    temporary folder (8 bytes a row), then merged by `find_duplicate`.
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
        with tempfile.TemporaryDirectory(prefix="dcslurm-uids-") as tmp:
            spill = DataFolder(tmp)

            def sort_one(k: int) -> np.ndarray | str:
                # At most max_workers files' uid columns are in memory at once.
                try:
                    run, offsets = sorted_uid_run(*read_uid_halves(folder, readable[k].name), readable[k].url)
                except UserError as exc:
                    return str(exc)
                save_uid_run(spill, f"{k}.npy", run)
                return offsets

            with ThreadPoolExecutor(max_workers=max_workers) as pool:
                results = list(pool.map(sort_one, range(len(readable))))
            runs: list[tuple[PoolFile, UidRun]] = []
            for k, (f, res) in enumerate(zip(readable, results)):
                if isinstance(res, str):
                    f.problems.append(res)
                    report.problems.append(res)
                else:
                    runs.append((f, UidRun(res, uid_run_reader(spill, f"{k}.npy"),
                                           lambda name=f.name: read_uid_halves(folder, name))))
            dup = find_duplicate([r for _, r in runs])
            if dup is not None:
                uid, i, ri, j, rj = dup
                a, b = runs[i][0], runs[j][0]
                problem = f"{b.url}: duplicate uid {uid} in row {rj} (also in {a.url} row {ri})"
                b.problems.append(problem)
                report.problems.append(problem)
        report.uids_checked = True
    return report


def read_uid_halves(folder: DataFolder, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One parquet file's uids as (upper, lower) uint64 halves; a malformed or missing uid is
    a UserError naming the file and row."""
    import pyarrow.parquet as pq


    with folder.open(name) as fh:
        column = pq.read_table(fh, columns=["uid"]).column("uid")
    return parse_uids(column, folder.url_of(name))


# -- uid uniqueness in bounded memory ----------------------------------------------
#
# A pool can have 12.8B rows in thousands of files: one set of every uid would need
# hundreds of GB. Instead each file's uids are checked on their own and their upper
# 64-bit halves sorted (a "run", 8 bytes a row, spilled to storage), with the row
# offsets where each of UID_BUCKETS equal ranges of the upper half start. The merge
# takes a few consecutive buckets at a time, at most MERGE_ROWS rows from all runs
# together, and reads only those slices (byte ranges) of each run: memory is about
# 16 bytes x MERGE_ROWS (~256 MB) plus 8 KB of offsets per file, whatever the pool's
# size. Only an upper half seen twice sends the merge back to the files for the lower
# halves of those few rows (distinct uids share an upper half about n^2 / 2^65 times:
# a handful in 12.8B). DataComp uids are hashes, so the buckets are even (12.8B rows:
# 12.5M a bucket); a pool whose uids crowd into one bucket holds that bucket at once.
# Reads: (files x passes) ranges: one pass up to MERGE_ROWS rows, ~6,000 for 12.8B rows.

UID_BUCKET_BITS = 10
UID_BUCKETS = 1 << UID_BUCKET_BITS
MERGE_ROWS = 16 << 20


def uid_hex(hi: int, lo: int) -> str:
    return f"{int(hi):016x}{int(lo):016x}"


def _first_pair(hi: np.ndarray, lo: np.ndarray, owner: np.ndarray, row: np.ndarray):
    """The first uid (in uid order) that two of the given rows share: (uid, (owner, row) of
    the first, of the second), the first being the earlier owner/row; or None."""
    order = np.lexsort((row, owner, lo, hi))
    h, lw = hi[order], lo[order]
    same = np.nonzero((h[1:] == h[:-1]) & (lw[1:] == lw[:-1]))[0]
    if not same.size:
        return None
    p, q = order[same[0]], order[same[0] + 1]
    return uid_hex(hi[p], lo[p]), (int(owner[p]), int(row[p])), (int(owner[q]), int(row[q]))


def _repeats(sorted_upper: np.ndarray) -> np.ndarray:
    """The values that occur more than once in a sorted array."""
    eq = np.nonzero(sorted_upper[1:] == sorted_upper[:-1])[0]
    return np.unique(sorted_upper[eq]) if eq.size else eq.astype(np.uint64)


def sorted_uid_run(hi: np.ndarray, lo: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One file's sorted upper halves (uint64) and its bucket offsets (int64, UID_BUCKETS + 1);
    a uid twice in the file is a UserError naming `where` and both rows. (A plain sort of one
    uint64 column: a third of the time of a two-key sort of the uids.)"""
    run = np.sort(hi)
    shared = _repeats(run)
    if shared.size:  # rare: compare those rows in full
        rows = np.nonzero(np.isin(hi, shared))[0]
        pair = _first_pair(hi[rows], lo[rows], np.zeros(len(rows), np.int64), rows)
        if pair is not None:
            uid, (_, a), (_, b) = pair
            raise UserError(f"{where}: duplicate uid {uid} in rows {a} and {b}")
    starts = np.arange(UID_BUCKETS, dtype=np.uint64) << np.uint64(64 - UID_BUCKET_BITS)
    offsets = np.empty(UID_BUCKETS + 1, np.int64)
    offsets[:-1] = np.searchsorted(run, starts)
    offsets[-1] = len(run)
    return run, offsets


def save_uid_run(folder: DataFolder, rel: str, run: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, run)
    folder.write_bytes(rel, buf.getvalue())


def uid_run_reader(folder: DataFolder, rel: str) -> Callable[[int, int], np.ndarray]:
    """Rows a..b of a run saved by `save_uid_run`: one ranged read (seek), not the file."""

    def read(a: int, b: int) -> np.ndarray:
        with folder.open(rel) as fh:
            major, _ = np.lib.format.read_magic(fh)
            header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            header(fh)
            fh.seek(fh.tell() + a * 8)
            data = fh.read((b - a) * 8)
        if len(data) != (b - a) * 8:
            raise UserError(f"{folder.url_of(rel)}: sorted uids cut short (rows {a}..{b} asked for)")
        return np.frombuffer(data, np.uint64)

    return read


@dataclass
class UidRun:
    """One file's uids, as the merge sees them."""

    offsets: np.ndarray  # from sorted_uid_run
    read: Callable[[int, int], np.ndarray]  # rows a..b of the sorted upper halves
    halves: Callable[[], tuple[np.ndarray, np.ndarray]]  # the file's (upper, lower) in row order: rarely


def _passes(counts: np.ndarray, max_rows: int) -> list[tuple[int, int]]:
    """Consecutive bucket ranges [a, b) of at most max_rows rows each (one bucket if bigger)."""
    out, a, rows = [], 0, 0
    for b, c in enumerate(counts.tolist()):
        if rows and rows + c > max_rows:
            out.append((a, b))
            a, rows = b, 0
        rows += c
    out.append((a, len(counts)))
    return out


def find_duplicate(runs: Sequence[UidRun], max_rows: int = MERGE_ROWS) -> tuple[str, int, int, int, int] | None:
    """A uid in two runs: (uid, run i, its row there, run j, its row there), i < j; None if
    every uid is unique. Runs are duplicate-free inside (sorted_uid_run checked).

    Each pass concatenates the runs' slices of a bucket range and sorts them with a
    stable sort (timsort: it merges the already sorted slices). An upper half seen
    twice asks the files holding it for their lower halves (`UidRun.halves`).
    """
    if len(runs) < 2:
        return None
    counts = np.zeros(UID_BUCKETS, np.int64)
    for r in runs:
        counts += np.diff(r.offsets)
    for ba, bb in _passes(counts, max_rows):
        slices, owners = [], []
        for k, r in enumerate(runs):
            a, b = int(r.offsets[ba]), int(r.offsets[bb])
            if b > a:
                slices.append(r.read(a, b))
                owners.append(k)
        if len(slices) < 2:
            continue
        lengths = [len(x) for x in slices]
        upper = np.concatenate(slices)
        del slices
        shared = _repeats(np.sort(upper, kind="stable"))
        if not shared.size:
            continue  # the usual case: no upper half twice, so no uid twice
        # Which runs hold a shared upper half, then those rows' lower halves, from the files.
        owner = np.repeat(np.asarray(owners, np.int64), lengths)
        holders = np.unique(owner[np.isin(upper, shared)]).tolist()
        del upper
        his, los, whose, rows = [], [], [], []
        for k in holders:
            hi, lo = runs[k].halves()
            r = np.nonzero(np.isin(hi, shared))[0]
            his.append(hi[r])
            los.append(lo[r])
            whose.append(np.full(len(r), k, np.int64))
            rows.append(r)
        pair = _first_pair(np.concatenate(his), np.concatenate(los), np.concatenate(whose), np.concatenate(rows))
        if pair is not None:
            uid, (i, ri), (j, rj) = pair
            return uid, i, ri, j, rj
    return None


# -- uids as DataComp writes them: 32 hex characters, kept as (upper, lower) uint64 --
# One codec for the orchestrator's pool checks and every stage (filter, reshard, audit).

def hex_halves(hex_text) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated 32-character hex uids (bytes-like) -> (upper, lower) uint64 arrays, in one
    C call; binascii.Error if any character is not hex."""
    words = np.frombuffer(binascii.unhexlify(hex_text), dtype=">u8").astype(np.uint64)
    return np.ascontiguousarray(words[0::2]), np.ascontiguousarray(words[1::2])


_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


def parse_uids(uids, where: str) -> tuple[np.ndarray, np.ndarray]:
    """32-hex-char uids (a pyarrow string column or a list) -> (upper, lower) uint64.

    Reads the column's bytes directly (no Python string per row); a null, a
    wrong length or a non-hex character is a UserError naming `where`, the
    column and the row.
    """
    import pyarrow as pa

    arr = uids if isinstance(uids, (pa.Array, pa.ChunkedArray)) else pa.array(list(uids), pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.string())
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        raise UserError(f"{where}: column 'uid' has type {arr.type}, expected strings of 32 hex characters")
    if arr.null_count:
        row = int(np.nonzero(arr.is_null().to_numpy(zero_copy_only=False))[0][0])
        raise UserError(f"{where}: column 'uid' row {row}: missing uid")
    off_type = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=off_type)[arr.offset: arr.offset + n + 1]
    bad = np.nonzero(np.diff(offsets) != 32)[0]
    if bad.size:
        row = int(bad[0])
        raise UserError(f"{where}: column 'uid' row {row}: malformed uid {arr[row].as_py()!r} "
                        "(expected 32 hex characters)")
    raw = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]: offsets[-1]]
    try:  # the whole column in one C call, straight from arrow's buffer; any non-hex byte raises
        return hex_halves(raw)
    except binascii.Error:
        pass  # the slow path below names the first malformed row
    nib = _HEX[raw].reshape(n, 32)
    bad = np.nonzero((nib == 255).any(axis=1))[0]
    if bad.size:
        row = int(bad[0])
        raise UserError(f"{where}: column 'uid' row {row}: malformed uid {arr[row].as_py()!r} "
                        "(expected 32 hex characters)")
    raw_bytes = (nib[:, 0::2] << 4) | nib[:, 1::2]  # (n, 16) bytes, most significant first
    words = np.ascontiguousarray(raw_bytes).view(">u8").astype(np.uint64)  # (n, 2): upper, lower
    return np.ascontiguousarray(words[:, 0]), np.ascontiguousarray(words[:, 1])
