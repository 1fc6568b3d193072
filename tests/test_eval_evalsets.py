"""`dcslurm evalsets prepare` (offline parts) and eval sets read from S3."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dcslurm.cli.evalsets import hf_repo, is_hf_datasets_task
from dcslurm.core.storage import DataFolder
from dcslurm.datacomp.tasks import get_task
from tests.test_eval_fixtures import make_classification_set


def test_published_set_names():
    assert hf_repo(get_task("vtab/cifar100")) == "djghosh/wds_vtab-cifar100_test"
    assert hf_repo(get_task("fairness/dollar_street")) == "djghosh/wds_dollar_street_test"
    assert hf_repo(get_task("imagenet1k")) == "djghosh/wds_imagenet1k_test"
    assert is_hf_datasets_task(get_task("Flickr")) and is_hf_datasets_task(get_task("WinoGAViL"))
    assert not is_hf_datasets_task(get_task("wilds/fmow"))


def test_prepare_copies_a_local_copy_and_resumes(tmp_path):
    from dcslurm.cli import app

    src = tmp_path / "src"
    make_classification_set(str(src / "wds_mnist_test"), n=20, per_shard=10)
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["evalsets", "prepare", "--out", str(out), "--tasks", "mnist", "--source", str(src)])
    assert res.exit_code == 0, res.output
    assert "5 files copied, 0 already there" in res.output
    assert ((out / "wds_mnist_test" / "test" / "1.tar").read_bytes()
            == (src / "wds_mnist_test" / "test" / "1.tar").read_bytes())
    res = runner.invoke(app, ["evalsets", "prepare", "--out", str(out), "--tasks", "mnist", "--source", str(src)])
    assert "0 files copied, 5 already there" in res.output


def test_prepare_without_network_is_one_line_per_task(tmp_path, monkeypatch):
    from dcslurm.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = CliRunner().invoke(app, ["evalsets", "prepare", "--out", str(tmp_path / "o"), "--tasks", "mnist,stl10"])
    assert res.exit_code != 0
    assert "2 of 2 eval sets not prepared" in str(res.exception) + res.output


@pytest.mark.s3
def test_eval_reads_sets_from_s3(tmp_path, s3_bucket, s3_server):
    from dcslurm.cli import app
    from jobs.evaluate.evalset import EvalSet

    src = tmp_path / "src"
    make_classification_set(str(src / "wds_mnist_test"), n=30, per_shard=10)
    res = CliRunner().invoke(app, ["evalsets", "prepare", "--out", f"{s3_bucket}/evalsets", "--tasks", "mnist",
                                   "--source", str(src), "--endpoint-url", s3_server.endpoint_url])
    assert res.exit_code == 0, res.output
    remote = EvalSet.open(DataFolder(f"{s3_bucket}/evalsets/wds_mnist_test", s3_server.storage_options()))
    local = EvalSet.open(DataFolder(str(src / "wds_mnist_test")))
    assert remote.nshards == 3 and remote.classnames == local.classnames and remote.templates == local.templates
    assert [s["cls"] for s in remote.samples()] == [s["cls"] for s in local.samples()]
