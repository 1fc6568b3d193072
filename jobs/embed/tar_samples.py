"""Reading webdataset tar shards robustly: samples in tar order, bad ones counted.

A sample is the group of consecutive members sharing a key (webdataset's
rule: the key is the member's path up to the first '.' of its file name;
the rest is the extension). A tar whose headers are damaged or that ends
early cannot be trusted past that point: `CorruptShard` is raised and the
caller drops the whole shard.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from jobs.reshard.tario import Member, ReadCounters, keyed_member, member_index, parse_pax


class CorruptShard(Exception):
    """The tar stream is damaged (bad header, truncated): nothing in it is committed."""


@dataclass
class Sample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # extension ("jpg", "txt", "json") -> bytes


def split_member_name(name: str) -> tuple[str, str]:
    """('dir/000012', 'jpg') for 'dir/000012.jpg'; the extension is lower-cased."""
    folder, base = posixpath.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


class _CheckedTarInfo(tarfile.TarInfo):
    """tarfile's TarInfo, except that damage raises instead of ending the walk.

    On a bad header after the first (checksum, a length-0 PAX record, a missing
    end-of-archive block), tarfile ends its walk as if the tar were complete; and
    it reads a PAX size that is not a number as 0. Raising here passes through
    TarFile.next() (which only swallows its own HeaderErrors) to `iter_samples`.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            info = super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise  # the end-of-archive block: a tar's normal end
        except tarfile.HeaderError as exc:
            raise tarfile.ReadError(f"{exc}") from None
        try:
            pax_size_ok = int(info.pax_headers.get("size", "0")) >= 0
        except ValueError:
            pax_size_ok = False
        has_data = info.isreg() or info.type not in tarfile.SUPPORTED_TYPES  # (tarfile's rule)
        if not pax_size_ok or (info.size < 0 and has_data):
            raise tarfile.ReadError(f"bad size {info.size} (PAX: {info.pax_headers.get('size', '')[:20]!r})")
        return info

    # Set on a member whose extended headers reshard's reader reads otherwise than tarfile: a PAX
    # record tario counts as damage (the tarfile of Python < 3.11.10 skips malformed ones), or
    # several extended headers before one member (tarfile's last value wins, tario's first).
    # Such a tar gets no member index (IndexRecorder).
    tario_differs = False

    def _proc_pax(self, tar):
        spy = _FirstRead(tar.fileobj)
        tar.fileobj = spy
        try:
            info = super()._proc_pax(tar)
        finally:
            tar.fileobj = spy.f
        try:
            parse_pax(spy.first)
        except ValueError:
            info.tario_differs = True
        self._check_chain(info)
        return info

    def _proc_gnulong(self, tar):
        info = super()._proc_gnulong(tar)
        self._check_chain(info)
        return info

    def _check_chain(self, info: tarfile.TarInfo) -> None:
        """Flag `info` when more than this one extended header stands before its own."""
        if info.offset_data - self.offset != 2 * tarfile.BLOCKSIZE + self._block(self.size):
            info.tario_differs = True


class _FirstRead:
    """A file object that keeps the bytes of its first read (a PAX header's data)."""

    def __init__(self, f):
        self.f = f
        self.first: bytes | None = None

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if self.first is None:
            self.first = data
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)


class IndexRecorder:
    """Notes, while `iter_samples` walks a tar, where its sample fields lie as reshard's reader
    (jobs.reshard.tario) would find them: the tar's member index, without a second read.

    Offsets come from tarfile's walk, which reads an undamaged tar as tario does (their
    agreement is fuzz-tested); what the two read differently is not indexed (`usable` False):
    compressed tars, global PAX records, GNU sparse members, a file name ending in "/", and
    what `_CheckedTarInfo.tario_differs` flags.
    """

    def __init__(self):
        self.members: list[Member] = []
        self.counters = ReadCounters()
        self.usable = True

    def add(self, info: tarfile.TarInfo, tar: tarfile.TarFile) -> bytes | None:
        """Note member `info`; returns its data when it had to read it (a .json field)."""
        typeflag = info.type[0] if info.type else 0
        if info.type == tarfile.GNUTYPE_SPARSE or (info.isreg() and info.name.endswith("/")) \
                or getattr(info, "tario_differs", False):
            self.usable = False
        member = keyed_member(info.name, typeflag, info.offset_data, info.size, self.counters)
        if member is None:
            return None
        if member.ext == "json":
            member.data = tar.extractfile(info).read()
        self.members.append(member)
        return member.data

    def finish(self, tar: tarfile.TarFile) -> None:
        if getattr(tar.fileobj, "comptype", "tar") != "tar" or tar.pax_headers:
            self.usable = False

    def index(self, identity: dict) -> bytes | None:
        """The index file's bytes, or None when this tar is not one to index."""
        return member_index(identity, self.members, self.counters) if self.usable else None


def iter_samples(fileobj: IO[bytes], what: str = "shard", index: IndexRecorder | None = None) -> Iterator[Sample]:
    """Samples of a tar stream, in order. Raises CorruptShard naming `what`. With `index`,
    every member is noted there too (see IndexRecorder)."""
    current: Sample | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_CheckedTarInfo) as tar:
            for info in tar:
                data = index.add(info, tar) if index is not None else None
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if key.startswith("__") or not ext:  # webdataset's metadata members, stray files
                    continue
                if data is None:
                    data = tar.extractfile(info).read()
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = Sample(key)
                current.members[ext] = data
            if index is not None:
                index.finish(tar)
    except (ConnectionError, TimeoutError):
        raise  # storage trouble, not a damaged shard: the task fails and is retried
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise CorruptShard(f"{what}: damaged tar ({type(exc).__name__}: {str(exc).strip() or 'truncated'})") from None
    if current is not None:
        yield current
