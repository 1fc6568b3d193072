"""Reshard steps (see spec.py for the plan): count, index, write, finalize.

The global order of output samples is: input shards in unit order (or a
seeded permutation of them when shuffling), samples in tar order, the c
repeats of a sample one after the other. Global sample g goes to output shard
g // samples_per_shard, so shard names and contents depend only on the
inputs, the subset and the params, never on the number of tasks.
"""

from __future__ import annotations

import binascii
import bisect
import contextlib
import dataclasses
import io
import json
import os
import re
import threading
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dcslurm.core.errors import UserError
from dcslurm.core.shards import split_evenly
from dcslurm.core.storage import DataFolder, content_identity
from dcslurm.core.task import TaskContext, TaskResult
from dcslurm.datacomp.pool import hex_halves
from jobs.inputs import filter_in_run
from jobs.reshard.subset import SubsetFile, load_subset_url
from jobs.reshard.tario import (
    ReadCounters,
    SampleTable,
    TarSampleReader,
    TarShardWriter,
    indexed_table,
    json_uid,
    open_tar_spans,
    open_tars_ahead,
)
from jobs.wds import TarIndex, index_name, shard_stem

COUNTS_DIR = "_counts"
INDEX_FILE = "_index.json"
SIZES_FILE = "sizes.json"
STATS_FILE = "stats.json"
_HEX_UID = re.compile(r"[0-9a-fA-F]{32}")
# Per-sample problems that make a sample unmatchable (counted, never raised).
SAMPLE_PROBLEMS = ("samples_without_json", "samples_bad_json", "samples_without_uid", "samples_bad_uid",
                   "samples_unsafe_key")
_PROBLEM_KEY = {"no_json": "samples_without_json", "bad_json": "samples_bad_json",
                "no_uid": "samples_without_uid", "bad_uid": "samples_bad_uid"}


# -- inputs ---------------------------------------------------------------------

def subset_url(ctx: TaskContext) -> str:
    """The subset this run reshards: the filter stage's output, or params `subset`."""
    if filter_in_run(ctx.plan.steps):
        return ctx.run.url_of("filter/subset.npy")
    return ctx.params.subset


def load_run_subset(ctx: TaskContext) -> SubsetFile:
    """Load and validate the run's subset (copied to scratch first when remote)."""
    return load_subset_url(subset_url(ctx), ctx.plan.storage_options, ctx.scratch)


def split_url(ctx: TaskContext, url: str) -> tuple[DataFolder, str]:
    parent, name = url.rstrip("/").rsplit("/", 1)
    return ctx.folder(parent), name


def hex_uid_pairs(uids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(upper halves, lower halves, valid) of uids that should be 32 hex characters; the
    halves of an invalid one are 0. All valid (the usual case): one C call for the lot."""
    n = len(uids)
    if n and all(isinstance(u, str) and len(u) == 32 for u in uids):
        try:
            return (*hex_halves("".join(uids).encode("ascii")), np.ones(n, bool))
        except (binascii.Error, UnicodeEncodeError):
            pass  # some uid is not hex: sort them out one by one
    his, los, valid = np.zeros(n, np.uint64), np.zeros(n, np.uint64), np.zeros(n, bool)
    for i, u in enumerate(uids):
        if isinstance(u, str) and _HEX_UID.fullmatch(u):
            his[i], los[i], valid[i] = int(u[:16], 16), int(u[16:], 16), True
    return his, los, valid


def _unsafe_key(key: str) -> bool:
    """A key that would extract outside the output folder."""
    return "/" in key and (key.startswith("/") or ".." in key.split("/"))


def multiplicities(table: SampleTable, subset: SubsetFile) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per sample: (times the subset keeps it, its uid's first subset row, problem key or "")."""
    n = len(table)
    problems = [""] * n
    uids, rows = [], []
    for i, (key, (uid, problem)) in enumerate(zip(table.keys, table.uid_results())):
        if uid is None:
            problems[i] = _PROBLEM_KEY[problem]
        elif _unsafe_key(key):
            problems[i] = "samples_unsafe_key"
        else:
            uids.append(uid)
            rows.append(i)
    his, los, valid = hex_uid_pairs(uids)
    rows = np.asarray(rows, np.int64)
    for i in rows[~valid].tolist():
        problems[i] = "samples_bad_uid"
    rows_ok = rows[valid]
    counts, first = np.zeros(n, np.int64), np.full(n, -1, np.int64)
    if rows_ok.size:
        f, c = subset.lookup_many(his[valid], los[valid])
        counts[rows_ok], first[rows_ok] = c, f
    return counts, first, problems


def _readers(ctx: TaskContext, urls: list[str]) -> contextlib.closing:
    """Readers of the input tars `urls`, in order (None where one is missing), each opened
    while the one before is processed; use as `with _readers(...) as readers:`."""
    sources = []
    for url in urls:
        folder, name = split_url(ctx, url)
        sources.append((folder, name, ctx.scratch, url))
    return contextlib.closing(open_tars_ahead(sources))


# -- step 1: count ----------------------------------------------------------------

def count(ctx: TaskContext) -> TaskResult:
    """Per input shard of this task: samples scanned, samples the subset keeps (with repeats),
    and where each kept sample's members lie in the tar (what the write step copies)."""
    subset = load_run_subset(ctx)
    shards: list[dict] = []
    kept = KeptSamples()
    tars = [url for url in ctx.input_names() if url.endswith(".tar")]  # not the parquet/stats beside them
    indexes, stale = _member_indexes(ctx, tars)
    unindexed = [url for url in tars if indexes[url] is None]
    with _readers(ctx, unindexed) as readers:
        for url in tars:
            record = _new_record(url, url in stale)
            if indexes[url] is not None:
                _count_indexed_shard(record, *indexes[url], subset, shards, kept)
            else:
                _count_shard(ctx, record, next(readers), subset, shards, kept)
    rel = f"{COUNTS_DIR}/{ctx.index:06d}"
    ctx.output.write_bytes(f"{rel}.npz", kept.to_npz())
    ctx.output.write_json(f"{rel}.json", {"subset": subset.url, "subset_rows": len(subset), "shards": shards})
    totals = _sum_records(shards)
    return TaskResult(outputs=[f"{ctx.step.stage}/{rel}.json", f"{ctx.step.stage}/{rel}.npz"], stats=totals)


class KeptSamples:
    """The kept samples of a count task's input shards, as columns saved in one .npz:
    per kept sample its input shard (position in the task), uid's first subset row,
    multiplicity and key; per member its extension, data offset and size."""

    COLUMNS = ("shard", "first", "count", "key", "starts", "ext", "offset", "size")

    def __init__(self):
        self.parts: dict[str, list[np.ndarray]] = {c: [] for c in self.COLUMNS}
        self.members = 0

    def add(self, shard: int, table: SampleTable, counts: np.ndarray, first: np.ndarray) -> None:
        picked = np.flatnonzero(counts > 0)
        lo, hi = table.starts[picked], table.starts[picked + 1]
        lengths = hi - lo
        rows = _concat_ranges(lo, hi)
        p = self.parts
        p["shard"].append(np.full(len(picked), shard, np.int32))
        p["first"].append(first[picked])
        p["count"].append(counts[picked])
        p["key"].append(_byte_strings([table.keys[i] for i in picked.tolist()]))
        p["starts"].append(self.members + np.cumsum(lengths) - lengths)
        p["ext"].append(_byte_strings([table.exts[j] for j in rows.tolist()]))
        p["offset"].append(table.offsets[rows])
        p["size"].append(table.sizes[rows])
        self.members += int(lengths.sum())

    def to_npz(self) -> bytes:
        arrays = {c: np.concatenate(v) if v else np.zeros(0, np.int64) for c, v in self.parts.items()}
        arrays["starts"] = np.append(arrays["starts"], self.members).astype(np.int64)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()


def _concat_ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The integers of [lo[i], hi[i]) for every i, in order, without a Python loop."""
    lengths = hi - lo
    return np.repeat(lo - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())


def _byte_strings(texts: list[str]) -> np.ndarray:
    """Names as a numpy bytes array (no pickling; tar names never hold NUL)."""
    return np.array([t.encode("utf-8", "surrogateescape") for t in texts], dtype=bytes) if texts \
        else np.zeros(0, "S1")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _index_folder(ctx: TaskContext) -> DataFolder | None:
    """Where embed wrote the member indexes of the input tars (jobs.wds): this run's embed
    folder, or else the folder of the embed outputs this run's filter reads (a sweep's
    upstream); None when neither is in the plan."""
    if any(s.stage == "embed" for s in ctx.plan.steps):
        return ctx.run.child("embed")
    for s in ctx.plan.steps:
        units = s.units
        if units.upstream is None and units.count and (units.names or units.pattern):
            first = units.name(0)
            if first.endswith(".parquet"):
                return ctx.folder(first.rsplit("/", 1)[0])
    return None


def _member_indexes(ctx: TaskContext, tars: list[str]
                    ) -> tuple[dict[str, tuple[SampleTable, ReadCounters, int] | None], set[str]]:
    """Per input tar: (table, counters, size) from the index embed wrote of it, or None where
    there is none or it describes another version of the tar (then the tar is read);
    and the tars whose index was stale (the second case)."""
    folder = _index_folder(ctx)
    out: dict = {url: None for url in tars}
    stale: set[str] = set()
    if folder is None:
        return out, stale
    for url in tars:
        where = folder.url_of(index_name(shard_stem(url)))
        try:
            data = folder.read_bytes(index_name(shard_stem(url)))
        except FileNotFoundError:
            continue
        try:
            index = TarIndex(data)
        except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
            ctx.log.warning("%s: unreadable member index %s (%s): reading the tar", url, where, exc)
            stale.add(url)
            continue
        tar_folder, name = split_url(ctx, url)
        try:
            identity = content_identity(tar_folder.info(name))
        except FileNotFoundError:
            continue  # counted as missing by the read
        if not index.describes(identity):
            ctx.log.warning("%s: its member index %s describes another version of it (%s then, %s now): "
                            "reading the tar", url, where, index.identity, identity)
            stale.add(url)
            continue
        out[url] = (*indexed_table(index), identity["size"])
    return out, stale


def _new_record(url: str, stale_index: bool) -> dict:
    """An input shard's count record; `tars_indexed`: counted from its member index, not read;
    `tar_indexes_stale`: it had an index, of another version of the tar."""
    return {"url": url, "missing": False, "input_bytes": 0, "scanned": 0, "kept": 0, "matched": 0,
            "tars_indexed": 0, "tar_indexes_stale": int(stale_index),
            **{k: 0 for k in SAMPLE_PROBLEMS}, **dataclasses.asdict(ReadCounters())}


def _count_indexed_shard(record: dict, table: SampleTable, counters: ReadCounters, size: int, subset: SubsetFile,
                         shards: list[dict], kept: KeptSamples) -> None:
    """`_count_shard` from the tar's member index: the same record, the tar unread."""
    record.update(input_bytes=size, tars_indexed=1)
    _add_counts(record, table, counters, subset, shards, kept)


def _count_shard(ctx: TaskContext, record: dict, reader: TarSampleReader | None, subset: SubsetFile,
                 shards: list[dict], kept: KeptSamples) -> None:
    """Append one input shard's record and its kept samples."""
    url = record["url"]
    if reader is None:
        ctx.log.warning("%s: input shard does not exist: counted as missing", url)
        record["missing"] = True
        shards.append(record)
        return
    with reader:
        table = reader.table()  # headers and json only: the image bytes stay unread
        record["input_bytes"] = reader.source.size
    _add_counts(record, table, reader.counters, subset, shards, kept)


def _add_counts(record: dict, table: SampleTable, counters: ReadCounters, subset: SubsetFile,
                shards: list[dict], kept: KeptSamples) -> None:
    counts, first, problems = multiplicities(table, subset)
    record["scanned"] = len(table)
    for problem in problems:
        if problem:
            record[problem] += 1
    record["kept"] = int(counts.sum())
    record["matched"] = int(np.count_nonzero(counts))
    kept.add(len(shards), table, counts, first)
    record.update(dataclasses.asdict(counters))
    shards.append(record)


def _sum_records(records: list[dict]) -> dict:
    totals: Counter = Counter()
    for r in records:
        totals["input_shards"] += 1
        totals["input_shards_missing"] += int(r["missing"])
        for k, v in r.items():
            if k not in ("url", "missing", "task", "position"):
                totals[k] += v
    out = dict(totals)
    out["input_samples_scanned"] = out.pop("scanned", 0)
    out["samples_matched"] = out.pop("matched", 0)
    out["samples_to_write"] = out.pop("kept", 0)
    return out


# -- step 2: index ------------------------------------------------------------------

def index(ctx: TaskContext) -> TaskResult:
    """The global layout: where each input shard's kept samples start; uids found/missing."""
    subset = load_run_subset(ctx)
    samples_per_shard = ctx.params.samples_per_shard
    found = np.zeros(len(subset), dtype=bool)
    records = []
    for i in range(ctx.plan.step(f"{ctx.step.stage}.count").n_tasks):
        rel = f"{COUNTS_DIR}/{i:06d}"
        counted = ctx.output.read_json(f"{rel}.json")
        if counted["subset"] != subset.url or counted["subset_rows"] != len(subset):
            raise UserError(f"{subset.url}: the subset changed since count task {i} ran "
                            f"({counted['subset_rows']} rows then, {len(subset)} now); use a new run folder")
        if not ctx.output.exists(f"{rel}.npz"):  # e.g. counted by a dcslurm that wrote only first rows (.npy)
            raise UserError(f"{ctx.output.url_of(rel + '.npz')}: missing: count task {i} left no record of its "
                            "kept samples; use a new run folder")
        with np.load(io.BytesIO(ctx.output.read_bytes(f"{rel}.npz"))) as kept:
            found[kept["first"]] = True
        for position, record in enumerate(counted["shards"]):
            records.append({**record, "task": i, "position": position})
    stats = _sum_records(records)
    if records and stats["input_shards_missing"] == len(records):
        raise UserError(f"{records[0]['url']}: none of the {len(records)} input shards exists")
    unique_uids = len(subset.unique_starts())
    stats.update(subset_rows=len(subset), subset_uids=unique_uids, uids_found=int(found.sum()),
                 uids_missing=unique_uids - int(found.sum()))
    kept = [r for r in records if r["kept"] > 0]
    if ctx.params.shuffle:
        order = np.random.default_rng([ctx.params.shuffle_seed, 0]).permutation(len(kept))
        kept = [kept[j] for j in order]
    inputs, start = [], 0
    for r in kept:
        inputs.append({"url": r["url"], "start": start, "kept": r["kept"], "input_bytes": r["input_bytes"],
                       "task": r["task"], "position": r["position"]})
        start += r["kept"]
    if start == 0:
        raise UserError(f"{subset.url}: no uid of the subset occurs in the {len(records)} input shards "
                        f"({stats['input_samples_scanned']} samples scanned)")
    n_shards = -(-start // samples_per_shard)
    ctx.output.write_json(INDEX_FILE, {"subset": subset.url, "samples_per_shard": samples_per_shard,
                                       "total": start, "n_shards": n_shards, "inputs": inputs})
    stats.update(output_shards=n_shards)
    ctx.log.info("%d samples to write in %d shards from %d input shards", start, n_shards, len(inputs))
    return TaskResult(outputs=[f"{ctx.step.stage}/{INDEX_FILE}"], stats=stats)


# -- step 3: write ------------------------------------------------------------------

def shard_name(shard: int) -> str:
    return f"{shard:08d}.tar"


def shard_stats_name(shard: int) -> str:
    return f"{shard:08d}_stats.json"


def repeat_key(key: bytes, repeat: int) -> bytes:
    """The key of a sample's `repeat`-th copy: the original key first, then key_r1, key_r2, ..."""
    return key if repeat == 0 else b"%s_r%d" % (key, repeat)


def write(ctx: TaskContext) -> TaskResult:
    """Write the output shards of this task's parts; skip shards already committed."""
    layout = ctx.output.read_json(INDEX_FILE)
    subset = load_run_subset(ctx)
    n_parts = ctx.step.units.count
    shards = [s for part in ctx.shards for s in split_evenly(layout["n_shards"], n_parts, part)]
    _remove_stale_temporaries(ctx.output, shards)
    kept = _KeptColumns(ctx)
    # per shard to write, what it takes from each input shard: known before any input is opened,
    # so a remote input is read only where those samples lie
    todo = {shard: [_KeptSlice.of(e, kept, *_shard_range(layout, shard)) for e in _shard_inputs(layout, shard)]
            for shard in shards
            if not (ctx.output.exists(shard_stats_name(shard)) and ctx.output.exists(shard_name(shard)))}
    stats = Counter()
    if len(todo) < len(shards):
        stats["shards_resumed"] = len(shards) - len(todo)
    for written in _write_shards(ctx, layout, subset, todo):
        for k in ("samples", "bytes", "repeats"):
            stats[k] += written[k]
        stats["shards_written"] += 1
    outputs = [f"{ctx.step.stage}/{shard_name(shard)}" for shard in shards]
    out = {"shards": len(shards), "samples_written": stats.pop("samples", 0), **stats}
    return TaskResult(outputs=outputs, stats=out)


def _write_shards(ctx: TaskContext, layout: dict, subset: SubsetFile, todo: dict[int, list[_KeptSlice]]
                  ) -> list[dict]:
    """Write the shards of `todo`, up to cpus_per_task at once, each from its own readers.

    A shard is about half Python (json checks, headers) and half system calls that release
    the GIL (writev from the input mappings, populating the next input's mapping, the
    fsync that commits it), so a task with several shards overlaps one shard's I/O with
    another's Python. Each shard's bytes depend only on its pieces, never on the timing.
    Shards still commit in order, as one at a time did: a shard's commit waits for the
    shard before it, and after a failure no later shard is committed (its upload or
    temporary file is discarded), so a failed task leaves a prefix of its shards."""
    shards = list(todo)
    if not shards:
        return []
    threads = min(len(shards), max(1, ctx.step.resources.cpus_per_task))
    done = [threading.Event() for _ in shards]
    ok = [False] * len(shards)
    failed = threading.Event()

    def previous_committed(i: int) -> None:
        if i:
            done[i - 1].wait()
            if not ok[i - 1]:
                raise _Abandoned

    def one(i: int) -> dict:
        try:
            if failed.is_set():
                raise _Abandoned  # an earlier shard failed: do not start this one
            shard = shards[i]
            # each input tar of this shard, in reading order, opened while the one before is copied
            # (from S3: each shard under way holds its own pieces' spans)
            with _span_readers(ctx, todo[shard]) as readers:
                written = _write_shard(ctx, layout, subset, shard, todo[shard], readers,
                                       before_commit=lambda: previous_committed(i))
            ok[i] = True
            return written
        except BaseException:
            failed.set()
            raise
        finally:
            done[i].set()

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shard") as pool:
        futures = [pool.submit(one, i) for i in range(len(shards))]
    errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None and not isinstance(e, _Abandoned)), None)
    if first is not None:
        raise first
    return [f.result() for f in futures]


class _Abandoned(Exception):
    """A shard not committed because one before it failed (that failure is the task's error)."""


def _span_readers(ctx: TaskContext, pieces: list[_KeptSlice]) -> contextlib.closing:
    """Readers of the input tars of `pieces`, in order, each holding the bytes of its piece's
    members (a local tar: mapped whole; a remote one: only those spans, by ranged reads)."""
    sources = []
    for piece in pieces:
        folder, name = split_url(ctx, piece.url)
        starts, ends = piece.spans()
        sources.append((folder, name, starts, ends, piece.url))
    return contextlib.closing(open_tars_ahead(sources, open_tar_spans))


def _remove_stale_temporaries(folder: DataFolder, shards: list[int]) -> None:
    """Delete what a killed attempt left under temporary names (local folders only)."""
    path = folder.local_path()
    if path is None or not os.path.isdir(path):
        return  # on S3 an unfinished upload never becomes an object
    ours = {shard_name(s) for s in shards} | {shard_stats_name(s) for s in shards}
    with os.scandir(path) as entries:
        for e in entries:
            if e.name.startswith(".tmp-") and e.name.split("-", 2)[-1] in ours:
                os.unlink(e.path)


def _shard_range(layout: dict, shard: int) -> tuple[int, int]:
    """The global sample indexes [lo, hi) of output shard `shard`."""
    per_shard = layout["samples_per_shard"]
    return shard * per_shard, min((shard + 1) * per_shard, layout["total"])


def _shard_inputs(layout: dict, shard: int) -> list[dict]:
    """The index entries of the input shards whose kept samples fall in output shard `shard`."""
    lo, hi = _shard_range(layout, shard)
    inputs = layout["inputs"]
    i = bisect.bisect_right([e["start"] for e in inputs], lo) - 1
    entries = []
    while i < len(inputs) and inputs[i]["start"] < hi:
        entries.append(inputs[i])
        i += 1
    return entries


class _KeptColumns:
    """The count steps' kept-sample columns, read once per count task (write tasks take input
    shards in index order, so one task's file is used for a run of entries)."""

    def __init__(self, ctx: TaskContext):
        self.ctx = ctx
        self.task: int | None = None
        self.columns: dict[str, np.ndarray] = {}

    def of(self, entry: dict) -> tuple[dict[str, np.ndarray], int, int]:
        """(columns, a, b): kept samples a..b-1 of the columns are input shard `entry`'s."""
        if entry["task"] != self.task:
            data = self.ctx.output.read_bytes(f"{COUNTS_DIR}/{entry['task']:06d}.npz")
            with np.load(io.BytesIO(data)) as npz:
                self.columns = {c: npz[c] for c in KeptSamples.COLUMNS}
            self.task = entry["task"]
        shard = self.columns["shard"]
        a, b = np.searchsorted(shard, entry["position"], "left"), np.searchsorted(shard, entry["position"], "right")
        return self.columns, int(a), int(b)


@dataclasses.dataclass
class _KeptSlice:
    """What output shard [lo, hi) takes from input shard `entry`: its kept samples `inside`
    (positions among the input's kept samples) and where their members lie in the tar.
    The columns are views of the count task's arrays: a write task plans every piece it
    copies before opening any input, without a Python object per sample."""

    entry: dict
    lo: int
    hi: int
    inside: np.ndarray
    begins: np.ndarray  # per kept sample of the input: its first global index
    counts: np.ndarray  # per kept sample: its multiplicity
    first: np.ndarray  # per kept sample: its uid's first subset row
    keys: np.ndarray  # per kept sample, bytes
    starts: np.ndarray  # kept sample i's members are rows starts[i]:starts[i + 1] of the member columns
    exts: np.ndarray  # per member, bytes
    offsets: np.ndarray  # per member: where its data starts in the tar
    sizes: np.ndarray

    @property
    def url(self) -> str:
        return self.entry["url"]

    @classmethod
    def of(cls, entry: dict, kept: _KeptColumns, lo: int, hi: int) -> _KeptSlice:
        cols, a, b = kept.of(entry)
        counts = cols["count"][a:b]
        if int(counts.sum()) != entry["kept"]:
            raise UserError(f"{entry['url']}: the count step's records disagree ({int(counts.sum())} kept samples "
                            f"in {COUNTS_DIR}/{entry['task']:06d}.npz, {entry['kept']} in its .json): "
                            "rerun the count step")
        ends = entry["start"] + np.cumsum(counts)
        begins = ends - counts
        inside = np.flatnonzero((ends > lo) & (begins < hi))  # the kept samples this output shard takes (from a)
        m0, m1 = int(cols["starts"][a]), int(cols["starts"][b])
        return cls(entry=entry, lo=lo, hi=hi, inside=inside, begins=begins, counts=counts, first=cols["first"][a:b],
                   keys=cols["key"][a:b], starts=cols["starts"][a:b + 1] - m0, exts=cols["ext"][m0:m1],
                   offsets=cols["offset"][m0:m1], sizes=cols["size"][m0:m1])

    def spans(self) -> tuple[list[int], list[int]]:
        """(starts, ends) in the tar of the members of the samples taken: all that is copied."""
        rows = _concat_ranges(self.starts[self.inside], self.starts[self.inside + 1])
        offsets = self.offsets[rows]
        return offsets.tolist(), (offsets + self.sizes[rows]).tolist()


Members = list[tuple[bytes, bytes | memoryview]]  # (extension as UTF-8, data) of one sample


def _write_shard(ctx: TaskContext, layout: dict, subset: SubsetFile, shard: int, pieces: list[_KeptSlice],
                 readers: Iterator[TarSampleReader | None], before_commit: Callable[[], None] = lambda: None
                 ) -> dict:
    """Write output shard `shard` from `pieces`, taking one reader from `readers` for each;
    `before_commit` runs once it is all written, before it is committed (raising discards it)."""
    lo, hi = _shard_range(layout, shard)
    shuffle = ctx.params.shuffle
    collected: list[tuple[bytes, Members]] = []
    used: list[str] = []
    stats = {"samples": 0, "bytes": 0, "repeats": 0}

    with ctx.output.writer(shard_name(shard)) as f:
        writer = TarShardWriter(f)

        def emit(key: bytes, members: Members) -> None:
            if shuffle:
                collected.append((key, members))
            else:
                _add_sample(writer, key, members)

        for piece in pieces:
            used.append(piece.url)
            _copy_range(piece, next(readers), subset, emit, stats)
        if shuffle:
            rng = np.random.default_rng([ctx.params.shuffle_seed, 1, shard])
            for j in rng.permutation(len(collected)):
                _add_sample(writer, *collected[j])
        writer.close()
        stats["bytes"] = writer.bytes
        before_commit()
    if stats["samples"] != hi - lo:
        raise UserError(f"{shard_name(shard)}: wrote {stats['samples']} samples, expected {hi - lo}: "
                        "the input shards changed since they were counted")
    ctx.output.write_json(shard_stats_name(shard), {
        "shard": shard, "name": shard_name(shard), "samples": stats["samples"], "bytes": stats["bytes"],
        "repeats": stats["repeats"], "first_sample": lo, "inputs": used,
    })
    return stats


def _add_sample(writer: TarShardWriter, key: bytes, members: Members) -> None:
    for ext, data in members:
        writer.add(key + b"." + ext, data)


def _copy_range(piece: _KeptSlice, reader: TarSampleReader | None, subset: SubsetFile,
                emit: Callable[[bytes, Members], None], stats: dict) -> None:
    """Emit the kept samples of `piece` (read by `reader`) whose global indexes fall in its
    [lo, hi): their members are copied from where the count step found them, no second walk."""
    url = piece.url
    if reader is None:
        raise UserError(f"{url}: input shard disappeared since it was counted")
    lo, hi = piece.lo, piece.hi
    # this piece's columns as Python lists, names as bytes (the writer takes them as they are)
    begins, counts, keys = piece.begins.tolist(), piece.counts.tolist(), piece.keys.tolist()
    starts, exts = piece.starts.tolist(), piece.exts.tolist()
    with reader:
        source = reader.source
        if source.size != piece.entry["input_bytes"] or (piece.offsets + piece.sizes > source.size).any():
            raise UserError(f"{url}: {source.size} bytes now, {piece.entry['input_bytes']} when counted: "
                            "the input changed during the run")
        view = source.view()
        offsets, ends_at = piece.offsets.tolist(), (piece.offsets + piece.sizes).tolist()
        picked = []
        for i in piece.inside.tolist():
            members = [(exts[j], view[offsets[j]:ends_at[j]]) for j in range(starts[i], starts[i + 1])]
            picked.append((i, keys[i], members))
        _check_uids(url, picked, piece.first, subset)
        for i, key, members in picked:
            begin = begins[i]
            for r in range(max(0, lo - begin), min(counts[i], hi - begin)):
                emit(repeat_key(key, r), members)
                stats["samples"] += 1
                stats["repeats"] += int(r > 0)


def _check_uids(url: str, picked: list[tuple[int, bytes, Members]], first: np.ndarray, subset: SubsetFile) -> None:
    """Each sample about to be copied still holds the uid it was counted with (a shard rewritten
    in place to the same size would otherwise go unnoticed); `first` is indexed like `picked`'s."""
    uids = []
    for _, _, members in picked:
        uid, _ = json_uid(next((data for ext, data in members if ext == b"json"), None))
        uids.append(uid)
    his, los, valid = hex_uid_pairs(uids)
    rows = first[[i for i, _, _ in picked]]
    same = valid & (his == subset.rows["f0"][rows]) & (los == subset.rows["f1"][rows])
    if not same.all():
        key = picked[int(np.flatnonzero(~same)[0])][1]
        raise UserError(f"{url}: sample {_text(key)!r} no longer holds the uid it was counted with: "
                        "the input changed during the run")


# -- step 4: finalize ---------------------------------------------------------------

def finalize(ctx: TaskContext) -> TaskResult:
    """sizes.json ({shard name: samples}, what training reads) and stats.json (run totals)."""
    layout = ctx.output.read_json(INDEX_FILE)
    sizes, total_bytes, repeats = {}, 0, 0
    for shard in range(layout["n_shards"]):
        st = ctx.output.read_json(shard_stats_name(shard))
        sizes[shard_name(shard)] = st["samples"]
        total_bytes += st["bytes"]
        repeats += st["repeats"]
    written = sum(sizes.values())
    if written != layout["total"]:
        raise RuntimeError(f"{ctx.output.url}: shards hold {written} samples, the index planned {layout['total']}")
    stats = dict(ctx.upstream_stats(f"{ctx.step.stage}.index")[0])
    stats.pop("seconds", None)
    stats.pop("samples_to_write", None)
    stats.update(samples_written=written, output_shards=len(sizes), bytes_written=total_bytes,
                 repeated_samples_written=repeats, samples_per_shard=layout["samples_per_shard"],
                 subset=layout["subset"], shuffle=ctx.params.shuffle)
    ctx.output.write_json(SIZES_FILE, sizes)
    ctx.output.write_json(STATS_FILE, stats)
    ctx.log.info("reshard: %s", json.dumps(stats, sort_keys=True))
    return TaskResult(outputs=[f"{ctx.step.stage}/{shard_name(s)}" for s in range(len(sizes))], stats=stats)
