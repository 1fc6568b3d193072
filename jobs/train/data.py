"""Training data: webdataset shards read as deterministic streams, an epoch at a time.

The global batch of step t is the same set of samples whatever the world size
or the number of DataLoader workers, so a 2-rank run and a 1-rank run see the
same data, and a resumed run continues exactly where the checkpoint stopped:

- the data is `n_streams` streams over one shared order (DataOrder below): per
  epoch the shards are shuffled and concatenated, and stream s reads all of it
  from its own offset, N / n_streams samples from the next stream, through a
  small shuffle buffer;
- every step takes `per_stream` consecutive samples from every stream
  (global batch = n_streams x per_stream); rank r owns a contiguous block
  of streams, DataLoader worker w of the rank owns every W-th of those;
- a stream's position counts the samples it has taken (a sample that fails to
  decode, or has no image and caption, is skipped and counted), and the
  positions after each step travel back with the batch, so the checkpoint
  records exactly where each stream is;
- augmentation of the sample at position p of stream s is seeded by
  (seed, s, p), so it does not depend on which process decodes it.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dcslurm.core.errors import UserError
from dcslurm.core.storage import DataFolder
from jobs.train.inputs import Shard, check_shards, list_shards, read_size_table  # noqa: F401 - re-exported
from jobs.wds import CorruptShard, tar_samples

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# -- raw samples ----------------------------------------------------------------

def is_training_sample(sample: dict) -> bool:
    return "txt" in sample and any(e in sample for e in IMAGE_EXTS)


# -- the order: which sample every stream reads at every position ---------------
#
# The training data is read as "epochs" of one virtual sequence: the shards in an order
# shuffled once per epoch (the same order for every stream), concatenated. Stream s of n
# reads the whole sequence once per epoch, starting at its own offset u_e + s * N / n
# (u_e random per epoch) and wrapping around, through a shuffle buffer. So the streams
# are always N / n samples apart: they never read the same samples in step, each step's
# samples come from n evenly spread places of the pool (one shard or many), and every
# sample is read n times an epoch, evenly. This is webdataset's own advice for few
# shards and many readers (slice the samples, not the shards: webdataset issue #71;
# shuffle the whole shard list per cycle: #318); drawing shards independently per stream,
# as before, put every stream of a 1-shard pool at the same place of the same shard.
#
# A stream's position counts the samples it has taken from the buffer (good, undecodable
# or without image/caption alike), so a position maps to (epoch, place in the sequence)
# by arithmetic alone and a resume skips whole segments without reading them.


@dataclass(frozen=True)
class Segment:
    """A contiguous run [start, stop) of one shard's samples, read as one piece by one stream."""

    shard: int
    start: int
    stop: int
    epoch: int
    index: int  # the segment's number within the stream's epoch (seeds its shuffle)


class DataOrder:
    """The samples every stream reads, from the shard sizes alone (no data read)."""

    def __init__(self, sizes: list[int], n_streams: int, seed: int, shuffle_buffer: int):
        if not sizes or min(sizes) <= 0:
            raise ValueError("DataOrder needs shards of known, positive sizes")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.total = int(self.sizes.sum())
        self.n_streams = n_streams
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)

    def segments(self, stream: int, start: int = 0) -> Iterator[tuple[Segment, int]]:
        """(segment, its first position) for the stream, from the one holding `start` on, forever."""
        epoch = start // self.total
        while True:
            rng = np.random.default_rng([self.seed, 0x0D47A, epoch])  # shared by all streams
            order = rng.permutation(len(self.sizes))
            ends = np.cumsum(self.sizes[order])
            offset = (int(rng.integers(self.total)) + stream * self.total // self.n_streams) % self.total
            j = int(np.searchsorted(ends, offset, side="right"))  # the shard holding `offset`
            inner = offset - int(ends[j] - self.sizes[order[j]])
            pieces = [(j, inner, int(self.sizes[order[j]]))]
            pieces += [(k % len(order), 0, int(self.sizes[order[k % len(order)]]))
                       for k in range(j + 1, j + len(order))]
            if inner:
                pieces.append((j, 0, inner))
            position = epoch * self.total
            for index, (k, lo, hi) in enumerate(pieces):
                if position + (hi - lo) > start:
                    yield Segment(int(order[k]), lo, hi, epoch, index), position
                position += hi - lo
            epoch += 1

    def shuffled(self, items: Iterator, stream: int, segment: Segment) -> Iterator:
        """`items` (one per sample of the segment) through the stream's shuffle buffer."""
        rng = np.random.default_rng([self.seed, stream, segment.epoch, segment.index])
        buffer: list = []
        for item in items:
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                i = int(rng.integers(len(buffer)))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                yield buffer.pop()
        for i in rng.permutation(len(buffer)):
            yield buffer[int(i)]

    def read(self, stream: int, start: int, read_segment) -> Iterator[tuple[int, object]]:
        """(position, item) of the stream from `start` on; read_segment(segment) gives the
        segment's items in shard order, exactly stop - start of them."""
        for segment, position in self.segments(stream, start):
            for item in self.shuffled(read_segment(segment), stream, segment):
                if position >= start:
                    yield position, item
                position += 1


_COUNTED: dict[str, int] = {}  # shard url -> samples, counted once per process


def sized_shards(shards: list[Shard], storage_options: dict) -> list[Shard]:
    """The shards with their sample counts; those without a size table entry are counted by
    reading them once (params `data` without sizes.json; reshard's outputs always have one)."""
    out = []
    for shard in shards:
        if shard.samples is None:
            if shard.url not in _COUNTED:
                parent, name = shard.url.rsplit("/", 1)
                with DataFolder(parent, storage_options).open(name) as f:
                    try:
                        _COUNTED[shard.url] = sum(1 for _ in tar_samples(f, shard.url))
                    except CorruptShard as exc:
                        raise UserError(str(exc)) from None
            if _COUNTED[shard.url] == 0:
                raise UserError(f"{shard.url}: training shard has no samples")
            shard = Shard(shard.url, _COUNTED[shard.url])
        out.append(shard)
    return out


class SampleStream:
    """One stream of the data order, reading the shards: (position, raw sample or None) where
    None is a sample without an image and a caption (skipped and counted by the caller)."""

    def __init__(self, shards: list[Shard], seed: int, stream: int, shuffle_buffer: int,
                 storage_options: dict, n_streams: int = 1, skipped: Counter | None = None):
        self.shards = sized_shards(shards, storage_options)
        self.stream = stream
        self.storage_options = storage_options
        # tar members that are no sample field, by reason (jobs.wds), at every read of them
        self.skipped = Counter() if skipped is None else skipped
        self.order = DataOrder([s.samples for s in self.shards], n_streams, seed, shuffle_buffer)

    def _read_segment(self, segment: Segment) -> Iterator[dict | None]:
        url = self.shards[segment.shard].url
        parent, name = url.rsplit("/", 1)
        n = 0
        with DataFolder(parent, self.storage_options).open(name) as f:
            try:
                for i, sample in enumerate(tar_samples(f, url, self.skipped)):
                    if i >= segment.stop:
                        break
                    if i >= segment.start:
                        n += 1
                        yield sample if is_training_sample(sample) else None
            except CorruptShard:
                self.skipped["damaged_tars"] += 1  # the samples after the damage: skipped ones, below
        # A size table larger than the tar (or a tar damaged since it was counted): the missing
        # samples count as skipped ones, so positions stay the arithmetic the resume relies on.
        yield from (None for _ in range(segment.stop - segment.start - n))

    def samples(self, start: int = 0) -> Iterator[tuple[int, dict | None]]:
        """(position, raw sample or None) from position `start` on, forever."""
        return self.order.read(self.stream, start, self._read_segment)


# -- decoded batches ------------------------------------------------------------

@dataclass(frozen=True)
class StreamLayout:
    """Which streams a rank reads, and how many samples each gives per step."""

    n_streams: int
    per_stream: int
    rank: int
    world_size: int

    @property
    def rank_streams(self) -> list[int]:
        per_rank = self.n_streams // self.world_size
        return list(range(self.rank * per_rank, (self.rank + 1) * per_rank))


def default_streams(global_batch: int, world_size: int, target: int = 64) -> int:
    """The smallest multiple of the world size >= `target` that divides the global batch."""
    n = world_size * max(1, -(-target // world_size))
    while n <= global_batch:
        if global_batch % n == 0:
            return n
        n += world_size
    return world_size


def make_layout(global_batch: int, n_streams: int, rank: int, world_size: int) -> StreamLayout:
    if n_streams % world_size or global_batch % n_streams:
        raise UserError(f"data_streams {n_streams}: must be a multiple of the world size ({world_size}) "
                        f"and divide the global batch ({global_batch})")
    return StreamLayout(n_streams, global_batch // n_streams, rank, world_size)


class StepBatches(IterableDataset):
    """Yields, per step and per worker, the decoded samples of that worker's streams."""

    def __init__(self, shards: list[Shard], layout: StreamLayout, positions: dict[int, int], seed: int,
                 shuffle_buffer: int, transform, tokenizer, storage_options: dict):
        # Counted here, before the DataLoader forks its workers, so they inherit the counts.
        self.shards = sized_shards(shards, storage_options)
        self.layout = layout
        self.positions = dict(positions)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.transform = transform
        self.tokenizer = tokenizer
        self.storage_options = storage_options

    def _decode(self, stream: int, position: int, sample: dict):
        from PIL import Image

        ext = next(e for e in IMAGE_EXTS if e in sample)
        with Image.open(io.BytesIO(sample[ext])) as img:
            image = img.convert("RGB")
        caption = sample["txt"].decode("utf-8", errors="replace").strip()
        # Augmentation depends on the sample, not on the process decoding it.
        torch.manual_seed(hash((self.seed, stream, position)) & 0x7FFF_FFFF_FFFF_FFFF)
        return self.transform(image), self.tokenizer([caption])[0]

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        mine = self.layout.rank_streams[worker::n_workers]
        skipped: Counter = Counter()  # tar members that are no sample field, since the last item
        iters = {s: SampleStream(self.shards, self.seed, s, self.shuffle_buffer, self.storage_options,
                                 self.layout.n_streams, skipped).samples(self.positions.get(s, 0)) for s in mine}
        total = sum(shard.samples for shard in self.shards)
        bad_in_a_row = {s: 0 for s in mine}
        next_position = {s: self.positions.get(s, 0) for s in mine}
        while True:
            images, texts, bad = [], [], 0
            for s in mine:
                got = 0
                while got < self.layout.per_stream:
                    position, raw = next(iters[s])
                    next_position[s] = position + 1
                    try:
                        if raw is None:
                            raise ValueError("no image and caption")
                        image, text = self._decode(s, position, raw)
                    except Exception:  # noqa: BLE001 - a corrupt sample is skipped and counted
                        bad += 1
                        bad_in_a_row[s] += 1
                        if bad_in_a_row[s] > total:  # a whole epoch: nothing here can be trained on
                            raise UserError(f"{self.shards[0].url} ({len(self.shards)} shards): no training "
                                            "sample with a decodable image and a caption") from None
                        continue
                    bad_in_a_row[s] = 0
                    images.append(image)
                    texts.append(text)
                    got += 1
            # plain dicts: the DataLoader's default_convert copies mappings with update(), which adds Counters
            yield {"images": torch.stack(images), "texts": torch.stack(texts),
                   "positions": dict(next_position), "bad": bad, "skipped_members": dict(skipped)}
            skipped.clear()


class RankBatches:
    """The rank's batch for each step: one item from each DataLoader worker, joined."""

    def __init__(self, dataset: StepBatches, workers: int):
        self.n_workers = max(1, min(workers, len(dataset.layout.rank_streams)))
        self.loader = DataLoader(dataset, batch_size=None, num_workers=workers and self.n_workers,
                                 persistent_workers=False, prefetch_factor=2 if workers else None)
        # This rank's streams only: a resumed checkpoint holds every rank's, and the gather at the
        # next save must not let this rank's stale copy of another rank's streams win.
        self.positions = {s: p for s, p in dataset.positions.items() if s in dataset.layout.rank_streams}
        self.bad_samples = 0
        self.skipped_members: Counter = Counter()  # jobs.wds's reasons, at every read of a tar

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        it = iter(self.loader)
        while True:
            items = [next(it) for _ in range(self.n_workers)]
            for item in items:
                self.positions.update(item["positions"])
                self.bad_samples += item["bad"]
                self.skipped_members.update(item["skipped_members"])
            yield torch.cat([i["images"] for i in items]), torch.cat([i["texts"] for i in items])
