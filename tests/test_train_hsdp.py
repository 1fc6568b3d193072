"""HSDP (issue 19): shard within a node, replicate across nodes, on a 2-D device mesh.

- the mesh is chosen from the scale and the job shape, with a config override;
- 4 ranks on a forced 2 x 2 mesh (local executor, gloo) train like the 1-D mesh, loss
  within 1e-4 for 20 steps;
- the same on the real SLURM cluster: 2 nodes x 2 tasks, "hsdp" replicating across the nodes.
"""

from __future__ import annotations

import os

import pytest

from dcslurm.core.config import load_config
from dcslurm.core.errors import UserError
from dcslurm.core.markers import read_marker
from dcslurm.core.runs import submit_run
from dcslurm.core.storage import DataFolder
from jobs.train.spec import mesh_shape
from tests.core_helpers import update_toml
from tests.test_train import run_train, shards  # noqa: F401 - fixture
from tests.train_helpers import read_metrics, write_plan_toml

STEPS = 20


@pytest.mark.parametrize("mode, scale, nodes, tasks, replicas, expected", [
    ("auto", "tiny", 1, 1, None, (1,)),
    ("auto", "small", 1, 8, None, (8,)),
    ("auto", "medium", 4, 8, None, (32,)),  # medium: FSDP over all ranks
    ("auto", "large", 1, 8, None, (8,)),  # one node: nothing to replicate across
    ("auto", "large", 16, 8, None, (16, 8)),
    ("auto", "xlarge", 64, 8, None, (64, 8)),  # DataComp's 512 A100s
    ("auto", "xlarge", 64, 1, None, (64,)),  # one task a node: no node to shard within
    ("fsdp", "xlarge", 64, 8, None, (512,)),
    ("hsdp", "tiny", 2, 2, None, (2, 2)),
    ("hsdp", "tiny", 1, 4, 2, (2, 2)),
])
def test_the_mesh_follows_the_scale_and_the_job_shape(mode, scale, nodes, tasks, replicas, expected):
    assert mesh_shape(mode, scale, nodes, tasks, replicas) == expected


def test_a_mesh_that_does_not_divide_the_ranks_is_a_one_line_error():
    with pytest.raises(UserError, match=r"mesh hsdp: 6 ranks .* do not split into 4 replica groups"):
        mesh_shape("hsdp", "large", 3, 2, 4)


def test_an_unknown_mesh_is_a_config_error():
    from jobs.train.spec import TrainParams

    with pytest.raises(ValueError, match="mesh: expected auto, fsdp or hsdp"):
        TrainParams(mesh="2d").validate()


def train_log(folder: str) -> str:
    logs = os.path.join(folder, "logs", "train")
    return "".join(open(os.path.join(logs, name)).read() for name in sorted(os.listdir(logs)))


def assert_same_losses(a_folder: str, b_folder: str) -> None:
    a, b = read_metrics(a_folder), read_metrics(b_folder)
    assert [m["step"] for m in a] == list(range(1, STEPS + 1)) == [m["step"] for m in b]
    diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
    assert max(diffs) < 1e-4, diffs
    assert a[-1]["loss"] < a[0]["loss"]  # it learns


@pytest.fixture(scope="module")
def fsdp_4_ranks(tmp_path_factory, shards):
    """The 1-D reference: 4 local ranks, FSDP over all of them."""
    folder, failed = run_train(tmp_path_factory.mktemp("fsdp"), "fsdp", shards, tasks_per_node=4,
                               samples=16 * STEPS, checkpoint_every=100, mesh="fsdp", export=False)
    assert not failed
    assert "device mesh 4 (FSDP)" in train_log(folder)
    return folder


@pytest.mark.slow
def test_a_2x2_mesh_trains_like_the_1d_mesh_on_4_local_ranks(tmp_path, shards, fsdp_4_ranks):
    folder, failed = run_train(tmp_path, "hsdp", shards, tasks_per_node=4, samples=16 * STEPS,
                               checkpoint_every=10, mesh="hsdp", mesh_replicas=2, export=False)
    assert not failed
    assert "device mesh 2 x 2 (HSDP)" in train_log(folder)
    assert_same_losses(folder, fsdp_4_ranks)
    assert read_marker(DataFolder(folder), "train", 0)["stats"]["world_size"] == 4


@pytest.mark.slurm
@pytest.mark.slow
def test_hsdp_across_2_slurm_nodes_trains_like_the_1d_mesh(slurm_cluster, tmp_path, shards, fsdp_4_ranks):
    from tests.test_train_slurm import slurm_toml, wait_committed

    path, folder = slurm_toml(tmp_path, "hsdp", shards, mesh="hsdp", export=False)
    # 2 nodes x 2 tasks instead of the helper's 2 x 1
    update_toml(path, {"stages": {"train": {"resources": {"tasks_per_node": 2}}}})
    submit_run(load_config(path))
    marker = wait_committed(folder, slurm_cluster)
    assert marker["stats"]["world_size"] == 4
    assert "device mesh 2 x 2 (HSDP)" in train_log(folder)
    assert_same_losses(folder, fsdp_4_ranks)


@pytest.mark.parametrize("scale, nodes, tasks, facts", [
    ("large", 16, 8, ("ViT-B-16", "global batch 8,192 = 16 nodes x 8 tasks x 64 per rank", "HSDP mesh 16 x 8")),
    ("xlarge", 64, 8, ("ViT-L-14", "global batch 90,112 = 64 nodes x 8 tasks x 176 per rank",
                       "HSDP mesh 64 x 8")),
    ("large", 1, 8, ("global batch 8,192 = 1 nodes x 8 tasks x 1,024 per rank", "FSDP mesh 8")),
])
def test_the_dry_run_shows_the_job_shape_and_the_mesh(tmp_path, shards, scale, nodes, tasks, facts):
    import json

    from typer.testing import CliRunner

    from dcslurm.cli import app

    toml = write_plan_toml(tmp_path / "big.toml", str(tmp_path / "run"), shards,
                           {"nodes": nodes, "tasks_per_node": tasks, "gpus_per_node": tasks})
    result = CliRunner().invoke(app, ["plan", "-c", str(toml), "--scale", scale, "--json"])
    assert result.exit_code == 0, result.output
    basis = json.loads(result.output)["steps"][0]["estimate_basis"]
    for fact in facts:
        assert fact in basis, (fact, basis)
