"""VAS and VAS-D select what the authors' code (github ypwang61/VAS, baselines/vas.py) selects.

Each rule is pinned on a pool of a few hand-made rows whose selection is worked
out by hand in the comments: exactly n = int(N * fraction) rows (ties by
smaller uid), VAS-D's fixed chunk of ceil((n0 - n)/k) rows a round, and S built
from the rows entering the CLIP step (the whole pool) rather than from the rows
that passed it. The last test runs benchmarks/vas_reference.py, a minimal
re-statement of the authors' selection, against the engine on a synthetic pool.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcslurm.core.storage import DataFolder
from jobs.filter import engine, rules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORE = "clip_l14_similarity_score"


def write_tiny(folder, rows, files=2):
    """rows: (uid as a small int, CLIP score, 2-d embedding); split over `files` parquet + npz pairs."""
    os.makedirs(folder, exist_ok=True)
    parts = np.array_split(np.arange(len(rows)), files)
    for i, idx in enumerate(parts):
        sel = [rows[j] for j in idx]
        pq.write_table(pa.table({"uid": pa.array([f"{u:032x}" for u, _, _ in sel], pa.string()),
                                 SCORE: pa.array([float(c) for _, c, _ in sel], pa.float64())}),
                       os.path.join(folder, f"{i:08d}.parquet"))
        np.savez(os.path.join(folder, f"{i:08d}.npz"),
                 l14_img=np.array([e for _, _, e in sel], np.float32).reshape(len(sel), 2))
    return str(folder)


def run(folder, spec, tmp_path):
    work = DataFolder(str(tmp_path / "work"))
    out = str(tmp_path / "subset.npy")
    stats = engine.run_local(spec, engine.list_inputs(folder), work, out, scratch=str(tmp_path / "scratch"))
    subset = np.load(out)
    assert (subset["f0"] == 0).all()
    return sorted(int(u) for u in subset["f1"]), stats


@pytest.fixture
def x_only(tmp_path):
    """S = diag(1, 0): a row's VAS is x^2 of its normalised embedding."""
    path = tmp_path / "s.npy"
    np.save(path, np.diag([1.0, 0.0]))
    return str(path)


# -- exactly n rows -----------------------------------------------------------

def test_vas_keeps_exactly_n_ties_by_smaller_uid(tmp_path, x_only):
    # VAS: uid 9 -> 1.0; uids 5, 7, 2 -> 0.5 (tied); uids 10..15 -> 0. N = 10, n = int(10 * 0.3) = 3:
    # uid 9, then two of the tied three, the smaller uids 2 and 5 (uid 2 sits in the other file).
    # DataComp's rule (score >= the value at index 3 = 0.5) would keep 4 rows.
    rows = [(9, 0.5, (1, 0)), (5, 0.5, (1, 1)), (7, 0.5, (1, 1)), (10, 0.5, (0, 1)), (11, 0.5, (0, 1)),
            (2, 0.5, (1, 1)), (12, 0.5, (0, 1)), (13, 0.5, (0, 1)), (14, 0.5, (0, 1)), (15, 0.5, (0, 1))]
    kept, stats = run(write_tiny(tmp_path / "p", rows), f"vas(target={x_only}, fraction=0.3)", tmp_path)
    assert kept == [2, 5, 9]
    assert stats["parameters"]["0"]["kept"] == 3


CLIP_TIES = [  # uid, CLIP score, embedding (VAS under S = diag(1, 0) in the comments)
    (1, 0.9, (1, 0)),  # VAS 1.0
    (2, 0.8, (0, 1)),  # 0.0
    (3, 0.7, (1, 1)),  # 0.5
    (4, 0.7, (1, 2)),  # 0.2
    (5, 0.7, (1, 3)),  # 0.1
    (6, 0.7, (1, 0)),  # 1.0, but the fourth of four rows tied at the CLIP cut
    (7, 0.1, (0, 1)), (8, 0.1, (0, 1)), (9, 0.1, (0, 1)), (10, 0.1, (0, 1)),
]


def test_clip_step_before_vas_keeps_exactly_n(tmp_path, x_only):
    # CLIP step: n = int(10 * 0.5) = 5: uids 1, 2 and three of the four tied at 0.7 (3, 4, 5; not 6).
    # VAS: n = 3 of {1, 2, 3, 4, 5}: 1 (1.0), 3 (0.5), 4 (0.2). DataComp's rule at both steps
    # would keep uids 1..6 at the CLIP step and then 1, 6, 3, 4.
    kept, stats = run(write_tiny(tmp_path / "p", CLIP_TIES),
                      f"clip_score(l14, fraction=0.5) then vas(target={x_only}, fraction=0.3)", tmp_path)
    assert kept == [1, 3, 4]
    assert stats["per_filter_kept"]["0:clip_score(fraction=0.5)"] == 5


def test_clip_score_alone_keeps_datacomps_ties(tmp_path):
    # Without a VAS step after it, clip_score stays DataComp's rule: index 5 is 0.7, all four 0.7s kept.
    kept, _ = run(write_tiny(tmp_path / "p", CLIP_TIES), "clip_score(l14, fraction=0.5)", tmp_path)
    assert kept == [1, 2, 3, 4, 5, 6]


# -- the VAS-D round schedule -------------------------------------------------

def _twenty():
    rng = np.random.default_rng(5)
    return [(i + 1, 0.5, tuple(rng.normal(size=2))) for i in range(20)]


@pytest.mark.parametrize("fraction,k,sizes,chunk", [
    # n0 = 20, n = int(20 * 0.3) = 6, chunk = ceil(14 / 4) = 4: 16, 12, 8, then the last keeps 6
    # (the rule before kept 20 - round(i * 14 / 4): 16, 13, 10, 6).
    (0.3, 4, [16, 12, 8, 6], 4),
    # n = 13, chunk = ceil(7 / 6) = 2: 18, 16, 14 and then 12 < 13, where the authors' loop would ask
    # torch.topk for 13 of 10 rows in its last round; we stop at n after 4 rounds.
    (0.65, 6, [18, 16, 14, 13], 2),
    # k divides n0 - n: the same either way
    (0.5, 5, [18, 16, 14, 12, 10], 2),
])
def test_vas_d_removes_a_fixed_chunk_a_round(tmp_path, fraction, k, sizes, chunk):
    kept, stats = run(write_tiny(tmp_path / "p", _twenty()), f"vas_d(fraction={fraction}, iterations={k})", tmp_path)
    p = stats["parameters"]["0"]
    assert (p["chunk"], p["rounds"], p["first_sizes"], p["last_size"]) == (chunk, len(sizes), sizes[:3], sizes[-1])
    assert len(kept) == sizes[-1]


def test_vas_d_sizes_rule():
    assert rules.vas_d_sizes(20, 6, 4) == [16, 12, 8, 6]
    assert rules.vas_d_sizes(20, 13, 6) == [18, 16, 14, 13]
    assert rules.vas_d_sizes(20, 6, 1) == [6]
    assert rules.vas_d_sizes(6, 6, 4) == [] and rules.vas_d_sizes(5, 6, 4) == []
    assert rules.vas_d_sizes(6000, 1200, 7)[:2] == [6000 - 686, 6000 - 2 * 686]  # ceil(4800 / 7) = 686


# -- S from the whole pool before a CLIP step ---------------------------------

WHOLE_POOL = [  # uids 1-5: low CLIP, along x; uids 6-10: high CLIP, 6-7 along x, 8-10 along y
    (1, 0.10, (1, 0)), (2, 0.11, (1, 0)), (3, 0.12, (1, 0)), (4, 0.13, (1, 0)), (5, 0.14, (1, 0)),
    (6, 0.90, (1, 0)), (7, 0.80, (1, 0)), (8, 0.70, (0, 1)), (9, 0.60, (0, 1)), (10, 0.50, (0, 1)),
]


@pytest.mark.parametrize("spec", [
    "clip_score(l14, fraction=0.5) then vas(target=pool, fraction=0.2)",
    "clip_score(l14, fraction=0.5) then vas_d(fraction=0.2, iterations=1)",
    "clip_score(l14, fraction=0.5) then vas_d(fraction=0.2, iterations=2)",
    "clip_score(l14, threshold=0.5) then vas(target=pool, fraction=0.2)",
])
def test_s_comes_from_the_rows_entering_the_clip_step(tmp_path, spec):
    # CLIP keeps uids 6-10. S over the whole pool = (7 x x^T + 3 y y^T) / 10 = diag(0.7, 0.3): uids 6, 7
    # score 0.7, uids 8-10 score 0.3; n = int(10 * 0.2) = 2 -> {6, 7}. S over the CLIP survivors would be
    # diag(0.4, 0.6) and pick y rows (8, 9). With 2 rounds: chunk ceil(3/2) = 2 -> keep 3 (6, 7, and 8 by
    # uid), S from those = diag(2/3, 1/3), keep 2 -> {6, 7}.
    kept, stats = run(write_tiny(tmp_path / "p", WHOLE_POOL), spec, tmp_path)
    assert kept == [6, 7]
    assert stats["parameters"]["1"]["s_rows"] == 10


def test_s_from_the_candidates_without_a_clip_step(tmp_path):
    # vas(target=pool) first: S from all 10 rows, diag(0.7, 0.3): the 7 x rows tie at 0.7, n = 2 -> uids 1, 2.
    kept, stats = run(write_tiny(tmp_path / "p", WHOLE_POOL), "vas(target=pool, fraction=0.2)", tmp_path)
    assert kept == [1, 2] and stats["parameters"]["0"]["s_rows"] == 10


# -- against the authors' algorithm ---------------------------------------------

def _vas_reference():
    spec = importlib.util.spec_from_file_location("vas_reference", os.path.join(ROOT, "benchmarks/vas_reference.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_selection_matches_the_authors_algorithm(tmp_path):
    results = _vas_reference().compare(rows=1500, files=3, dim=16, seed=1, tmp=str(tmp_path))
    assert len(results) == 9
    for r in results:
        assert r["ours"] == r["reference"], r
        assert r["common"] == r["reference"], r


def test_metaclip_repeated_entry_counts_once(tmp_path):
    # The README says how a line listed twice is counted: once, under its first line (MetaCLIP's
    # naive matcher would match both lines, its Aho-Corasick matcher only the last).
    entries = tmp_path / "entries.txt"
    entries.write_text("dog\ncat\ndog\n")
    ptr, ids = rules.metaclip_matches(["a dog and a cat", "dog", "bird"], str(entries))
    assert list(ptr) == [0, 2, 3, 3] and list(ids) == [0, 1, 0]
