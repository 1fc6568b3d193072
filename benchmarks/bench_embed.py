"""Embed stage vs the model alone, on this machine's CPUs, in one run.

    .venv/bin/python benchmarks/bench_embed.py [--model ViT-B-32] [--samples 128] [--batch 32] [--workers 1]

Writes webdataset shards of real photos (scikit-image's, resized to DataComp's
512 px longest side, JPEG), then measures, at the same batch size and with the
same torch threads:

- reference: `encode_image` + `encode_text` + L2-normalise on tensors already
  decoded, resized, normalised and tokenised (the model alone);
- stage: the embed stage's task function end to end (tar reading, decoding in
  DataLoader workers, tokenising, the model, writing npz + parquet), as the
  runner calls it; samples/s from its own stats, and from wall time with
  model loading included.

The reference runs before and after the stage (the machine is shared; the
mean of the two is the baseline). Goal: stage / reference >= 0.9.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def photos() -> list[Image.Image]:
    import skimage.data as data

    arrays = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.camera(),
              data.immunohistochemistry()]
    return [Image.fromarray(a).convert("RGB") for a in arrays]


def write_shards(folder: str, samples: int, per_shard: int) -> list[dict]:
    """Shards of JPEGs at 512 px longest side (varied crops), img2dataset-style members."""
    rng = np.random.default_rng(0)
    base = photos()
    written = []
    for shard in range(-(-samples // per_shard)):
        with tarfile.open(os.path.join(folder, f"{shard:08d}.tar"), "w") as tar:
            for i in range(min(per_shard, samples - shard * per_shard)):
                img = base[(shard * per_shard + i) % len(base)]
                w, h = img.size
                x0, y0 = rng.integers(0, w // 4), rng.integers(0, h // 4)
                crop = img.crop((x0, y0, x0 + int(w * rng.uniform(0.6, 0.75)), y0 + int(h * rng.uniform(0.6, 0.75))))
                scale = 512 / max(crop.size)
                crop = crop.resize((int(crop.width * scale), int(crop.height * scale)), Image.BICUBIC)
                buf = io.BytesIO()
                crop.save(buf, "JPEG", quality=90)
                key = f"{shard:04d}{i:05d}"
                caption = f"a photo of item {i} in shard {shard}, taken outdoors on a sunny day"
                meta = {"uid": f"{shard:016x}{i:016x}", "key": key, "url": f"http://example.com/{key}.jpg",
                        "original_width": crop.width, "original_height": crop.height}
                for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", caption.encode()),
                                   (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                written.append({"image": buf.getvalue(), "caption": caption})
    return written


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def reference_rate(model, preprocess, tokenizer, samples: list[dict], batch: int,
                   repeats: int = 1) -> tuple[float, float]:
    """(samples/s, CPU seconds a sample) of the model alone on pre-decoded, pre-tokenised batches."""
    images = torch.stack([preprocess(Image.open(io.BytesIO(s["image"])).convert("RGB")) for s in samples])
    tokens = tokenizer([s["caption"] for s in samples])
    with torch.inference_mode():
        model.encode_image(images[:batch])  # warm-up
        start, cpu_start = time.perf_counter(), cpu_seconds()
        for _ in range(repeats):
            for i in range(0, len(samples), batch):
                img = torch.nn.functional.normalize(model.encode_image(images[i:i + batch]), dim=-1)
                txt = torch.nn.functional.normalize(model.encode_text(tokens[i:i + batch]), dim=-1)
                (img * txt).sum(-1)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    return repeats * len(samples) / seconds, cpu / (repeats * len(samples))


def run_stage(root: str, shards: str, ckpt: str, model: str, batch: int, workers: int, per_task: int,
              gpu_decode: bool = False, device: str = "cpu") -> tuple[dict, float, float]:
    """The stage's task 0 through dcslurm's runner, in this process: (stats, wall s, CPU s incl. workers)."""
    from dcslurm.core.config import load_config
    from dcslurm.core.markers import read_marker
    from dcslurm.core.plan import PLAN_FILE
    from dcslurm.core.runs import plan_run
    from dcslurm.core.taskrun import run_task
    from dcslurm.core.tomlfile import write_toml

    run = os.path.join(root, f"run-{time.time_ns()}")
    toml = write_toml(os.path.join(root, f"{os.path.basename(run)}.toml"), {
        "run": {"folder": run, "scale": "tiny", "stages": ["embed"]},
        "pool": {"shards": shards},
        "stages": {"embed": {"models": [{"name": "m", "model": model, "pretrained": ckpt}], "batch_size": batch,
                             "workers": workers, "device": device, "gpu_decode": gpu_decode,
                             "units_per_task": per_task}},
    })
    cfg = load_config(toml)
    plan = plan_run(cfg)
    cfg.folder().write_text(PLAN_FILE, plan.to_json())
    start, cpu_start = time.perf_counter(), cpu_seconds()
    code = run_task(cfg.run_url, "embed", 0, storage_options={})
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    if code != 0:
        raise SystemExit(f"stage task failed (exit {code})")
    return read_marker(cfg.folder(), "embed", 0)["stats"], wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    from jobs.models import create_model

    root = tempfile.mkdtemp(prefix="bench-embed-")
    shards = os.path.join(root, "shards")
    os.makedirs(shards)
    samples = write_shards(shards, args.samples, args.per_shard)
    model, _, preprocess, tokenizer = create_model(args.model, "", "cpu", 0)
    model.eval()
    ckpt = os.path.join(root, "model.pt")
    torch.save(model.state_dict(), ckpt)
    n_shards = -(-args.samples // args.per_shard)
    print(f"{args.model}, {args.samples} samples in {n_shards} shards, batch {args.batch}, "
          f"{args.workers} decode workers, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}", flush=True)

    before, cpu_ref1 = reference_rate(model, preprocess, tokenizer, samples, args.batch)
    print(f"reference (model alone, pre-decoded)  {before:9.2f} samples/s  {cpu_ref1:7.3f} CPU s/sample", flush=True)
    stats, wall, cpu = run_stage(root, shards, ckpt, args.model, args.batch, args.workers, n_shards)
    cpu_stage = stats["embed_cpu_seconds"] / stats["samples"]
    print(f"stage (end to end, from its stats)     {stats['samples_per_s']:9.2f} samples/s  "
          f"{cpu_stage:7.3f} CPU s/sample "
          f"incl. decode workers ({stats['samples']} samples, {stats['embed_seconds']:.1f} s)", flush=True)
    print(f"stage (wall, incl. model load {stats['model_load_seconds']:.1f} s) "
          f"{stats['samples'] / wall:9.2f} samples/s",
          flush=True)
    after, cpu_ref2 = reference_rate(model, preprocess, tokenizer, samples, args.batch)
    print(f"reference again                        {after:9.2f} samples/s  {cpu_ref2:7.3f} CPU s/sample", flush=True)
    baseline = (before + after) / 2
    print(f"ratio stage / model alone: {stats['samples_per_s'] / baseline:.3f} samples/s (goal >= 0.9); "
          f"CPU time a sample, model alone / stage: {(cpu_ref1 + cpu_ref2) / 2 / cpu_stage:.3f} "
          "(the load-independent figure on a shared machine)")

if __name__ == "__main__":
    main()
