"""Training with the data and the run folder on S3 (real SeaweedFS endpoint): shards read
through fsspec, DCP checkpoints written and resumed from s3://, the export uploaded."""

from __future__ import annotations

import io
import os

import pytest
import torch

from dcslurm.core.config import load_config
from dcslurm.core.errors import UserError
from dcslurm.core.runs import submit_run
from dcslurm.core.storage import DataFolder
from dcslurm.core.task import STOP_AFTER_ENV
from tests.core_helpers import update_toml
from tests.test_train import assert_bit_equal, final_weights, run_train, shards  # noqa: F401 - fixture
from tests.train_helpers import write_train_toml

pytestmark = pytest.mark.s3


def test_s3_data_and_checkpoints_resume_to_the_local_runs_weights(tmp_path, shards, s3_server, s3_bucket,
                                                                   monkeypatch):
    opts = s3_server.storage_options()
    data = DataFolder(f"{s3_bucket}/shards", opts)
    for name in sorted(os.listdir(shards)):
        data.put_file(os.path.join(shards, name), name)
    common = dict(samples=16 * 6, checkpoint_every=100)
    local, failed = run_train(tmp_path, "local", shards, **common)
    assert not failed

    run_url = f"{s3_bucket}/run"
    toml = write_train_toml(tmp_path / "s3.toml", run_url, data.url, **common)
    monkeypatch.setenv(STOP_AFTER_ENV, "3")  # test-only: each attempt stops after 3 steps, as if preempted
    update_toml(toml, {"storage": {"endpoint_url": s3_server.endpoint_url},
                       "executor": {"log_dir": f"{tmp_path}/logs"}})
    assert submit_run(load_config(toml)).failed  # stopped after 3 steps, as if preempted
    run = DataFolder(run_url, opts)
    assert run.list("train/checkpoints", suffix=".json") == ["step-00000003.json"]

    assert not submit_run(load_config(toml)).failed  # resumes at 3; its own stop would be at 6 = the end
    weights = torch.load(io.BytesIO(run.read_bytes("train/model.pt")), weights_only=True)
    assert_bit_equal(weights, final_weights(local))


def test_missing_s3_shards_are_a_one_line_error(tmp_path, shards, s3_server, s3_bucket):
    toml = write_train_toml(tmp_path / "bad.toml", str(tmp_path / "run"), f"{s3_bucket}/nothing-here")
    update_toml(toml, {"storage": {"endpoint_url": s3_server.endpoint_url}})
    with pytest.raises(UserError, match=r"nothing-here: training data folder does not exist$"):
        submit_run(load_config(toml))
