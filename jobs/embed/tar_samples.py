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


def iter_samples(fileobj: IO[bytes], what: str = "shard") -> Iterator[Sample]:
    """Samples of a tar stream, in order. Raises CorruptShard naming `what`."""
    current: Sample | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_CheckedTarInfo) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if key.startswith("__") or not ext:  # webdataset's metadata members, stray files
                    continue
                data = tar.extractfile(info).read()
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = Sample(key)
                current.members[ext] = data
    except (ConnectionError, TimeoutError):
        raise  # storage trouble, not a damaged shard: the task fails and is retried
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise CorruptShard(f"{what}: damaged tar ({type(exc).__name__}: {str(exc).strip() or 'truncated'})") from None
    if current is not None:
        yield current
