"""Training on the reshard stage's outputs, in one run (reshard -> train), local executor."""

from __future__ import annotations

import json
import os

import torch

from dcslurm.core.config import load_config
from dcslurm.core.markers import read_marker
from dcslurm.core.runs import submit_run
from dcslurm.core.storage import DataFolder
from dcslurm.core.tomlfile import write_toml
from tests.test_reshard import make_pool, make_subset
from tests.train_helpers import read_metrics


def test_train_reads_the_reshard_outputs_and_size_table(tmp_path):
    samples = make_pool(str(tmp_path / "pool"), n_shards=3, per_shard=20)
    make_subset(str(tmp_path / "subset.npy"), samples)
    run = str(tmp_path / "run")
    toml = write_toml(tmp_path / "run.toml", {
        "run": {"folder": run, "scale": "tiny", "stages": ["reshard", "train"]},
        "pool": {"shards": str(tmp_path / "pool")},
        "executor": {"kind": "local", "max_parallel": 2},
        "stages": {"reshard": {"subset": str(tmp_path / "subset.npy"), "samples_per_shard": 8, "tasks": 2},
                   "train": {"batch_size": 8, "samples": 24, "log_every": 1, "workers": 0, "data_streams": 2,
                             "grad_checkpointing": False}},
    })
    cfg = load_config(toml)
    assert [s.name for s in submit_run(cfg).plan.steps][-1] == "train"
    stats = read_marker(DataFolder(run), "train", 0)["stats"]
    assert stats["steps"] == 3 and stats["samples_seen"] == 24
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    sizes = json.load(open(os.path.join(run, "reshard", "sizes.json")))
    assert sizes and all(n.endswith(".tar") for n in sizes)
    weights = torch.load(os.path.join(run, "train", "model.pt"), weights_only=True)
    assert "logit_scale" in weights
