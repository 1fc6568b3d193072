"""Synthetic pools with planted effects, for the audit tests and demonstrations.

`write_caption_pool`: metadata parquet whose captions name known groups (ground
truth returned), and `planted_subset`: a test filter that keeps every row with
a base probability except one group, kept at an exact planted rate.
`write_image_pool`: parquet + npz + webdataset tars of small rendered images,
optionally with a planted colour shift.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np

# subject phrase -> ground-truth group (None = no group term)
SUBJECTS = {
    None: ["a dog", "a red car", "a mountain lake", "a bowl of fruit", "an old bicycle", "a wooden boat"],
    "women": ["a woman", "a young girl", "a smiling lady"],
    "men": ["a man", "a young boy", "an old gentleman"],
    "lgbtq": ["a gay couple", "a lesbian couple", "a pride parade", "a queer artist"],
    "muslim": ["a muslim family", "a mosque"],
    "christian": ["a christian choir", "a church"],
    "asian": ["an asian chef", "a japanese garden"],
    "jewish": ["a jewish wedding", "a synagogue"],
}
SHARES = {None: 0.55, "women": 0.13, "men": 0.13, "lgbtq": 0.04, "muslim": 0.04, "christian": 0.04, "asian": 0.04,
          "jewish": 0.03}
TEMPLATES = ["a photo of {s} in the city", "{s} on a sunny day", "close up of {s}", "{s}, stock image"]
DOMAINS = ["example.com", "photos.example.org", "shop.example.de", "news.example.co.uk", "img.example.fr",
           "stock.example.net", "blog.example.jp"]


def _uids(rng: np.random.Generator, n: int) -> list[str]:
    return [bytes(r).hex() for r in rng.integers(0, 256, size=(n, 16), dtype=np.uint8)]


def write_caption_pool(folder: str, n_files: int, rows_per_file: int, seed: int = 0) -> dict[str, list[str]]:
    """Metadata parquet files; returns ground truth: group -> uids ("" = rows with no group term)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys = list(SHARES)
    p = np.array([SHARES[k] for k in keys])
    truth: dict[str, list[str]] = {}
    for i in range(n_files):
        n = rows_per_file
        uids = _uids(rng, n)
        groups = [keys[j] for j in rng.choice(len(keys), size=n, p=p / p.sum())]
        texts = [TEMPLATES[rng.integers(len(TEMPLATES))].format(s=SUBJECTS[g][rng.integers(len(SUBJECTS[g]))])
                 for g in groups]
        side = rng.choice([90, 150, 250, 500, 1000], size=(n, 2)).astype(np.float64)
        urls = [f"https://{DOMAINS[rng.integers(len(DOMAINS))]}/img/{i}-{j}.jpg" for j in range(n)]
        kinds = rng.choice(["clean", "mismatched_caption", "tiny_image"], size=n, p=[0.8, 0.1, 0.1])
        for u, g in zip(uids, groups):
            truth.setdefault(g or "", []).append(u)
        pq.write_table(pa.table({"uid": uids, "url": urls, "text": texts, "original_width": side[:, 0],
                                 "original_height": side[:, 1], "demo_kind": kinds.tolist()}),
                       os.path.join(folder, f"{i:08d}.parquet"))
    return truth


def planted_subset(path: str, truth: dict[str, list[str]], group: str, planted_rate: float, base_rate: float,
                   seed: int = 0) -> None:
    """A test filter: rows of `group` kept at exactly round(planted_rate * n) (a seeded choice), every
    other row with probability base_rate; written as a DataComp subset .npy."""
    from jobs.reshard.subset import uids_to_array

    rng = np.random.default_rng(seed)
    kept = []
    for g, uids in sorted(truth.items()):
        if g == group:
            kept += list(rng.choice(uids, size=round(planted_rate * len(uids)), replace=False))
        else:
            kept += [u for u, r in zip(uids, rng.random(len(uids))) if r < base_rate]
    np.save(path, uids_to_array(kept))


# -- images --------------------------------------------------------------------

def render(rng: np.random.Generator, side: int, shift: tuple[int, int, int]) -> bytes:
    """A small JPEG: a plain background near mid-grey and one ellipse of a random colour, plus `shift`."""
    from PIL import Image, ImageDraw

    bg = tuple(int(v) for v in np.clip(rng.normal(128, 15, 3), 0, 255))
    img = Image.new("RGB", (side, side), bg)
    x0, y0 = rng.integers(0, side // 2, 2)
    w, h = rng.integers(side // 4, side // 2, 2)
    ImageDraw.Draw(img).ellipse([int(x0), int(y0), int(x0 + w), int(y0 + h)],
                                fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    arr = np.clip(np.asarray(img, np.int16) + np.array(shift, np.int16), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def pseudo_embedding(jpeg: bytes, projection: np.ndarray) -> np.ndarray:
    """A fixed stand-in for a CLIP image embedding (no weights offline): a random projection of the
    image's 8x8 pixels, L2-normalised."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        x = np.asarray(im.convert("RGB").resize((8, 8)), np.float32).ravel() / 255.0
    e = projection @ (x - 0.5)
    return e / np.linalg.norm(e)


def write_image_pool(folder: str, n_files: int, rows_per_file: int, seed: int = 0,
                     shift: tuple[int, int, int] = (0, 0, 0), side: int = 48, dim: int = 16) -> None:
    """folder/metadata/*.parquet + .npz (l14_img, l14_txt) and folder/shards/*.tar (jpg, txt, json with uid)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    projection = np.random.default_rng(12345).normal(size=(dim, 8 * 8 * 3)).astype(np.float32)  # same for all pools
    os.makedirs(os.path.join(folder, "metadata"), exist_ok=True)
    os.makedirs(os.path.join(folder, "shards"), exist_ok=True)
    for i in range(n_files):
        uids = _uids(rng, rows_per_file)
        texts = [f"picture number {int(v)}" for v in rng.integers(0, 1000, rows_per_file)]
        images = [render(rng, side, shift) for _ in uids]
        with tarfile.open(os.path.join(folder, "shards", f"{i:08d}.tar"), "w") as tar:
            for j, (uid, text, jpg) in enumerate(zip(uids, texts, images)):
                for ext, data in (("jpg", jpg), ("txt", text.encode()), ("json", json.dumps({"uid": uid}).encode())):
                    info = tarfile.TarInfo(f"{i:04d}{j:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        img = np.stack([pseudo_embedding(b, projection) for b in images]).astype(np.float16)
        txt = rng.normal(size=(rows_per_file, dim)).astype(np.float32)
        txt = (txt / np.linalg.norm(txt, axis=1, keepdims=True)).astype(np.float16)
        stem = os.path.join(folder, "metadata", f"{i:08d}")
        np.savez(stem + ".npz", l14_img=img, l14_txt=txt)
        pq.write_table(pa.table({"uid": uids, "text": texts}), stem + ".parquet")
