"""The embed stage's input pipeline: shards -> batches of model-ready pixels and tokens.

Runs inside DataLoader workers. Each image is decoded once (PIL) and resized
once per distinct *image recipe* (size, resize mode, interpolation): two
models at 224 px share one resize. Pixels leave the worker as uint8 (a
quarter of the bytes of float); normalisation to each model's mean/std
happens batched on the device. With `raw_jpeg`, JPEG bytes leave undecoded
for nvjpeg on the device.

Batches are consecutive runs of `batch_size` samples of one shard (chunk c =
samples [c*B, (c+1)*B) in tar order), so what a batch holds does not depend
on the number of workers: outputs are the same with 0 or 16 of them.
With fewer shards than workers, each shard is read by several workers, each
decoding every k-th chunk ("stripes").
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dcslurm.core.storage import DataFolder, content_identity
from jobs.embed.tar_samples import CorruptShard, IndexRecorder, iter_samples

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
JPEG_MAGIC = b"\xff\xd8\xff"
# json fields that describe the download attempt, not the sample (img2dataset).
DOWNLOAD_BOOKKEEPING = {"status", "error_message", "exif", "caption"}


@dataclass(frozen=True)
class ImageRecipe:
    """How a model wants its pixels before normalisation (open_clip's eval transform)."""

    size: tuple[int, int]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    fill_color: int = 0

    @property
    def key(self) -> str:
        return f"{self.size[0]}x{self.size[1]}-{self.resize_mode}-{self.interpolation}-{self.fill_color}"


@dataclass(frozen=True)
class TextRecipe:
    """Which tokenizer a model uses: `model` is an open_clip name that builds it."""

    model: str
    context_length: int
    key: str


@dataclass(frozen=True)
class ShardInput:
    index: int  # position of the shard in this task's inputs
    url: str


def pil_resize_transform(recipe: ImageRecipe):
    """open_clip's eval transform up to (not including) ToTensor and Normalize."""
    import open_clip
    from torchvision.transforms import Normalize

    full = open_clip.image_transform(recipe.size, is_train=False, resize_mode=recipe.resize_mode,
                                     interpolation=recipe.interpolation, fill_color=recipe.fill_color)
    kept = [t for t in full.transforms if not isinstance(t, Normalize) and type(t).__name__ != "MaybeToTensor"]
    if len(kept) != len(full.transforms) - 2:
        raise RuntimeError("open_clip's eval transform changed shape: expected ... ToTensor, Normalize at the end")
    return kept


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """HWC PIL RGB image -> CHW uint8 tensor (the bytes ToTensor would divide by 255)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class Tokenization:
    """A tokenizer that also says which captions it had to truncate."""

    def __init__(self, recipe: TextRecipe):
        import open_clip

        from jobs.models import register_configs

        register_configs()
        self.recipe = recipe
        self.tokenizer = open_clip.get_tokenizer(recipe.model)
        self._simple = (isinstance(self.tokenizer, open_clip.tokenizer.SimpleTokenizer)
                        and self.tokenizer.reduction_fn is None)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tokens [N, context_length], truncated mask [N] or None when unknown)."""
        length = self.recipe.context_length
        if not self._simple:
            return self.tokenizer(texts), None
        # One pass one token longer: a non-zero last column means the caption did not fit.
        longer = self.tokenizer(texts, context_length=length + 1)
        truncated = longer[:, length] != 0
        tokens = longer[:, :length].clone()
        tokens[truncated, length - 1] = self.tokenizer.eot_token_id  # what open_clip's truncation does
        return tokens, truncated


class ShardBatches(torch.utils.data.IterableDataset):
    """Yields {"kind": "batch", ...} per chunk of a shard and {"kind": "end", ...} per stripe.

    batch: shard, rows (tar ordinals), meta (JSON list, a dict per row), tokens {text key: LongTensor},
           images {image key: uint8 [n, 3, H, W]} for `pixel_idx` rows, and, with raw_jpeg, the
           JPEG files of `jpeg_idx` rows (jpeg_bytes[jpeg_offsets[i]:jpeg_offsets[i+1]]);
           truncated: bool [n].
    end:   shard, stripe, stripes, samples (in the tar), skipped ({reason: count}), error (or None),
           missing (the shard does not exist), index (stripe 0 of an undamaged tar: its member
           index, jobs.wds, else None).
    """

    def __init__(self, shards: list[ShardInput], storage_options: dict, batch_size: int,
                 image_recipes: list[ImageRecipe], text_recipes: list[TextRecipe],
                 raw_jpeg: bool = False, workers: int = 0):
        super().__init__()
        self.shards = shards
        self.storage_options = storage_options
        self.batch_size = batch_size
        self.image_recipes = image_recipes
        self.text_recipes = text_recipes
        self.raw_jpeg = raw_jpeg
        self.workers = max(1, workers)
        self.stripes = max(1, self.workers // max(1, len(shards)))

    def work_items(self) -> list[tuple[ShardInput, int]]:
        """(shard, stripe) pairs; worker w takes items w, w + W, ..."""
        return [(s, stripe) for s in self.shards for stripe in range(self.stripes)]

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._resizers = {r.key: pil_resize_transform(r) for r in self.image_recipes}
        self._tokenizers = {r.key: Tokenization(r) for r in self.text_recipes}
        for shard, stripe in self.work_items()[worker::n_workers]:
            yield from self._read_stripe(shard, stripe)

    def _read_stripe(self, shard: ShardInput, stripe: int) -> Iterator[dict]:
        skipped: Counter = Counter()
        end = {"kind": "end", "shard": shard.index, "stripe": stripe, "stripes": self.stripes,
               "samples": 0, "skipped": {}, "error": None, "missing": False, "index": None}
        parent, name = shard.url.rstrip("/").rsplit("/", 1)
        chunk: list = []
        chunk_id = -1
        # Every stripe reads the whole tar; the first also notes its member index for reshard.
        recorder = IndexRecorder() if stripe == 0 else None
        try:
            folder = DataFolder(parent, self.storage_options)
            # the identity before the read: a tar replaced meanwhile then mismatches its index
            identity = content_identity(folder.info(name)) if recorder is not None else None
            with folder.open(name) as f:
                # members that are no sample field: counted once, by the stripe that indexes
                members_skipped = skipped if stripe == 0 else None
                for ordinal, sample in enumerate(iter_samples(f, shard.url, recorder, members_skipped)):
                    end["samples"] = ordinal + 1
                    c = ordinal // self.batch_size
                    if c % self.stripes != stripe:
                        continue
                    if c != chunk_id and chunk:
                        yield self._batch(shard, chunk, skipped)
                        chunk = []
                    chunk_id = c
                    chunk.append((ordinal, sample))
            if chunk:
                yield self._batch(shard, chunk, skipped)
            if recorder is not None:
                end["index"] = recorder.index(identity)
        except FileNotFoundError:
            end["missing"] = True
            end["error"] = f"{shard.url}: input shard does not exist"
        except CorruptShard as exc:
            end["error"] = str(exc)
        # A plain dict: the DataLoader's default_convert copies mappings with update(), which adds Counters.
        end["skipped"] = dict(skipped)
        yield end

    def _batch(self, shard: ShardInput, chunk: list, skipped: Counter) -> dict:
        rows, meta, captions = [], [], []
        pixels: dict[str, list[torch.Tensor]] = {k: [] for k in self._resizers}
        pixel_idx, jpeg_idx, jpegs = [], [], []
        for ordinal, sample in chunk:
            row = self._describe(sample, skipped)
            if row is None:
                continue
            image_bytes = next((sample.members[e] for e in IMAGE_EXTENSIONS if e in sample.members), None)
            if image_bytes is None:
                skipped["missing_image"] += 1
                continue
            if self.raw_jpeg and image_bytes[:3] == JPEG_MAGIC:
                jpeg_idx.append(len(rows))
                jpegs.append(image_bytes)
            else:
                decoded = self._decode(image_bytes)
                if decoded is None:
                    skipped["undecodable_image"] += 1
                    continue
                pixel_idx.append(len(rows))
                for key, tensor in decoded.items():
                    pixels[key].append(tensor)
            rows.append(ordinal)
            meta.append(row)
            captions.append(row["text"])
        tokens, truncated = {}, torch.zeros(len(rows), dtype=torch.bool)
        for key, tokenize in self._tokenizers.items():
            tokens[key], cut = tokenize(captions) if captions else (torch.zeros(0, tokenize.recipe.context_length,
                                                                                dtype=torch.long), None)
            if cut is not None:
                truncated |= cut
        images = {k: torch.stack(v) if v else torch.zeros(0, 3, *self._size(k), dtype=torch.uint8)
                  for k, v in pixels.items()}
        # JPEG bytes travel as one flat tensor + offsets: one pinned buffer per batch, not one per image.
        offsets = np.cumsum([0] + [len(j) for j in jpegs])
        return {"kind": "batch", "shard": shard.index, "rows": torch.tensor(rows, dtype=torch.long),
                # One JSON string, not 1,000 dicts: pinning and pickling then touch one object.
                "meta": json.dumps(meta), "tokens": tokens, "truncated": truncated, "images": images,
                "pixel_idx": torch.tensor(pixel_idx, dtype=torch.long),
                "jpeg_idx": torch.tensor(jpeg_idx, dtype=torch.long),
                "jpeg_bytes": torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8) if jpegs
                else torch.zeros(0, dtype=torch.uint8),
                "jpeg_offsets": torch.from_numpy(offsets.astype(np.int64))}

    def _size(self, key: str) -> tuple[int, int]:
        return next(r.size for r in self.image_recipes if r.key == key)

    @staticmethod
    def _describe(sample, skipped: Counter) -> dict | None:
        """uid, text and metadata of a sample, or None (counted) when it cannot be used."""
        if "txt" not in sample.members:
            skipped["missing_caption"] += 1
            return None
        try:
            info = json.loads(sample.members["json"]) if "json" in sample.members else {}
        except (ValueError, UnicodeDecodeError):
            skipped["bad_json"] += 1
            return None
        if not isinstance(info, dict) or not info.get("uid"):
            skipped["missing_uid"] += 1
            return None
        try:
            text = sample.members["txt"].decode("utf-8")
        except UnicodeDecodeError:
            skipped["caption_not_utf8"] += 1
            return None
        row = {"uid": str(info["uid"]), "key": info.get("key", sample.key), "text": text}
        for k, v in info.items():
            if k not in row and k not in DOWNLOAD_BOOKKEEPING:
                row[k] = v
        return row

    def _decode(self, data: bytes) -> dict[str, torch.Tensor] | None:
        """{image recipe key: uint8 CHW} from one decode, or None if the bytes are no image."""
        try:
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                img = opened.convert("RGB") if opened.mode != "RGB" else opened.copy()
            out = {}
            for key, steps in self._resizers.items():
                resized = img
                for step in steps:
                    resized = step(resized)
                out[key] = pil_to_uint8(resized)
            return out
        except Exception:  # noqa: BLE001 - any decoder failure is a bad sample, counted by the caller
            return None
