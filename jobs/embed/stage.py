"""Embed stage code (see spec.py): runs on the compute node.

Per task: load every configured model once, stream the task's shards
through `ShardBatches` (decoding in DataLoader workers), run each batch
through every model, and commit each shard as soon as all its samples are
embedded: `{stem}.npz` first (and `{stem}.tarindex`, the tar's member
index for reshard, jobs/wds.py), then `{stem}.parquet`, each atomically. The
parquet is the shard's commit: a shard whose parquet exists is skipped on a
rerun, and a shard that fails (damaged tar) leaves neither file.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from dcslurm.core.errors import UserError
from dcslurm.core.task import TaskContext, TaskResult
from jobs.embed.spec import EmbedParams
from jobs.wds import index_name, shard_stem

DATACOMP_COLUMNS = ("uid", "key", "url", "text", "original_width", "original_height", "width", "height",
                    "sha256", "face_bboxes")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"[stages.embed] device: {device!r} asked for, but this node has no CUDA device")
    return device


@dataclass
class EmbedModel:
    """One configured model, ready to encode batches on its device."""

    name: str  # output name: b32, l14, ...
    model: object
    image_key: str  # which ImageRecipe's pixels it takes
    text_key: str  # which TextRecipe's tokens it takes
    mean: object  # [1, 3, 1, 1] float tensor on the device
    std: object

    def encode(self, pixels_uint8, tokens, autocast_dtype):
        """(image embeddings, text embeddings, scores): fp32, L2-normalised, on the device."""
        import torch
        import torch.nn.functional as F

        # Same operations as open_clip's ToTensor + Normalize, so CPU inputs match it bit for bit.
        x = pixels_uint8.float().div(255).sub_(self.mean).div_(self.std)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            img = self.model.encode_image(x)
            txt = self.model.encode_text(tokens)
        img = F.normalize(img.float(), dim=-1)
        txt = F.normalize(txt.float(), dim=-1)
        return img, txt, (img * txt).sum(-1)


def load_models(specs: list[dict], device: str, seed: int, storage_options: dict | None = None):
    """(EmbedModel list, image recipes, text recipes): recipes deduplicated across models."""
    import torch

    from jobs.embed.loader import ImageRecipe, TextRecipe
    from jobs.models import create_model, model_preprocess, text_settings

    models, image_recipes, text_recipes = [], {}, {}
    for spec in specs:
        model, _, _, _ = create_model(spec["model"], spec.get("pretrained", ""), device, seed, storage_options)
        model.eval()
        if device.startswith("cuda"):
            model = model.to(memory_format=torch.channels_last)
        pre = model_preprocess(model)
        size = pre.size if isinstance(pre.size, tuple) else (pre.size, pre.size)
        recipe = ImageRecipe(size=tuple(size), resize_mode=pre.resize_mode, interpolation=pre.interpolation,
                             fill_color=pre.fill_color)
        image_recipes.setdefault(recipe.key, recipe)
        context_length, tokenizer_key = text_settings(spec["model"], model)
        text = TextRecipe(model=spec["model"], context_length=context_length, key=tokenizer_key)
        text_recipes.setdefault(text.key, text)
        mean = torch.tensor(pre.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(pre.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        models.append(EmbedModel(spec["name"], model, recipe.key, text.key, mean, std))
    return models, list(image_recipes.values()), list(text_recipes.values())


class DeviceDecoder:
    """JPEG bytes -> per-recipe uint8 pixels on the device (gpu_decode).

    Resizing follows open_clip's eval recipe (shortest side to size, centre
    crop) with torch's antialiased bicubic, which differs from PIL's in the
    last bits of some pixels: scores are close to the CPU path's (the tests
    hold them to 1e-2), not bit-identical.
    """

    def __init__(self, device: str, recipes):
        for r in recipes:
            if r.resize_mode not in ("shortest", "squash"):
                raise UserError(f"[stages.embed] gpu_decode: resize mode {r.resize_mode!r} is not supported on the "
                                "device; set gpu_decode = false")
        self.device = device
        self.recipes = recipes

    def __call__(self, jpegs: list) -> tuple[dict, list[bool]]:
        """({recipe key: uint8 [n_ok, 3, H, W]}, ok flags per input)."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device)
            ok = [True] * len(jpegs)
        except RuntimeError:  # one bad JPEG fails the batch call: find it one by one
            images, ok = [], []
            for data in jpegs:
                image = self._decode_one(data)
                ok.append(image is not None)
                if image is not None:
                    images.append(image)
        out = {}
        for r in self.recipes:
            resized = [self._resize(img, r) for img in images]
            out[r.key] = torch.stack(resized) if resized else torch.zeros(0, 3, *r.size, dtype=torch.uint8,
                                                                         device=self.device)
        return out, ok

    def _decode_one(self, data):
        """One JPEG on the device, else on the CPU (e.g. CMYK JPEGs nvjpeg refuses); None if neither can."""
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            pass
        try:
            return decode_image(data, mode=ImageReadMode.RGB).to(self.device)
        except RuntimeError:
            return None

    @staticmethod
    def _resize(img, recipe):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        mode = InterpolationMode.BILINEAR if recipe.interpolation == "bilinear" else InterpolationMode.BICUBIC
        if recipe.resize_mode == "squash":
            return TF.resize(img, list(recipe.size), interpolation=mode, antialias=True)
        h, w = recipe.size
        img = TF.resize(img, h if h == w else min(h, w), interpolation=mode, antialias=True)
        return TF.center_crop(img, [h, w])


class ShardAccumulator:
    """Rows of one shard as they arrive (any order), written out in tar order."""

    def __init__(self, stem: str, stripes: int):
        self.stem = stem
        self.stripes_left = stripes
        self.rows, self.meta = [], []
        self.embeddings: dict[str, list] = {}
        self.scores: dict[str, list] = {}
        self.samples_in_tar = 0
        self.skipped: Counter = Counter()
        self.truncated = 0  # captions cut to the context length (kept, as DataComp scored them)
        self.error: str | None = None
        self.index: bytes | None = None  # the tar's member index (jobs.wds), from the stripe that read it

    def add(self, name: str, img, txt, score) -> None:
        self.embeddings.setdefault(f"{name}_img", []).append(img)
        self.embeddings.setdefault(f"{name}_txt", []).append(txt)
        self.scores.setdefault(f"clip_{name}_similarity_score", []).append(score)

    def add_rows(self, rows, meta) -> None:
        self.rows.append(rows)
        self.meta.extend(meta)

    def arrays(self, model_dims: dict[str, int]) -> tuple[np.ndarray, dict, dict]:
        """(tar ordinals, npz arrays, score columns), sorted into tar order."""
        rows = np.concatenate(self.rows) if self.rows else np.zeros(0, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        npz, scores = {}, {}
        for name, dim in model_dims.items():
            for part in ("img", "txt"):
                key = f"{name}_{part}"
                parts = self.embeddings.get(key)
                arr = np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float16)
                npz[key] = np.ascontiguousarray(arr[order])
            col = f"clip_{name}_similarity_score"
            parts = self.scores.get(col)
            scores[col] = (np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32))[order]
        return order, npz, scores


def metadata_table(meta: list[dict], order: np.ndarray, scores: dict):
    """The DataComp-style parquet table: uid, metadata columns, one score column per model."""
    import pyarrow as pa

    rows = [meta[i] for i in order]
    names = [c for c in DATACOMP_COLUMNS if any(c in r for r in rows)]
    for r in rows:
        names.extend(k for k in r if k not in names)
    columns = {}
    for name in names:
        values = [r.get(name) for r in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types across samples: keep them as JSON text
            columns[name] = pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string())
    if "uid" not in columns:
        columns["uid"] = pa.array([], type=pa.string())
    for col, values in scores.items():
        columns[col] = pa.array(values.astype(np.float32))
    return pa.table(columns)


def commit_shard(out, acc: ShardAccumulator, model_dims: dict[str, int]) -> int:
    """Write {stem}.npz, then {stem}.parquet (the commit); returns the number of rows."""
    import pyarrow.parquet as pq

    order, npz, scores = acc.arrays(model_dims)
    buf = io.BytesIO()
    np.savez(buf, **npz)
    out.write_bytes(f"{acc.stem}.npz", buf.getvalue())
    if acc.index is not None:  # before the parquet, the commit: a committed shard has its index
        out.write_bytes(index_name(acc.stem), acc.index)
    table = metadata_table(acc.meta, order, scores)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    out.write_bytes(f"{acc.stem}.parquet", buf.getvalue())
    return len(order)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers, once joined)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _workers(params: EmbedParams, ctx: TaskContext) -> int:
    if params.workers is not None:
        return params.workers
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    return max(0, min(ctx.step.resources.cpus_per_task, available) - 1)


def run(ctx: TaskContext) -> TaskResult:
    """Embed this task's shards; outputs = the committed parquet paths (npz beside)."""
    params: EmbedParams = ctx.params
    urls = ctx.input_names()
    stems = [shard_stem(u) for u in urls]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise UserError(f"{ctx.run.url}: two input shards of task {ctx.index} are both called {dup}.tar")
    out = ctx.output
    done_before = [i for i, s in enumerate(stems) if out.exists(f"{s}.parquet")]
    todo = [i for i in range(len(urls)) if i not in set(done_before)]
    stats: dict = {"shards": len(urls), "shards_already_done": len(done_before)}
    committed = [stems[i] for i in done_before]
    if todo:
        stats.update(embed_shards(ctx, params, [(i, urls[i], stems[i]) for i in todo], committed))
    outputs = [f"{ctx.step.stage}/{s}.parquet" for s in stems if s in set(committed)]
    return TaskResult(outputs=outputs, stats=stats)


def embed_shards(ctx: TaskContext, params: EmbedParams, shards: list[tuple[int, str, str]],
                 committed: list[str]) -> dict:
    """Embed `shards` ((index, url, stem)); appends committed stems; returns stats."""
    import torch

    from jobs.embed.loader import ShardBatches, ShardInput
    from jobs.models import embed_dim

    device = resolve_device(params.device)
    t0 = time.time()
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = False  # same kernels every run: identical embeddings
        torch.backends.cudnn.deterministic = True
    models, image_recipes, text_recipes = load_models(params.models, device, ctx.seed, ctx.plan.storage_options)
    model_dims = {m.name: embed_dim(s["model"]) for m, s in zip(models, params.models)}
    load_seconds = time.time() - t0
    autocast = torch.bfloat16 if device.startswith("cuda") else None
    decoder = DeviceDecoder(device, image_recipes) if params.gpu_decode else None
    workers = _workers(params, ctx)
    dataset = ShardBatches([ShardInput(i, url) for i, url, _ in shards], ctx.plan.storage_options,
                           params.batch_size, image_recipes, text_recipes, raw_jpeg=params.gpu_decode,
                           workers=workers)
    loader = torch.utils.data.DataLoader(
        # Two batches ahead a worker: a 1024-image uint8 batch at 224 px is 150 MB of shared memory.
        dataset, batch_size=None, num_workers=workers, pin_memory=device.startswith("cuda"),
        prefetch_factor=2 if workers else None, persistent_workers=False)
    stems = {i: stem for i, _, stem in shards}
    open_shards: dict[int, ShardAccumulator] = {}
    totals: Counter = Counter()
    corrupt: list[str] = []
    ctx.log.info("embed: %d shards, models %s on %s, batch %d, %d workers%s", len(shards),
                 ", ".join(f"{m.name}={s['model']}" for m, s in zip(models, params.models)), device,
                 params.batch_size, workers, ", gpu_decode" if decoder else "")
    started, cpu_started = time.time(), _cpu_seconds()
    with torch.inference_mode():
        for item in loader:
            acc = open_shards.get(item["shard"])
            if acc is None:
                acc = open_shards[item["shard"]] = ShardAccumulator(stems[item["shard"]], dataset.stripes)
            if item["kind"] == "batch":
                _embed_batch(item, acc, models, decoder, device, autocast, totals)
                continue
            # end of one stripe of a shard
            acc.stripes_left -= 1
            acc.samples_in_tar = max(acc.samples_in_tar, item["samples"])
            acc.skipped.update(item["skipped"])
            acc.index = acc.index or item["index"]
            if item["missing"]:
                raise UserError(item["error"])
            acc.error = acc.error or item["error"]
            if acc.stripes_left:
                continue
            del open_shards[item["shard"]]
            if acc.error:
                ctx.log.warning("shard skipped, nothing committed: %s", acc.error)
                corrupt.append(acc.error)
                continue
            n = commit_shard(ctx.output, acc, model_dims)
            committed.append(acc.stem)
            totals["samples"] += n
            totals.update({f"skipped_{k}": v for k, v in acc.skipped.items()})
            totals["captions_truncated"] += acc.truncated
            ctx.log.info("shard %s committed: %d samples (%d in the tar)", acc.stem, n, acc.samples_in_tar)
    seconds = max(time.time() - started, 1e-9)
    embedded = totals.pop("embedded", 0)
    return {
        "samples": totals.pop("samples", 0),
        "samples_embedded": embedded,
        "samples_per_s": round(embedded / seconds, 2),
        "embed_seconds": round(seconds, 3),
        "embed_cpu_seconds": round(_cpu_seconds() - cpu_started, 3),  # this process + its decode workers
        "captions_truncated": totals.pop("captions_truncated", 0),
        **{k: v for k, v in sorted(totals.items())},
        "shards_committed": len(shards) - len(corrupt),
        "shards_corrupt": len(corrupt),
        "corrupt_shards": corrupt[:20],
        "device": device,
        "workers": workers,
        "models": {m["name"]: f"{m['model']}/{m.get('pretrained') or 'random init'}" for m in params.models},
        "model_load_seconds": round(load_seconds, 3),
    }


def _embed_batch(item: dict, acc: ShardAccumulator, models: list[EmbedModel], decoder, device: str,
                 autocast, totals: Counter) -> None:
    """Run one batch through every model and keep the results in its shard's accumulator."""
    import torch

    n = len(item["rows"])
    keep = torch.ones(n, dtype=torch.bool)
    pixels = {}
    for key, cpu_pixels in item["images"].items():
        full = torch.empty((n, *cpu_pixels.shape[1:]), dtype=torch.uint8, device=device)
        if len(item["pixel_idx"]):
            full[item["pixel_idx"].to(device)] = cpu_pixels.to(device, non_blocking=True)
        pixels[key] = full
    if len(item["jpeg_idx"]):
        flat, offsets = item["jpeg_bytes"], item["jpeg_offsets"].tolist()
        decoded, ok = decoder([flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])])
        jpeg_idx = item["jpeg_idx"]
        good = jpeg_idx[torch.tensor(ok, dtype=torch.bool)]
        keep[jpeg_idx[~torch.tensor(ok, dtype=torch.bool)]] = False
        acc.skipped["undecodable_image"] += ok.count(False)
        for key in pixels:
            if len(good):
                pixels[key][good.to(device)] = decoded[key]
    if not keep.all():
        rows = item["rows"][keep]
        meta = [m for m, k in zip(json.loads(item["meta"]), keep.tolist()) if k]
        pixels = {k: v[keep.to(device)] for k, v in pixels.items()}
        tokens = {k: v[keep] for k, v in item["tokens"].items()}
        truncated = item["truncated"][keep]
    else:
        rows, meta, tokens, truncated = item["rows"], json.loads(item["meta"]), item["tokens"], item["truncated"]
    if not len(rows):
        return
    acc.add_rows(rows.numpy(), meta)
    for m in models:
        img, txt, score = m.encode(pixels[m.image_key], tokens[m.text_key].to(device, non_blocking=True), autocast)
        acc.add(m.name, img.to(torch.float16).cpu().numpy(), txt.to(torch.float16).cpu().numpy(),
                score.cpu().numpy())
    totals["embedded"] += len(rows)
    acc.truncated += int(truncated.sum())
