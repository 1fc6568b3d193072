"""Shared by the training tests and benchmark: small real webdataset shards and run.toml files."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np

from dcslurm.core.tomlfile import write_toml


def digit_images(n: int, size: int = 64):
    """(PIL image, caption) pairs from scikit-learn's real 8x8 handwritten digits, upscaled."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = []
    for i in range(n):
        j = i % len(digits.images)
        pixels = (digits.images[j] / 16.0 * 255).astype(np.uint8)
        img = Image.fromarray(pixels).resize((size, size), Image.BICUBIC).convert("RGB")
        out.append((img, f"a photo of the handwritten digit {int(digits.target[j])}"))
    return out


def write_shards(folder: str, n_shards: int = 4, per_shard: int = 32, corrupt: int = 0) -> list[str]:
    """webdataset shards {:08d}.tar of KEY.jpg / KEY.txt / KEY.json; `corrupt` bad jpgs in shard 0."""
    os.makedirs(folder, exist_ok=True)
    pairs = digit_images(n_shards * per_shard)
    paths = []
    for s in range(n_shards):
        path = os.path.join(folder, f"{s:08d}.tar")
        with tarfile.open(path, "w") as tar:
            for k in range(per_shard):
                idx = s * per_shard + k
                img, caption = pairs[idx]
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                jpg = buf.getvalue() if not (s == 0 and k < corrupt) else b"not a jpeg"
                key = f"{s:04d}{k:04d}"
                for ext, data in (("jpg", jpg), ("txt", caption.encode()),
                                  ("json", json.dumps({"uid": f"{idx:032x}"}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def write_train_toml(path, folder: str, data: str, tasks_per_node: int = 1, nodes: int = 1,
                     executor: str = "local", scale: str = "tiny", **params) -> str:
    """A train-only run.toml (the one TOML writer); `params`: [stages.train] keys over the
    small defaults."""
    defaults = dict(batch_size=16, samples=16 * 20, log_every=1, checkpoint_every=10, workers=0,
                    data_streams=4, shuffle_buffer=8, grad_checkpointing=False, timeout_s=120)
    doc = {
        "run": {"folder": folder, "scale": scale, "stages": ["train"]},
        "executor": {"kind": executor},
        "stages": {"train": {"data": data, **defaults, **params,
                             "resources": {"nodes": nodes, "tasks_per_node": tasks_per_node, "cpus_per_task": 1}}},
    }
    return write_toml(path, doc)


def write_plan_toml(path, folder: str, data: str, slurm: dict, scale: str = "tiny",
                    executor: str | None = "slurm") -> str:
    """A train-only run.toml for `dcslurm plan` at a scale: the job shape in [slurm]
    (nodes, tasks_per_node, ...); `executor` None leaves [executor] out (the default kind)."""
    doc = {"run": {"folder": folder, "scale": scale, "stages": ["train"]},
           **({"executor": {"kind": executor}} if executor else {}),
           "slurm": slurm, "stages": {"train": {"data": data}}}
    return write_toml(path, doc)


def read_metrics(run_folder: str) -> list[dict]:
    with open(os.path.join(run_folder, "train", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
