"""Eval sets and a tiny checkpoint built from real offline images, for the eval tests (helpers, no tests).

Images: Debian's dataset-fashion-mnist (28x28 grayscale, 10 classes); when the
package is missing, scikit-learn's load_digits (8x8, 10 classes).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile

import numpy as np

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of a {c}.", "a blurry photo of a {c}.", "a black and white photo of the {c}.",
             "a low resolution photo of a {c}."]


def offline_images(n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images (n, h, w), labels, class names) from real offline data."""
    images_gz = os.path.join(FASHION_DIR, "t10k-images-idx3-ubyte.gz")
    labels_gz = os.path.join(FASHION_DIR, "t10k-labels-idx1-ubyte.gz")
    if os.path.exists(images_gz):
        with gzip.open(images_gz) as f:
            images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(labels_gz) as f:
            labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
        return images[offset:offset + n], labels[offset:offset + n].astype(int), FASHION_CLASSES
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).astype(np.uint8)
    return images[offset:offset + n], digits.target[offset:offset + n].astype(int), DIGIT_CLASSES


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: str, samples: list[dict[str, bytes]], per_shard: int) -> int:
    """Write samples (ext -> bytes, "__key__") as test/{i}.tar + test/nshards.txt."""
    os.makedirs(os.path.join(folder, "test"), exist_ok=True)
    nshards = 0
    for start in range(0, len(samples), per_shard):
        with tarfile.open(os.path.join(folder, "test", f"{nshards}.tar"), "w") as tar:
            for s in samples[start:start + per_shard]:
                for ext, data in s.items():
                    if ext != "__key__":
                        _add(tar, f"{s['__key__']}.{ext}", data)
        nshards += 1
    with open(os.path.join(folder, "test", "nshards.txt"), "w") as f:
        f.write(f"{nshards}\n")
    return nshards


def make_classification_set(folder: str, n: int = 300, per_shard: int = 100, offset: int = 0,
                            metadata: np.ndarray | None = None) -> list[str]:
    """A clip_benchmark classification set; `metadata` rows become per-sample .npy."""
    images, labels, classes = offline_images(n, offset)
    samples = []
    for i, (img, label) in enumerate(zip(images, labels)):
        s = {"__key__": f"s{i:06d}", "png": png_bytes(img), "cls": f"{label}".encode()}
        if metadata is not None:
            buf = io.BytesIO()
            np.save(buf, metadata[i])
            s["npy"] = buf.getvalue()
        samples.append(s)
    write_shards(folder, samples, per_shard)
    with open(os.path.join(folder, "classnames.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")
    with open(os.path.join(folder, "zeroshot_classification_templates.txt"), "w") as f:
        f.write("\n".join(TEMPLATES) + "\n")
    return classes


def make_retrieval_set(folder: str, n: int = 120, per_shard: int = 50, offset: int = 1000) -> None:
    """A clip_benchmark retrieval set: each image with two unique captions."""
    images, labels, classes = offline_images(n, offset)
    samples = []
    for i, (img, label) in enumerate(zip(images, labels)):
        caps = f"a photo of a {classes[label]}, picture {i}\nitem {i}: {classes[label]} on black"
        samples.append({"__key__": f"r{i:06d}", "png": png_bytes(img), "txt": caps.encode()})
    write_shards(folder, samples, per_shard)
    with open(os.path.join(folder, "dataset_type.txt"), "w") as f:
        f.write("retrieval\n")


def make_winogavil_set(folder: str, n_examples: int = 6) -> None:
    images, labels, classes = offline_images(12 * n_examples, 2000)
    samples = []
    for e in range(n_examples):
        k = 10 if e % 2 == 0 else 12
        idx = list(range(e * 12, e * 12 + k))
        cue = classes[labels[idx[0]]]
        s = {"__key__": f"w{e:04d}", "json": json.dumps({
            "cue": cue, "candidates": [f"c{j}" for j in idx],
            "associations": [f"c{j}" for j in idx if labels[j] == labels[idx[0]]]}).encode()}
        for i, j in enumerate(idx):
            s[f"{i}.png"] = png_bytes(images[j])
        samples.append(s)
    write_shards(folder, samples, per_shard=3)
    with open(os.path.join(folder, "dataset_type.txt"), "w") as f:
        f.write("winogavil\n")


def make_tiny_checkpoint(path: str, steps: int = 150, seed: int = 0) -> str:
    """dcslurm-tiny-vit whose zero-shot predictions are not constant, saved as an
    open_clip state dict. A random init predicts one class for every image, so the
    two output projections are fitted with the CLIP loss on the (frozen) towers'
    features of captioned offline images: cheap, as the towers run forward once."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from jobs.models import create_model

    model, _, preprocess, tokenizer = create_model("dcslurm-tiny-vit", seed=seed)
    model.eval()
    images, labels, classes = offline_images(200, 5000)
    x = torch.stack([preprocess(Image.fromarray(im).convert("RGB")) for im in images])
    texts = tokenizer([f"a photo of a {classes[label]}." for label in labels])
    visual_proj, text_proj = model.visual.proj, model.text_projection
    with torch.no_grad():  # pre-projection features: drop the projections for one pass
        model.visual.proj, model.text_projection = None, None
        img_feats, txt_feats = model.encode_image(x), model.encode_text(texts)
        model.visual.proj, model.text_projection = visual_proj, text_proj
    same = torch.as_tensor(labels)[:, None] == torch.as_tensor(labels)[None, :]
    target = same.float() / same.float().sum(1, keepdim=True)  # same-class captions are all positives
    opt = torch.optim.Adam([visual_proj, text_proj], lr=2e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a busy machine
    for _ in range(steps):
        logits = 20.0 * F.normalize(img_feats @ visual_proj, dim=-1) @ F.normalize(txt_feats @ text_proj, dim=-1).T
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    torch.save(model.state_dict(), path)
    return path
