"""Pools: `pool inspect` and `submit` reject bad pools with one line naming the file;
the demo pool is deterministic, DataComp-format, and its captions and held-out
labels describe the images."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from dcslurm.cli.pool import app as pool_app
from dcslurm.core.config import load_config
from dcslurm.core.errors import UserError
from dcslurm.core.runs import submit_run
from dcslurm.core.tomlfile import write_toml
from dcslurm.datacomp.pool import inspect_pool
from dcslurm.demo.pool import COLOURS, NOISE, SHAPES, generate_demo_pool


def _uid(i: int) -> str:
    return hashlib.md5(str(i).encode()).hexdigest()


def _write(path, uids, with_url: bool = True) -> None:
    cols = {"uid": uids, "text": [f"caption {i}" for i in range(len(uids))]}
    if with_url:
        cols["url"] = [f"http://127.0.0.1:9/{i}.jpg" for i in range(len(uids))]
    pq.write_table(pa.table(cols), str(path))


def _good_pool(folder) -> None:
    os.makedirs(folder, exist_ok=True)
    _write(folder / "a.parquet", [_uid(i) for i in range(10)])
    _write(folder / "b.parquet", [_uid(i) for i in range(10, 20)])


def _break(folder, how: str) -> str:
    """Break file b.parquet of a good pool; return what the error must mention."""
    b = folder / "b.parquet"
    if how == "missing_url":
        _write(b, [_uid(i) for i in range(10, 20)], with_url=False)
        return "missing required column 'url'"
    if how == "corrupt":
        b.write_bytes(b"PAR1 this is not a parquet file at all" * 10)
        return "not a readable parquet file"
    if how == "duplicate":
        _write(b, [_uid(i) for i in range(10, 19)] + [_uid(3)])  # uid 3 is in a.parquet too
        return f"duplicate uid {_uid(3)}"
    if how == "malformed":
        _write(b, [_uid(i) for i in range(10, 15)] + ["not-a-uid"] + [_uid(i) for i in range(16, 20)])
        return "row 5: malformed uid 'not-a-uid'"
    raise ValueError(how)


BAD = ("missing_url", "corrupt", "duplicate", "malformed")


def test_good_pool_inspects_clean(tmp_path):
    _good_pool(tmp_path / "pool")
    report = inspect_pool(str(tmp_path / "pool"))
    assert report.ok and report.rows == 20 and len(report.files) == 2 and report.uids_checked
    assert report.columns == ("uid", "text", "url")
    assert report.estimated_shard_bytes == 20 * 35_000
    res = CliRunner().invoke(pool_app, ["inspect", str(tmp_path / "pool")])
    assert res.exit_code == 0 and "20 rows" in res.output


@pytest.mark.parametrize("how", BAD)
def test_pool_inspect_rejects_bad_pool_naming_the_file(tmp_path, how):
    _good_pool(tmp_path / "pool")
    expect = _break(tmp_path / "pool", how)
    res = CliRunner().invoke(pool_app, ["inspect", str(tmp_path / "pool")])
    assert res.exit_code != 0
    assert isinstance(res.exception, UserError)
    message = str(res.exception)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "pool" / "b.parquet") + ": ") and expect in message


def _config(tmp_path) -> str:
    return write_toml(tmp_path / "run.toml", {"run": {"folder": str(tmp_path / "run"), "stages": ["download"]},
                                              "pool": {"metadata": str(tmp_path / "pool")}})


@pytest.mark.parametrize("how", BAD)
def test_submit_rejects_bad_pool_before_queueing(tmp_path, how):
    _good_pool(tmp_path / "pool")
    expect = _break(tmp_path / "pool", how)
    with pytest.raises(UserError) as err:
        submit_run(load_config(_config(tmp_path)))
    assert str(err.value).startswith(str(tmp_path / "pool" / "b.parquet") + ": ") and expect in str(err.value)
    assert not (tmp_path / "run" / "plan.json").exists()  # nothing planned into the run folder, nothing queued


def test_submit_cli_prints_one_line_and_exits_2(tmp_path):
    _good_pool(tmp_path / "pool")
    _break(tmp_path / "pool", "duplicate")
    proc = subprocess.run([sys.executable, "-m", "dcslurm.cli", "submit", "-c", _config(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "b.parquet: duplicate uid" in lines[0], proc.stderr


def test_big_pools_get_footers_checked_at_submit_and_uids_in_the_task(tmp_path):
    from jobs.download.spec import preflight

    _good_pool(tmp_path / "pool")
    _break(tmp_path / "pool", "duplicate")
    cfg = load_config(_config(tmp_path))
    cfg.stages["download"].params.preflight_uid_rows = 5  # the pool is "too big" to read its uids
    preflight(cfg)  # footers are fine
    _break(tmp_path / "pool", "missing_url")
    with pytest.raises(UserError, match="b.parquet: missing required column 'url'"):
        preflight(cfg)


# -- the demo pool --------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    generate_demo_pool(str(root / "a"), samples=300, seed=7, files=3, heldout=40)
    generate_demo_pool(str(root / "b"), samples=300, seed=7, files=3, heldout=40)
    generate_demo_pool(str(root / "c"), samples=300, seed=8, files=3, heldout=40)
    return root


def _tree(folder) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(folder):
        for n in files:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_demo_pool_is_deterministic_in_its_seed(demo):
    a, b, c = _tree(demo / "a"), _tree(demo / "b"), _tree(demo / "c")
    assert a == b
    assert a["00000000.parquet"] != c["00000000.parquet"]


def test_demo_pool_is_a_valid_datacomp_pool(demo):
    report = inspect_pool(str(demo / "a"))
    assert report.ok and report.rows == 300 and len(report.files) == 3
    for col in ("uid", "url", "text", "original_width", "original_height", "sha256", "face_bboxes"):
        assert col in report.columns
    res = CliRunner().invoke(pool_app, ["demo", "--out", str(demo / "cli"), "--samples", "20", "--heldout", "0"])
    assert res.exit_code == 0 and inspect_pool(str(demo / "cli")).rows == 20


def test_pool_serve_answers_for_the_demo_host_until_stopped(demo):
    """`dcslurm pool serve`: the proxy a run's http_proxy names when the pool is served by hand
    (`dcslurm demo --config-only`): the pool's URLs answered from its folder, others refused."""
    import urllib.error
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "dcslurm", "pool", "serve", str(demo / "a"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        proxy = line.split('http_proxy = "', 1)[1].split('"', 1)[0]
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
        row = next(r for r in pq.read_table(str(demo / "a" / "00000000.parquet")).to_pylist()
                   if r["demo_kind"] == "clean")
        assert opener.open(row["url"], timeout=10).read() == (demo / "a" / row["url"].split("/", 3)[3]).read_bytes()
        with pytest.raises(urllib.error.HTTPError, match="502"):
            opener.open("http://example.com/images/000000.jpg", timeout=10)
    finally:
        proc.terminate()  # the one process this test started, by its handle
        proc.wait(timeout=10)
    # Not a demo pool: one line, exit 2.
    res = subprocess.run([sys.executable, "-m", "dcslurm", "pool", "serve", str(demo)], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip() == (
        f"dcslurm: error: {demo}: not a complete demo pool (no serve.json; `dcslurm pool demo` writes one)")


def test_demo_pool_files_match_their_metadata_and_noise(demo):
    rows = pa.concat_tables([pq.read_table(str(demo / "a" / f"{i:08d}.parquet")) for i in range(3)]).to_pylist()
    kinds = {}
    for r in rows:
        kinds[r["demo_kind"]] = kinds.get(r["demo_kind"], 0) + 1
        rel = r["url"].split("/", 3)[3]
        path = demo / "a" / rel
        if r["demo_kind"] == "broken_url":
            assert not path.exists()
            continue
        data = path.read_bytes()
        if r["demo_kind"] == "non_image":
            assert data.startswith(b"<!DOCTYPE html>")
            continue
        assert hashlib.sha256(data).hexdigest() == r["sha256"]
        assert Image.open(io.BytesIO(data)).size == (r["original_width"], r["original_height"])
        if r["demo_kind"] == "tiny_image":
            assert max(r["original_width"], r["original_height"]) <= 40
        if r["demo_kind"] == "extreme_aspect":
            w, h = r["original_width"], r["original_height"]
            assert max(w, h) / min(w, h) >= 4
    assert set(kinds) == {*NOISE, "clean"}
    assert kinds["clean"] > 300 * 0.5
    manifest = json.loads((demo / "a" / "manifest.json").read_text())
    assert manifest["noise"] == {k: kinds.get(k, 0) for k in manifest["noise"]}


def test_clean_captions_name_the_colour_and_shape_drawn(demo):
    """The caption is true: the named colour is the most common non-background colour."""
    rows = pq.read_table(str(demo / "a" / "00000000.parquet")).to_pylist()
    checked = 0
    for r in rows:
        if r["demo_kind"] != "clean":
            continue
        colour = next(c for c in COLOURS if f" {c} " in f" {r['text']} ")
        assert any(s in r["text"] for s in SHAPES)
        img = Image.open(demo / "a" / r["url"].split("/", 3)[3]).convert("RGB")
        assert _dominant_shape_colour(img) == colour, r
        checked += 1
    assert checked > 20


def _dominant_shape_colour(img) -> str:
    import numpy as np

    arr = np.asarray(img, dtype=np.int32)
    counts = {name: int((np.abs(arr - np.array(rgb)).sum(axis=-1) < 40).sum()) for name, rgb in COLOURS.items()}
    return max(counts, key=counts.get)


def test_heldout_is_a_clip_benchmark_webdataset(demo):
    held = demo / "a" / "heldout"
    for task, classes in (("shapes", SHAPES), ("colours", tuple(COLOURS))):
        assert (held / task / "classnames.txt").read_text().split("\n")[: len(classes)] == list(classes)
        assert "{c}" in (held / task / "zeroshot_classification_templates.txt").read_text()
        assert (held / task / "test" / "nshards.txt").read_text().strip() == "1"
        with tarfile.open(held / task / "test" / "0.tar") as tar:
            names = tar.getnames()
            assert len([n for n in names if n.endswith(".png")]) == 40
            assert len([n for n in names if n.endswith(".cls")]) == 40
            if task == "colours":  # labels are true
                for key in ("000000", "000001", "000002"):
                    label = int(tar.extractfile(f"{key}.cls").read())
                    img = Image.open(io.BytesIO(tar.extractfile(f"{key}.png").read())).convert("RGB")
                    assert _dominant_shape_colour(img) == classes[label]
    assert (held / "retrieval" / "dataset_type.txt").read_text().strip() == "retrieval"
    labels = [json.loads(line) for line in (held / "labels.jsonl").read_text().splitlines()]
    pool_uids = {r["uid"] for i in range(3) for r in pq.read_table(str(demo / "a" / f"{i:08d}.parquet")).to_pylist()}
    assert len(labels) == 40 and not pool_uids & {label["uid"] for label in labels}
