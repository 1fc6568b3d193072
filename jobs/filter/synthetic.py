"""Synthetic DataComp-format metadata pools (parquet + npz) for tests and benchmarks.

Rows carry the awkward cases the filters must get right: tied and NaN scores,
empty/None/one-word captions, non-English captions, newlines, tiny images,
extreme aspect ratios and exact boundary sizes (200 px, ratio 3).
"""

from __future__ import annotations

import os

import numpy as np

ENGLISH = [
    "a photo of a dog on the beach", "red sports car parked in front of a house",
    "two cats sleeping on a sofa", "the golden retriever plays with a tennis ball",
    "mountain landscape with a lake at sunset", "a bowl of fresh fruit on the kitchen table",
    "vintage bicycle leaning against a brick wall", "close up of a sunflower in a field",
    "child flying a kite in the park", "an old wooden boat on the river",
    "Dog, cat. Bird; fish: horse? cow! goat`", "a plate of spaghetti with tomato sauce",
    "white ceramic coffee mug\non a desk", "snow covered pine trees in the forest",
]
OTHER = [
    "un chien sur la plage au coucher du soleil", "ein roter Sportwagen vor dem Haus",
    "dos gatos durmiendo en el sofá", "一只猫在沙发上睡觉", "собака играет с мячом в парке",
    "il gatto dorme sul divano di casa",
]
SHORT = ["", "dog", "a dog", "hello", "cat  ", "  ", "car\n"]


def random_uids(rng: np.random.Generator, n: int) -> list[str]:
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    return [bytes(r).hex() for r in raw]


def make_rows(rng: np.random.Generator, n: int, dims: tuple[int, int] = (512, 768),
              with_embeddings: bool = True, uids: list[str] | None = None) -> tuple[dict, dict]:
    """(columns of a metadata parquet, arrays of its npz) for `n` rows."""
    kind = rng.random(n)
    captions = []
    for k in kind:
        if k < 0.65:
            captions.append(ENGLISH[rng.integers(len(ENGLISH))])
        elif k < 0.8:
            captions.append(OTHER[rng.integers(len(OTHER))])
        elif k < 0.97:
            captions.append(SHORT[rng.integers(len(SHORT))])
        else:
            captions.append(None)
    side = rng.choice([10, 150, 199, 200, 256, 300, 400, 600, 1024], size=(n, 2))
    w, h = side[:, 0].astype(np.float64), side[:, 1].astype(np.float64)
    extreme = rng.random(n) < 0.05
    w[extreme] = 2000
    h[extreme] = 200  # ratio 10
    exact3 = rng.random(n) < 0.05
    w[exact3], h[exact3] = 600, 200  # ratio exactly 3: kept
    w[rng.random(n) < 0.01] = np.nan
    b32 = np.round(rng.normal(0.27, 0.05, n), 2)  # 2 decimals: many ties
    l14 = np.round(rng.normal(0.24, 0.05, n), 3)
    b32[rng.random(n) < 0.02] = np.nan
    l14[rng.random(n) < 0.02] = np.nan
    cols = {
        "uid": uids if uids is not None else random_uids(rng, n),
        "url": [f"http://example.com/{i}.jpg" for i in range(n)],
        "text": captions,
        "original_width": w, "original_height": h,
        "clip_b32_similarity_score": b32, "clip_l14_similarity_score": l14,
    }
    arrays = {}
    if with_embeddings:
        for name, d in zip(("b32", "l14"), dims):
            for kind_ in ("img", "txt"):
                x = rng.normal(size=(n, d)).astype(np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
                arrays[f"{name}_{kind_}"] = x.astype(np.float16)
    return cols, arrays


def write_pool(folder: str, n_files: int, rows_per_file: int, seed: int = 0, dims: tuple[int, int] = (512, 768),
               with_embeddings: bool = True, empty_file: bool = False) -> list[str]:
    """Write `n_files` parquet (+ npz) files; returns the parquet paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n_files):
        n = 0 if (empty_file and i == 1) else rows_per_file
        cols, arrays = make_rows(rng, n, dims, with_embeddings)
        table = pa.table({
            "uid": pa.array(cols["uid"], pa.string()), "url": pa.array(cols["url"], pa.string()),
            "text": pa.array(cols["text"], pa.string()),
            "original_width": pa.array(cols["original_width"], pa.float64(), from_pandas=True),
            "original_height": pa.array(cols["original_height"], pa.float64(), from_pandas=True),
            "clip_b32_similarity_score": pa.array(cols["clip_b32_similarity_score"], pa.float64()),
            "clip_l14_similarity_score": pa.array(cols["clip_l14_similarity_score"], pa.float64()),
        })
        stem = os.path.join(folder, f"{i:08d}")
        pq.write_table(table, stem + ".parquet")
        if with_embeddings:
            np.savez(stem + ".npz", **arrays)
        paths.append(stem + ".parquet")
    return paths


def write_metadata_fast(folder: str, rows: int, rows_per_file: int, seed: int = 0) -> list[str]:
    """Metadata parquet only (no npz), vectorised, for benchmarks at millions of rows.

    Captions are drawn from the same English / non-English / short lists (with
    nulls); sizes and scores as in make_rows (ties, NaN, boundary sizes).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = pa.array(ENGLISH + OTHER + SHORT, pa.string())
    p = np.array([0.65 / len(ENGLISH)] * len(ENGLISH) + [0.15 / len(OTHER)] * len(OTHER)
                 + [0.17 / len(SHORT)] * len(SHORT))
    hex_pairs = np.array([f"{i:02x}".encode() for i in range(256)], dtype="S2")
    paths = []
    for i, start in enumerate(range(0, rows, rows_per_file)):
        n = min(rows_per_file, rows - start)
        uid_bytes = hex_pairs[rng.integers(0, 256, size=(n, 16))].view("S32").ravel()
        idx = rng.choice(len(vocab), size=n, p=p / p.sum())
        texts = vocab.take(pa.array(idx))
        null = pa.array(rng.random(n) < 0.03)
        texts = pa.compute.if_else(null, pa.scalar(None, pa.string()), texts)
        side = rng.choice(np.array([10, 150, 199, 200, 256, 300, 400, 600, 1024], np.int64), size=(n, 2))
        w, h = side[:, 0], side[:, 1]
        b32 = np.round(rng.normal(0.27, 0.05, n), 2)
        l14 = np.round(rng.normal(0.24, 0.05, n), 3)
        l14[rng.random(n) < 0.02] = np.nan
        table = pa.table({
            "uid": pa.array(uid_bytes.astype(object), pa.binary()).cast(pa.string()),
            "text": texts, "original_width": w, "original_height": h,
            "clip_b32_similarity_score": b32, "clip_l14_similarity_score": l14,
        })
        path = os.path.join(folder, f"{i:08d}.parquet")
        pq.write_table(table, path)
        paths.append(path)
    return paths
