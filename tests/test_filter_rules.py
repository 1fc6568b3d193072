"""Every filter rule against a direct implementation over the whole table.

The references below re-state DataComp's `baselines/` code (load everything,
`-np.sort(-scores)[int(N * f)]`, `scores >= t`, per-row language ID and
WordNet lookups), MetaCLIP's substring rule and VAS's f^T S f densely, and
must select exactly what the map-reduce engine selects.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pandas as pd
import pytest

from dcslurm.core.errors import UserError
from dcslurm.core.storage import DataFolder
from dcslurm.datacomp.pool import parse_uids
from jobs.filter import engine, rules
from jobs.filter.synthetic import write_pool

DIMS = (16, 24)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    write_pool(str(folder), n_files=4, rows_per_file=300, seed=3, dims=DIMS, empty_file=True)
    table = pd.concat([pd.read_parquet(folder / n) for n in sorted(os.listdir(folder)) if n.endswith(".parquet")],
                      ignore_index=True)
    emb = {}
    for key in ("l14_img", "b32_img"):
        emb[key] = np.concatenate([np.load(folder / n)[key] for n in sorted(os.listdir(folder)) if n.endswith(".npz")])
    return str(folder), table, emb


def run(pool_folder, spec, tmp_path, seed=0):
    work = DataFolder(str(tmp_path / "work"))
    out = str(tmp_path / "subset.npy")
    stats = engine.run_local(spec, engine.list_inputs(pool_folder), work, out, seed=seed)
    subset = np.load(out)
    assert subset.dtype == np.dtype("u8,u8")
    assert (np.sort(subset) == subset).all()
    return subset, stats, work


def uids_of(table: pd.DataFrame, mask) -> np.ndarray:
    """DataComp's conversion: (int(uid[:16], 16), int(uid[16:32], 16)), sorted."""
    sel = table.uid[np.asarray(mask, bool)]
    return np.sort(np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in sel], np.dtype("u8,u8")))


def texts(table):
    return [t if isinstance(t, str) else "" for t in table.text]


def ref_fraction_threshold(values: np.ndarray, fraction: float) -> float:
    n = int(len(values) * fraction)
    return -np.sort(-values)[n]


def ft_english(text: str) -> bool:
    return rules.fasttext_model("").predict(text.replace("\n", " "))[0][0] == "__label__en"


# -- DataComp baselines ---------------------------------------------------------

def test_pool_has_the_awkward_cases(pool):
    _, table, _ = pool
    assert table.clip_l14_similarity_score.isna().any() and table.text.isna().any()
    assert (table.text == "").any() and table.clip_l14_similarity_score.duplicated().any()
    assert (np.maximum(table.original_width, table.original_height)
            / np.minimum(table.original_width, table.original_height) == 3).any()


def test_no_filter_keeps_every_row(pool, tmp_path):
    folder, table, _ = pool
    subset, stats, _ = run(folder, "no_filter", tmp_path)
    assert (subset == uids_of(table, np.ones(len(table)))).all()
    assert stats["input_rows"] == stats["kept_rows"] == len(table)


@pytest.mark.parametrize("arch,fraction", [("l14", 0.3), ("b32", 0.3), ("l14", 0.45), ("b32", 0.977), ("l14", 1.0)])
def test_clip_score_fraction_matches_full_sort_with_ties_and_nans(pool, tmp_path, arch, fraction):
    folder, table, _ = pool
    col = f"clip_{arch}_similarity_score"
    subset, stats, _ = run(folder, f"clip_score({arch}, fraction={fraction})", tmp_path)
    values = table[col].values
    if fraction == 1.0:
        expected = ~np.isnan(values)  # DataComp indexes past the end here; we keep every scored row
    else:
        t = ref_fraction_threshold(values, fraction)
        expected = table[col] >= t
        used = stats["parameters"]["0"]["threshold"]
        assert (np.isnan(t) and used == "nan") or used == t
    assert (subset == uids_of(table, expected)).all()
    # ties at the threshold are all kept, so the subset can exceed int(N * f)
    assert len(subset) >= min(int(len(table) * fraction), (~np.isnan(values)).sum()) or fraction > 0.97


def test_fraction_landing_on_nan_tail_keeps_nothing_like_datacomp(pool, tmp_path):
    folder, table, _ = pool
    subset, stats, _ = run(folder, "clip_score(b32, fraction=0.995)", tmp_path)
    assert np.isnan(ref_fraction_threshold(table.clip_b32_similarity_score.values, 0.995))
    assert len(subset) == 0 and stats["parameters"]["0"]["threshold"] == "nan"


def test_clip_score_threshold(pool, tmp_path):
    folder, table, _ = pool
    subset, _, _ = run(folder, "clip_score(arch=b32, threshold=0.3)", tmp_path)
    assert (subset == uids_of(table, table.clip_b32_similarity_score >= 0.3)).all()


def test_multi_pass_radix_select_is_exact(pool, tmp_path, monkeypatch):
    from jobs.filter import select

    monkeypatch.setattr(select, "COLLECT_CAP", 0)  # force every 16-bit level
    monkeypatch.setattr(engine, "exact_descending_value",
                        lambda stream, n, first=None: select.exact_descending_value(stream, n, collect_cap=0,
                                                                                    first=first))
    folder, table, _ = pool
    subset, stats, _ = run(folder, "clip_score(l14, fraction=0.3)", tmp_path)
    assert stats["parameters"]["0"]["passes"] == 3  # digit 1 from the map tasks' histograms, 2-4 in the reduce
    t = ref_fraction_threshold(table.clip_l14_similarity_score.values, 0.3)
    assert (subset == uids_of(table, table.clip_l14_similarity_score >= t)).all()


def test_map_histograms_replace_the_first_reduce_pass(pool, tmp_path):
    folder, table, _ = pool
    spec = "basic then clip_score(b32, fraction=0.2)"  # candidates = basic rows: known in the map
    _, stats, work = run(folder, spec, tmp_path)
    with_map = stats["parameters"]["1"]
    params = engine.reduce(engine.parse_spec(spec), engine.list_inputs(folder), work, engine.Reader(), 0,
                           str(tmp_path), first_level_from_map=False)
    assert params["1"]["threshold"] == with_map["threshold"] and params["1"]["passes"] == with_map["passes"] + 1
    b32 = table.clip_b32_similarity_score.values
    basic = np.concatenate([engine.load_parts(work, f"{i:08d}")["m0"] for i in range(4)])
    assert with_map["candidates"] == basic.sum()
    assert with_map["threshold"] == -np.sort(-b32[basic])[int(len(table) * 0.2)]


def test_basic_filter(pool, tmp_path):
    folder, table, _ = pool
    subset, _, _ = run(folder, "basic", tmp_path)
    t = texts(table)
    lo = np.minimum(table.original_width, table.original_height)
    hi = np.maximum(table.original_width, table.original_height)
    expected = (np.array([ft_english(x) for x in t]) & np.array([len(x.split()) > 2 for x in t])
                & np.array([len(x) > 5 for x in t]) & (lo >= 200) & (hi / lo <= 3.0))
    assert 0 < expected.sum() < len(table)
    assert (subset == uids_of(table, expected)).all()


def test_laion2b(pool, tmp_path):
    folder, table, _ = pool
    subset, _, _ = run(folder, "laion2b", tmp_path)
    import gcld3

    det = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
    english = np.array([det.FindLanguage(text=x.replace("\n", " ")).language == "en" for x in texts(table)])
    expected = english & (table.clip_b32_similarity_score >= 0.28)
    assert (subset == uids_of(table, expected)).all()


def test_text_based(pool, tmp_path):
    folder, table, _ = pool
    wn = rules.wordnet_reader()  # the default, Princeton WordNet 3.0 (tests/test_filter_wordnet.py)
    ids = sorted({wn.synsets(w)[0].offset() for w in ("dog", "car", "boat", "sunflower", "kite")})
    synsets = tmp_path / "in21k.txt"
    synsets.write_text("".join(f"n{i:08d}\n" for i in ids))
    subset, _, _ = run(folder, f"text_based(synsets='{synsets}')", tmp_path)

    def has_entity(text):
        for word in text.split():
            s = wn.synsets(word)
            if s and s[0].offset() in set(ids):
                return True
        return False

    t = texts(table)
    expected = np.array([ft_english(x) and has_entity(x) for x in t])
    assert 0 < expected.sum() < len(table)
    assert (subset == uids_of(table, expected)).all()


def _caption_filter(t: list[str]) -> np.ndarray:
    def tokens(x):  # fasttext.tokenize: whitespace-split words plus '</s>' per newline
        return len([w for w in re.split(r"[ \t\v\f\r\0\n]", x) if w]) + x.count("\n")

    return np.array([ft_english(x) and tokens(x) > 1 and len(x) > 5 for x in t])


def _image_fixture(tmp_path, emb, k=6, seed=1):
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(k, DIMS[1])).astype(np.float32)
    targets = emb["l14_img"][rng.choice(len(emb["l14_img"]), 40)].astype(np.float32) + 0.01
    np.save(tmp_path / "centroids.npy", centroids)
    np.save(tmp_path / "targets.npy", targets)
    return centroids, targets


def _image_expected(table, emb, centroids, targets):
    target_ids = np.unique(np.argmax(targets @ centroids.T, axis=1))
    nearest = np.argmax(emb["l14_img"].astype(np.float32) @ centroids.T, axis=1)
    return _caption_filter(texts(table)) & np.isin(nearest, target_ids)


def test_image_based_with_given_centroids(pool, tmp_path):
    folder, table, emb = pool
    centroids, targets = _image_fixture(tmp_path, emb)
    subset, _, _ = run(folder, f"image_based(targets={tmp_path}/targets.npy, centroids={tmp_path}/centroids.npy)",
                       tmp_path)
    expected = _image_expected(table, emb, centroids, targets)
    assert 0 < expected.sum() < len(table)
    assert (subset == uids_of(table, expected)).all()


def test_image_based_intersect_clip_score_is_datacomp_1b_rule(pool, tmp_path):
    folder, table, emb = pool
    centroids, targets = _image_fixture(tmp_path, emb)
    spec = (f"image_based(targets={tmp_path}/targets.npy, centroids={tmp_path}/centroids.npy)"
            " & clip_score(l14, fraction=0.3)")
    subset, stats, _ = run(folder, spec, tmp_path)
    t = ref_fraction_threshold(table.clip_l14_similarity_score.values, 0.3)
    expected = _image_expected(table, emb, centroids, targets) & (table.clip_l14_similarity_score >= t).values
    assert (subset == uids_of(table, expected)).all()
    # "clip then image" is the same set: image_based is a per-row rule
    subset2, _, _ = run(folder, spec.split(" & ")[1] + " then " + spec.split(" & ")[0], tmp_path / "b")
    assert (subset2 == subset).all()


def test_image_based_kmeans_of_the_pool(pool, tmp_path):
    folder, table, emb = pool
    _, targets = _image_fixture(tmp_path, emb)
    subset, _, work = run(folder, f"image_based(targets={tmp_path}/targets.npy, k=5, iterations=20)", tmp_path)
    z = np.load(work.local_path("_prepared/image0.npz"))
    assert z["centroids"].shape == (5, DIMS[1])
    expected = _image_expected(table, emb, z["centroids"], targets)
    assert (subset == uids_of(table, expected)).all()


# -- MetaCLIP -----------------------------------------------------------------

ENTRIES = ["dog", "cat", "red sports car", "a", "beach", "Dog", "fish", "goat", "sofa", "kitchen table", "!", "zebra"]


def _metaclip_reference(table, entries, t, candidates):
    spaced = [f" {x} " for x in texts(table)]
    for p in (",", ".", ";", ":", "?", "!", "`"):
        spaced = [s.replace(p, f" {p} ") for s in spaced]
    for c in ("\t", "\n", "\r"):
        spaced = [s.replace(c, " ") for s in spaced]
    matched = [[i for i, e in enumerate(entries) if f" {e} " in s] for s in spaced]
    counts = np.zeros(len(entries), np.int64)
    for row, m in enumerate(matched):
        if candidates[row]:
            for i in m:
                counts[i] += 1
    prob = np.array([1 - np.prod([1 - min(1.0, t / counts[i]) for i in m]) if m else 0.0 for m in matched])
    return counts, prob, matched


@pytest.mark.parametrize("t", [3, 40, 10_000])
def test_metaclip_counts_probabilities_and_sampling(pool, tmp_path, t):
    folder, table, _ = pool
    (tmp_path / "entries.txt").write_text("\n".join(ENTRIES) + "\n")
    subset, stats, work = run(folder, f"metaclip(entries={tmp_path}/entries.txt, t={t})", tmp_path, seed=5)
    counts, prob, matched = _metaclip_reference(table, ENTRIES, t, np.ones(len(table), bool))
    assert (np.load(work.local_path("_params/metaclip0.npy")) == counts).all()
    hi, lo = parse_uids(list(table.uid), "fixture")
    u = rules.uniform_by_uid(hi, lo, 5, stream=0)
    expected = u < prob
    assert (subset == uids_of(table, expected)).all()
    has_match = np.array([bool(m) for m in matched])
    assert not (expected & ~has_match).any()  # unmatched pairs never kept
    if t >= counts.max():
        assert (expected == has_match).all()  # t >= every count: every matched pair kept
    # engine probabilities equal the brute force
    parts = engine.load_parts(work, "00000000")
    n0 = len(parts["hi"])
    p = rules.metaclip_keep_probability(parts["p0"], parts["e0"], counts, t)
    assert np.allclose(p, prob[:n0], rtol=0, atol=1e-12)


def test_metaclip_after_basic_counts_only_candidates(pool, tmp_path):
    folder, table, _ = pool
    (tmp_path / "entries.txt").write_text("\n".join(ENTRIES) + "\n")
    _, _, work = run(folder, f"basic then metaclip(entries={tmp_path}/entries.txt, t=5)", tmp_path)
    cand = np.concatenate([engine.load_parts(work, f"{i:08d}")["m0"] for i in range(4)])
    counts, _, _ = _metaclip_reference(table, ENTRIES, 5, cand)
    assert (np.load(work.local_path("_params/metaclip1.npy")) == counts).all()


# -- VAS ----------------------------------------------------------------------

def _normalized(x):
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _top_exactly(score, mask, n, table):
    """The authors' count (exactly n of the rows in `mask`), highest score first, NaN last, ties by smaller uid."""
    hi, lo = parse_uids(list(table.uid), "fixture")
    idx = np.nonzero(mask)[0]
    sc = np.where(np.isnan(score[idx]), -np.inf, score[idx])
    keep = np.zeros(len(mask), bool)
    keep[idx[np.lexsort((lo[idx], hi[idx], -sc))[:n]]] = True
    return keep


def test_vas_scores_are_f_S_f_and_selection_follows_fraction(pool, tmp_path):
    folder, table, emb = pool
    subset, stats, work = run(folder, "clip_score(l14, fraction=0.45) then vas(target=pool, fraction=0.3)", tmp_path)
    l14 = table.clip_l14_similarity_score.values
    # the CLIP step of a VAS pipeline keeps exactly n (the fixture's scores tie and are NaN)
    cand = _top_exactly(l14, np.ones(len(table), bool), int(len(table) * 0.45), table)
    f = _normalized(emb["l14_img"])
    s = f.T @ f / len(f)  # S from the rows entering the CLIP step: the whole pool
    assert np.allclose(np.load(work.local_path("_params/vas1.npy")), s, atol=1e-12)
    dense = np.array([fi @ s @ fi for fi in f])
    assert np.allclose(rules.vas_scores(emb["l14_img"], s), dense, atol=1e-12)
    n = int(len(table) * 0.3)
    expected = _top_exactly(rules.vas_scores(emb["l14_img"], np.load(work.local_path("_params/vas1.npy"))), cand, n,
                            table)
    assert (subset == uids_of(table, expected)).all()
    assert len(subset) == n


def test_vas_target_file(pool, tmp_path):
    folder, table, emb = pool
    rng = np.random.default_rng(0)
    target = rng.normal(size=(50, DIMS[1]))
    np.save(tmp_path / "target.npy", target)
    subset, _, _ = run(folder, f"vas(target={tmp_path}/target.npy, fraction=0.2)", tmp_path)
    ft = _normalized(target)
    s = ft.T @ ft / len(ft)
    f = _normalized(emb["l14_img"])
    dense = np.einsum("ij,jk,ik->i", f, s, f)
    expected = _top_exactly(dense, np.ones(len(table), bool), int(len(table) * 0.2), table)
    assert (subset == uids_of(table, expected)).all()


def test_vas_d_last_round_keeps_exactly_the_target(pool, tmp_path):
    folder, table, emb = pool
    rounds, fraction = 4, 0.3
    subset, stats, _ = run(folder,
                           f"clip_score(l14, fraction=0.45) then vas_d(fraction={fraction}, iterations={rounds})",
                           tmp_path)
    n_target = int(len(table) * fraction)
    assert len(subset) == n_target == stats["parameters"]["1"]["last_size"]
    # dense reference: the authors' schedule (a fixed chunk a round), S first from the whole pool
    l14 = table.clip_l14_similarity_score.values
    alive = _top_exactly(l14, np.ones(len(table), bool), int(len(table) * 0.45), table)
    f = _normalized(emb["l14_img"])
    n0 = alive.sum()
    chunk = -(-(n0 - n_target) // rounds)
    s = f.T @ f / len(f)
    for i in range(1, rounds + 1):
        keep = n_target if i == rounds else n0 - i * chunk
        alive = _top_exactly(np.einsum("ij,jk,ik->i", f, s, f), alive, keep, table)
        s = f[alive].T @ f[alive] / alive.sum()
    assert (subset == uids_of(table, alive)).all()


# -- bad input ----------------------------------------------------------------

def _one_line(exc):
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_missing_score_column_names_file_and_column(tmp_path):
    write_pool(str(tmp_path / "p"), 1, 20, dims=DIMS)
    df = pd.read_parquet(tmp_path / "p/00000000.parquet").drop(columns=["clip_l14_similarity_score"])
    df.to_parquet(tmp_path / "p/00000000.parquet")
    with pytest.raises(UserError) as exc:
        run(str(tmp_path / "p"), "clip_score(l14, fraction=0.3)", tmp_path)
    assert "00000000.parquet" in _one_line(exc) and "clip_l14_similarity_score" in str(exc.value)


def test_missing_npz_key_and_row_mismatch(tmp_path):
    write_pool(str(tmp_path / "p"), 1, 20, dims=DIMS)
    npz = tmp_path / "p/00000000.npz"
    z = dict(np.load(npz))
    np.savez(npz, b32_img=z["b32_img"])
    with pytest.raises(UserError) as exc:
        run(str(tmp_path / "p"), "vas(target=pool, fraction=0.3)", tmp_path / "a")
    assert "00000000.npz" in _one_line(exc) and "'l14_img'" in str(exc.value)
    np.savez(npz, l14_img=z["l14_img"][:-1])
    with pytest.raises(UserError) as exc:
        run(str(tmp_path / "p"), "vas(target=pool, fraction=0.3)", tmp_path / "b")
    assert "00000000.npz" in _one_line(exc) and "19" in str(exc.value) and "20 rows" in str(exc.value)


def test_malformed_uid(tmp_path):
    write_pool(str(tmp_path / "p"), 1, 20, dims=DIMS)
    df = pd.read_parquet(tmp_path / "p/00000000.parquet")
    df.loc[7, "uid"] = "xyz" + df.loc[7, "uid"][3:]
    df.to_parquet(tmp_path / "p/00000000.parquet")
    with pytest.raises(UserError) as exc:
        run(str(tmp_path / "p"), "no_filter", tmp_path)
    assert "00000000.parquet" in _one_line(exc) and "'uid'" in str(exc.value) and "row 7" in str(exc.value)


@pytest.mark.parametrize("bad", ["0a 1b" + "c" * 27, "é" + "a" * 31, "+" * 32, "a" * 31 + "\n"])
def test_parse_uids_fast_path_refuses_what_the_slow_path_refuses(bad):
    """The whole-column fast path (one unhexlify) must name the same malformed rows the
    per-row path does; upper and lower case hex parse to the same numbers."""
    good = [f"{i:032x}" for i in range(5)]
    hi, lo = parse_uids(good + [good[3].upper()], "fixture")
    assert list(lo) == [0, 1, 2, 3, 4, 3] and not hi.any()
    with pytest.raises(UserError, match="row 2: malformed uid"):
        parse_uids(good[:2] + [bad] + good[2:], "fixture")


@pytest.mark.parametrize("spec,message", [
    ("clip_scor(fraction=0.3)", "unknown filter 'clip_scor'"),
    ("clip_score(l14, fractio=0.3)", "unknown parameter 'fractio'"),
    ("clip_score(l14, fraction=0)", "fraction must be in (0, 1]"),
    ("vas(fraction=1.5)", "fraction must be in (0, 1]"),
    ("clip_score(l14)", "exactly one of threshold= or fraction="),
    ("basic &", "ends with"),
    ("text_based", "missing required parameter 'synsets'"),
])
def test_bad_spec_is_a_one_line_config_error(tmp_path, spec, message):
    from dcslurm.core.config import load_config
    from dcslurm.core.errors import ConfigError

    write_pool(str(tmp_path / "p"), 1, 5, dims=DIMS)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'[run]\nfolder = "run"\nstages = ["filter"]\n[pool]\nmetadata = "p"\n'
                   f'[stages.filter]\nspec = {json.dumps(spec)}\n')
    with pytest.raises(ConfigError) as exc:
        load_config(str(cfg))
    text = _one_line(exc)
    assert message in text and "[stages.filter]" in text and "run.toml" in text


# -- language ID choice ---------------------------------------------------------

def test_language_id_choice_fasttext_lite_vs_py3langid():
    """fastText lid.176.ftz (what the rule names, quantised) vs py3langid on captions.

    Both are offline; we use fastText because the baselines are defined by its
    labels. This records how often py3langid would disagree on caption-like text.
    """
    import py3langid

    captions = ([c for c in __import__("jobs.filter.synthetic", fromlist=["x"]).ENGLISH]
                + __import__("jobs.filter.synthetic", fromlist=["x"]).OTHER
                + ["sunset", "I love Paris", "BMW 320d M Sport", "Nike Air Max 90 white", "IMG_2043.JPG",
                   "Chanel No 5 eau de parfum 100ml", "Happy birthday!!!", "jardin de la maison"])
    fast = np.array([ft_english(c) for c in captions])
    py3 = np.array([py3langid.classify(c)[0] == "en" for c in captions])
    english_truth = np.array([True] * 14 + [False] * 6 + [True] * 7 + [False])
    assert (fast[:20] == english_truth[:20]).all()  # clean sentences: fastText is right on every one
    assert (fast == english_truth).mean() >= (py3 == english_truth).mean() - 0.15


def test_subset_written_in_many_uid_partitions_equals_one(tmp_path):
    """`write` sorts a bounded number of uids at a time; the file must not depend on that bound."""
    work = DataFolder(str(tmp_path))
    rng = np.random.default_rng(0)
    inputs = []
    for i in range(5):
        n = [0, 1000, 3, 1000, 500][i]
        uids = rules.uid_array(rng.integers(0, 2**64, n, dtype=np.uint64), rng.integers(0, 2**64, n, dtype=np.uint64))
        if n:
            uids[: n // 10] = uids[n // 10: 2 * (n // 10)]  # duplicates are allowed and kept
        engine._save_npy(work, f"_kept/{i:08d}.npy", rules.sort_uids(uids))
        inputs.append(engine.InputFile(f"{i:08d}", f"{i}.parquet"))
    total = engine.write_subset(inputs, work, work, "one.npy")
    assert engine.write_subset(inputs, work, work, "many.npy", partition_bytes=16 * 37) == total == 2503
    one, many = np.load(tmp_path / "one.npy"), np.load(tmp_path / "many.npy")
    assert (one == many).all() and (np.sort(one) == one).all()


def test_wordnet_lexnames_fallback_equals_debian_page():
    page = "/usr/share/man/man5/lexnames.5WN.gz"
    if not os.path.exists(page):
        pytest.skip("wordnet-base's manual page is not installed")
    lines = rules._lexnames_lines()
    assert [line.split("\t")[1] for line in lines] == rules._LEXNAMES and len(lines) == 45


def test_fasttext_batch_call_equals_one_call_per_caption():
    """rules.fasttext_english predicts a list in one call: the same labels as fastText's predict per caption."""
    from jobs.filter.synthetic import ENGLISH, OTHER, SHORT

    captions = [*ENGLISH, *OTHER, *SHORT, "\n", "a\nb c\n", "émoji 🐶 dog photo", "\t tabs\tand\rcr", "x" * 5000,
                "Chanel No 5 eau de parfum 100ml", "IMG_2043.JPG"]
    expected = np.array([ft_english(c) for c in captions])
    assert 0 < expected.sum() < len(captions)
    assert (rules.fasttext_english(captions) == expected).all()
    assert rules.fasttext_english([]).shape == (0,)


@pytest.mark.parametrize("upper_values", [4, 1 << 62])  # many equal upper halves; (almost surely) none
def test_sort_uids_is_np_sort(upper_values):
    rng = np.random.default_rng(upper_values % 97)
    uids = rules.uid_array(rng.integers(0, upper_values, 5000, dtype=np.uint64),
                           rng.integers(0, 1 << 63, 5000, dtype=np.uint64))
    assert (rules.sort_uids(uids) == np.sort(uids)).all()
    assert len(rules.sort_uids(uids[:1])) == 1 and len(rules.sort_uids(uids[:0])) == 0


def test_fasttext_token_counts_split_on_fasttext_whitespace_only():
    """Words between fastText's whitespace (not Python's: \\x1c and \\xa0 are inside words, \\0 splits),
    plus one '</s>' per newline."""
    captions = ["", " ", "\n", "a", "a b", "  a  b  ", "a\nb", "a\n\nb\n", "a\tb\vc\fd\re\0f", "a\x1cb", "a\xa0b",
                "a\u2003b", "x" * 3000, "dog, cat. Bird; fish"]
    expected = [len([w for w in re.split(r"[ \t\v\f\r\0\n]", x) if w]) + x.count("\n") for x in captions]
    assert rules.fasttext_token_counts(captions).tolist() == expected
    assert expected[:9] == [0, 0, 1, 1, 2, 2, 3, 5, 6] and expected[9:12] == [1, 1, 1]

