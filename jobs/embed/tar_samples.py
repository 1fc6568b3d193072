"""Embed's reading of webdataset tar shards: jobs.wds's samples, and the tar's member index
noted on the way.

The grouping, the key rule and what is skipped are jobs.wds's (`tar_samples`). A tar
whose headers are damaged or that ends early cannot be trusted past that point:
`CorruptShard` is raised and the caller drops the whole shard.
"""

from __future__ import annotations

import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from jobs.reshard.tario import Member, ReadCounters, keyed_member, member_index
from jobs.wds import CheckedTarInfo, CorruptShard, tar_samples

__all__ = ["CorruptShard", "IndexRecorder", "Sample", "iter_samples"]


@dataclass
class Sample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # extension ("jpg", "txt", "json") -> bytes


class _CheckedTarInfo(CheckedTarInfo):
    """jobs.wds.CheckedTarInfo, noting besides where reshard's reader would read the member
    otherwise (for IndexRecorder)."""

    # Set on a member with several extended headers before it (GNU long name and PAX
    # records): tarfile's last value wins, tario's first. Such a tar gets no member index.
    tario_differs = False

    def _proc_pax(self, tar):
        info = super()._proc_pax(tar)
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

    def add(self, info: tarfile.TarInfo | None, tar: tarfile.TarFile) -> bytes | None:
        """Note member `info` (None: the walk's end); returns its data when it had to read it
        (a .json field)."""
        if info is None:
            if getattr(tar.fileobj, "comptype", "tar") != "tar" or tar.pax_headers:
                self.usable = False
            return None
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

    def index(self, identity: dict) -> bytes | None:
        """The index file's bytes, or None when this tar is not one to index."""
        return member_index(identity, self.members, self.counters) if self.usable else None


def iter_samples(fileobj: IO[bytes], what: str = "shard", index: IndexRecorder | None = None,
                 skipped: Counter | None = None) -> Iterator[Sample]:
    """Samples of a tar stream, in order (jobs.wds.tar_samples: members left out are counted
    in `skipped`). Raises CorruptShard naming `what`. With `index`, every member is noted
    there too (see IndexRecorder)."""
    for sample in tar_samples(fileobj, what, skipped, tarinfo=_CheckedTarInfo,
                              observe=index.add if index is not None else None):
        key = sample.pop("__key__")
        yield Sample(key, sample)
