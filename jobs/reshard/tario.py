"""Webdataset tar shards, read and written without tarfile's per-member cost.

Reading: `TarSampleReader` walks a tar's 512-byte headers (ustar, GNU long
names, PAX `path`/`size`), groups consecutive members by webdataset key
(the basename up to its first dot), reads each sample's `.json` at once and
leaves the other members in place until `Sample.load()` asks for them, so a
pass that only needs uids skips the image bytes. Damage is counted, never
raised: a corrupt header (bad checksum, a number that does not parse, a
negative size, a malformed PAX record) is skipped by resynchronising on the
next valid header, a truncated tar ends the shard; the sample open at the
damage (and the first one after a resync) is dropped because it may be
missing members. Members dropped for what they are are counted too: links,
names without an extension, names with a newline.

A tar that Python's tarfile reads cleanly is read as tarfile reads it (same
header rules: which types carry data, which record names a member, how
numbers parse; tests/test_tario_fuzz.py checks this on mutated shards), but
for what is deliberately stricter or simpler here: PAX records must be
well-formed as in CPython's tarfile since 3.11.10 (older ones skip malformed
ones), a PAX size that is not a number is damage (tarfile reads 0), global
PAX records name no member, GNU sparse members are never sample fields.
Every walk ends: each step consumes at least one 512-byte block, no size
is negative or read past the end of the file, each PAX record advances by
at least 5 bytes.

Writing: `TarShardWriter` writes POSIX ustar members with fixed metadata
(mode 0644, uid/gid 0, no user names, mtime 0) so the same samples always
give the same bytes.
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import io
import json
import mmap
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from fsspec.utils import merge_offset_ranges

from dcslurm.core.errors import StorageError
from jobs.wds import KEY_EXT, TarIndex, encode_index, parse_pax

BLOCK = 512
RECORD = 20 * BLOCK  # tar's record size: archives are padded to a multiple of it
_ZERO_BLOCK = bytes(BLOCK)
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


class _Corrupt(Exception):
    """A header that fails its checksum or cannot be parsed."""


@dataclass
class ReadCounters:
    """Damage seen while reading (summed into the task's stats)."""

    corrupt_headers: int = 0  # headers failing their checksum (skipped by resync)
    truncated_tars: int = 0  # tars ending without the end-of-archive block
    damaged_samples: int = 0  # samples dropped because damage hit them
    members_without_key: int = 0  # members whose name has no extension (not a sample field)
    newline_names: int = 0  # members whose name holds a newline: unusable as a webdataset key
    # (keys go into line-based lists and logs downstream), so the member is left out
    links: int = 0  # symlink and hardlink members: a sample field must hold its bytes, so left out

    def add(self, other: ReadCounters) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Member:
    name: str
    key: str
    ext: str
    offset: int  # byte offset of the data in the tar
    size: int
    data: bytes | memoryview | None = None  # None until loaded
    truncated: bool = False  # the tar ends inside this member's data


@dataclass
class Sample:
    key: str
    members: list[Member] = field(default_factory=list)
    _source: _Source | None = None

    def member(self, ext: str) -> Member | None:
        for m in self.members:
            if m.ext == ext:
                return m
        return None

    def load(self) -> list[Member]:
        """Every member with its data (reads what the walk skipped)."""
        for m in self.members:
            if m.data is None:
                m.data = self._source.read_at(m.offset, m.size)
        return self.members

    def uid(self) -> tuple[str | None, str]:
        """(uid, problem): the `uid` in the sample's json, or None and why not."""
        m = self.member("json")
        return json_uid(None if m is None else m.data)


def json_uid(data: bytes | memoryview | None) -> tuple[object, str]:
    """(uid, problem) of a sample's json bytes: the value of its `uid`, or None and why not
    ("no_json", "bad_json", "no_uid"). The uid is returned as found (not checked as hex)."""
    if data is None:
        return None, "no_json"
    try:
        meta = _load_json(data if isinstance(data, bytes) else bytes(data))
    except (ValueError, UnicodeDecodeError):
        return None, "bad_json"
    uid = meta.get("uid") if isinstance(meta, dict) else None
    if uid is None:
        return None, "no_uid"
    return uid, ""


_SCAN_JSON = json.JSONDecoder().scan_once  # the C scanner behind json.loads


def _load_json(data: bytes):
    """json.loads(data), three times faster on the usual sample json (UTF-8, nothing around
    the value): json.loads spends most of a small document's time in its Python wrappers."""
    try:
        text = data.decode("utf-8")
        value, end = _SCAN_JSON(text, 0)
        if end == len(text) or text[end:].isspace():
            return value
    except (UnicodeDecodeError, StopIteration, ValueError):
        pass
    return json.loads(data)  # everything else (other encodings, leading space, errors) as json.loads has it


@dataclass
class SampleTable:
    """A tar's complete samples as columns: what a pass over many samples needs, without an
    object per member. Sample i's members are rows starts[i]:starts[i + 1] of the member
    columns; a member's name is f"{key}.{ext}" (webdataset's split)."""

    keys: list[str]  # per sample
    starts: np.ndarray  # int64, one more than samples
    jsons: list  # per sample: the bytes of its first .json member, or None
    exts: list[str]  # per member
    offsets: np.ndarray  # int64 per member: where its data starts in the tar
    sizes: np.ndarray  # int64 per member
    uids: list[tuple[object, str]] | None = None  # per sample json_uid(its json), when known without the json

    def __len__(self) -> int:
        return len(self.keys)

    def uid_results(self) -> list[tuple[object, str]]:
        """Per sample: (uid, problem) of its json (`json_uid`)."""
        return self.uids if self.uids is not None else [json_uid(j) for j in self.jsons]

    @classmethod
    def from_samples(cls, samples: list[Sample]) -> SampleTable:
        keys, starts, jsons, exts, offsets, sizes = [], [0], [], [], [], []
        for s in samples:
            keys.append(s.key)
            json_member = s.member("json")
            jsons.append(None if json_member is None else json_member.data)
            for m in s.members:
                exts.append(m.ext)
                offsets.append(m.offset)
                sizes.append(m.size)
            starts.append(len(exts))
        return cls(keys, np.array(starts, np.int64), jsons, exts,
                   np.array(offsets, np.int64), np.array(sizes, np.int64))

    def samples(self, source: _Source) -> Iterator[Sample]:
        """The table as Sample objects reading from `source` (json data filled in)."""
        starts, offsets, sizes = self.starts.tolist(), self.offsets.tolist(), self.sizes.tolist()
        for i, key in enumerate(self.keys):
            members = []
            json_data = self.jsons[i]
            for j in range(starts[i], starts[i + 1]):
                ext = self.exts[j]
                m = Member(name=f"{key}.{ext}", key=key, ext=ext, offset=offsets[j], size=sizes[j])
                if ext == "json":
                    m.data = json_data if json_data is not None else source.read_at(m.offset, m.size)
                    json_data = None  # only the first json member is the sample's json
                members.append(m)
            yield Sample(key=key, members=members, _source=source)


class _Source:
    """A seekable binary stream with a known size (an fsspec file, or any file object)."""

    def __init__(self, f: BinaryIO, size: int):
        self.f = f
        self.size = size
        self.pos = 0

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def skip(self, n: int) -> bool:
        """Move forward n bytes; False if that passes the end of the file."""
        if self.pos + n > self.size:
            self.pos = self.size
            self.f.seek(self.size)
            return False
        self.pos += n
        self.f.seek(self.pos)
        return True

    def seek(self, pos: int) -> None:
        self.pos = pos
        self.f.seek(pos)

    def read_at(self, offset: int, n: int) -> bytes:
        here = self.pos
        self.f.seek(offset)
        data = self.f.read(n)
        self.f.seek(here)
        if len(data) != n:
            raise OSError(f"short read at {offset} ({len(data)} of {n} bytes): file changed while reading")
        return data

    def close(self) -> None:
        self.f.close()


class _MappedSource(_Source):
    """A local file through mmap: skipping costs nothing and reads are slices (no system calls)."""

    def __init__(self, path: str, spans: tuple[list[int], list[int]] | None = None):
        """`spans` (starts, ends): the only bytes the caller reads; their pages alone are
        filled in advance (else every page: the walk over headers reads the whole file)."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.mm = _map_spans(f.fileno(), *spans) if size and spans is not None else None
            if size and self.mm is None:
                self.mm = _map_whole(f.fileno())
        if self.mm is not None and hasattr(mmap, "MADV_SEQUENTIAL"):
            self.mm.madvise(mmap.MADV_SEQUENTIAL)
        self.size = size
        self.pos = 0
        self._view: memoryview | None = None

    def read(self, n: int) -> bytes:
        start = self.pos
        self.pos = min(start + n, self.size)
        return self.mm[start:self.pos] if self.mm is not None else b""

    def skip(self, n: int) -> bool:
        if self.pos + n > self.size:
            self.pos = self.size
            return False
        self.pos += n
        return True

    def seek(self, pos: int) -> None:
        self.pos = pos

    def read_at(self, offset: int, n: int) -> memoryview:
        """A view into the mapping (no copy): valid until the source is closed and the view dropped."""
        if offset + n > self.size:
            raise OSError(f"short read at {offset}: file changed while reading")
        return self.view()[offset:offset + n]

    def view(self) -> memoryview:
        """The mapping as one memoryview (made once): slicing it is the cheapest read there is."""
        if self._view is None:
            self._view = memoryview(self.mm if self.mm is not None else b"")
        return self._view

    def close(self) -> None:
        if self._view is not None:
            self._view.release()  # slices taken from it stay valid: they hold the mapping themselves
            self._view = None
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass  # views of it are still alive: the mapping goes when the last one is dropped


def _map_whole(fd: int) -> mmap.mmap:
    """A read-only mapping of the whole file, its page tables filled at once where Linux allows.

    Every byte of a shard is read anyway (the walk touches every header, the
    write copies the kept members); faulting 4 KiB pages in one by one while
    the kernel copies them out made the copy 3x slower than one MAP_POPULATE.
    """
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if populate:
        try:
            return mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ)
        except OSError:
            pass
    return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)


_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14; Python 3.11 has no name for it


def _map_spans(fd: int, starts: list[int], ends: list[int]) -> mmap.mmap | None:
    """A read-only mapping of the whole file with the page tables of bytes [starts[i], ends[i])
    filled, no others; None where the kernel cannot (then `_map_whole`).

    The write step copies the kept samples only (30% of a tar for a 30% subset): filling the
    whole tar's page tables cost it 0.07 s of CPU per 490 MB tar here, the kept spans' 0.04 s."""
    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    page = mmap.PAGESIZE
    _, merged_starts, merged_ends = merge_offset_ranges([""] * len(starts), list(starts), list(ends),
                                                        max_gap=page, sort=True)
    try:
        for start, end in zip(merged_starts, merged_ends):
            first = start - start % page
            if end > first:
                mm.madvise(_MADV_POPULATE_READ, first, end - first)
    except (OSError, ValueError):  # an older kernel (EINVAL), or a span past the end: map it whole
        mm.close()
        return None
    return mm


def _octal(field_bytes: bytes) -> int:
    """A header's number field, parsed as tarfile's `nti` parses it (so the two agree on
    every header): GNU base-256 behind 0x80 (0xff: negative), else octal text to a NUL."""
    if field_bytes[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field_bytes[1:], "big")
        return value - 256 ** (len(field_bytes) - 1) if field_bytes[0] == 0xFF else value
    try:
        return int(field_bytes.split(b"\0", 1)[0].decode("ascii").strip() or "0", 8)
    except ValueError:  # UnicodeDecodeError included
        raise _Corrupt(f"bad number {field_bytes!r}") from None


def _check_header(block: bytes) -> None:
    stored = _octal(block[148:156])
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored == unsigned:
        return
    signed = sum((b - 256 if b > 127 else b) for b in block) - sum(
        (b - 256 if b > 127 else b) for b in block[148:156]) + 8 * 32
    if stored != signed:
        raise _Corrupt("checksum mismatch")


def _ustar_name(block: bytes) -> str:
    """The member name a header block holds: its name field, behind the prefix field when
    that is set (tarfile's rule: whatever the magic, except in GNU's own header types)."""
    name = block[:100].split(b"\0", 1)[0]
    if block[345] and block[156] not in _GNU_TYPES:
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape")


_REGULAR = frozenset(b"0\0" b"7")  # typeflags of regular files (as ints, what indexing bytes gives)
_NAME_RECORDS = frozenset(b"LKxXg")  # GNU long name/link, PAX per-file (and Solaris') and global records
_GNU_TYPES = frozenset(b"LKS")
# Hard links, symlinks, devices, directories, FIFOs: no data follows their header, whatever
# their size field says (POSIX; tarfile skips nothing for them either).
_NO_DATA = frozenset(b"123456")
_LINKS = frozenset(b"12")
_NO_DATA_FLAGS = np.array(sorted(_NO_DATA), np.uint8)
_LINK_FLAGS = np.array(sorted(_LINKS), np.uint8)
_REGULAR_FLAGS = np.array(sorted(_REGULAR), np.uint8)
_NAME_RECORD_FLAGS = np.array(sorted(_NAME_RECORDS), np.uint8)
_CHECK_ROWS = 8192  # header blocks checked per numpy call: bounded memory on huge tars


def _checksums_match(blocks: np.ndarray, stored: np.ndarray) -> bool:
    """Whether every header block (rows of `blocks`) has the checksum stored in it: tar's
    unsigned sum, or the signed one some old tars wrote (the checksum field counts as 8 spaces)."""
    if not len(blocks):
        return True
    want = np.asarray(stored, dtype=np.int64)
    got = blocks.sum(1, dtype=np.int64) - blocks[:, 148:156].sum(1, dtype=np.int64) + 8 * 32
    wrong = got != want
    if wrong.any():
        signed = blocks[wrong].view(np.int8)
        got = signed.sum(1, dtype=np.int64) - signed[:, 148:156].sum(1, dtype=np.int64) + 8 * 32
        return bool((got == want[wrong]).all())
    return True


def _split_names(names: np.ndarray, prefixed: dict[int, str]
                 ) -> tuple[np.ndarray, list[str], np.ndarray, list[str], np.ndarray, int]:
    """Regular members' names (rows of their 100-byte name fields) split the way webdataset
    does (`KEY_EXT`) and grouped into samples (consecutive equal keys): (rows with a key,
    sample keys, sample starts, extensions, each sample's first .json member or -1, how many
    names hold a newline: those have no key). `prefixed` holds the full names of ustar
    members whose prefix field has their directory."""
    keyed, keys, starts, exts, json_at = [], [], [], [], []
    current = None
    newlines = 0
    for i, raw in enumerate(np.ascontiguousarray(names).view(f"S{names.shape[1]}").ravel().tolist()):
        if i in prefixed:
            name = prefixed[i]
        else:
            name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        m = KEY_EXT.match(name)
        if m is None or "\n" in name:
            newlines += "\n" in name
            continue
        key, ext = m.groups()
        if key != current:
            current = key
            keys.append(key)
            starts.append(len(exts))
            json_at.append(-1)
        if ext == "json" and json_at[-1] < 0:
            json_at[-1] = len(exts)
        exts.append(ext)
        keyed.append(i)
    starts.append(len(exts))
    return (np.array(keyed, np.int64), keys, np.array(starts, np.int64), exts, np.array(json_at, np.int64),
            newlines)


def _parse_pax(data: bytes) -> dict[str, str]:
    """jobs.wds.parse_pax (the one PAX record rule), its damage as this reader's `_Corrupt`."""
    try:
        return parse_pax(data)
    except ValueError as exc:
        raise _Corrupt(str(exc)) from None


def keyed_member(name: str, typeflag: int, offset: int, size: int, counters: ReadCounters) -> Member | None:
    """The sample field a tar member is (webdataset's key rule), or None, counted, for a member
    that is none: a directory, link or device, a name without an extension or with a newline."""
    m = KEY_EXT.match(name)
    regular = typeflag in _REGULAR
    if not regular or m is None or "\n" in name:
        if regular:
            if "\n" in name:
                counters.newline_names += 1
            else:
                counters.members_without_key += 1
        counters.links += typeflag in _LINKS
        return None
    return Member(name=name, key=m.group(1), ext=m.group(2), offset=offset, size=size)


def table_of_members(members: Iterable[Member], counters: ReadCounters) -> SampleTable:
    """The SampleTable of an undamaged tar's sample fields (from `keyed_member`, in tar order,
    each .json one's data filled in): the grouping `TarSampleReader.table` does."""
    return SampleTable.from_samples(list(_grouped(iter(members), None, counters)))


def member_index(identity: dict, members: Iterable[Member], counters: ReadCounters) -> bytes:
    """The member index (jobs.wds) of an undamaged tar whose sample fields are `members`:
    what the count step would find by reading the tar, grouped as `table_of_members` does."""
    table = table_of_members(members, counters)
    return encode_index(identity, table.keys, table.starts, table.exts, table.offsets, table.sizes,
                        [json_uid(j) for j in table.jsons], dataclasses.asdict(counters))


def indexed_table(index: TarIndex) -> tuple[SampleTable, ReadCounters]:
    """The count step's view of a tar from its member index: what `TarSampleReader.table` and
    its counters would be, the json bytes replaced by the uids read from them."""
    table = SampleTable(index.keys, index.starts, [None] * len(index.keys), index.exts, index.offsets,
                        index.sizes, uids=index.uids)
    return table, ReadCounters(**index.counters)


class TarSampleReader:
    """Iterate a tar's samples; see the module docstring for damage handling."""

    def __init__(self, f: BinaryIO | None, size: int = 0, name: str = "", source: _Source | None = None):
        self.source = source if source is not None else _Source(f, size)
        self.name = name
        self.counters = ReadCounters()

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> TarSampleReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _members(self) -> Iterator[Member | None]:
        """Members in order; None marks damage (a corrupt header or truncation).

        Ends on any input: every pass of the loop reads a whole header block (or stops),
        sizes are checked to be non-negative before anything is skipped, and `_parse_pax`
        and `_resync` advance on every step of theirs.
        """
        src = self.source
        counters = self.counters
        name: str | None = None  # set by the first GNU long name or PAX path before a member
        pax_size: int | None = None  # set by the first PAX size before a member
        while True:
            block = src.read(BLOCK)
            if len(block) < BLOCK:
                counters.truncated_tars += 1  # no end-of-archive block
                yield None
                return
            if block == _ZERO_BLOCK:
                return
            typeflag = block[156]
            if typeflag == 0 and block[:100].split(b"\0", 1)[0].endswith(b"/"):
                typeflag = ord("5")  # an old tar's directory (tarfile's rule too)
            try:
                _check_header(block)
                size = _octal(block[124:136])
                if size < 0 and typeflag not in _NO_DATA:  # (no data follows the others: size unused)
                    raise _Corrupt(f"negative size {size}")
                padded = -(-size // BLOCK) * BLOCK
                if typeflag in _NAME_RECORDS:
                    if src.pos + padded > src.size:  # never read more than the file holds
                        counters.truncated_tars += 1
                        yield None
                        return
                    data = src.read(padded)
                    if len(data) < padded:
                        counters.truncated_tars += 1
                        yield None
                        return
                    # A record applies to the member after it; when several come first, the
                    # first one's value wins (tarfile applies them outermost last).
                    if typeflag == ord("L"):
                        name = name if name is not None else \
                            data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    elif typeflag in b"xX":
                        pax = _parse_pax(data)
                        if name is None and "path" in pax:
                            name = pax["path"].rstrip("/")
                        if pax_size is None and "size" in pax:
                            pax_size = int(pax["size"])
                    elif typeflag == ord("g"):
                        _parse_pax(data)  # checked; its records (git archive's comment) name no member
                    continue
            except _Corrupt:
                counters.corrupt_headers += 1
                yield None
                if not self._resync():
                    return
                name, pax_size = None, None
                continue
            if name is None:
                name = _ustar_name(block)
            if pax_size is not None:
                size, padded = pax_size, -(-pax_size // BLOCK) * BLOCK
            if typeflag in _NO_DATA:
                padded = size = 0
            offset = src.pos
            member = keyed_member(name, typeflag, offset, size, counters)
            name, pax_size = None, None
            if member is None:  # directories, links, no extension, newline
                if not src.skip(padded):
                    counters.truncated_tars += 1
                    yield None
                    return
                continue
            if member.ext == "json":
                data = src.read(padded)
                member.data = data[:size]
                member.truncated = len(data) < size
            else:
                member.truncated = not src.skip(padded) and src.size - offset < size
            if member.truncated:
                counters.truncated_tars += 1
                yield member  # a known key: the previous sample is complete
                return
            yield member

    def table(self) -> SampleTable:
        """Every complete sample of the tar as columns (see `SampleTable`); damage is counted."""
        lean = self._lean_table()
        return lean if lean is not None else SampleTable.from_samples(list(self._careful_samples()))

    def _lean_table(self) -> SampleTable | None:
        """The table of an undamaged mapped tar in one lean pass, or None for the careful walk.

        A walk is sequential by nature (each header's size gives the next one's
        place), so the Python loop only locates headers; checksums, typeflags and
        names are then read from all the header blocks at once with numpy. Anything
        the lean pass does not handle (a checksum that fails, truncation, GNU long
        names, PAX records, base-256 or negative numbers, a directory or link with a
        size) returns None, and the tar is walked carefully from the start.
        """
        src = self.source
        mm, size = getattr(src, "mm", None), src.size
        if mm is None or src.pos != 0:
            return None
        at, lengths, stored = [], [], []
        pos = 0
        while True:
            try:  # int() takes the padded octal text as is; a NUL ends it; an empty field raises
                length = int(mm[pos + 124:pos + 136].split(b"\0", 1)[0], 8)
                checksum = int(mm[pos + 148:pos + 156].split(b"\0", 1)[0], 8)
            except ValueError:  # the end-of-archive block, or something to walk carefully
                if mm[pos:pos + BLOCK] == _ZERO_BLOCK:
                    break
                return None
            if length < 0:
                return None
            at.append(pos)
            lengths.append(length)
            stored.append(checksum)
            pos += BLOCK + -(-length // BLOCK) * BLOCK
        # every member's data ends before the end-of-archive block found above: no bounds to check
        rows = np.array(at, np.int64) // BLOCK
        data_at = rows * BLOCK + BLOCK
        sizes = np.array(lengths, np.int64)
        regular, name_fields, prefixed = [], [], {}
        links = 0
        blocks = np.frombuffer(mm, np.uint8, count=size // BLOCK * BLOCK).reshape(-1, BLOCK)
        try:
            for lo in range(0, len(rows), _CHECK_ROWS):
                heads = blocks[rows[lo:lo + _CHECK_ROWS]]
                flags = heads[:, 156]
                if np.isin(flags, _NAME_RECORD_FLAGS).any() or not _checksums_match(heads, stored[lo:lo + _CHECK_ROWS]):
                    return None
                is_regular = np.isin(flags, _REGULAR_FLAGS)
                # an old tar's directory: typeflag NUL and a name ending in "/" (tarfile's rule)
                for i in np.flatnonzero(flags == 0).tolist():
                    if heads[i, :100].tobytes().split(b"\0", 1)[0].endswith(b"/"):
                        is_regular[i] = False
                        if sizes[lo + i]:
                            return None  # no data follows a directory: the walk above skipped some
                no_data = np.isin(flags, _NO_DATA_FLAGS)
                if (no_data & (sizes[lo:lo + _CHECK_ROWS] != 0)).any():
                    return None  # links, directories, devices with a size: no data follows them
                links += int(np.isin(flags, _LINK_FLAGS).sum())
                heads = heads[is_regular]
                before = sum(map(len, name_fields))  # regular members in the chunks before this one
                for i in np.flatnonzero(heads[:, 345] != 0).tolist():
                    prefixed[before + i] = _ustar_name(heads[i].tobytes())
                regular.append(np.flatnonzero(is_regular) + lo)
                name_fields.append(heads[:, :100])
        finally:
            del blocks  # the mapping cannot close while a view of it lives
        names = np.concatenate(name_fields) if name_fields else np.zeros((0, 100), np.uint8)
        keyed, keys, starts, exts, json_at, newlines = _split_names(names, prefixed)
        self.counters.members_without_key += len(names) - len(keyed) - newlines
        self.counters.newline_names += newlines
        self.counters.links += links
        picked = np.concatenate(regular)[keyed] if regular else np.zeros(0, np.int64)
        offsets, member_sizes = data_at[picked], sizes[picked]
        at_list, size_list = offsets.tolist(), member_sizes.tolist()
        jsons = [None if j < 0 else mm[at_list[j]:at_list[j] + size_list[j]] for j in json_at.tolist()]
        return SampleTable(keys, starts, jsons, exts, offsets, member_sizes)

    def _resync(self) -> bool:
        """Advance to the next block that is a valid header; False at end of file."""
        src = self.source
        while True:
            start = src.pos
            block = src.read(BLOCK)
            if len(block) < BLOCK:
                self.counters.truncated_tars += 1
                return False
            if block == _ZERO_BLOCK:  # the end-of-archive marker
                return False
            if block[257:262] == b"ustar":
                try:
                    _check_header(block)
                except _Corrupt:
                    continue
                src.seek(start)
                return True

    def __iter__(self) -> Iterator[Sample]:
        """Complete samples, in tar order. Damaged ones are counted and left out."""
        lean = self._lean_table()
        if lean is not None:
            yield from lean.samples(self.source)
        else:
            yield from self._careful_samples()

    def _careful_samples(self) -> Iterator[Sample]:
        """`__iter__` by the careful walk: every header checked as it is met."""
        return _grouped(self._members(), self.source, self.counters)


def _grouped(members: Iterator[Member | None], source: _Source | None, counters: ReadCounters) -> Iterator[Sample]:
    """Members (None: damage) grouped into complete samples; damaged ones counted and left out."""
    current: Sample | None = None
    damaged = False  # the current sample was hit by damage
    after_damage = False  # the next sample starts right after a resync
    lost_key = None  # the sample dropped at the last damage (its tail after a resync is the same sample)

    def drop(sample: Sample) -> None:
        if sample.key != lost_key:
            counters.damaged_samples += 1

    for member in members:
        if member is None:
            if current is not None:
                drop(current)
                lost_key = current.key
                current = None
            after_damage = True
            damaged = False
            continue
        key = member.key
        if current is not None and key == current.key:
            current.members.append(member)
            damaged = damaged or member.truncated
            continue
        if current is not None:
            if damaged:
                drop(current)
            else:
                yield current
        current = Sample(key=key, members=[member], _source=source)
        damaged, after_damage = after_damage or member.truncated, False
    if current is not None:
        if damaged:
            drop(current)
        else:
            yield current


def open_tar(folder, name: str, scratch: str, url: str = "") -> TarSampleReader:
    """A reader over tar `name` in DataFolder `folder`; FileNotFoundError if absent.

    Local tars are memory-mapped in place; remote ones are first copied whole
    into `scratch` (one sequential download) and mapped from there, so the
    walk over headers and the later reads of kept samples never refetch.
    """
    url = url or folder.url_of(name)
    local = folder.local_path(name)
    if local is not None:
        return TarSampleReader(None, name=url, source=_MappedSource(local))
    copy = os.path.join(scratch, f"input-{os.getpid()}-{name}")
    try:
        with folder.open(name, "rb", block_size=16 << 20) as src, open(copy, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        return TarSampleReader(None, name=url, source=_MappedSource(copy))
    finally:
        if os.path.exists(copy):
            os.unlink(copy)  # the mapping keeps the data until it is closed


# Spans of a remote tar closer than this are fetched in one ranged read: between two members
# of a sample, or two kept samples in a row, lie only a header (512 bytes; more with PAX or GNU
# long-name records) and padding. A skipped sample with an image is far longer, so it is not read.
SPAN_MERGE_GAP = 4 * BLOCK


class _SpanSource:
    """Some byte spans of a tar, held in memory and sliced by tar offset like `_MappedSource.view()`.

    What the write step copies is known before it opens a tar (the count step recorded every
    kept member's offset and size), so a remote tar is read only there: a 30% subset reads 30%
    of the tar, not all of it. What one is held is what a write copies from one input into one
    output shard (at most that shard's bytes), and two are held at a time: the one being
    copied and the next, fetched meanwhile by `open_tars_ahead`.
    """

    def __init__(self, size: int, starts: list[int], chunks: list[bytes]):
        self.size = size
        self._starts = starts
        self._chunks = [memoryview(c) for c in chunks]

    def view(self) -> _SpanSource:
        return self

    def __getitem__(self, span: slice) -> memoryview:
        i = bisect.bisect_right(self._starts, span.start) - 1
        if i < 0 or span.stop - self._starts[i] > len(self._chunks[i]):
            raise IndexError(f"bytes {span.start}-{span.stop} of the tar were not fetched")
        base = self._starts[i]
        return self._chunks[i][span.start - base:span.stop - base]

    def close(self) -> None:
        self._chunks = []  # slices handed out keep their own chunk alive


def open_tar_spans(folder, name: str, starts: list[int], ends: list[int], url: str = "") -> TarSampleReader:
    """A reader whose source holds at least bytes [starts[i], ends[i]) of tar `name` in DataFolder
    `folder` (for copying members the count step located; it cannot walk the tar);
    FileNotFoundError if absent. A local tar is mapped in place, the page tables of those spans
    alone filled in advance; a remote one is read only at those spans, nearby ones merged (`SPAN_MERGE_GAP`), by
    concurrent ranged reads (`DataFolder.read_ranges`)."""
    url = url or folder.url_of(name)
    local = folder.local_path(name)
    if local is not None:
        return TarSampleReader(None, name=url, source=_MappedSource(local, (starts, ends)))
    size = folder.size(name)
    if starts and max(ends) > size:
        # the tar shrank since it was counted: the caller's size check reports it in one line
        return TarSampleReader(None, name=url, source=_SpanSource(size, [], []))
    _, merged_starts, merged_ends = merge_offset_ranges([name] * len(starts), list(starts), list(ends),
                                                        max_gap=SPAN_MERGE_GAP)
    chunks = folder.read_ranges(name, merged_starts, merged_ends) if starts else []
    for start, end, chunk in zip(merged_starts, merged_ends, chunks):
        if len(chunk) != end - start:
            raise StorageError(f"{url}: {len(chunk)} bytes read at {start} where {end - start} were asked: "
                               "the input changed during the run")
    return TarSampleReader(None, name=url, source=_SpanSource(size, merged_starts, chunks))


def open_tars_ahead(sources: list[tuple], opener: Callable[..., TarSampleReader] = open_tar
                    ) -> Iterator[TarSampleReader | None]:
    """`opener(*source)` (default `open_tar`) for each source in order, each one opened while the
    caller reads the one before it; None for a tar that does not exist.

    Opening is the I/O of a shard: a local one is paged in whole (MAP_POPULATE),
    a remote one downloaded to scratch or read at the spans a write copies. All of
    these release the GIL, so one thread overlaps the next shard's reading with the
    Python work on this one. The caller closes each reader it is given; one it never
    takes is closed here.
    """
    def opened(source: tuple) -> TarSampleReader | None:
        try:
            return opener(*source)
        except FileNotFoundError:
            return None

    if not sources:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tar-ahead") as pool:
        pending: Future | None = pool.submit(opened, sources[0])
        try:
            for i in range(len(sources)):
                reader = pending.result()
                pending = pool.submit(opened, sources[i + 1]) if i + 1 < len(sources) else None
                yield reader
        finally:
            if pending is not None:  # the caller stopped early: close what was opened for it
                try:
                    leftover = pending.result()
                except Exception:  # noqa: BLE001 - the caller's own error is what matters now
                    leftover = None
                if leftover is not None:
                    leftover.close()


def _header_template() -> bytes:
    header = bytearray(BLOCK)
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[136:148] = b"00000000000\0"  # mtime 0: the bytes depend only on the samples
    header[148:156] = b" " * 8  # the checksum field counts as spaces
    header[257:265] = b"ustar\x0000"
    return bytes(header)


_TEMPLATE = _header_template()
_TEMPLATE_SUM = sum(_TEMPLATE)


def _ustar_header(name: bytes, size: int, typeflag: bytes = b"0") -> bytes:
    prefix = b""
    if len(name) > 100:  # fits the ustar name+prefix split only at a slash
        cut = name.rfind(b"/", 0, 156)
        if cut <= 0 or len(name) - cut - 1 > 100:
            raise ValueError("name too long for ustar")
        prefix, name = name[:cut], name[cut + 1:]
    size_field = b"%011o\0" % size
    header = bytearray(_TEMPLATE)
    header[0:len(name)] = name
    header[124:136] = size_field
    header[156] = typeflag[0]
    header[345:345 + len(prefix)] = prefix
    checksum = _TEMPLATE_SUM + sum(name) + sum(size_field) + typeflag[0] + sum(prefix)
    header[148:156] = b"%06o\0 " % checksum
    return bytes(header)


def member_header(name: str, size: int) -> bytes:
    """The header block(s) of a regular member: ustar, or PAX for long/non-ASCII names."""
    raw = name.encode("utf-8", "surrogateescape")
    if size < 8 ** 11:
        try:
            if raw.isascii():
                return _ustar_header(raw, size)
        except ValueError:
            pass
    records = {"path": name, "size": str(size)}
    body = b""
    for key, value in records.items():
        payload = f" {key}={value}\n".encode("utf-8", "surrogateescape")
        length = len(payload) + 1
        while len(str(length).encode()) + len(payload) != length:
            length = len(str(length).encode()) + len(payload)
        body += str(length).encode() + payload
    pad = -len(body) % BLOCK
    short = raw[:100] if raw.isascii() else b"pax-named-member"
    return (_ustar_header(b"././@PaxHeader", len(body), b"x") + body + bytes(pad)
            + _ustar_header(short, min(size, 8 ** 11 - 1)))


def _simple_headers(names: list[bytes], sizes: np.ndarray) -> np.ndarray:
    """`_ustar_header(name, size)` for many members at once, as rows of a (n, 512) array;
    every name ASCII and at most 100 bytes, every size below 8 ** 11."""
    n = len(names)
    out = np.empty((n, BLOCK), np.uint8)
    out[:] = np.frombuffer(_TEMPLATE, np.uint8)
    out[:, :100] = np.array(names, dtype="S100").view(np.uint8).reshape(n, 100)  # NUL-padded
    out[:, 124:135] = (sizes[:, None] // _OCTAL_11) % 8 + ord("0")  # "%011o\0"
    out[:, 135] = 0
    out[:, 156] = ord("0")
    checksum = out.sum(1, dtype=np.int64)  # the template holds 8 spaces in the checksum field
    out[:, 148:154] = (checksum[:, None] // _OCTAL_6) % 8 + ord("0")  # "%06o\0 "
    out[:, 154] = 0
    out[:, 155] = ord(" ")
    return out


_OCTAL_11 = 8 ** np.arange(10, -1, -1, dtype=np.int64)
_OCTAL_6 = 8 ** np.arange(5, -1, -1, dtype=np.int64)


class TarShardWriter:
    """Write members to a binary stream as a deterministic tar (buffered: few large writes).

    Headers are made when the buffer is flushed, all of a flush's short ASCII names
    in one numpy pass (a header per member in Python was a third of a write's CPU).
    """

    FLUSH = 8 << 20

    def __init__(self, f: BinaryIO):
        self.f = f
        self.bytes = 0
        self._names: list[bytes] = []
        self._data: list = []
        self._pending = 0

    def add(self, name: str | bytes, data: bytes | memoryview) -> None:
        """Add member `name` (str, or its UTF-8 bytes) holding `data`."""
        self._names.append(name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape"))
        self._data.append(data)
        self._pending += BLOCK + len(data)
        if self._pending >= self.FLUSH:
            self._flush()

    def _pieces(self) -> tuple[list, int]:
        """The pending members as writev pieces (header, data, padding) and their total length."""
        names, data = self._names, self._data
        sizes = np.fromiter(map(len, data), np.int64, len(data))
        simple = np.fromiter((len(n) <= 100 and n.isascii() for n in names), bool, len(names)) & (sizes < 8 ** 11)
        block = _simple_headers([n for n, ok in zip(names, simple.tolist()) if ok], sizes[simple]).tobytes() \
            if simple.any() else b""
        view = memoryview(block)
        at = ((np.cumsum(simple) - 1) * BLOCK).tolist()  # where each simple member's header is in `block`
        pieces = []
        total = 0
        for name, payload, ok, h in zip(names, data, simple.tolist(), at):
            header = view[h:h + BLOCK] if ok else \
                member_header(name.decode("utf-8", "surrogateescape"), len(payload))
            pad = -len(payload) % BLOCK
            pieces += (header, payload, _ZERO_BLOCK[:pad])
            total += len(header) + len(payload) + pad
        return pieces, total

    def _flush(self, last: bool = False) -> None:
        pieces, total = self._pieces()
        if last:  # end-of-archive blocks, padded to a whole record as tar does
            end = 2 * BLOCK
            end += -(self.bytes + total + end) % RECORD
            pieces.append(bytes(end))
            total += end
        fd = _file_descriptor(self.f)
        if fd is None:
            self.f.write(b"".join(pieces))  # one copy into one exact buffer, one write
        else:
            self.f.flush()
            _writev_all(fd, pieces, total)  # straight from the input mappings: no copy in Python
            _start_writeback(fd)
        self.bytes += total
        self._names, self._data, self._pending = [], [], 0

    def close(self) -> None:
        """Flush everything and end the archive."""
        self._flush(last=True)


def _file_descriptor(f) -> int | None:
    """The descriptor of a local regular file, or None (object-store uploads and the like)."""
    try:
        fd = f.fileno()
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) from the C library (Python's os module has none), or None."""
    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return func


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writing dirty pages back, wait for nothing


def _start_writeback(fd: int) -> bool:
    """Start writing what is in the page cache of `fd` to its disk, without waiting.

    A shard is committed with one fsync (DataFolder.writer); started after each flush,
    the disk writes each flushed 8 MB while the next is copied, and that fsync has only
    the last flush left to wait for (measured here: 0.2 s of fsync for 480 MB down to a
    few ms). Durability is the fsync's, as before: this only moves the disk's work earlier.
    """
    # False where there is no sync_file_range or it failed: the fsync then does it all, as before
    return _SYNC_FILE_RANGE is not None and _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0


def _writev_all(fd: int, pieces: list, total: int) -> None:
    """Write all `pieces` (`total` bytes together) to `fd`, IOV_MAX pieces a call."""
    for i in range(0, len(pieces), _IOV_MAX):
        chunk = pieces[i:i + _IOV_MAX]
        want = total if len(pieces) <= _IOV_MAX else sum(map(len, chunk))
        written = os.writev(fd, chunk)
        if written < want:  # a short write: finish the rest plainly
            rest = memoryview(b"".join(chunk))[written:]
            while rest:
                rest = rest[os.write(fd, rest):]
