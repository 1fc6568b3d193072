"""Bias probe: two samples of one pool are indistinguishable, a planted colour shift is found (and mean
colour alone recovers it); the stage on the local executor, on SLURM arrays and the CLI agree."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dcslurm.core.config import load_config
from dcslurm.core.runs import submit_run
from dcslurm.core.storage import DataFolder
from dcslurm.core.tomlfile import write_toml
from jobs.audit import bias, synthetic

SAMPLES = 150
FEATURES = ["img", "txt", "mean_colour", "grayscale"]


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("bias")
    synthetic.write_image_pool(str(root / "a"), n_files=3, rows_per_file=100, seed=1)
    synthetic.write_image_pool(str(root / "b"), n_files=3, rows_per_file=100, seed=2, shift=(30, 0, -30))
    return root


def _source(root, name, pool):
    return bias.Source(name, str(root / pool / "metadata"), "", str(root / pool / "shards"))


@pytest.fixture(scope="module")
def planted_report(pools, tmp_path_factory):
    out = tmp_path_factory.mktemp("planted")
    rep = bias.run_local([_source(pools, "a", "a"), _source(pools, "b", "b")], SAMPLES, FEATURES,
                         DataFolder(str(out / "work")), DataFolder(str(out / "report")), seed=0)
    return out / "report", rep


def test_two_samples_of_one_pool_are_at_chance(pools, tmp_path):
    a1, a2 = _source(pools, "a1", "a"), _source(pools, "a2", "a")
    rep = bias.run_local([a1, a2], SAMPLES, ["img", "txt", "mean_colour"], DataFolder(str(tmp_path / "w")),
                         DataFolder(str(tmp_path / "r")), seed=0)
    assert rep["samples_per_source"] == SAMPLES
    for feat, r in rep["features"].items():
        assert r["chance"] == 0.5 and r["test"] == 90 and r["missing"] == 0
        assert r["ci95"][0] <= 0.5 <= r["ci95"][1], (feat, r)
        assert r["chance_in_ci"]


def test_planted_colour_shift_is_found_and_mean_colour_alone_recovers_it(planted_report):
    _, rep = planted_report
    f = rep["features"]
    for feat in ("img", "mean_colour"):
        assert f[feat]["ci95"][0] > 0.75 and f[feat]["p_value"] < 1e-6, (feat, f[feat])
    assert f["mean_colour"]["test"] == 90 and f["mean_colour"]["missing"] == 0
    assert f["txt"]["chance_in_ci"]  # the captions carry no difference
    conf = np.array(f["mean_colour"]["confusion"])
    assert conf.sum() == 90 and conf.trace() == round(f["mean_colour"]["accuracy"] * 90)


def test_sampling_is_seeded_balanced_and_respects_subsets(pools, tmp_path):
    import pyarrow.parquet as pq

    from jobs.reshard.subset import uids_to_array

    uids = sorted(u for p in sorted((pools / "a/metadata").glob("*.parquet"))
                  for u in pq.read_table(p)["uid"].to_pylist())
    np.save(tmp_path / "s.npy", uids_to_array(uids[:40]))
    src = [bias.Source("a", str(pools / "a/metadata"), str(tmp_path / "s.npy")), _source(pools, "b", "b")]
    files = bias.metadata_files(src, None)
    for run in ("w1", "w2"):
        bias.sample_task(src, files, 100, 7, "l14", ["img"], DataFolder(str(tmp_path / run)), str(tmp_path), None)
    s1 = bias.select(src, files, 100, DataFolder(str(tmp_path / "w1")))
    s2 = bias.select(src, files, 100, DataFolder(str(tmp_path / "w2")))
    assert s1["available"] == [40, 300] and s1["n"] == 40  # balanced: the smaller source decides
    from jobs.reshard.subset import pair_to_uid

    assert {pair_to_uid(hi, lo) for hi, lo in zip(s1["rows"][0]["hi"], s1["rows"][0]["lo"])} == set(uids[:40])
    assert all((x["hi"] == y["hi"]).all() for x, y in zip(s1["rows"], s2["rows"]))


def test_report_renders(planted_report):
    out, rep = planted_report
    with Image.open(out / "bias_accuracy.png") as im:
        im.verify()
    with Image.open(out / "bias_accuracy.png") as im:
        assert im.size[0] > 100 and np.asarray(im.convert("L")).std() > 5
    md = (out / "bias.md").read_text()
    for feat in FEATURES:
        assert md.count(f"| {feat} |") == 1
    assert "no pretrained model offline" in md
    features = json.loads((out / "bias.json").read_text())["features"]
    assert features["img"]["accuracy"] == rep["features"]["img"]["accuracy"]


def _toml(path, run, pools, executor="local", tasks=2):
    sources = [{"name": n, "metadata": str(pools / n / "metadata"), "shards": str(pools / n / "shards")}
               for n in ("a", "b")]
    return write_toml(path, {
        "run": {"folder": str(run), "stages": ["audit_bias"], "seed": 0},
        "executor": {"kind": executor},
        "stages": {"audit_bias": {"sources": sources, "samples": SAMPLES, "features": FEATURES, "tasks": tasks}},
        **({"slurm": {"time": "00:10:00"}} if executor == "slurm" else {}),
    })


REPORTS = ("bias.json", "bias.md", "bias.csv")


@pytest.fixture(scope="module")
def local_stage_run(pools, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bias_stage")
    cfg = load_config(_toml(tmp / "run.toml", tmp / "run", pools))
    assert not submit_run(cfg).failed
    return tmp / "run"


def test_stage_and_cli_give_the_same_report(pools, planted_report, local_stage_run, tmp_path):
    from dcslurm.cli.audit import app

    args = ["bias", "--a", str(pools / "a/metadata"), "--b", str(pools / "b/metadata"),
            "--a-shards", str(pools / "a/shards"), "--b-shards", str(pools / "b/shards"),
            "--samples", str(SAMPLES), "--out", str(tmp_path / "cli")]
    for f in FEATURES:
        args += ["--feature", f]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "mean_colour: accuracy" in res.output
    for name in REPORTS:
        assert (tmp_path / "cli" / name).read_text() == (local_stage_run / "audit_bias" / name).read_text()
    assert json.loads((local_stage_run / "audit_bias/bias.json").read_text())["features"] == \
        json.loads(json.dumps(planted_report[1]["features"]))


def test_bad_sources_are_one_line_config_errors(tmp_path):
    from dcslurm.cli.audit import app

    res = CliRunner().invoke(app, ["bias", "--a", "x.npy", "--b", "y/", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "needs --pool" in str(res.exception or res.output)
    res = CliRunner().invoke(app, ["bias", "--a", "x/", "--b", "y/", "--feature", "edges", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "shards" in str(res.exception or res.output)


@pytest.mark.slurm
def test_slurm_arrays_give_the_local_report(slurm_cluster, pools, local_stage_run, tmp_path):
    from tests.core_helpers import wait_run_done

    cfg_path = _toml(tmp_path / "run.toml", tmp_path / "run", pools, executor="slurm", tasks=3)
    submit_run(load_config(cfg_path))
    wait_run_done(cfg_path, timeout=400)
    slurm_cluster.wait_jobs_done(60)
    for name in REPORTS:
        assert (tmp_path / "run/audit_bias" / name).read_text() == (local_stage_run / "audit_bias" / name).read_text()


def test_damaged_images_are_counted_not_fatal(tmp_path):
    import io
    import tarfile

    from jobs.reshard.subset import uid_to_pair

    good = synthetic.render(np.random.default_rng(0), 32, (0, 0, 0))
    uids = [f"{i:032x}" for i in range(1, 5)]
    members = [(uids[0], "jpg", good), (uids[1], "jpg", b"not a jpeg"), (uids[2], "txt", b"no image"),
               (None, "jpg", good), (uids[3], "jpg", good)]
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for i, (uid, ext, data) in enumerate(members):
            meta = json.dumps({"uid": uid} if uid else {}).encode()
            for e, d in ((ext, data), ("json", meta)):
                info = tarfile.TarInfo(f"{i:04d}.{e}")
                info.size = len(d)
                tar.addfile(info, io.BytesIO(d))
    chosen = {uid_to_pair(u) for u in uids[:3]}  # uids[3] exists but is not chosen
    counts = bias.images_file(0, "x", str(tmp_path / "s.tar"), chosen, ["mean_colour", "edges"],
                              DataFolder(str(tmp_path / "w")), str(tmp_path), None)
    assert counts == {"scanned": 5, "found": 1, "bad_image": 2, "bad_json": 1}
    with np.load(tmp_path / "w/_bias/images/000-x.npz") as z:
        assert z["mean_colour"].shape == (1, 3) and z["edges"].shape == (1, 256)
        assert (int(z["hi"][0]), int(z["lo"][0])) == uid_to_pair(uids[0])
