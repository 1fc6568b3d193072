"""Exact fraction thresholds over many files with bounded memory.

DataComp's rule: n = int(N * f); t = -np.sort(-scores)[n]; keep score >= t.
Sorting descending puts NaN last, so t is NaN (nothing kept) when n lands on
the NaN tail; rows tied with t are all kept. We get the same t without
holding the scores: floats map to order-preserving 64-bit keys, and a radix
select reads one 16-bit digit per streaming pass (histograms of 65,536
buckets), collecting the values themselves once the bucket holding rank n
is small. Every pass sees the files one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

_SIGN = np.uint64(1 << 63)
DIGIT_BITS = 16
COLLECT_CAP = 1 << 20  # values (8 bytes) held at once in the final exact pass


def order_keys(x: np.ndarray) -> np.ndarray:
    """uint64 keys with key(a) < key(b) iff a < b for non-NaN float64 (-0.0 == 0.0)."""
    bits = (np.asarray(x, dtype=np.float64) + 0.0).view(np.uint64)  # + 0.0 turns -0.0 into 0.0
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def key_to_float(key: int) -> float:
    k = np.uint64(key)
    bits = k & ~_SIGN if k & _SIGN else ~k
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


def fraction_index(n_pool: int, fraction: float) -> int:
    """DataComp's index into the descending sort: int(len(df) * fraction)."""
    return int(n_pool * fraction)


@dataclass
class TopDigitHistogram:
    """What a map task computes per file: counts of all rows, non-NaN rows, and the first digit."""

    total: int = 0
    finite: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(1 << DIGIT_BITS, dtype=np.int64))

    def add(self, scores: np.ndarray) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        ok = scores[~np.isnan(scores)]
        self.total += scores.size
        self.finite += ok.size
        self.counts += np.bincount((order_keys(ok) >> np.uint64(64 - DIGIT_BITS)).astype(np.int64),
                                   minlength=1 << DIGIT_BITS)

    def sparse(self) -> np.ndarray:
        """[total, finite, bucket, count, bucket, count, ...] (int64): small to store per file."""
        nz = np.nonzero(self.counts)[0]
        return np.concatenate([[self.total, self.finite], np.stack([nz, self.counts[nz]], 1).ravel()]).astype(np.int64)

    def merge_sparse(self, packed: np.ndarray) -> None:
        self.total += int(packed[0])
        self.finite += int(packed[1])
        pairs = packed[2:].reshape(-1, 2)
        np.add.at(self.counts, pairs[:, 0], pairs[:, 1])


def exact_descending_value(stream: Callable[[], Iterable[np.ndarray]], n: int,
                           collect_cap: int = COLLECT_CAP,
                           first: TopDigitHistogram | None = None) -> tuple[float, dict]:
    """The value at index `n` of all streamed scores sorted descending, NaN last.

    `stream()` yields the scores file by file (float arrays, NaN allowed) and
    is called once per pass. Returns (t, info): t = NaN when index n falls on
    the NaN tail; t = -inf when n is past the end (every non-NaN row kept:
    our reading of fraction = 1, where DataComp's indexing would fail).
    `first`, the merged histograms of the map tasks, saves the first pass.
    """
    passes = 0
    if first is None:
        first = TopDigitHistogram()
        for scores in stream():
            first.add(scores)
        passes = 1
    total, finite, top = first.total, first.finite, first.counts
    info = {"candidates": total, "non_nan": finite, "index": n, "passes": passes}
    if n >= total:
        return float("-inf"), info
    if n >= finite:
        return float("nan"), info
    rank = finite - 1 - n  # ascending rank among non-NaN values
    prefix, shift, hist = 0, 64 - DIGIT_BITS, top
    while True:
        cum = np.cumsum(hist)
        digit = int(np.searchsorted(cum, rank, side="right"))
        below = int(cum[digit - 1]) if digit else 0
        rank -= below
        prefix = (prefix << DIGIT_BITS) | digit
        in_bucket = int(hist[digit])
        if shift == 0:
            return key_to_float(prefix), info
        if in_bucket <= collect_cap:
            # Collect the bucket's values and pick the exact one.
            lo = np.uint64(prefix << shift)
            hi_shift = np.uint64(shift)
            parts = []
            for scores in stream():
                k = order_keys(np.asarray(scores, dtype=np.float64)[~np.isnan(scores)])
                parts.append(k[(k >> hi_shift) == (lo >> hi_shift)])
            info["passes"] += 1
            keys = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
            return key_to_float(int(np.partition(keys, rank)[rank])), info
        # Next digit, among keys in this bucket only.
        next_shift = shift - DIGIT_BITS
        hist = np.zeros(1 << DIGIT_BITS, dtype=np.int64)
        for scores in stream():
            k = order_keys(np.asarray(scores, dtype=np.float64)[~np.isnan(scores)])
            k = k[(k >> np.uint64(shift)) == np.uint64(prefix)]
            hist += np.bincount(((k >> np.uint64(next_shift)) & np.uint64((1 << DIGIT_BITS) - 1)).astype(np.int64),
                                minlength=1 << DIGIT_BITS)
        info["passes"] += 1
        shift = next_shift


def keep_at_threshold(scores: np.ndarray, t: float) -> np.ndarray:
    """score >= t (NaN never kept; t = NaN keeps nothing), as DataComp's pandas comparison."""
    with np.errstate(invalid="ignore"):
        return np.asarray(scores, dtype=np.float64) >= t
