"""Training data: webdataset shards sampled with replacement, as deterministic streams.

The global batch of step t is the same set of samples whatever the world size
or the number of DataLoader workers, so a 2-rank run and a 1-rank run see the
same data, and a resumed run continues exactly where the checkpoint stopped:

- the data is `n_streams` independent streams; stream s draws shards with
  replacement (numpy generator seeded by (seed, s, draw)) and reads each one
  through a small shuffle buffer;
- every step takes `per_stream` consecutive samples from every stream
  (global batch = n_streams x per_stream); rank r owns a contiguous block
  of streams, DataLoader worker w of the rank owns every W-th of those;
- a stream's position counts the raw samples it has read (image + caption);
  a sample that fails to decode is skipped and counted, and the positions
  after each step travel back with the batch, so the checkpoint records
  exactly where each stream is;
- augmentation of the sample at position p of stream s is seeded by
  (seed, s, p), so it does not depend on which process decodes it.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dcslurm.errors import UserError
from dcslurm.storage import DataFolder
from jobs.train.inputs import Shard, check_shards, list_shards, read_size_table  # noqa: F401 - re-exported

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's rule: key = path up to the first dot


# -- raw samples ----------------------------------------------------------------

def iter_tar_samples(fileobj) -> Iterator[dict]:
    """Samples of a webdataset tar, in order: {"__key__": key, ext: bytes, ...}."""
    current: dict | None = None
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            m = _KEY.match(member.name)
            if m is None:
                continue
            key, ext = m.group(1), m.group(2).lower()
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current


def is_training_sample(sample: dict) -> bool:
    return "txt" in sample and any(e in sample for e in IMAGE_EXTS)


class SampleStream:
    """One stream: shards drawn with replacement, each read through a shuffle buffer."""

    def __init__(self, shards: list[Shard], seed: int, stream: int, shuffle_buffer: int,
                 storage_options: dict):
        self.shards = shards
        self.seed = seed
        self.stream = stream
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.storage_options = storage_options

    def _draw(self, draw: int) -> tuple[Shard, np.random.Generator]:
        rng = np.random.default_rng([self.seed, self.stream, draw])
        return self.shards[int(rng.integers(len(self.shards)))], rng

    def _shard_samples(self, shard: Shard, rng: np.random.Generator) -> Iterator[dict]:
        parent, name = shard.url.rsplit("/", 1)
        with DataFolder(parent, self.storage_options).open(name) as f:
            buffer: list[dict] = []
            for sample in iter_tar_samples(f):
                if not is_training_sample(sample):
                    continue
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    i = int(rng.integers(len(buffer)))
                    buffer[i], buffer[-1] = buffer[-1], buffer[i]
                    yield buffer.pop()
            order = rng.permutation(len(buffer))
            for i in order:
                yield buffer[int(i)]

    def samples(self, start: int = 0) -> Iterator[tuple[int, dict]]:
        """(position, raw sample) from position `start` on, forever."""
        position, draw = 0, 0
        while True:
            shard, rng = self._draw(draw)
            draw += 1
            if shard.samples is not None and position + shard.samples <= start:
                position += shard.samples  # skipped without reading it
                continue
            n = 0
            for sample in self._shard_samples(shard, rng):
                n += 1
                if position >= start:
                    yield position, sample
                position += 1
            if n == 0:
                raise UserError(f"{shard.url}: training shard has no samples with an image and a caption")


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
        self.shards = shards
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
        iters = {s: SampleStream(self.shards, self.seed, s, self.shuffle_buffer, self.storage_options)
                 .samples(self.positions.get(s, 0)) for s in mine}
        next_position = {s: self.positions.get(s, 0) for s in mine}
        while True:
            images, texts, bad = [], [], 0
            for s in mine:
                got = 0
                while got < self.layout.per_stream:
                    position, raw = next(iters[s])
                    next_position[s] = position + 1
                    try:
                        image, text = self._decode(s, position, raw)
                    except Exception:  # noqa: BLE001 - a corrupt sample is skipped and counted
                        bad += 1
                        continue
                    images.append(image)
                    texts.append(text)
                    got += 1
            yield {"images": torch.stack(images), "texts": torch.stack(texts),
                   "positions": dict(next_position), "bad": bad}


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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        it = iter(self.loader)
        while True:
            items = [next(it) for _ in range(self.n_workers)]
            for item in items:
                self.positions.update(item["positions"])
                self.bad_samples += item["bad"]
            yield torch.cat([i["images"] for i in items]), torch.cat([i["texts"] for i in items])
