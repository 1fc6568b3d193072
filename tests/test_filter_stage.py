"""The filter stage as a run: same subset from 1 task and 16 tasks, local and SLURM; CLIs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dcslurm.core.config import load_config
from dcslurm.core.errors import UserError
from dcslurm.core.runs import submit_run
from dcslurm.core.tomlfile import write_toml
from jobs.filter.synthetic import write_pool
from tests.core_helpers import merge_tables

DIMS = (8, 12)
SPEC = "clip_score(l14, fraction=0.45) then basic then metaclip(entries={entries}, t=4)"


@pytest.fixture(scope="module")
def pool16(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool16")
    write_pool(str(root / "pool"), n_files=16, rows_per_file=60, seed=11, dims=DIMS)
    (root / "entries.txt").write_text("dog\ncat\nbeach\na\nthe\nsofa\ncar\n")
    return root


def filter_toml(path, run_folder, pool_root, per_task: int, executor: str = "local", extra: dict | None = None) -> str:
    """A filter-only run.toml over the pool under `pool_root` (the one TOML writer); `extra`: more
    tables, merged in (a pool elsewhere, [storage], ...)."""
    doc = {
        "run": {"folder": str(run_folder), "stages": ["filter"], "seed": 3},
        "pool": {"metadata": str(pool_root / "pool")},
        "executor": {"kind": executor},
        "stages": {"filter": {"spec": SPEC.format(entries=pool_root / "entries.txt"), "units_per_task": per_task}},
        **({"slurm": {"time": "00:10:00"}} if executor == "slurm" else {}),
    }
    return write_toml(path, merge_tables(doc, extra or {}))


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def one_task_run(pool16, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    cfg = load_config(filter_toml(tmp / "run.toml", tmp / "run", pool16, per_task=16))
    assert not submit_run(cfg).failed
    return tmp / "run"


def test_sixteen_tasks_give_the_same_subset_as_one(pool16, one_task_run, tmp_path):
    cfg = load_config(filter_toml(tmp_path / "run.toml", tmp_path / "run", pool16, per_task=1))
    plan_tasks = {s: n for s, n in [("filter.map", 16), ("filter.apply", 16)]}
    assert not submit_run(cfg).failed
    from dcslurm.core.plan import read_plan
    from dcslurm.core.storage import DataFolder

    plan = read_plan(DataFolder(str(tmp_path / "run")))
    assert {s.name: s.n_tasks for s in plan.steps if s.name in plan_tasks} == plan_tasks
    one = one_task_run / "filter"
    assert digest(tmp_path / "run/filter/subset.npy") == digest(one / "subset.npy")
    stats = json.load(open(tmp_path / "run/filter/stats.json"))
    assert stats == json.load(open(one / "stats.json"))
    assert stats["input_rows"] == 16 * 60 and 0 < stats["kept_rows"] < 16 * 60 and stats["seed"] == 3
    import pandas as pd

    texts = pd.concat([pd.read_parquet(p) for p in sorted((pool16 / "pool").glob("*.parquet"))]).text
    assert stats["null_text_rows"] == texts.isna().sum() > 0
    assert set(stats["per_filter_kept"]) == {"0:clip_score(fraction=0.45)", "1:basic", "2:metaclip(entries="
                                             + str(pool16 / "entries.txt") + ", t=4)"}
    subset = np.load(tmp_path / "run/filter/subset.npy")
    assert subset.dtype == np.dtype("u8,u8") and len(subset) == stats["kept_rows"]
    assert (np.sort(subset) == subset).all()


def test_the_cli_gives_the_same_subset_as_the_stage(pool16, one_task_run, tmp_path):
    spec = SPEC.format(entries=pool16 / "entries.txt")
    out = tmp_path / "subset.npy"
    proc = subprocess.run([sys.executable, "-m", "dcslurm", "filter", "run", "--pool", str(pool16 / "pool"),
                           "--spec", spec, "--seed", "3", "--workers", "2", "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert digest(out) == digest(one_task_run / "filter/subset.npy")
    assert json.load(open(tmp_path / "subset_stats.json"))["kept_rows"] == len(np.load(out))


def test_cli_filter_options_and_one_line_errors(pool16, tmp_path):
    out = tmp_path / "s.npy"
    ok = subprocess.run([sys.executable, "-m", "dcslurm", "filter", "run", "--pool", str(pool16 / "pool"),
                         "--filter", "clip_score", "--arch", "b32", "--fraction", "0.3", "--out", str(out)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "dcslurm", "filter", "run", "--pool", str(pool16 / "pool"),
                          "--filter", "clip_score", "--fraction", "1.5", "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "(0, 1]" in bad.stderr
    listing = subprocess.run([sys.executable, "-m", "dcslurm", "filter", "list", "--json"],
                             capture_output=True, text=True)
    assert set(json.loads(listing.stdout)) >= {"no_filter", "basic", "clip_score", "laion2b", "text_based",
                                              "image_based", "metaclip", "vas", "vas_d"}


@pytest.mark.slurm
def test_slurm_sixteen_tasks_equal_local(slurm_cluster, pool16, one_task_run, tmp_path):
    from tests.core_helpers import wait_run_done

    cfg_path = filter_toml(tmp_path / "run.toml", tmp_path / "run", pool16, per_task=1, executor="slurm")
    submit_run(load_config(cfg_path))
    wait_run_done(cfg_path, timeout=500)
    slurm_cluster.wait_jobs_done(60)
    assert digest(tmp_path / "run/filter/subset.npy") == digest(one_task_run / "filter/subset.npy")


@pytest.mark.s3
def test_pool_and_run_folder_on_s3_give_the_same_subset(s3_server, s3_bucket, pool16, one_task_run, tmp_path):
    fs = s3_server.fs()
    bucket = s3_bucket.removeprefix("s3://")
    for p in sorted((pool16 / "pool").iterdir()):
        fs.put_file(str(p), f"{bucket}/pool/{p.name}")
    cfg_path = filter_toml(tmp_path / "run.toml", f"{s3_bucket}/run", pool16, per_task=4, extra={
        "pool": {"metadata": f"{s3_bucket}/pool"}, "storage": {"endpoint_url": s3_server.endpoint_url},
        "executor": {"log_dir": f"{tmp_path}/logs"}})
    assert not submit_run(load_config(cfg_path)).failed
    data = fs.cat_file(f"{bucket}/run/filter/subset.npy")
    assert hashlib.sha256(data).hexdigest() == digest(one_task_run / "filter/subset.npy")
    assert not [p for p in fs.find(bucket) if "/.tmp-" in p]


# -- assets -------------------------------------------------------------------

def test_assets_verify_local_copies(tmp_path, monkeypatch):
    from dcslurm.cli import assets as assets_cli
    from dcslurm.core.storage import sha256_file

    good = tmp_path / "ids.txt"
    good.write_text("n01440764\nn01443537\n")
    sha = sha256_file(str(good))
    monkeypatch.setitem(assets_cli.ASSETS, "imagenet21k_wordnet_ids",
                        assets_cli.Asset("imagenet21k_wordnet_ids", "https://invalid.example/x", sha,
                                         "imagenet21k_wordnet_ids.txt", "text_based"))
    dest = tmp_path / "assets"
    path = assets_cli.fetch("imagenet21k_wordnet_ids", str(dest), source=str(good))
    assert open(path).read() == good.read_text()
    # already present and verified: no source needed, nothing downloaded
    assert assets_cli.fetch("imagenet21k_wordnet_ids", str(dest)) == path
    bad = tmp_path / "bad.txt"
    bad.write_text("tampered\n")
    with pytest.raises(UserError, match="does not match the published"):
        assets_cli.fetch("imagenet21k_wordnet_ids", str(tmp_path / "other"), source=str(bad))
    assert not os.listdir(tmp_path / "other")  # the bad copy never lands, not even as a temp file
    with pytest.raises(UserError, match="unknown asset"):
        assets_cli.fetch("nope", str(dest))


def test_language_id_model_is_decided_when_planned_and_kept_by_the_run(pool16, tmp_path, monkeypatch):
    """DataComp's rule runs lid.176.bin; the offline lid.176.ftz is quantised and labels some captions
    differently. Terms naming no lid_model take [stages.filter] lid_model, which defaults to the
    fetched lid.176.bin, else lid.176.ftz with one warning before anything is queued. The choice is
    made once, on the login node, and kept in the plan: a resubmit after fetching the model would
    mix two models in one subset, so the run folder refuses it."""
    import shutil

    from jobs.filter import rules

    monkeypatch.setenv("DCSLURM_CACHE", str(tmp_path / "cache"))
    cfg = filter_toml(tmp_path / "run.toml", tmp_path / "run", pool16, per_task=16,
                      extra={"stages": {"filter": {"spec": "basic then clip_score(l14, fraction=0.5)"}}})

    def plan_warnings() -> list[str]:
        proc = subprocess.run([sys.executable, "-m", "dcslurm", "plan", "--config", cfg], capture_output=True,
                              text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return [line for line in proc.stderr.splitlines() if "lid.176" in line]

    (warning,) = plan_warnings()
    assert "filter basic" in warning and "lid.176.ftz" in warning and "dcslurm assets fetch fasttext" in warning
    assert load_config(cfg).stages["filter"].params.lid_model == "lid.176.ftz"
    assert rules.fasttext_model_path("lid.176.ftz") == rules.fasttext_model_path("") == rules.quantised_lid()
    assert not submit_run(load_config(cfg)).failed
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["stage_params"]["filter"]["lid_model"] \
        == "lid.176.ftz"

    fetched = tmp_path / "cache" / "assets" / "lid.176.bin"
    fetched.parent.mkdir(parents=True)
    shutil.copyfile(rules.quantised_lid(), fetched)  # a stand-in: the tasks load whatever file is there
    assert plan_warnings() == []
    again = load_config(cfg)
    assert again.stages["filter"].params.lid_model == str(fetched) == rules.fasttext_model_path("")
    assert rules.fasttext_english(["a dog on the beach at sunset"], "").tolist() == [True]
    with pytest.raises(UserError, match="lid_model"):
        submit_run(again)


def test_lid_model_key_is_checked_before_queueing_and_left_empty_without_language_id(pool16, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("DCSLURM_CACHE", str(tmp_path / "cache"))
    scores = filter_toml(tmp_path / "scores.toml", tmp_path / "run", pool16, per_task=16,
                         extra={"stages": {"filter": {"spec": "clip_score(l14, fraction=0.5)"}}})
    assert load_config(scores).stages["filter"].params.lid_model == ""  # fetching a model changes nothing here
    missing = filter_toml(tmp_path / "missing.toml", tmp_path / "run", pool16, per_task=16,
                          extra={"stages": {"filter": {"spec": "basic", "lid_model": str(tmp_path / "nope.bin")}}})
    proc = subprocess.run([sys.executable, "-m", "dcslurm", "plan", "--config", missing], capture_output=True,
                          text=True, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "nope.bin" in lines[0] and "lid_model" in lines[0]


def test_assets_table_has_datacomp_hashes():
    from dcslurm.cli import assets as assets_cli

    a = assets_cli.ASSETS
    assert a["small_centroids"].sha256 == "23c66a05e49ad77283c1e2b33355c7eb088ac332a944c97ff85d5dfd48a5b251"
    assert a["fasttext"].url.endswith("lid.176.bin") and len([n for n in a if n.startswith("in1k_")]) == 5
    proc = subprocess.run([sys.executable, "-m", "dcslurm", "assets", "verify", "small_centroids", __file__],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "does not match" in proc.stderr
