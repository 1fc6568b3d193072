"""Training on the real SLURM cluster (tests/infra: nodes n1..n4 on this host, gloo).

- a 2-node x 1-task job trains, and its loss curve equals a 1-process run with
  the same global batch (2 accumulation steps) within 1e-4 for 20 steps, and its
  weights equal the local executor's 2-rank run bit for bit;
- `scontrol requeue` mid-run: the ranks checkpoint on SIGTERM, SLURM requeues
  the job, it resumes, and the final weights equal the uninterrupted run's;
- kill -9 of one rank: srun ends the job; resubmission resumes from the last
  complete checkpoint;
- SIGUSR2 (the time-limit warning): checkpoint, the runner requeues the job, it resumes.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from dcslurm.core import proctree
from dcslurm.core.config import load_config
from dcslurm.core.markers import read_marker
from dcslurm.core.runs import submit_run
from dcslurm.core.storage import DataFolder
from dcslurm.core.task import POLL_SLEEP_ENV
from tests.core_helpers import update_toml
from tests.test_train import assert_bit_equal, final_weights, run_train, shards  # noqa: F401 - fixture
from tests.train_helpers import read_metrics, write_train_toml

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 20
COMMON = dict(samples=16 * STEPS, checkpoint_every=100, time="00:15:00")


def slurm_toml(tmp_path, name: str, data: str, **params) -> tuple[str, str]:
    folder = str(tmp_path / name)
    kw = dict(COMMON, **params)
    time_limit = kw.pop("time")
    path = write_train_toml(tmp_path / f"{name}.toml", folder, data, nodes=2, tasks_per_node=1,
                            executor="slurm", **kw)
    update_toml(path, {"stages": {"train": {"resources": {"time": time_limit}}}})  # a resources key, not a train one
    return path, folder


def wait_committed(folder: str, cluster, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        marker = read_marker(DataFolder(folder), "train", 0)
        if marker is not None:
            return marker
        time.sleep(1)
    raise AssertionError(f"train not committed after {timeout} s; jobs {cluster.jobs()}; "
                         f"logs: {os.listdir(os.path.join(folder, 'logs', 'train'))}")


def wait_step(folder: str, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if read_metrics(folder)[-1]["step"] >= step:
                return
        except (FileNotFoundError, IndexError, json.JSONDecodeError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"step {step} not reached in {folder}")


def rank_pids(job_id: str, rank: int) -> list[int]:
    """PIDs of the task process of `rank` in SLURM job `job_id` (found by its environment): the
    runner's child that runs the stage, not its supervisor (proctree.supervise)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if (env.get(b"SLURM_JOB_ID") == job_id.encode() and env.get(b"SLURM_PROCID") == str(rank).encode()
                and b"dcslurm.core.runner" in cmd and proctree.WATCHDOG_ENV.encode() in env):
            out.append(int(pid))
    return out


@pytest.fixture(scope="module")
def local_references(tmp_path_factory, shards):
    """The same training with the local executor: 2 ranks, and 1 rank with 2 accumulation steps."""
    tmp = tmp_path_factory.mktemp("refs")
    two, failed = run_train(tmp, "two", shards, tasks_per_node=2, samples=16 * STEPS, checkpoint_every=100)
    assert not failed
    one, failed = run_train(tmp, "one", shards, tasks_per_node=1, accum=2, samples=16 * STEPS,
                            checkpoint_every=100)
    assert not failed
    return {"two": two, "one": one}


def test_two_nodes_match_one_process_and_the_local_run(slurm_cluster, tmp_path, shards, local_references):
    path, folder = slurm_toml(tmp_path, "nodes", shards)
    submit_run(load_config(path))
    marker = wait_committed(folder, slurm_cluster)
    assert marker["stats"]["world_size"] == 2
    a, b = read_metrics(folder), read_metrics(local_references["one"])
    assert [m["step"] for m in a] == list(range(1, STEPS + 1)) == [m["step"] for m in b]
    diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
    assert max(diffs) < 1e-4, diffs
    assert_bit_equal(final_weights(folder), final_weights(local_references["two"]))
    # Two distinct emulated nodes ran the ranks.
    log = open(os.path.join(folder, "logs", "train", os.listdir(os.path.join(folder, "logs", "train"))[0])).read()
    assert "rank 0/2" in log and "rank 1/2" in log


def test_scontrol_requeue_resumes_to_identical_weights(slurm_cluster, tmp_path, shards, local_references,
                                                       monkeypatch):
    path, folder = slurm_toml(tmp_path, "requeued", shards)
    monkeypatch.setenv(POLL_SLEEP_ENV, "0.5")  # each step 0.5 s slower (test-only; the job inherits it)
    sub = submit_run(load_config(path))
    (job_id,) = sub.submission.job_ids()
    wait_step(folder, 5)
    slurm_cluster.run("scontrol", "requeue", job_id)
    marker = wait_committed(folder, slurm_cluster)
    resumed = marker["stats"]["resumed_from_step"]
    assert 5 <= resumed < STEPS, marker["stats"]
    assert_bit_equal(final_weights(folder), final_weights(local_references["two"]))
    assert [m["step"] for m in read_metrics(folder)] == list(range(1, STEPS + 1))


def test_kill_9_of_one_rank_fails_and_resubmission_resumes(slurm_cluster, tmp_path, shards, local_references,
                                                          monkeypatch):
    path, folder = slurm_toml(tmp_path, "killed", shards, checkpoint_every=4, timeout_s=60)
    monkeypatch.setenv(POLL_SLEEP_ENV, "0.5")
    sub = submit_run(load_config(path))
    (job_id,) = sub.submission.job_ids()
    wait_step(folder, 10)
    pids = rank_pids(job_id, 1)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    slurm_cluster.wait_jobs_done(180)
    assert read_marker(DataFolder(folder), "train", 0) is None
    ckpts = sorted(n for n in os.listdir(os.path.join(folder, "train", "checkpoints")) if n.endswith(".json"))
    last = int(ckpts[-1][5:13])
    assert last >= 8
    submit_run(load_config(path))
    marker = wait_committed(folder, slurm_cluster)
    assert marker["stats"]["resumed_from_step"] == last
    assert_bit_equal(final_weights(folder), final_weights(local_references["two"]))


def test_time_limit_signal_checkpoints_and_the_job_requeues_itself(slurm_cluster, tmp_path, shards, monkeypatch):
    """SIGUSR2 (what the script's --signal=USR2@N sends before the time limit; here from scancel)
    makes the ranks checkpoint and rank 0's runner requeue its job, which then resumes and finishes."""
    path, folder = slurm_toml(tmp_path, "usr2", shards)
    monkeypatch.setenv(POLL_SLEEP_ENV, "0.5")
    sub = submit_run(load_config(path))
    (job_id,) = sub.submission.job_ids()
    wait_step(folder, 5)
    slurm_cluster.run("scancel", "--signal=USR2", job_id)
    marker = wait_committed(folder, slurm_cluster)
    assert 5 <= marker["stats"]["resumed_from_step"] < STEPS, marker["stats"]
    # Submitted once: only the job's own `scontrol requeue` can have started the resumed attempt.
    assert [m["step"] for m in read_metrics(folder)] == list(range(1, STEPS + 1))
