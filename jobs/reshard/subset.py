"""DataComp subset files: load, validate, look up uids.

A subset file is a `.npy` holding a numpy structured array of dtype
`np.dtype("u8,u8")` (fields `f0` = upper 64 bits, `f1` = lower 64 bits of the
128-bit uid), sorted ascending; a uid that occurs c times means "repeat this
sample c times". This module accepts exactly that (in either byte order) and
turns anything else into a one-line `UserError` naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from dcslurm.core.errors import UserError

SUBSET_DTYPE = np.dtype("u8,u8")
_CHUNK = 1 << 22  # rows per chunk when scanning (64 MiB of subset at a time)


def uid_to_pair(uid: str) -> tuple[int, int]:
    """32 hex characters -> (upper 64 bits, lower 64 bits). ValueError if malformed."""
    if not isinstance(uid, str) or len(uid) != 32:
        raise ValueError(f"uid {uid!r}: expected 32 hex characters")
    return int(uid[:16], 16), int(uid[16:], 16)


def pair_to_uid(hi: int, lo: int) -> str:
    """(upper, lower) 64-bit halves -> the 32-character lowercase hex uid."""
    return f"{int(hi):016x}{int(lo):016x}"


def uids_to_array(uids: list[str]) -> np.ndarray:
    """Hex uids -> a sorted subset array (duplicates kept), as DataComp writes them."""
    arr = np.array([uid_to_pair(u) for u in uids], dtype=SUBSET_DTYPE) if uids else np.zeros(0, SUBSET_DTYPE)
    arr.sort()
    return arr


@dataclass
class SubsetFile:
    """A validated subset: `rows` (memory-mapped when local), and uid lookups."""

    url: str
    rows: np.ndarray  # structured u8,u8, sorted

    def __post_init__(self) -> None:
        # plain strided views of the two halves (no memmap subclass overhead per lookup)
        self._hi = np.asarray(self.rows["f0"])
        self._lo = np.asarray(self.rows["f1"])

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, hi: int, lo: int) -> tuple[int, int]:
        """(position of the uid's first row, number of rows with this uid); count 0 if absent."""
        his = self._hi
        key = np.uint64(hi)
        start = int(his.searchsorted(key, "left"))
        if start == len(his) or his[start] != key:
            return start, 0
        stop = int(his.searchsorted(key, "right"))
        los = self._lo[start:stop]  # the rows sharing the upper half: usually the uid's repeats
        first = int(np.searchsorted(los, np.uint64(lo), "left"))
        last = int(np.searchsorted(los, np.uint64(lo), "right"))
        return start + first, last - first

    def lookup_many(self, his: np.ndarray, los: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised `lookup` over uint64 arrays of upper and lower halves: (first rows, counts)."""
        left = self._hi.searchsorted(his, "left")
        right = self._hi.searchsorted(his, "right")
        first, counts = left.astype(np.int64), np.zeros(len(his), np.int64)
        cand = np.flatnonzero(right > left)
        if cand.size:
            lc, rc, want = left[cand], right[cand], los[cand]
            # usual case: every row sharing the upper half is this uid (its repeats)
            whole = (self._lo[lc] == want) & (self._lo[rc - 1] == want)
            counts[cand[whole]] = (rc - lc)[whole]
            for j in cand[~whole]:  # upper halves shared by different uids: rare
                first[j], counts[j] = self.lookup(int(his[j]), int(los[j]))
        return first, counts

    def count_uid(self, uid: str) -> int:
        """How many times hex `uid` occurs (0 if absent)."""
        return self.lookup(*uid_to_pair(uid))[1]

    def unique_starts(self) -> np.ndarray:
        """Row positions where a new uid begins (one per distinct uid), int64."""
        parts = []
        n = len(self.rows)
        for begin in range(0, n, _CHUNK):
            end = min(begin + _CHUNK, n)
            cur = self.rows[begin:end]
            if begin == 0:
                new = np.ones(len(cur), dtype=bool)
                if len(cur) > 1:
                    new[1:] = cur[1:] != cur[:-1]
            else:
                prev = self.rows[begin - 1:end - 1]
                new = cur != prev
            parts.append(np.flatnonzero(new) + begin)
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def check_dtype(arr: np.ndarray, url: str) -> np.ndarray:
    """The array as `u8,u8` in native byte order, or a one-line UserError."""
    dt = arr.dtype
    ok = (
        dt.names == ("f0", "f1")
        and all(dt.fields[n][0].kind == "u" and dt.fields[n][0].itemsize == 8 for n in dt.names)
        and dt.itemsize == 16
    )
    if not ok:
        raise UserError(
            f"{url}: subset dtype is {dt.descr if dt.names else dt.str}, expected numpy's "
            "np.dtype('u8,u8') (fields f0 = upper, f1 = lower 64 bits of each uid)"
        )
    if arr.ndim != 1:
        raise UserError(f"{url}: subset array has shape {arr.shape}, expected one dimension")
    if dt != SUBSET_DTYPE:  # the same fields in the other byte order
        arr = arr.astype(SUBSET_DTYPE)
    return arr


def check_sorted(rows: np.ndarray, url: str) -> None:
    """One-line UserError naming the first row out of order (chunked: bounded memory)."""
    n = len(rows)
    for begin in range(0, max(n - 1, 0), _CHUNK):
        end = min(begin + _CHUNK, n - 1)
        a, b = rows[begin:end], rows[begin + 1:end + 1]
        ahi, bhi = a["f0"], b["f0"]
        bad = (bhi < ahi) | ((bhi == ahi) & (b["f1"] < a["f1"]))
        if bad.any():
            i = begin + int(np.argmax(bad)) + 1
            raise UserError(
                f"{url}: subset is not sorted: row {i} ({pair_to_uid(*rows[i])}) comes after a larger uid "
                f"({pair_to_uid(*rows[i - 1])}); sort it with np.sort before saving"
            )


def load_subset(path: str, url: str | None = None) -> SubsetFile:
    """Load and validate the subset `.npy` at local `path` (memory-mapped).

    `url` is the name used in error messages (the original URL when `path` is
    a downloaded copy). Checks: a readable .npy, dtype u8,u8 (f0, f1), one
    dimension, sorted ascending.
    """
    url = url or path
    if not os.path.exists(path):
        raise UserError(f"{url}: subset file does not exist")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise UserError(f"{url}: not a readable .npy subset file ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise UserError(f"{url}: not a .npy subset file ({type(exc).__name__}: {exc})") from None
    if not isinstance(arr, np.ndarray):
        raise UserError(f"{url}: not a single numpy array (an .npz archive?); expected a .npy of dtype u8,u8")
    arr = check_dtype(arr, url)
    check_sorted(arr, url)
    return SubsetFile(url=url, rows=arr)


def load_subset_url(url: str, storage_options: dict | None, scratch: str) -> SubsetFile:
    """Load and validate a subset file from any URL (remote ones are copied to scratch)."""
    from dcslurm.core.storage import DataFolder

    parent, name = url.rstrip("/").rsplit("/", 1)
    try:
        local = DataFolder(parent, storage_options).local_copy(name, scratch)
    except FileNotFoundError:
        raise UserError(f"{url}: subset file does not exist") from None
    return load_subset(local, url)
