"""The eval stage end to end (local executor), its group metrics on WILDS-style
sets, resume, and one-line errors for bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dcslurm.core.errors import UserError
from dcslurm.core.storage import DataFolder
from dcslurm.core.tomlfile import write_toml
from dcslurm.datacomp.tasks import Task, get_task
from tests.core_helpers import merge_tables
from tests.test_eval_fixtures import make_classification_set, make_retrieval_set, make_winogavil_set

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    from jobs.models import create_model

    path = str(tmp_path_factory.mktemp("ckpt") / "model.pt")
    torch.save(create_model("dcslurm-tiny-vit", seed=1)[0].state_dict(), path)
    return path


@pytest.fixture(scope="module")
def evalsets(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsets")
    make_classification_set(str(root / "wds_fashion_test"), n=60, per_shard=25)
    make_retrieval_set(str(root / "wds_fashion_captions_test"), n=40, per_shard=20)
    make_winogavil_set(str(root / "wds_misc-winogavil_test"), n_examples=4)
    # FMoW-style: .npy metadata [region, year, y]
    rng = np.random.default_rng(0)
    fmow_meta = np.stack([rng.integers(0, 4, 60), rng.integers(0, 3, 60), np.zeros(60, int)], axis=1)
    make_classification_set(str(root / "wds_wilds-fmow_test"), n=60, per_shard=30, metadata=fmow_meta)
    ds_meta = np.stack([rng.integers(0, 3, 60), np.zeros(60, int), np.zeros(60, int)], axis=1)
    make_classification_set(str(root / "wds_dollar_street_test"), n=60, per_shard=30, metadata=ds_meta)
    make_classification_set(str(root / "wds_wilds-iwildcam_test"), n=60, per_shard=30,
                            metadata=np.zeros((60, 9), int))
    return root


EXTRA_TASKS = {"extra_tasks": [
    {"key": "demo/fashion", "name": "Demo fashion", "evalset": "wds_fashion_test"},
    {"key": "demo/captions", "name": "Demo captions", "evalset": "wds_fashion_captions_test", "kind": "retrieval",
     "main_metric": "mean_recall@1"},
]}


def write_config(tmp_path, run: str, evalsets: str, ckpt: str, tasks: list[str] | str, extra: dict = EXTRA_TASKS,
                 per_task: int = 1, more: dict | None = None) -> str:
    """An eval-only run.toml. `tasks`: task keys or a group name; `extra`: more [stages.eval]
    keys; `more`: more tables, merged in (core_helpers.merge_tables)."""
    doc = {
        "run": {"folder": run, "scale": "tiny", "stages": ["eval"]},
        "executor": {"kind": "local"},
        "stages": {"eval": {"tasks": tasks, "evalsets": evalsets, "checkpoint": ckpt, "batch_size": 16,
                            "num_workers": 1, "units_per_task": per_task, **extra}},
    }
    return write_toml(tmp_path / f"{os.path.basename(run)}.toml", merge_tables(doc, more or {}))


def test_eval_run_writes_datacomp_results_and_skips_done_tasks(tmp_path, evalsets, random_checkpoint, capsys):
    from dcslurm.cli.results import after_run
    from dcslurm.core.config import load_config
    from dcslurm.core.runs import submit_run
    from dcslurm.datacomp.results import parse_results

    run = str(tmp_path / "run")
    cfg = load_config(write_config(tmp_path, run, str(evalsets), random_checkpoint,
                                   ["demo/fashion", "demo/captions", "wilds/fmow", "misc/winogavil"], per_task=4))
    result = submit_run(cfg)
    assert not result.failed
    lines = open(os.path.join(run, "eval", "results.jsonl")).read().splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["key"] for r in recs] == ["demo/fashion", "demo/captions", "wilds/fmow", "misc/winogavil"]
    assert all(set(r) == {"key", "dataset", "metrics"} and "main_metric" in r["metrics"] for r in recs)
    by_key = {r["key"]: r["metrics"] for r in recs}
    assert by_key["demo/fashion"]["main_metric"] == by_key["demo/fashion"]["acc1"]
    assert by_key["demo/captions"]["main_metric"] == by_key["demo/captions"]["mean_recall@1"]
    fmow = by_key["wilds/fmow"]
    assert fmow["main_metric"] == fmow["acc_worst_region"]
    assert fmow["acc_worst_region"] == min(v for k, v in fmow.items() if k.startswith("acc_region:"))
    assert fmow["acc_worst_year"] == min(v for k, v in fmow.items() if k.startswith("acc_year:"))
    assert abs(fmow["acc_avg"] - fmow["acc1"]) < 1e-12
    assert by_key["misc/winogavil"]["main_metric"] == by_key["misc/winogavil"]["jaccard_score_10-12"]
    assert 0 <= by_key["misc/winogavil"]["main_metric"] <= 1
    assert sorted(os.listdir(os.path.join(run, "eval", "tasks"))) == [
        "demo__captions.json", "demo__fashion.json", "misc__winogavil.json", "wilds__fmow.json"]
    assert "Demo fashion" in parse_results("\n".join(lines))

    after_run(cfg, result)
    shown = capsys.readouterr().out
    assert "Demo fashion" in shown and "FMoW" in shown

    # Rerun: every task is committed, nothing is evaluated again.
    mtime = os.path.getmtime(os.path.join(run, "eval", "tasks", "wilds__fmow.json"))
    result = submit_run(load_config(cfg.path))
    assert not result.failed
    assert os.path.getmtime(os.path.join(run, "eval", "tasks", "wilds__fmow.json")) == mtime


def test_fairness_and_iwildcam_metrics_are_consistent(evalsets, random_checkpoint):
    from jobs.evaluate.stage import Evaluator

    ev = Evaluator("dcslurm-tiny-vit", random_checkpoint, "cpu", batch_size=32, num_workers=1)
    ds, _ = ev.evaluate(get_task("fairness/dollar_street"), DataFolder(str(evalsets)))
    worst_group = min(v for k, v in ds.items() if k.startswith("acc_top5_income_ds:"))
    assert ds["main_metric"] == ds["acc_top5_wg"] == worst_group
    assert abs(ds["acc_top5_avg"] - ds["acc5"]) < 1e-12
    iw, _ = ev.evaluate(get_task("wilds/iwildcam"), DataFolder(str(evalsets)))
    assert iw["main_metric"] == iw["F1-macro_all"] and 0 <= iw["F1-macro_all"] <= 1


def test_unknown_task_in_config_is_one_line_error(tmp_path, evalsets, random_checkpoint):
    from dcslurm.core.config import load_config
    from dcslurm.core.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        load_config(write_config(tmp_path, str(tmp_path / "r"), str(evalsets), random_checkpoint,
                                 ["imagenet1k", "imagenet-z"]))
    msg = str(exc.value)
    assert "tasks" in msg and "imagenet-z" in msg and "\n" not in msg


def test_extra_task_main_metric_its_kind_never_gives_is_refused_at_load(tmp_path, evalsets, random_checkpoint):
    """A misspelt main_metric left the task's number null in every table, silently."""
    from dcslurm.core.config import load_config
    from dcslurm.core.errors import ConfigError

    extra = {"extra_tasks": [{"key": "lab/captions", "name": "Lab captions", "kind": "retrieval",
                              "main_metric": "recall@1"}]}
    with pytest.raises(ConfigError) as exc:
        load_config(write_config(tmp_path, str(tmp_path / "r"), str(evalsets), random_checkpoint,
                                 "extra", extra=extra))
    msg = str(exc.value)
    assert "lab/captions" in msg and "'recall@1'" in msg and "mean_recall@1" in msg and "\n" not in msg


def test_eval_set_without_nshards_or_classnames_is_one_line_error(tmp_path, random_checkpoint):
    from jobs.evaluate.evalset import EvalSet

    make_classification_set(str(tmp_path / "set"), n=10, per_shard=10)
    os.remove(tmp_path / "set" / "classnames.txt")
    with pytest.raises(UserError) as exc:
        EvalSet.open(DataFolder(str(tmp_path / "set")))
    assert str(exc.value).endswith("classnames.txt: missing; a zero-shot classification set needs classnames.txt")
    os.remove(tmp_path / "set" / "test" / "nshards.txt")
    with pytest.raises(UserError, match=r"test/nshards.txt: missing"):
        EvalSet.open(DataFolder(str(tmp_path / "set")))
    with pytest.raises(UserError, match="eval set folder does not exist"):
        EvalSet.open(DataFolder(str(tmp_path / "nothing")))


def test_checkpoint_that_is_not_open_clip_is_one_line_error(tmp_path):
    from jobs.evaluate.zeroshot import load_model

    junk = tmp_path / "notes.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(UserError) as exc:
        load_model("dcslurm-tiny-vit", str(junk), "cpu")
    assert str(exc.value).startswith(f"{junk}: not an open_clip dcslurm-tiny-vit checkpoint")
    assert "\n" not in str(exc.value)
    other = tmp_path / "other.pt"
    torch.save({"linear.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(UserError, match="not an open_clip dcslurm-tiny-vit checkpoint"):
        load_model("dcslurm-tiny-vit", str(other), "cpu")


def test_failed_task_reports_one_line_in_status(tmp_path, evalsets, random_checkpoint):
    from dcslurm.core.config import load_config
    from dcslurm.core.runs import run_status, submit_run

    run = str(tmp_path / "badrun")
    # A checkpoint file that exists (the preflight checks no more) but holds no open_clip model.
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    cfg = load_config(write_config(tmp_path, run, str(evalsets), str(junk), ["demo/fashion"]))
    assert submit_run(cfg).failed
    _, steps = run_status(cfg.run_url, cfg.storage_options, config=cfg)
    failed = [f for s in steps for f in s.failed]
    assert failed and "not an open_clip dcslurm-tiny-vit checkpoint" in failed[0].error


@pytest.mark.s3
def test_eval_run_entirely_on_s3(tmp_path, evalsets, random_checkpoint, s3_bucket, s3_server):
    """Run folder, eval sets and checkpoint all in the S3 server; results gathered from there."""
    from dcslurm.cli.evalsets import copy_tree
    from dcslurm.core.config import load_config
    from dcslurm.core.runs import submit_run
    from dcslurm.datacomp.results import gather

    opts = s3_server.storage_options()
    copy_tree(DataFolder(str(evalsets / "wds_fashion_test"), opts),
              DataFolder(f"{s3_bucket}/sets/wds_fashion_test", opts))
    DataFolder(f"{s3_bucket}/ckpt", opts).put_file(random_checkpoint, "model.pt")
    path = write_config(tmp_path, f"{s3_bucket}/runs/r1", f"{s3_bucket}/sets", f"{s3_bucket}/ckpt/model.pt",
                        ["demo/fashion"], more={"storage": {"endpoint_url": s3_server.endpoint_url},
                                                "executor": {"log_dir": str(tmp_path / "logs")}})
    assert not submit_run(load_config(path)).failed
    runs = gather([f"{s3_bucket}/runs"], opts)
    assert [r.name for r in runs] == ["r1"] and "Demo fashion" in runs[0].aggregate.extras


@pytest.mark.slurm
def test_eval_as_slurm_array_then_gather(tmp_path, evalsets, random_checkpoint, slurm_cluster):
    """On the real local SLURM cluster: one array element per task, then the gather job."""
    from dcslurm.core.config import load_config
    from dcslurm.core.runs import submit_run
    from tests.core_helpers import wait_run_done

    run = str(tmp_path / "slurm-run")
    # the emulated nodes have 2 CPUs and no GPUs (no gres)
    path = write_config(tmp_path, run, str(evalsets), random_checkpoint,
                        ["demo/fashion", "demo/captions", "wilds/fmow"],
                        more={"executor": {"kind": "slurm"},
                              "stages": {"eval": {"resources": {"gpus_per_node": 0, "cpus_per_task": 1}}}})
    cfg = load_config(path)
    submit_run(cfg)
    wait_run_done(path, timeout=600)
    slurm_cluster.wait_jobs_done(60)
    recs = [json.loads(line) for line in open(os.path.join(run, "eval", "results.jsonl"))]
    assert [r["key"] for r in recs] == ["demo/fashion", "demo/captions", "wilds/fmow"]
    # one job array of 3 elements plus one gather job, recorded in the submission
    sub = json.load(open(os.path.join(run, "_submissions", sorted(os.listdir(os.path.join(run, "_submissions")))[0])))
    assert "eval.run" in json.dumps(sub) and "eval.gather" in json.dumps(sub)


def test_bad_samples_are_skipped_and_counted(tmp_path, random_checkpoint):
    from jobs.evaluate.stage import Evaluator
    from tests.test_eval_fixtures import offline_images, png_bytes, write_shards

    images, labels, classes = offline_images(12)
    samples = [{"__key__": f"k{i:03d}", "png": png_bytes(im), "cls": str(lb).encode()}
               for i, (im, lb) in enumerate(zip(images, labels))]
    samples[3]["png"] = b"\x89PNG broken"  # undecodable image
    del samples[5]["cls"]  # no label
    samples[7]["cls"] = b"99"  # label outside the class list
    folder = tmp_path / "wds_bad_test"
    write_shards(str(folder), samples, per_shard=6)
    (folder / "classnames.txt").write_text("\n".join(classes) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    ev = Evaluator("dcslurm-tiny-vit", random_checkpoint, "cpu", batch_size=4, num_workers=1)
    metrics, stats = ev.evaluate(Task(key="demo/bad", name="Bad", evalset="wds_bad_test"), DataFolder(str(tmp_path)))
    assert stats["samples"] == 9 and stats["skipped"] == 3
    assert 0 <= metrics["acc1"] <= 1
