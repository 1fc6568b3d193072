"""The local executor: same tasks, same markers, same outputs; kills and resubmission."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dcslurm.core.config import load_config
from dcslurm.core.errors import UserError
from dcslurm.core.markers import done_indexes
from dcslurm.core.runs import run_status, submit_run
from tests.core_helpers import executions, tree_digest, write_run_toml


def test_three_stage_run_is_deterministic(tmp_path):
    a = write_run_toml(tmp_path / "a.toml", str(tmp_path / "run-a"), units=12, per_task=5)
    b = write_run_toml(tmp_path / "b.toml", str(tmp_path / "run-b"), units=12, per_task=2)
    assert not submit_run(load_config(a)).failed
    assert not submit_run(load_config(b)).failed
    da, db = tree_digest(str(tmp_path / "run-a")), tree_digest(str(tmp_path / "run-b"))
    shards = {k: v for k, v in da.items() if k.startswith("synth/")}
    assert len(shards) == 12 and shards == {k: v for k, v in db.items() if k.startswith("synth/")}
    assert da["summary/summary.txt"] != ""
    _, steps = run_status(str(tmp_path / "run-a"))
    assert [(s.name, s.counts["done"], s.n_tasks) for s in steps] == [("synth", 3, 3), ("digest", 3, 3),
                                                                      ("summary", 1, 1)]


def test_resubmit_runs_only_unfinished_tasks(tmp_path):
    cfg_path = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=6)
    submit_run(load_config(cfg_path))
    before = tree_digest(str(tmp_path / "run"))
    # Lose two synth tasks' commits (and their outputs): only they rerun.
    for i in (1, 4):
        os.remove(tmp_path / "run" / "_markers" / "synth" / f"{i:06d}.json")
        os.remove(tmp_path / "run" / "synth" / f"shard-{i:08d}.bin")
    n_before = len(executions(str(tmp_path / "run"), "synth"))
    result = submit_run(load_config(cfg_path))
    assert result.pending["synth"] == [1, 4] and result.pending["digest"] == []
    assert len(executions(str(tmp_path / "run"), "synth")) == n_before + 2
    assert tree_digest(str(tmp_path / "run")) == before


def test_failed_task_is_reported_with_log_and_last_error(tmp_path):
    cfg_path = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=4, fail_tasks=[2])
    result = submit_run(load_config(cfg_path))
    assert result.failed == {"synth": [2]}
    assert done_indexes(load_config(cfg_path).folder(), "digest") == set()  # afterok: never started
    _, steps = run_status(str(tmp_path / "run"))
    synth = steps[0]
    assert synth.counts["failed"] == 1 and synth.counts["done"] == 3
    (failed,) = synth.failed
    assert failed.index == 2 and "planted failure in task 2" in failed.error
    assert os.path.exists(failed.log) and "planted failure" in open(failed.log).read()
    assert steps[1].counts["not started"] == steps[1].n_tasks


def test_run_folder_from_another_config_is_refused(tmp_path):
    first = write_run_toml(tmp_path / "a.toml", str(tmp_path / "run"), units=3)
    submit_run(load_config(first))
    other = write_run_toml(tmp_path / "b.toml", str(tmp_path / "run"), units=4)
    with pytest.raises(UserError, match=r"created by another config .* differs in stages.synth.units"):
        submit_run(load_config(other))


def test_cli_errors_are_one_line_and_submit_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    cfg = write_run_toml(tmp_path / "run.toml", "s3://bucket/run", units=3,
                         extra={"storage": {"endpoint_url": "http://127.0.0.1:9", "max_attempts": 1,
                                            "connect_timeout": 1}})
    proc = subprocess.run([sys.executable, "-m", "dcslurm", "submit", "-c", cfg], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("dcslurm: error: s3://bucket/run") and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "dcslurm", "plan", "-c", cfg, "--scale", "giant"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown scale 'giant'" in proc.stderr and "Traceback" not in proc.stderr


def test_killed_local_run_resumes_to_identical_outputs(tmp_path):
    ref = write_run_toml(tmp_path / "ref.toml", str(tmp_path / "ref"), units=12)
    submit_run(load_config(ref))
    cfg_path = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=12, sleep=1.5)
    proc = subprocess.Popen([sys.executable, "-m", "dcslurm", "submit", "-c", cfg_path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "run"
    deadline = time.time() + 60
    while len(done_indexes(load_config(cfg_path).folder(), "synth")) < 2 and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # what `dcslurm cancel` does to a local run
    proc.wait(timeout=30)
    committed = done_indexes(load_config(cfg_path).folder(), "synth")
    assert 2 <= len(committed) < 12
    resubmitted_at = time.time()
    result = submit_run(load_config(cfg_path))
    assert not result.failed
    assert set(result.pending["synth"]) == set(range(12)) - committed
    again = [e for e in executions(str(run), "synth") if e["time"] >= resubmitted_at]
    assert {e["index"] for e in again}.isdisjoint(committed)  # no task ran after its marker existed

    def strip(d):
        return {k: v for k, v in d.items() if k != "plan.json"}

    ref_tree = tree_digest(str(tmp_path / "ref"))
    run_tree = tree_digest(str(run))
    assert strip(run_tree).keys() == strip(ref_tree).keys()
    assert {k: v for k, v in run_tree.items() if k.startswith(("synth/", "digest/", "summary/"))} == \
           {k: v for k, v in ref_tree.items() if k.startswith(("synth/", "digest/", "summary/"))}


def test_a_local_run_inside_an_srun_session_is_not_that_jobs_rank(tmp_path, monkeypatch):
    """`srun --ntasks 2 --pty bash`, then `dcslurm submit` with the local executor: the
    tasks inherit the session's SLURM_* variables. They took its rank (1 of 2), and a rank
    other than 0 commits no marker: every task ended without its commit."""
    from dcslurm.core.environment import world_from_env

    for k, v in {"SLURM_JOB_ID": "999", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0",
                 "SLURM_LOCALID": "1"}.items():
        monkeypatch.setenv(k, v)
    cfg = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=2)
    assert not submit_run(load_config(cfg)).failed
    _, steps = run_status(str(tmp_path / "run"))
    assert [(s.name, s.counts["done"]) for s in steps] == [("synth", 2), ("digest", 2), ("summary", 1)]
    world = world_from_env({**os.environ, "DCSLURM_RANK": "0", "DCSLURM_WORLD_SIZE": "1"})
    assert (world.rank, world.world_size, world.slurm) == (0, 1, False)
