"""The webdataset layer shared by the stages: the key rule, the grouping of a tar's members
into samples, and the member index of a tar.

Key rule (webdataset's): a member `dir/000012.jpg` belongs to sample `dir/000012`, field
`jpg`: the key is the path up to the first dot of the file name, the rest is the extension.
A sample is a run of consecutive members with the same key.

Grouping (`tar_samples`, for embed, train and the eval sets): samples as webdataset yields
them, {"__key__": key, ext: bytes}, extensions lower-cased. A member that is no sample field
is left out and counted by reason (`SKIP_REASONS`), by the same rule as reshard's reader
(jobs.reshard.tario; tests/test_wds.py feeds both the same hostile tars); a damaged tar
raises `CorruptShard`. webdataset's own tariterators are not used: its tar_file_iterator
ends quietly where tarfile does (a bad header after the first, see `CheckedTarInfo`) and
skips links and `__*__` names uncounted, its group_by_keys raises on a repeated extension,
and it is no faster (benchmarks/bench_wds.py: the time is tarfile's header parsing).

Member index: embed reads every input tar whole anyway, so it records where each sample's
members lie (`{stem}.tarindex` beside its `{stem}.parquet`); reshard's count step then reads
that small file instead of the tar. An index names the exact tar it describes (its size and
its ETag on object storage, or its mtime and inode on a filesystem): a tar replaced since is
read again, never trusted to an old index.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from typing import IO

import numpy as np

# webdataset's split of a member name into (key, extension): key = up to the basename's first dot.
KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")

INDEX_SUFFIX = ".tarindex"  # not .npz: nothing listing a folder's .npz embeddings picks it up
INDEX_VERSION = 1
_HEX_UID = re.compile(r"[0-9a-fA-F]{32}")
# A sample's uid problem, as reshard classes it (jobs.reshard.tario.json_uid); "" = a uid.
UID_PROBLEMS = ("", "no_json", "bad_json", "no_uid")


def split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name by webdataset's rule, or None (no extension)."""
    m = KEY_EXT.match(name)
    return None if m is None else (m.group(1), m.group(2))


# What grouping leaves out, by reason; the first three are reshard's ReadCounters names.
SKIP_REASONS = (
    "members_without_key",  # a regular member whose name has no key: no extension, ".jpg", "dir/.jpg"
    "newline_names",  # a name with a newline: keys go into line-based lists and logs downstream
    "links",  # symlinks and hard links: a sample field must hold its bytes
    "other_members",  # GNU sparse files, unknown types: they hold data, but reshard's reader takes
    # them for no field either (it does not count them)
    "duplicate_fields",  # a repeated (lower-cased) extension within one sample: the first is kept,
    # as reshard's json uid and webdataset's decoders would see it (webdataset itself raises)
)
_FIELD_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)  # tario's regular typeflags
_NO_DATA_TYPES = (tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE,
                  tarfile.FIFOTYPE)  # no data follows their header, whatever their size says


class CorruptShard(Exception):
    """The tar stream is damaged (bad header, truncated): nothing after the damage can be trusted."""


class CheckedTarInfo(tarfile.TarInfo):
    """tarfile's TarInfo, except that damage raises instead of ending the walk.

    On a bad header after the first (checksum, a length-0 PAX record, a missing
    end-of-archive block), tarfile ends its walk as if the tar were complete; it
    reads a PAX size that is not a number as 0; before Python 3.11.10 it skips a
    malformed PAX record, so the member loses its name or size unseen; a negative
    size on an extended header sends it over members. Reshard's reader counts damage
    in each case; raising here passes through TarFile.next() (which only swallows its
    own HeaderErrors) to `tar_samples`.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise  # the end-of-archive block: a tar's normal end
        except tarfile.HeaderError as exc:
            raise tarfile.ReadError(f"{exc}") from None

    def _proc_member(self, tar):
        # every header, extended ones included: a negative size moves tarfile's walk backwards or
        # over members unseen (tario's rule: damage, but where no data follows the header)
        if self.size < 0 and self.type not in _NO_DATA_TYPES:
            raise tarfile.ReadError(f"negative size {self.size}")
        return super()._proc_member(tar)

    def _proc_pax(self, tar):
        spy = _FirstRead(tar.fileobj)
        tar.fileobj = spy
        try:
            info = super()._proc_pax(tar)
        finally:
            tar.fileobj = spy.f
        try:
            records = parse_pax(spy.first)
        except ValueError as exc:
            raise tarfile.ReadError(f"PAX header: {exc}") from None
        if self.type == tarfile.XGLTYPE and {"path", "size"} & records.keys():
            # tarfile gives every later member that path or size; tario none: no name is trustworthy
            raise tarfile.ReadError("global PAX header with a path or size")
        return info


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


_PAX_LENGTH = re.compile(rb"([0-9]{1,20}) ")


def parse_pax(data: bytes) -> dict[str, str]:
    """The records ("<length> <keyword>=<value>\\n") of a PAX header's data (its padded
    blocks, up to the first NUL), by the rules of CPython's tarfile since its fix for
    CVE-2024-6232: a record must be whole, at least 5 bytes and end in a newline, so each
    step advances by at least 5 and no match backtracks (the older parser also looped forever
    on a length of 0, CVE-2019-20907). Anything else is damage (ValueError), and so is a
    `size` that is not a non-negative integer (tarfile would read it as 0)."""
    out = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        match = _PAX_LENGTH.match(data, pos)
        if match is None:
            raise ValueError("PAX record without a length")
        length = int(match.group(1))
        end = pos + length - 1  # where the record's newline must be
        if length < 5 or end >= len(data) or data[end] != 0x0A:
            raise ValueError(f"PAX record of length {length}")
        key, equals, value = data[match.end():end].partition(b"=")
        if not key or not equals:
            raise ValueError("PAX record without a keyword")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    if "size" in out:
        try:
            if int(out["size"]) < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"PAX size {out['size'][:20]!r}") from None
    return out


def member_field(info: tarfile.TarInfo, skipped: Counter) -> tuple[str, str] | None:
    """(key, extension as named) of a member that is a sample field, or None, counted in
    `skipped` by reason; directories, devices and FIFOs hold no data and are not counted."""
    if info.type not in _FIELD_TYPES:
        if info.islnk() or info.issym():
            skipped["links"] += 1
        elif info.type not in _NO_DATA_TYPES:
            skipped["other_members"] += 1
        return None
    if "\n" in info.name:
        skipped["newline_names"] += 1
        return None
    field = split_key(info.name)
    if field is None:
        skipped["members_without_key"] += 1
    return field


def tar_samples(fileobj: IO[bytes], what: str = "shard", skipped: Counter | None = None,
                tarinfo: type[tarfile.TarInfo] = CheckedTarInfo,
                observe: Callable[[tarfile.TarInfo | None, tarfile.TarFile], bytes | None] | None = None
                ) -> Iterator[dict]:
    """Samples of a tar stream (plain or compressed), in order: {"__key__": key, ext: bytes}
    with extensions lower-cased (webdataset's default). What is left out is counted in
    `skipped` (see SKIP_REASONS). Raises CorruptShard naming `what` on damage: the samples
    already yielded are whole, the one open at the damage is not yielded. `observe(info, tar)`
    sees every member first and may return its data, read (saves reading it twice); it is
    called once more with info None after the end-of-archive block."""
    skipped = Counter() if skipped is None else skipped
    current: dict | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=tarinfo) as tar:
            for info in tar:
                tar.members = []  # a stream's members need not be kept (webdataset does this too)
                data = observe(info, tar) if observe is not None else None
                field = member_field(info, skipped)
                if field is None:
                    continue
                key, ext = field[0], field[1].lower()
                if current is not None and key != current["__key__"]:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                elif ext in current:
                    skipped["duplicate_fields"] += 1
                    continue
                current[ext] = data if data is not None else tar.extractfile(info).read()
            if observe is not None:
                observe(None, tar)
    except (ConnectionError, TimeoutError):
        raise  # storage trouble, not a damaged shard: the task fails and is retried
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise CorruptShard(f"{what}: damaged tar ({type(exc).__name__}: {str(exc).strip() or 'truncated'})") from None
    if current is not None:
        yield current


def shard_stem(url: str) -> str:
    """'s3://b/x/00000012.tar' -> '00000012'."""
    name = posixpath.basename(url.rstrip("/"))
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def index_name(stem: str) -> str:
    """The member index of shard `stem`, beside embed's {stem}.parquet."""
    return f"{stem}{INDEX_SUFFIX}"


def encode_index(identity: dict, keys: list[str], starts: np.ndarray, exts: list[str], offsets: np.ndarray,
                 sizes: np.ndarray, uids: list[tuple[object, str]], counters: dict) -> bytes:
    """The index file: per sample its key, member rows and uid (as reshard reads it: a valid
    hex uid, or "" and the problem); per member its extension, data offset and size; the
    tar's identity and the member counters of the read. An .npz without pickles."""
    hexes, problems = [], []
    for uid, problem in uids:
        problems.append(UID_PROBLEMS.index(problem))
        # only a 32-hex uid can match a subset; anything else is a bad uid to reshard either way
        hexes.append(uid.encode("ascii") if isinstance(uid, str) and _HEX_UID.fullmatch(uid) else b"")
    meta = {"version": INDEX_VERSION, "tar": identity, "counters": counters}
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8),
             keys=_bytes_array(keys), starts=np.asarray(starts, np.int64), exts=_bytes_array(exts),
             offsets=np.asarray(offsets, np.int64), sizes=np.asarray(sizes, np.int64),
             uids=np.array(hexes, dtype="S32") if hexes else np.zeros(0, "S32"),
             problems=np.array(problems, np.int8))
    return buf.getvalue()


class TarIndex:
    """A decoded index file (see `encode_index`)."""

    def __init__(self, data: bytes):
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            self.meta = json.loads(z["meta"].tobytes())
            self.keys = [k.decode("utf-8", "surrogateescape") for k in z["keys"].tolist()]
            self.starts = z["starts"]
            self.exts = [e.decode("utf-8", "surrogateescape") for e in z["exts"].tolist()]
            self.offsets, self.sizes = z["offsets"], z["sizes"]
            uids = [u.decode("ascii") for u in z["uids"].tolist()]
            problems = z["problems"].tolist()
        self.uids = [(None, UID_PROBLEMS[p]) if p else (u, "") for u, p in zip(uids, problems)]

    @property
    def identity(self) -> dict:
        return self.meta["tar"]

    @property
    def counters(self) -> dict:
        return self.meta["counters"]

    def describes(self, identity: dict) -> bool:
        return self.meta.get("version") == INDEX_VERSION and self.identity == identity


def _bytes_array(texts: list[str]) -> np.ndarray:
    """Names as a numpy bytes array (tar names never hold NUL, so nothing is cut)."""
    return np.array([t.encode("utf-8", "surrogateescape") for t in texts], dtype=bytes) if texts \
        else np.zeros(0, "S1")
