"""VAS / VAS-D: our filter engine against a minimal re-statement of the authors' selection.

    .venv/bin/python benchmarks/vas_reference.py [--rows 6000] [--files 3] [--dim 32] [--seed 0]

`reference_select` re-states, from reading github ypwang61/VAS at 5331ab83
(`baselines/vas.py`: load_uids_with_vas_filter, load_uids_with_vas_d_filter),
what those functions select, without their GPU/multiprocessing plumbing:

- N is the number of rows handed in (their pool after `given_uids`);
  n = int(N * fraction) for the CLIP step and for the VAS target alike.
- VAS-D's first S is (1/N) sum f f^T over ALL N rows, computed before the CLIP
  step; each later S comes from the survivors of the round before.
- CLIP step: fraction -> np.argpartition(scores, -n)[-n:] (exactly n rows),
  threshold -> scores >= t.
- VAS: np.argpartition(f^T S f, -n)[-n:] over the CLIP survivors (exactly n).
- VAS-D: chunk = ceil((n0 - n) / k); rounds 1..k-1 keep the top n0_i - chunk
  (torch.topk), the last keeps exactly n.
- Everything in float32 (their tensors are .float()); embeddings are used as
  stored (DataComp's are unit-norm; the synthetic pool here is normalised).

The pool here has continuous scores (no ties, no NaN), so every difference
between the two sides comes from a rule, not from a tie pick. Prints a
Markdown table: rows each side keeps and how many rows they share.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SCORE = "clip_l14_similarity_score"


def reference_select(uids: np.ndarray, css: np.ndarray, emb: np.ndarray, vas_fraction: float,
                     clip_fraction: float | None = None, clip_threshold: float | None = None,
                     target_s: np.ndarray | None = None, iterations: int | None = None) -> np.ndarray:
    """The uids the authors' code keeps: VAS with `target_s`, or VAS-D with `iterations` rounds."""
    emb = np.asarray(emb, np.float32)
    total = len(uids)
    s = emb.T @ emb / np.float32(total) if iterations is not None else np.asarray(target_s, np.float32)
    if clip_fraction is not None:
        idx = np.argpartition(css, -int(total * clip_fraction))[-int(total * clip_fraction):]
    elif clip_threshold is not None:
        idx = np.nonzero(css >= clip_threshold)[0]
    else:  # their functions always take a CLIP step; "none" is the pool as given
        idx = np.arange(total)
    target = int(vas_fraction * total)

    def vas(rows):
        return np.sum((emb[rows] @ s) * emb[rows], axis=1, dtype=np.float32)

    if iterations is None:
        return uids[idx[np.argpartition(vas(idx), -target)[-target:]]]
    n0 = len(idx)
    chunk = math.ceil((n0 - target) / iterations)
    for i in range(iterations):
        topk = target if i == iterations - 1 else len(idx) - chunk
        if topk > len(idx):
            raise RuntimeError("torch.topk: selected index k out of range")  # what their loop hits here
        idx = idx[np.argsort(-vas(idx), kind="stable")[:topk]]
        s = emb[idx].T @ emb[idx] / np.float32(len(idx))
    return uids[idx]


def make_pool(folder: str, rows: int, files: int, dim: int, seed: int) -> dict:
    """Parquet + npz files with continuous CLIP scores and anisotropic unit-norm embeddings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, 16), dtype=np.uint8)
    uid_hex = [bytes(r).hex() for r in raw]
    css = rng.normal(0.24, 0.05, rows)
    scale = np.linspace(2.0, 0.5, dim)  # a few dominant directions, as image embeddings have
    emb = rng.normal(size=(rows, dim)) * scale
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    os.makedirs(folder, exist_ok=True)
    bounds = np.linspace(0, rows, files + 1).astype(int)
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        pq.write_table(pa.table({"uid": pa.array(uid_hex[a:b], pa.string()), SCORE: pa.array(css[a:b])}),
                       os.path.join(folder, f"{i:08d}.parquet"))
        np.savez(os.path.join(folder, f"{i:08d}.npz"), l14_img=emb[a:b])
    uids = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in uid_hex], np.dtype("u8,u8"))
    return {"uids": uids, "css": css, "emb": emb}


def cases(target_path: str) -> list[tuple[str, str, dict]]:
    """(label, our spec, reference_select arguments)."""
    t = target_path
    return [
        ("VAS alone, S from a file", f"vas(target={t}, fraction=0.2)", {"vas_fraction": 0.2, "target": True}),
        *[(f"VAS-D k={k}", f"vas_d(fraction=0.2, iterations={k})", {"vas_fraction": 0.2, "iterations": k})
          for k in (1, 5, 7, 50)],
        ("CLIP 45% then VAS (file S)", f"clip_score(l14, fraction=0.45) then vas(target={t}, fraction=0.3)",
         {"vas_fraction": 0.3, "clip_fraction": 0.45, "target": True}),
        ("CLIP 45% then VAS (pool S)", "clip_score(l14, fraction=0.45) then vas(target=pool, fraction=0.3)",
         {"vas_fraction": 0.3, "clip_fraction": 0.45, "iterations": 1}),
        ("CLIP 30% then VAS-D k=7", "clip_score(l14, fraction=0.3) then vas_d(fraction=0.2, iterations=7)",
         {"vas_fraction": 0.2, "clip_fraction": 0.3, "iterations": 7}),
        ("CLIP >= 0.22 then VAS-D k=1", "clip_score(l14, threshold=0.22) then vas_d(fraction=0.2, iterations=1)",
         {"vas_fraction": 0.2, "clip_threshold": 0.22, "iterations": 1}),
    ]


def compare(rows: int = 6000, files: int = 3, dim: int = 32, seed: int = 0, tmp: str | None = None) -> list[dict]:
    from dcslurm.core.storage import DataFolder
    from jobs.filter import engine

    tmp = tmp or tempfile.mkdtemp(prefix="vas-compare-")
    pool = make_pool(os.path.join(tmp, "pool"), rows, files, dim, seed)
    target = np.random.default_rng(seed + 1).normal(size=(dim, dim)) / dim
    target = (target @ target.T).astype(np.float32)  # a symmetric d x d matrix: S itself
    target_path = os.path.join(tmp, "target_s.npy")
    np.save(target_path, target)
    inputs = engine.list_inputs(os.path.join(tmp, "pool"))
    out = []
    for i, (label, spec, kw) in enumerate(cases(target_path)):
        kw = dict(kw)
        if kw.pop("target", False):
            kw["target_s"] = target
        ref = reference_select(pool["uids"], pool["css"], pool["emb"], **kw)
        work = DataFolder(os.path.join(tmp, f"work{i}"))
        subset_path = os.path.join(tmp, f"subset{i}.npy")
        engine.run_local(spec, inputs, work, subset_path, scratch=os.path.join(tmp, f"scratch{i}"))
        ours = np.load(subset_path)
        common = len(np.intersect1d(ours, ref))
        out.append({"case": label, "spec": spec, "reference": len(ref), "ours": len(ours), "common": common,
                    "overlap": common / max(len(ref), 1)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--files", type=int, default=3)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(f"{a.rows} rows, {a.files} files, d={a.dim}, seed {a.seed}\n")
    print("| case | reference rows | our rows | shared | overlap |")
    print("|---|---|---|---|---|")
    for r in compare(a.rows, a.files, a.dim, a.seed):
        print(f"| {r['case']} | {r['reference']} | {r['ours']} | {r['common']} | {r['overlap']:.1%} |")


if __name__ == "__main__":
    main()
