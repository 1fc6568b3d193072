"""Embed throughput on one GPU: ViT-B-32 and ViT-L-14 at 224 px, img/s. A few minutes on one H100.

    .venv/bin/python benchmarks/gpu_embed.py [--samples 30000] [--workers 15] [--skip-stage] [--json OUT.json]
    .venv/bin/python benchmarks/gpu_embed.py --smoke   # CPU rehearsal of every code path (tiny model)

Random-init weights (throughput does not depend on them; no download).
Prints, per model:

1. model alone: encode_image (and image + text) on tensors already on the
   GPU, bf16 autocast, channels-last, at the stage's batch size;
2. nvjpeg alone: torchvision.io.decode_jpeg on the device, batched, for
   DataComp-sized JPEGs (512 px longest side), plus the resize to 224;
3. the stage end to end (task function via dcslurm's runner, in this
   process) with CPU decoding in `--workers` DataLoader workers and with
   gpu_decode = true; and both models together (DataComp's default).

Anchors (clip-retrieval, A100, CPU-resize bound): B/32 2,500 img/s,
L/14 312 img/s. Goals on one H100: B/32 >= 15,000 img/s, L/14 >= 3,000 img/s.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

GOALS = {"ViT-B-32": 15000, "ViT-L-14": 3000}
DEVICE = "cuda"  # --smoke: "cpu" (the tiny model stands in for both, so every path runs)
ANCHORS = {"ViT-B-32": 2500, "ViT-L-14": 312}
BATCH = {"ViT-B-32": 1024, "ViT-L-14": 512}


def synthetic_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n distinct JPEGs, 512 px longest side, with photo-like smooth structure (not noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = (512, int(rng.integers(288, 512))) if rng.random() < 0.5 else (int(rng.integers(288, 512)), 512)
        low = rng.integers(0, 255, size=(h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
        noise = rng.normal(0, 12, size=(h, w, 3))
        arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_shards(folder: str, jpegs: list[bytes], samples: int, per_shard: int) -> int:
    shards = -(-samples // per_shard)
    for s in range(shards):
        with tarfile.open(os.path.join(folder, f"{s:08d}.tar"), "w") as tar:
            for i in range(min(per_shard, samples - s * per_shard)):
                key = f"{s:04d}{i:05d}"
                caption = f"a photo of thing number {i} of shard {s}, outdoors, with people and a dog"
                meta = {"uid": f"{s:016x}{i:016x}", "key": key, "url": f"http://example.com/{key}.jpg"}
                for name, data in ((f"{key}.jpg", jpegs[(s * per_shard + i) % len(jpegs)]),
                                   (f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return shards


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, iters: int) -> float:
    """Seconds per call, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    _sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync()
    return (time.perf_counter() - start) / iters


def model_alone(name: str, ckpt_dir: str) -> tuple[float, float, str]:
    """(image img/s, image+text samples/s, checkpoint path) for `name` on the GPU."""
    from jobs.models import create_model

    model, _, _, tokenizer = create_model(name, "", "cpu", 0)
    ckpt = os.path.join(ckpt_dir, f"{name}.pt")
    torch.save(model.state_dict(), ckpt)
    model = model.to(DEVICE).eval().to(memory_format=torch.channels_last)
    batch = BATCH[name]
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = torch.randn(batch, 3, size, size, device=DEVICE).contiguous(memory_format=torch.channels_last)
    tokens = tokenizer(["a photo of thing number 12 of shard 3, outdoors, with people and a dog"] * batch).to(DEVICE)

    def image_only():
        with torch.inference_mode(), torch.autocast(DEVICE, dtype=torch.bfloat16):
            model.encode_image(x)

    def both():
        with torch.inference_mode(), torch.autocast(DEVICE, dtype=torch.bfloat16):
            i = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
            t = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
            (i * t).sum(-1).cpu()

    iters = 20 if name == "ViT-B-32" else 10
    rate_img = batch / timed(image_only, iters)
    rate_both = batch / timed(both, iters)
    # Drop the model (the closures above share this cell) so empty_cache can hand its memory back
    # before the next model loads; rebinding rather than `del` keeps the closures' name defined.
    model = None
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return rate_img, rate_both, ckpt


def nvjpeg_alone(jpegs: list[bytes], batch: int = 512) -> tuple[float, float]:
    """(decode img/s, decode + resize-to-224 img/s) with torchvision.io.decode_jpeg on the GPU."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in (jpegs * (batch // len(jpegs) + 1))[:batch]]

    def decode():
        decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")

    def decode_resize():
        imgs = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
        torch.stack([TF.center_crop(TF.resize(i, 224, interpolation=InterpolationMode.BICUBIC, antialias=True),
                                    [224, 224]) for i in imgs])

    return batch / timed(decode, 10), batch / timed(decode_resize, 10)


def stage(root: str, shards_dir: str, n_shards: int, models: list[tuple[str, str, str]], workers: int,
          gpu_decode: bool, batch: int) -> dict:
    """The stage's task over every shard (one task), in this process; its stats."""
    from dcslurm.core.config import load_config
    from dcslurm.core.markers import read_marker
    from dcslurm.core.plan import PLAN_FILE
    from dcslurm.core.runs import plan_run
    from dcslurm.core.taskrun import run_task

    run = os.path.join(root, f"run-{time.time_ns()}")
    from dcslurm.core.tomlfile import write_toml

    toml = write_toml(run + ".toml", {
        "run": {"folder": run, "scale": "tiny", "stages": ["embed"]},
        "pool": {"shards": shards_dir},
        "stages": {"embed": {"models": [{"name": n, "model": m, "pretrained": p} for n, m, p in models],
                             "batch_size": batch, "workers": workers, "device": DEVICE, "gpu_decode": gpu_decode,
                             "units_per_task": n_shards}},
    })
    cfg = load_config(toml)
    cfg.folder().write_text(PLAN_FILE, plan_run(cfg).to_json())
    if run_task(cfg.run_url, "embed", 0, storage_options={}) != 0:
        raise SystemExit("stage task failed: see the log above")
    return read_marker(cfg.folder(), "embed", 0)["stats"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=30000)
    parser.add_argument("--per-shard", type=int, default=2500)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--skip-stage", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU rehearsal: the tiny model in place of both, few samples, no nvjpeg")
    parser.add_argument("--json", default="", help="also write the results here as JSON")
    args = parser.parse_args()
    global DEVICE
    names = ("ViT-B-32", "ViT-L-14")
    if args.smoke:
        DEVICE = "cpu"
        names = ("dcslurm-tiny-vit",)
        BATCH["dcslurm-tiny-vit"] = 16
        GOALS["dcslurm-tiny-vit"] = ANCHORS["dcslurm-tiny-vit"] = 0
        args.samples, args.per_shard, args.workers = 64, 32, 1
        from jobs.models import register_configs

        register_configs()
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs one GPU (--smoke rehearses it on the CPU)")
    import logging

    logging.basicConfig(level=logging.WARNING)
    device_name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    print(f"device: {device_name}; {os.cpu_count()} CPUs; torch {torch.__version__}", flush=True)
    root = tempfile.mkdtemp(prefix="gpu-embed-")
    t0 = time.time()
    jpegs = synthetic_jpegs(256)
    print(f"made 256 distinct 512 px JPEGs ({np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB avg) "
          f"in {time.time() - t0:.1f} s", flush=True)

    results: dict = {"device": device_name, "torch": torch.__version__, "smoke": args.smoke}
    ckpts = {}
    for name in names:
        img, both, ckpts[name] = model_alone(name, root)
        results[name] = {"model_image": img, "model_image_text": both}
        print(f"{name}: model alone (bf16, channels-last, batch {BATCH[name]}): image {img:,.0f} img/s, "
              f"image+text {both:,.0f} samples/s", flush=True)
    if DEVICE == "cuda":
        dec, dec_resize = nvjpeg_alone(jpegs)
        results["nvjpeg"] = {"decode": dec, "decode_resize_224": dec_resize}
        print(f"nvjpeg alone: decode {dec:,.0f} img/s; decode + resize 224 {dec_resize:,.0f} img/s", flush=True)

    if not args.skip_stage:
        shards_dir = os.path.join(root, "shards")
        os.makedirs(shards_dir)
        n_shards = write_shards(shards_dir, jpegs, args.samples, args.per_shard)
        print(f"wrote {args.samples} samples in {n_shards} shards; stage with {args.workers} workers", flush=True)
        if args.smoke:  # the CPU cannot decode on the device: gpu_decode stays off
            runs = [("dcslurm-tiny-vit", [("tiny", "dcslurm-tiny-vit", ckpts["dcslurm-tiny-vit"])], False)]
        else:
            runs = [
                ("ViT-B-32", [("b32", "ViT-B-32", ckpts["ViT-B-32"])], False),
                ("ViT-B-32", [("b32", "ViT-B-32", ckpts["ViT-B-32"])], True),
                ("ViT-L-14", [("l14", "ViT-L-14", ckpts["ViT-L-14"])], False),
                ("ViT-L-14", [("l14", "ViT-L-14", ckpts["ViT-L-14"])], True),
                ("both", [("b32", "ViT-B-32", ckpts["ViT-B-32"]), ("l14", "ViT-L-14", ckpts["ViT-L-14"])], True),
            ]
        for label, models, gpu_decode in runs:
            batch = BATCH.get(label, 512)
            stats = stage(root, shards_dir, n_shards, models, args.workers, gpu_decode, batch)
            key = f"stage_{'gpu' if gpu_decode else 'cpu'}_decode"
            results.setdefault(label, {})[key] = stats["samples_per_s"]
            print(f"{label}: stage end to end, {'GPU' if gpu_decode else 'CPU'} decode, batch {batch}: "
                  f"{stats['samples_per_s']:,.0f} samples/s ({stats['samples']} samples, "
                  f"{stats['embed_seconds']:.1f} s; model load {stats['model_load_seconds']:.1f} s)", flush=True)

    print("\nsummary (img/s)          model alone   stage CPU decode   stage GPU decode   goal    A100 anchor")
    for name in names:
        r = results[name]
        print(f"{name:24s} {r['model_image_text']:11,.0f}   {r.get('stage_cpu_decode', float('nan')):16,.0f}   "
              f"{r.get('stage_gpu_decode', float('nan')):16,.0f}   {GOALS[name]:6,d}  {ANCHORS[name]:6,d}")
    if "both" in results:
        print(f"{'both (DataComp default)':24s} {'':11s}   {'':16s}   {results['both']['stage_gpu_decode']:16,.0f}")
    results["seconds"] = round(time.time() - t0, 1)
    print(f"total {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
