"""The webdataset layer shared by the stages: the key rule, and the member index of a tar.

Key rule (webdataset's): a member `dir/000012.jpg` belongs to sample `dir/000012`, field
`jpg`: the key is the path up to the first dot of the file name, the rest is the extension.
A sample is a run of consecutive members with the same key.

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
