"""Plan estimates at real scale (issue 19): they follow the pool's rows, the training job
is sized from the scale, and the preemption signal is USR2 with logs appended."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcslurm.core.config import parse_config, slurm_time_hours
from dcslurm.core.plan import discover_inputs, make_plan
from dcslurm.core.plantypes import PlanInputs
from dcslurm.core.sbatch import TaskLauncher, render_step_script
from dcslurm.core.shards import UnitSet
from tests.train_helpers import write_plan_toml

EMBED_SECONDS = 1 / 2500 + 1 / 312  # the two default models at clip-retrieval's A100 rates
XL_ROWS = 12_800_000_000


def _pool(folder, rows_per_file: list[int]) -> str:
    folder.mkdir()
    start = 0
    for k, n in enumerate(rows_per_file):
        ids = range(start, start + n)
        pq.write_table(pa.table({"uid": [f"{i:032x}" for i in ids], "url": [f"http://x/{i}.jpg" for i in ids],
                                 "text": ["a caption"] * n}), str(folder / f"{k:05d}.parquet"))
        start += n
    return str(folder)


def _config(tmp_path, scale: str, stages: list[str], pool: dict | None = None, slurm: dict | None = None,
            train: dict | None = None):
    raw = {"run": {"folder": str(tmp_path / "run"), "scale": scale, "stages": stages},
           "pool": pool or {}, "slurm": slurm or {},
           "stages": {"reshard": {"subset": "/nowhere/subset.npy"},
                      "train": {"data": "/nowhere/{00000000..00000009}.tar", **(train or {})}}}
    raw["stages"] = {k: v for k, v in raw["stages"].items() if k in stages}
    return parse_config(raw)


# -- estimates follow the pool's rows ----------------------------------------------

@pytest.mark.parametrize("scale", ["tiny", "small"])
def test_estimates_follow_the_pools_parquet_rows(tmp_path, scale):
    """Two pools of 3 files each (N and 2N rows): every pool-sized estimate doubles and is
    N x its per-sample figure, whatever the scale's nominal pool size."""
    plans = {}
    for name, rows in (("one", [300, 200, 500]), ("two", [600, 400, 1000])):
        config = _config(tmp_path / name, scale, ["download", "embed", "reshard"],
                         pool={"metadata": _pool(tmp_path / f"pool_{name}", rows)})
        inputs = discover_inputs(config)
        assert inputs.pool_rows == sum(rows)
        plans[name] = make_plan(config, inputs)
    for name, n in (("one", 1_000), ("two", 2_000)):
        plan = plans[name]
        assert plan.step("download").estimate.bytes_written == pytest.approx(n * 35_000)
        assert f"{n:,} samples (the pool's parquet rows)" in plan.step("download").estimate.basis
        embed = plan.step("embed").estimate
        assert embed.gpu_hours == pytest.approx(0.0 if scale == "tiny" else n * EMBED_SECONDS / 3600)
        assert embed.bytes_written == pytest.approx(n * (3e9 + 75e9) / 12.8e6)
        assert plan.step("reshard.count").estimate.bytes_written == pytest.approx(n * 35_000)


def _xlarge_estimates(tmp_path, inputs: PlanInputs) -> dict:
    config = _config(tmp_path, "xlarge", ["download", "embed", "reshard"] if inputs.metadata_files
                     else ["embed", "reshard"])
    plan = make_plan(config, inputs)
    return {s.name: s.estimate for s in plan.steps}


def test_xlarge_from_metadata_costs_what_the_shard_pattern_costs(tmp_path):
    """12.8B pool rows in 6,400 parquet files (as the footers would say) cost what the
    1.28M-shard pattern costs: ~12,800 A100-h and ~78 TB of embeddings, 448 TB of reshard."""
    files = tuple(f"s3://pool/{k:05d}.parquet" for k in range(6_400))
    meta = _xlarge_estimates(tmp_path, PlanInputs(metadata_files=files, pool_rows=XL_ROWS))
    shards = _xlarge_estimates(tmp_path, PlanInputs(
        shards=UnitSet(count=1_280_000, pattern="s3://b/{:08d}.tar", label="shards")))
    assert meta["embed"].gpu_hours == pytest.approx(XL_ROWS * EMBED_SECONDS / 3600)
    assert 12_700 < meta["embed"].gpu_hours < 12_900
    assert meta["embed"].bytes_written == pytest.approx(78e12)
    assert meta["reshard.count"].bytes_written == pytest.approx(XL_ROWS * 35_000)
    assert meta["download"].bytes_written == pytest.approx(XL_ROWS * 35_000)
    for step in ("embed", "reshard.count"):
        assert meta[step].gpu_hours == pytest.approx(shards[step].gpu_hours)
        assert meta[step].bytes_written == pytest.approx(shards[step].bytes_written)


def test_without_rows_the_scales_pool_size_is_the_basis(tmp_path):
    est = _xlarge_estimates(tmp_path, PlanInputs(metadata_files=("s3://pool/0.parquet",)))
    assert est["embed"].gpu_hours == pytest.approx(XL_ROWS * EMBED_SECONDS / 3600)
    assert "xlarge pool size" in est["download"].basis


# -- the training job's shape ------------------------------------------------------------

def _train(tmp_path, scale, resources: dict | None = None, **kw):
    config = _config(tmp_path, scale, ["train"], **kw)
    config.stages["train"].resources.update(resources or {})  # [stages.train.resources]
    return make_plan(config, PlanInputs()).step("train")


@pytest.mark.parametrize("scale, slurm, shape", [
    ("tiny", {}, (1, 1, 0)),
    ("debug", {}, (1, 1, 1)),
    ("small", {}, (1, 1, 1)),  # Table 2: 4 h on one A100
    ("medium", {}, (1, 8, 8)),
    ("large", {}, (16, 8, 8)),
    ("xlarge", {}, (64, 8, 8)),  # DataComp's 512 A100s
    ("xlarge", {"gpus_per_node": 4}, (128, 4, 4)),
    ("xlarge", {"nodes": 2, "tasks_per_node": 4, "gpus_per_node": 4}, (2, 4, 4)),  # the user's shape stands
    ("xlarge", {"tasks_per_node": 2}, (1, 2, 0)),
])
def test_the_training_job_is_sized_from_the_scale(tmp_path, scale, slurm, shape):
    res = _train(tmp_path, scale, slurm=slurm).resources
    assert (res.nodes, res.tasks_per_node, res.gpus_per_node) == shape


def test_the_train_resources_shape_stands_too(tmp_path):
    res = _train(tmp_path, "xlarge", resources={"nodes": 4, "tasks_per_node": 8}).resources
    assert (res.nodes, res.tasks_per_node) == (4, 8)


def test_xlarge_plan_shows_the_sized_job_and_no_warning(tmp_path):
    est = _train(tmp_path, "xlarge").estimate
    assert "global batch 90,112 = 64 nodes x 8 tasks x 176 per rank (sized from the scale" in est.basis
    assert "HSDP mesh 64 x 8" in est.basis
    assert est.warning == ""


@pytest.mark.parametrize("scale, slurm, resources, words", [
    ("xlarge", {"nodes": 1, "tasks_per_node": 1}, {}, "90,112 samples per rank"),
    ("small", {"nodes": 64, "tasks_per_node": 8}, {}, "8 samples per rank"),
    ("large", {"time": "04:00:00"}, {"requeue": False}, "exceeds the time limit 04:00:00 and requeue is off"),
])
def test_an_absurd_shape_is_one_warning_line(tmp_path, scale, slurm, resources, words):
    est = _train(tmp_path, scale, resources, slurm=slurm).estimate
    assert words in est.warning and "\n" not in est.warning


def test_requeue_on_or_enough_time_gives_no_warning(tmp_path):
    assert _train(tmp_path, "large", slurm={"time": "04:00:00"}).estimate.warning == ""  # requeues
    assert _train(tmp_path, "large", {"requeue": False, "time": "10:00:00"}).estimate.warning == ""


def test_plan_prints_the_warning(tmp_path):
    from typer.testing import CliRunner

    from dcslurm.cli import app

    toml = write_plan_toml(tmp_path / "xl.toml", str(tmp_path / "run"), "/nowhere/{00000000..00000009}.tar",
                           {"nodes": 1, "tasks_per_node": 1}, scale="xlarge", executor=None)
    result = CliRunner().invoke(app, ["plan", "-c", str(toml), "--no-checks"])
    assert result.exit_code == 0, result.output
    assert "warning: train: 1 nodes x 1 tasks gives 90,112 samples per rank" in result.output


@pytest.mark.parametrize("value, hours", [("90", 1.5), ("90:30", 1.5 + 30 / 3600), ("04:00:00", 4.0),
                                          ("2-00", 48.0), ("2-03:30", 51.5), ("1-00:00:36", 24.01)])
def test_slurm_time_limits_in_hours(value, hours):
    assert slurm_time_hours(value) == pytest.approx(hours)


# -- the preemption signal -------------------------------------------------------------------

def test_the_train_script_warns_with_usr2_and_appends_its_log(tmp_path):
    step = _train(tmp_path, "small")
    plan = make_plan(_config(tmp_path, "small", ["train"]), PlanInputs())
    text = render_step_script(plan, step, TaskLauncher(python="python3"), str(tmp_path / "logs"))
    assert "#SBATCH --signal=USR2@120\n" in text
    assert "#SBATCH --open-mode=append\n" in text
    assert "USR1" not in text

