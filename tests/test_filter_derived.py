"""Pool-level derived columns (jobs/filter/derived.py): computed once, reused by every filter over
the pool, never stale, never used damaged, and subsets byte-identical to running without them."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from dcslurm.core.storage import DataFolder
from jobs.filter import derived, engine, rules
from jobs.filter.synthetic import write_pool

DIMS = (16, 24)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A pool of 3 files, image_based centroids and targets, an ImageNet-21k-style synset list."""
    root = tmp_path_factory.mktemp("derived")
    write_pool(str(root / "pool"), n_files=3, rows_per_file=200, seed=5, dims=DIMS)
    rng = np.random.default_rng(1)
    np.save(root / "centroids.npy", rng.normal(size=(12, DIMS[1])).astype(np.float32))
    np.save(root / "targets.npy", rng.normal(size=(4, DIMS[1])).astype(np.float32))
    # dog.n.01, cat.n.01, car.n.01, sunflower.n.01: words of the synthetic captions
    (root / "in21k.txt").write_text("n02084071\nn02121620\nn02958343\nn11978233\n")
    return root


def baselines(root) -> list[str]:
    """Every baseline that reads a derived column, and pipelines that read them on some rows only."""
    image = f"image_based(targets={root}/targets.npy, centroids={root}/centroids.npy)"
    return ["basic", "clip_score(l14, fraction=0.3) then basic", "laion2b", f"text_based(synsets={root}/in21k.txt)",
            image, f"{image} & clip_score(l14, fraction=0.3)", f"basic & {image}",
            f"image_based(targets={root}/targets.npy, k=6, iterations=3)"]


def run(pool: str, spec: str, tmp_path, cache: str) -> tuple[bytes, dict]:
    work = tmp_path / f"work-{len(os.listdir(tmp_path))}"
    out = str(work) + ".npy"
    stats = engine.run_local(spec, engine.list_inputs(pool), DataFolder(str(work)), out, derived_cache=cache)
    with open(out, "rb") as f:
        return f.read(), stats


def cache_files(cache) -> list[str]:
    return sorted(os.path.join(d, n) for d, _, names in os.walk(cache) for n in names if n.endswith(".npz"))


def test_every_baseline_selects_the_same_with_and_without_the_cache(assets, tmp_path):
    """Run alone without a cache, then all in a row over one cache (cold, then warm): byte-identical."""
    pool, cache = str(assets / "pool"), str(tmp_path / "cache")
    alone = {spec: run(pool, spec, tmp_path, "off") for spec in baselines(assets)}
    for spec, (_, stats) in alone.items():  # (reused without a cache: two terms of one spec on one file)
        assert stats["derived"]["computed"] > 0 and stats["derived"]["damaged"] == 0, spec
    for rnd in range(2):
        for spec in baselines(assets):
            subset, stats = run(pool, spec, tmp_path, cache)
            assert subset == alone[spec][0], (rnd, spec)
            assert stats["kept_rows"] == alone[spec][1]["kept_rows"]
            if rnd == 1:  # everything any filter needs was computed in the first round
                assert stats["derived"]["computed"] == 0 and stats["derived"]["reused"] > 0, spec


def test_a_second_filter_reads_language_id_from_the_cache(assets, tmp_path, monkeypatch):
    """basic computes fastText's language ID; text_based and image_based then read it: fastText
    (and WordNet, the caption lengths, the centroid matmul on a rerun) is not called again."""
    pool, cache = str(assets / "pool"), str(tmp_path / "cache")
    first, stats = run(pool, "basic", tmp_path, cache)
    assert stats["derived"] == {"reused": 0, "computed": stats["derived"]["computed"], "damaged": 0}
    # clip_score then basic looks at a subset of the rows basic alone looked at: pure column arithmetic
    monkeypatch.setattr(rules, "fasttext_english", _forbidden("fastText"))
    monkeypatch.setattr(rules, "char_counts", _forbidden("caption lengths"))
    monkeypatch.setattr(rules, "word_counts", _forbidden("caption lengths"))
    _, stats = run(pool, "clip_score(l14, fraction=0.3) then basic", tmp_path, cache)
    assert stats["derived"]["computed"] == 0 and stats["derived"]["reused"] > 0
    again, stats = run(pool, "basic", tmp_path, cache)
    assert again == first and stats["derived"]["computed"] == 0
    monkeypatch.undo()
    spec = baselines(assets)[4]  # image_based
    _, cold = run(pool, spec, tmp_path, cache)
    assert cold["derived"]["reused"] > 0  # the language ID and lengths basic left
    monkeypatch.setattr(rules, "fasttext_english", _forbidden("fastText"))
    monkeypatch.setattr(rules, "fasttext_token_counts", _forbidden("fastText tokens"))
    matmuls = []
    nearest = rules.nearest_centroid
    monkeypatch.setattr(rules, "nearest_centroid", lambda x, c: matmuls.append(len(x)) or nearest(x, c))
    _, warm = run(pool, spec, tmp_path, cache)
    assert warm["derived"]["computed"] == 0
    assert matmuls == [4]  # the targets' centroids (prepare); no pool row's


def _forbidden(what):
    def call(*a, **k):
        raise AssertionError(f"{what} computed again although the cache holds it")
    return call


def test_a_rewritten_pool_file_is_never_read_from_a_stale_column(assets, tmp_path):
    """The file id hashes the parquet's size, mtime and inode: a rewrite (even of the same row count)
    reads another cache path, and the subset is that of the new content."""
    pool = str(tmp_path / "pool")
    shutil.copytree(assets / "pool", pool)
    cache = str(tmp_path / "cache")
    run(pool, "basic", tmp_path, cache)
    # file 1 gets other captions, same rows and uids: a stale column would keep the old rows
    other = str(tmp_path / "other")
    write_pool(other, n_files=2, rows_per_file=200, seed=99, dims=DIMS)
    table = pq.read_table(os.path.join(pool, "00000001.parquet"))
    new_text = pq.read_table(os.path.join(other, "00000001.parquet")).column("text")
    table = table.set_column(table.column_names.index("text"), "text", new_text)
    pq.write_table(table, os.path.join(pool, "00000001.parquet"))
    subset, stats = run(pool, "basic", tmp_path, cache)
    assert subset == run(pool, "basic", tmp_path, "off")[0]
    assert stats["derived"]["computed"] > 0 and stats["derived"]["reused"] > 0  # files 0 and 2 reused


def test_another_model_or_list_or_centroid_set_is_another_column(assets, tmp_path):
    """The column id hashes what computed it: the fastText model's bytes, the synset list's, the
    centroids'. Another one computes anew; the same bytes at another path reuse."""
    pool, cache = str(assets / "pool"), str(tmp_path / "cache")
    run(pool, "basic", tmp_path, cache)
    model = str(tmp_path / "lid-copy.ftz")
    shutil.copy(rules.fasttext_model_path(""), model)
    _, stats = run(pool, f"basic(lid_model={model})", tmp_path, cache)
    assert stats["derived"]["computed"] == 0  # the same model: its bytes, not its path, name it
    with open(model, "ab") as f:
        f.write(b"\0")  # another file (fastText ignores the trailing byte)
    _, stats = run(pool, f"basic(lid_model={model})", tmp_path, cache)
    assert stats["derived"]["computed"] > 0
    lst = tmp_path / "in21k.txt"
    shutil.copy(assets / "in21k.txt", lst)
    subset, _ = run(pool, f"text_based(synsets={lst})", tmp_path, cache)
    lst.write_text("n02084071\n")  # dog only
    subset2, stats = run(pool, f"text_based(synsets={lst})", tmp_path, cache)
    assert subset2 == run(pool, f"text_based(synsets={lst})", tmp_path, "off")[0] != subset
    cent = tmp_path / "centroids.npy"
    np.save(cent, np.load(assets / "centroids.npy"))
    spec = f"image_based(targets={assets}/targets.npy, centroids={cent})"
    run(pool, spec, tmp_path, cache)
    np.save(cent, np.load(assets / "centroids.npy")[::-1].copy())  # the same set in another order: other ids
    subset, stats = run(pool, spec, tmp_path, cache)
    assert subset == run(pool, spec, tmp_path, "off")[0] and stats["derived"]["computed"] > 0


def test_damaged_cache_files_are_counted_and_recomputed(assets, tmp_path):
    """Truncated, a flipped byte (zip CRC), another file's column under this name: each is
    counted in `damaged`, recomputed and rewritten; the subset is unchanged."""
    pool, cache = str(assets / "pool"), str(tmp_path / "cache")
    subset, stats = run(pool, "basic", tmp_path, cache)
    files = cache_files(cache)
    assert len(files) == 9  # 3 files x (chars, words, fastText)
    with open(files[0], "r+b") as f:
        f.truncate(os.path.getsize(files[0]) // 2)
    with open(files[1], "r+b") as f:
        data = bytearray(f.read())
        at = data.index(b"\x93NUMPY")  # `values`, the first member: flip a byte of its data
        data[at + 10 + int.from_bytes(data[at + 8:at + 10], "little") + 3] ^= 0xFF
        f.seek(0)
        f.write(data)
    shutil.copy(files[3], files[2])  # right format, another file's or column's header
    again, stats = run(pool, "basic", tmp_path, cache)
    assert again == subset and stats["derived"]["damaged"] == 3 and stats["derived"]["computed"] > 0
    _, stats = run(pool, "basic", tmp_path, cache)
    assert stats["derived"] == {"reused": stats["derived"]["reused"], "computed": 0, "damaged": 0}


def test_two_writers_of_one_column_both_leave_correct_values(tmp_path):
    """Two filters fill the same column at once: the second write merges the first's rows."""
    store = derived.Store(str(tmp_path / "cache"))
    stats = {"reused": 0, "computed": 0, "damaged": 0}
    a = derived.Column(store, "f/c.npz", "c", "f", 10, np.int8, stats)
    b = derived.Column(store, "f/c.npz", "c", "f", 10, np.int8, stats)
    truth = np.arange(10) % 2
    a.get(np.arange(0, 6), lambda m: truth[m], stats)
    b.get(np.arange(4, 10), lambda m: truth[m], stats)
    a.flush()
    b.flush()
    values, damaged = store.read("f/c.npz", "c", "f", 10, np.int8)
    assert not damaged and (values == truth).all()


def test_the_stage_reads_its_cache_option_and_a_moved_cache_keeps_the_run(tmp_path):
    """[stages.filter] derived_cache is not in the run's fingerprint: where a cache lives decides no output."""
    from dcslurm.core.config import parse_config

    def config(cache):
        doc = {"run": {"folder": str(tmp_path / "run"), "scale": "tiny", "stages": ["filter"]},
               "pool": {"metadata": str(tmp_path)}, "stages": {"filter": {"spec": "basic", "derived_cache": cache}}}
        return parse_config(doc, str(tmp_path / "run.toml"))

    a, b = config(str(tmp_path / "c1")), config("off")
    assert a.stages["filter"].params.derived_cache == str(tmp_path / "c1")
    assert a.fingerprint_hash() == b.fingerprint_hash()


def test_runs_share_a_cache_through_the_option_and_the_cli(assets, tmp_path):
    """Two runs (the stage, then `dcslurm filter run`) over one `derived_cache`: the second
    computes nothing; its markers and stats.json say so; the default is RUN/filter/_derived."""
    import json
    import subprocess
    import sys

    from dcslurm.core.config import load_config
    from dcslurm.core.runs import submit_run
    from dcslurm.core.tomlfile import write_toml

    cache = tmp_path / "cache"

    def stage_run(name: str, cache_url: str | None) -> dict:
        doc = {"run": {"folder": str(tmp_path / name), "stages": ["filter"]},
               "pool": {"metadata": str(assets / "pool")}, "executor": {"kind": "local"},
               "stages": {"filter": {"spec": "basic", **({"derived_cache": cache_url} if cache_url else {})}}}
        assert not submit_run(load_config(write_toml(tmp_path / f"{name}.toml", doc))).failed
        return json.loads((tmp_path / name / "filter" / "stats.json").read_text())

    first = stage_run("a", str(cache))
    assert first["derived"]["computed"] > 0 and first["derived"]["reused"] == 0
    assert stage_run("b", str(cache))["derived"]["computed"] == 0
    default = stage_run("c", None)
    assert default["derived"]["computed"] > 0 and cache_files(tmp_path / "c" / "filter" / "_derived")
    out = tmp_path / "cli.npy"
    proc = subprocess.run([sys.executable, "-m", "dcslurm", "filter", "run", "--pool", str(assets / "pool"),
                           "--filter", "basic", "--derived-cache", str(cache), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "cli_stats.json").read_text())["derived"]["computed"] == 0
    assert out.read_bytes() == (tmp_path / "a" / "filter" / "subset.npy").read_bytes()


@pytest.mark.s3
def test_pool_and_cache_on_s3(s3_server, s3_bucket, assets, tmp_path):
    """The pool's objects are named by URL, size, ETag and last-modified: a second filter reads the
    cache (also on S3); an object rewritten with other rows is computed anew."""
    from dcslurm.core.storage import s3fs_options

    fs = s3_server.fs()
    bucket = s3_bucket.removeprefix("s3://")
    for p in sorted((assets / "pool").iterdir()):
        fs.put_file(str(p), f"{bucket}/pool/{p.name}")
    options = s3fs_options(endpoint_url=s3_server.endpoint_url)

    def go(i: int, cache: str = f"{s3_bucket}/derived") -> tuple[bytes, dict]:
        out = tmp_path / f"s{i}.npy"
        stats = engine.run_local("basic", engine.list_inputs(f"{s3_bucket}/pool", options),
                                 DataFolder(str(tmp_path / f"w{i}")), str(out), storage_options=options,
                                 derived_cache=cache)
        return out.read_bytes(), stats

    first, s1 = go(0)
    second, s2 = go(1)
    assert s1["derived"]["computed"] > 0 and s2["derived"]["computed"] == 0 and first == second
    assert fs.find(f"{bucket}/derived") and not [p for p in fs.find(bucket) if "/.tmp-" in p]
    # file 0 with file 1's captions: same rows and uids, other text
    table = pq.read_table(assets / "pool" / "00000000.parquet")
    text = pq.read_table(assets / "pool" / "00000001.parquet").column("text")
    pq.write_table(table.set_column(table.column_names.index("text"), "text", text), tmp_path / "rewritten.parquet")
    fs.put_file(str(tmp_path / "rewritten.parquet"), f"{bucket}/pool/00000000.parquet")
    third, s3 = go(2)
    assert s3["derived"]["computed"] > 0 and third == go(3, "off")[0] != first
