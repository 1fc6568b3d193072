"""The filter's reads and work stay proportional to what a term needs.

- An npz holds four embedding arrays; a term reads one key (and of it, often a
  few rows): the bytes read from the file are counted by the kernel
  (/proc/self/io rchar), whatever library does the reading.
- `image_based & clip_score(fraction=)` (DataComp-1B's rule) computes cluster
  ids only of the rows over the CLIP threshold, and the subset stays the
  rule's subset.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcslurm.core.errors import UserError
from dcslurm.core.storage import DataFolder
from jobs.filter import engine, rules
from jobs.filter.synthetic import write_pool


def _rchar() -> int:
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


def _file(folder, rows, arrays, compressed=False):
    pq.write_table(pa.table({"uid": [f"{i:032x}" for i in range(rows)]}), os.path.join(folder, "a.parquet"))
    (np.savez_compressed if compressed else np.savez)(os.path.join(folder, "a.npz"), **arrays)
    return engine.InputFile("0", os.path.join(folder, "a.parquet"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_npz_read_reads_only_the_key_asked_for(tmp_path):
    rows = 2000
    rng = np.random.default_rng(0)
    small = rng.normal(size=(rows, 8)).astype(np.float16)
    f = _file(str(tmp_path), rows, {"b32_img": small, "l14_txt": np.zeros((rows, 12_000), np.float16)})  # 48 MB
    reader = engine.Reader()
    before = _rchar()
    got = reader.embeddings(f, "b32_img", rows)
    read = _rchar() - before
    assert (got == small).all()
    assert read < 4 << 20, f"{read} bytes read for a 32 kB key"


def test_npz_rows_selected_while_streaming(tmp_path, monkeypatch):
    rows = 1000
    x = np.random.default_rng(1).normal(size=(rows, 5)).astype(np.float16)
    monkeypatch.setattr(engine, "NPY_BLOCK_BYTES", 7 * 10)  # 7 rows a block: selections cross blocks
    reader = engine.Reader()
    for compressed in (False, True):
        folder = tmp_path / str(compressed)
        folder.mkdir()
        f = _file(str(folder), rows, {"l14_img": x, "b32_img": x[:, :2], "l14_txt": np.asfortranarray(x)}, compressed)
        mask = np.random.default_rng(2).random(rows) < 0.1
        mask[[0, 6, 7, rows - 1]] = True
        assert (reader.embeddings(f, "l14_img", rows, mask) == x[mask]).all()
        assert (reader.embeddings(f, "l14_img", rows, np.nonzero(mask)[0]) == x[mask]).all()
        assert reader.embeddings(f, "l14_img", rows, np.zeros(0, np.int64)).shape == (0, 5)
        assert (reader.embeddings(f, "b32_img", rows) == x[:, :2]).all()
        assert (reader.embeddings(f, "l14_txt", rows, mask) == x[mask]).all()  # a Fortran-ordered array
        with pytest.raises(UserError, match=r"a.npz: key 'l14_img' has shape \(1000, 5\), but its parquet has 999"):
            reader.embeddings(f, "l14_img", rows - 1)
        with pytest.raises(UserError, match=r"a.npz: missing key 'b32_txt' \(has l14_img, b32_img, l14_txt\)"):
            reader.embeddings(f, "b32_txt", rows)


def test_truncated_npz_key_is_one_line_error(tmp_path):
    rows = 400
    f = _file(str(tmp_path), rows, {"l14_img": np.ones((rows, 64), np.float32)})
    data = open(tmp_path / "a.npz", "rb").read()
    open(tmp_path / "a.npz", "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"a.npz: cannot read npz"):
        engine.Reader().embeddings(f, "l14_img", rows, np.arange(3))


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    write_pool(str(folder), n_files=3, rows_per_file=300, seed=5, dims=(16, 24))
    return str(folder)


def _targets(tmp_path, pool):
    emb = np.concatenate([np.load(os.path.join(pool, n))["l14_img"] for n in sorted(os.listdir(pool))
                          if n.endswith(".npz")]).astype(np.float32)
    rng = np.random.default_rng(1)
    np.save(tmp_path / "centroids.npy", rng.normal(size=(6, 24)).astype(np.float32))
    np.save(tmp_path / "targets.npy", emb[rng.choice(len(emb), 40)] + 0.01)
    return f"image_based(targets={tmp_path}/targets.npy, centroids={tmp_path}/centroids.npy)"


def _run(pool, spec, tmp_path):
    work = DataFolder(str(tmp_path / "work"))
    stats = engine.run_local(spec, engine.list_inputs(pool), work, str(tmp_path / "subset.npy"))
    return np.load(tmp_path / "subset.npy"), stats


@pytest.mark.parametrize("form", ["&", "then"])
def test_image_based_with_clip_score_clusters_only_rows_over_the_threshold(pool, tmp_path, monkeypatch, form):
    image = _targets(tmp_path, pool)
    clip = "clip_score(l14, fraction=0.3)"
    alone, _ = _run(pool, image, tmp_path / "alone")
    over, _ = _run(pool, clip, tmp_path / "clip")
    clustered = []
    real = rules.nearest_centroid
    monkeypatch.setattr(rules, "nearest_centroid", lambda x, c, **kw: (clustered.append(len(x)), real(x, c, **kw))[1])
    spec = f"{image} & {clip}" if form == "&" else f"{clip} then {image}"
    subset, stats = _run(pool, spec, tmp_path / "both")
    # image_based's targets are clustered once, in prepare; the rows in the map/apply calls
    assert sum(clustered[1:]) <= len(over), (clustered, len(over))
    assert (subset == np.intersect1d(alone, over)).all() and len(subset) > 0
    image_key = next(k for k in stats["per_filter_kept"] if "image_based" in k)
    assert stats["per_filter_kept"][image_key] == len(subset)  # judged on the rows over the threshold
