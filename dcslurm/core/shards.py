"""Sharding: the one place that splits units of work into tasks.

A stage's input is a `UnitSet`: the numbered things it works through (parquet
files, tar shards, upstream tasks, eval tasks). A task is a contiguous
`ShardRange` of those units. Both are tiny values, so a plan of 1.28M shards
stays small: a numbered pattern is never expanded into a list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dcslurm.core.errors import UserError

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass(frozen=True)
class ShardRange:
    """Units [start, stop) of a stage's UnitSet."""

    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        return iter(range(self.start, self.stop))


@dataclass(frozen=True)
class UnitSet:
    """The units a stage splits into tasks.

    Exactly one of:
    - `names`: explicit URLs (e.g. the pool's parquet files);
    - `pattern`: a numbered pattern such as `s3://b/shards/{:08d}.tar`,
      unit i being `pattern.format(first + i)`;
    - `upstream`: the tasks of an upstream step; unit i is that step's
      task i, whose committed marker lists its outputs;
    - none of these: `count` anonymous units (e.g. reshard's sample splits,
      or eval task indexes that the stage maps itself).
    """

    count: int
    names: tuple[str, ...] | None = None
    pattern: str | None = None
    first: int = 0
    upstream: str | None = None
    label: str = "units"

    def name(self, i: int) -> str:
        if not 0 <= i < self.count:
            raise IndexError(i)
        if self.names is not None:
            return self.names[i]
        if self.pattern is not None:
            return self.pattern.format(self.first + i)
        raise ValueError(f"{self.label} have no names")

    def names_in(self, shards: ShardRange) -> list[str]:
        return [self.name(i) for i in shards]

    def to_dict(self) -> dict:
        d = {"count": self.count, "label": self.label}
        if self.names is not None:
            d["names"] = list(self.names)
        if self.pattern is not None:
            d["pattern"] = self.pattern
            d["first"] = self.first
        if self.upstream is not None:
            d["upstream"] = self.upstream
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UnitSet:
        return cls(
            count=d["count"],
            names=tuple(d["names"]) if d.get("names") is not None else None,
            pattern=d.get("pattern"),
            first=d.get("first", 0),
            upstream=d.get("upstream"),
            label=d.get("label", "units"),
        )


def parse_brace_pattern(spec: str) -> UnitSet:
    """`prefix/{00000000..01279999}.tar` (webdataset's notation) as a UnitSet."""
    matches = list(_BRACE.finditer(spec))
    if len(matches) != 1:
        raise UserError(f"shard pattern {spec!r}: expected exactly one {{first..last}} range")
    m = matches[0]
    lo, hi = m.group(1), m.group(2)
    first, last = int(lo), int(hi)
    if last < first:
        raise UserError(f"shard pattern {spec!r}: range ends before it starts")
    width = len(lo) if lo.startswith("0") else 0
    fmt = "{:0%dd}" % width if width else "{:d}"
    escaped = (spec[: m.start()].replace("{", "{{").replace("}", "}}") + fmt
               + spec[m.end():].replace("{", "{{").replace("}", "}}"))
    return UnitSet(count=last - first + 1, pattern=escaped, first=first, label="shards")


def split_units(count: int, units_per_task: int) -> list[ShardRange]:
    """Contiguous ranges of at most `units_per_task` units covering [0, count)."""
    if units_per_task < 1:
        raise ValueError("units_per_task must be >= 1")
    return [ShardRange(s, min(s + units_per_task, count)) for s in range(0, count, units_per_task)]


def task_range(count: int, units_per_task: int, index: int) -> ShardRange:
    """The range of task `index` in split_units(count, units_per_task), in O(1)."""
    start = index * units_per_task
    if not 0 <= start < max(count, 1):
        raise IndexError(index)
    return ShardRange(start, min(start + units_per_task, count))


def split_evenly(total: int, parts: int, index: int) -> ShardRange:
    """Part `index` of `parts` near-equal contiguous pieces of [0, total).

    Used to split work by sample count (e.g. reshard): sizes differ by at
    most one, and the split is a pure function of (total, parts, index).
    """
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return ShardRange(start, start + base + (1 if index < extra else 0))


def compress_indexes(indexes: list[int]) -> str:
    """`[0,1,2,5,7,8]` -> `"0-2,5,7-8"` (SLURM's --array syntax)."""
    out: list[str] = []
    idx = sorted(set(indexes))
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ",".join(out)


def expand_indexes(spec: str) -> list[int]:
    """Inverse of compress_indexes (ignores a `%N` throttle suffix)."""
    spec = spec.split("%", 1)[0]
    out: list[int] = []
    for part in filter(None, spec.split(",")):
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


@dataclass
class ChunkedIndexes:
    """Task indexes cut into SLURM submissions that respect MaxArraySize.

    SLURM limits the array *index value* (< MaxArraySize), not the count, so
    each chunk gets an offset: array id = task index - offset.
    """

    offset: int
    indexes: list[int] = field(default_factory=list)

    @property
    def array_ids(self) -> list[int]:
        return [i - self.offset for i in self.indexes]


def chunk_for_max_array_size(indexes: list[int], max_array_size: int) -> list[ChunkedIndexes]:
    """Group task indexes so every array id is in [0, max_array_size)."""
    chunks: dict[int, ChunkedIndexes] = {}
    limit = max(1, max_array_size - 1)  # ids must be < MaxArraySize
    for i in sorted(set(indexes)):
        offset = (i // limit) * limit
        chunks.setdefault(offset, ChunkedIndexes(offset)).indexes.append(i)
    return [chunks[k] for k in sorted(chunks)]
