"""Training across processes with the local executor (gloo, FSDP2): the same
trainer, runner and markers as on SLURM (see test_train_slurm.py for the real cluster).

- 2 ranks equal 1 rank with the same global batch (accumulation), within 1e-4 for 20 steps;
- SIGTERM mid-run checkpoints; the resubmitted run ends bit-identical to an uninterrupted one;
- kill -9 of one rank fails the job; resubmission resumes from the last complete checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dcslurm.core.config import load_config
from dcslurm.core.markers import read_marker
from dcslurm.core.runs import run_status, submit_run
from dcslurm.core.storage import DataFolder
from dcslurm.core.task import POLL_SLEEP_ENV
from tests.test_train import assert_bit_equal, final_weights, run_train, shards  # noqa: F401 - fixture
from tests.train_helpers import read_metrics, write_train_toml

pytestmark = pytest.mark.slow
PY = sys.executable


def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path, shards):
    """2 ranks x 8 (gloo, FSDP2) == 1 rank x 2 accumulation steps x 8, within 1e-4 for 20 steps."""
    two, failed = run_train(tmp_path, "two", shards, tasks_per_node=2, samples=16 * 20, checkpoint_every=100)
    assert not failed
    one, failed = run_train(tmp_path, "one", shards, tasks_per_node=1, samples=16 * 20, checkpoint_every=100,
                            accum=2)
    assert not failed
    a, b = read_metrics(two), read_metrics(one)
    assert [m["step"] for m in a] == list(range(1, 21)) == [m["step"] for m in b]
    assert a[0]["world_size"] == 2 and b[0]["world_size"] == 1
    diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
    assert max(diffs) < 1e-4, diffs
    assert a[-1]["loss"] < a[0]["loss"]  # it learns
    stats = read_marker(DataFolder(two), "train", 0)["stats"]
    assert stats["world_size"] == 2 and stats["samples_seen"] == 320


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def _wait_for_step(folder: str, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "training ended before it could be interrupted"
        try:
            if read_metrics(folder) and read_metrics(folder)[-1]["step"] >= step:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached")


def _submit_cli(toml: str, poll_sleep: float = 0.5) -> subprocess.Popen:
    """`dcslurm submit` with every step poll_sleep s slower (test-only), so it can be hit mid-run."""
    return subprocess.Popen([PY, "-m", "dcslurm", "submit", "-c", toml], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, **{POLL_SLEEP_ENV: str(poll_sleep)}))


def test_sigterm_checkpoints_and_the_resumed_run_is_bit_exact(tmp_path, shards):
    common = dict(tasks_per_node=2, samples=16 * 12, checkpoint_every=100, workers=1)
    ref, failed = run_train(tmp_path, "ref", shards, **common)
    assert not failed

    folder = str(tmp_path / "preempted")
    toml = write_train_toml(tmp_path / "preempted.toml", folder, shards, **common)
    proc = _submit_cli(toml)
    _wait_for_step(folder, 4, proc)
    proc.send_signal(signal.SIGTERM)  # the local executor passes it to both ranks, as SLURM does
    assert proc.wait(timeout=120) != 0
    done = sorted(n for n in os.listdir(os.path.join(folder, "train", "checkpoints")) if n.endswith(".json"))
    assert len(done) == 1
    stopped_at = json.load(open(os.path.join(folder, "train", "checkpoints", done[0])))["step"]
    assert 4 <= stopped_at < 12
    assert not os.path.exists(os.path.join(folder, "train", "model.pt"))

    assert submit_run(load_config(toml)).failed == {}
    stats = read_marker(DataFolder(folder), "train", 0)["stats"]
    assert stats["resumed_from_step"] == stopped_at
    assert_bit_equal(final_weights(ref), final_weights(folder))
    # The metrics file is continuous: steps 1..12 once each.
    assert [m["step"] for m in read_metrics(folder)] == list(range(1, 13))


def test_kill_9_of_one_rank_fails_the_job_and_resubmission_resumes(tmp_path, shards):
    folder = str(tmp_path / "killed")
    toml = write_train_toml(tmp_path / "killed.toml", folder, shards, tasks_per_node=2, samples=16 * 10,
                            checkpoint_every=3, timeout_s=60)
    proc = _submit_cli(toml)
    _wait_for_step(folder, 7, proc)
    runners = _children(proc.pid)  # the executor's children: the two ranks' runner processes
    assert len(runners) == 2, runners
    os.kill(runners[1], signal.SIGKILL)
    proc.wait(timeout=180)
    assert not os.path.exists(os.path.join(folder, "_markers", "train", "000000.json"))
    # The surviving rank either records what gloo saw (its peer died) or is killed first by the
    # executor (as srun --kill-on-bad-exit would); a race either way. `status` names the failure.
    record = os.path.join(folder, "_failures", "train", "000000.json")
    if os.path.exists(record):
        with open(record) as f:
            assert "remote worker" in json.load(f)["error"]
    (train,) = [s for s in run_status(folder)[1] if s.name == "train"]
    assert [t.index for t in train.failed] == [0] and train.failed[0].error, train
    steps = sorted(int(n[5:13]) for n in os.listdir(os.path.join(folder, "train", "checkpoints"))
                   if n.endswith(".json"))
    assert steps and steps[-1] in (6, 9)
    assert submit_run(load_config(toml)).failed == {}
    stats = read_marker(DataFolder(folder), "train", 0)["stats"]
    assert stats["resumed_from_step"] == steps[-1]
    assert [m["step"] for m in read_metrics(folder)] == list(range(1, 11))




def test_activation_checkpointing_and_per_block_units_match_the_plain_run(tmp_path, shards):
    """2 ranks with activation checkpointing and one FSDP unit per block == 1 rank, one unit, no
    recompute: the layout changes memory and communication, not the numbers."""
    a, failed = run_train(tmp_path, "ac", shards, tasks_per_node=2, samples=16 * 3, grad_checkpointing=True,
                          fsdp_units="block")
    assert not failed
    b, failed = run_train(tmp_path, "plain", shards, tasks_per_node=1, samples=16 * 3, fsdp_units="model")
    assert not failed
    diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(read_metrics(a), read_metrics(b))]
    assert len(diffs) == 3 and max(diffs) < 1e-5, diffs
