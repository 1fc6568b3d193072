"""Checkpoint and requeue as a runner protocol (dcslurm.core.task): a step declared
`checkpointable` polls ctx.should_stop(), saves and raises Preempted; the runner owns the
signals and, on SLURM, the job's requeue. Exercised with the test-only stage `ticker`
(jobs/testing), which counts ticks and checkpoints the ticks done so far.

- a simulated stop (the test-only DCSLURM_TEST_STOP_AFTER) under the local executor:
  status names the task "Preempted: stopped at tick 3 ..."; a resubmission resumes;
- a real SIGTERM through `dcslurm submit` -> local executor -> supervisor -> task;
- StopRequest: USR2/USR1 ask for a requeue, TERM only stops; the knobs come from the env;
- sbatch: --signal only for checkpointable steps, `B:` where the task is the batch shell;
- on the real SLURM cluster: the time-limit warning makes the runner requeue the job,
  which resumes and finishes with one submission.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from dcslurm.core.config import load_config
from dcslurm.core.environment import World, world_from_env
from dcslurm.core.markers import read_marker
from dcslurm.core.plan import make_plan
from dcslurm.core.plantypes import PlanInputs
from dcslurm.core.runs import run_status, submit_run
from dcslurm.core.sbatch import TaskLauncher, render_step_script
from dcslurm.core.storage import DataFolder
from dcslurm.core.task import POLL_SLEEP_ENV, STOP_AFTER_ENV, StopRequest
from dcslurm.core.taskrun import _requeue
from tests.core_helpers import write_run_toml, write_ticker_toml

PY = sys.executable


def _ticker_status(folder: str):
    (step,) = [s for s in run_status(folder)[1] if s.name == "ticker"]
    return step


def _ticks(folder: str) -> list[int]:
    with open(os.path.join(folder, "ticker", "ticks.json")) as f:
        return json.load(f)["ticks"]


def test_a_stopped_checkpointable_step_is_reported_resumable_and_resumes(tmp_path, monkeypatch):
    folder = str(tmp_path / "run")
    toml = write_ticker_toml(tmp_path / "run.toml", folder, ticks=5)
    monkeypatch.setenv(STOP_AFTER_ENV, "3")  # each attempt is "preempted" at its 3rd poll
    assert submit_run(load_config(toml)).failed == {"ticker": [0]}
    step = _ticker_status(folder)
    assert [t.index for t in step.failed] == [0]
    assert step.failed[0].error == "Preempted: stopped at tick 3: checkpoint saved"  # no requeue: local
    assert read_marker(DataFolder(folder), "ticker", 0) is None

    # The resubmission resumes at 3; its own 3rd poll is the last tick, where it finishes.
    assert submit_run(load_config(toml)).failed == {}
    assert read_marker(DataFolder(folder), "ticker", 0)["stats"]["resumed_from"] == 3
    assert _ticks(folder) == [1, 2, 3, 4, 5]
    assert _ticker_status(folder).counts["done"] == 1


def test_sigterm_reaches_the_step_through_executor_and_supervisor(tmp_path):
    folder = str(tmp_path / "run")
    toml = write_ticker_toml(tmp_path / "run.toml", folder, ticks=1000)
    env = dict(os.environ, **{POLL_SLEEP_ENV: "0.1"})
    proc = subprocess.Popen([PY, "-m", "dcslurm", "submit", "-c", toml], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = os.path.join(folder, "ticker", "progress.json")
    deadline = time.time() + 60
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be signalled"
        try:
            if json.load(open(progress))["tick"] >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    else:
        raise AssertionError("the ticker never reached tick 3")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    with open(os.path.join(folder, "ticker", "checkpoint.json")) as f:
        stopped_at = len(json.load(f)["ticks"])
    assert 3 <= stopped_at < 1000
    (failed,) = _ticker_status(folder).failed
    assert failed.error == f"Preempted: stopped at tick {stopped_at}: checkpoint saved"
    with open(failed.log) as f:
        assert "stopped on request (SIGTERM)" in f.read()

    assert submit_run(load_config(toml)).failed == {}
    assert read_marker(DataFolder(folder), "ticker", 0)["stats"]["resumed_from"] == stopped_at
    assert _ticks(folder) == list(range(1, 1001))


def test_stop_request_signals_and_test_knobs(monkeypatch):
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    try:
        for signum, requeue in ((signal.SIGUSR2, True), (signal.SIGUSR1, True), (signal.SIGTERM, False)):
            stop = StopRequest()
            assert not stop.poll()
            stop.install()
            os.kill(os.getpid(), signum)
            assert stop.poll() and stop.requeue == requeue, signum
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert not any(StopRequest().poll() for _ in range(100))  # no knob, no signal: never
    stop = StopRequest.from_env({STOP_AFTER_ENV: "3"})
    assert [stop.poll() for _ in range(4)] == [False, False, True, True] and not stop.requeue


def test_only_checkpointable_steps_get_the_time_limit_signal(tmp_path):
    def script(toml: str, step: str) -> str:
        plan = make_plan(load_config(toml), PlanInputs())
        return render_step_script(plan, plan.step(step), TaskLauncher(python="python3"), str(tmp_path / "logs"))

    ticker = script(write_ticker_toml(tmp_path / "t.toml", str(tmp_path / "t"), executor="slurm"), "ticker")
    # The single task is the batch shell (exec), so the warning must go to it: B:.
    assert "#SBATCH --signal=B:USR2@120\n" in ticker and "#SBATCH --requeue\n" in ticker
    summary = script(write_run_toml(tmp_path / "r.toml", str(tmp_path / "r"), units=2, executor="slurm"), "summary")
    assert "#SBATCH --ntasks=1\n" in summary and "--signal" not in summary  # single too, not checkpointable


def test_only_a_slurm_job_is_requeued():
    """The runner requeues a World that SLURM started (srun's ranks, or a batch script's
    array/single task), never the local executor's ranks."""
    srun = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "7",
            "SLURM_JOB_NODELIST": "n1", "DCSLURM_MASTER_ADDR": "127.0.0.1"}
    assert world_from_env(srun).slurm and world_from_env({"SLURM_JOB_ID": "7"}).slurm
    local = {"DCSLURM_RANK": "0", "DCSLURM_WORLD_SIZE": "2", "DCSLURM_JOB_ID": "local-1"}
    assert not world_from_env(local).slurm and not world_from_env({}).slurm


@pytest.mark.slurm
def test_a_failed_requeue_is_said_in_the_tasks_record(slurm_cluster):
    stop = StopRequest()
    stop._on_signal(signal.SIGUSR2, None)
    log = logging.getLogger("test")
    assert _requeue(World(job_id="999999", slurm=True), stop, log).startswith("; requeue failed: scontrol requeue "
                                                                              "999999: ")
    assert _requeue(World(job_id="999999", slurm=True, rank=1), stop, log) == ""  # rank 0 requeues
    assert _requeue(World(job_id="local-1"), stop, log) == ""  # the local executor: a rerun resumes


@pytest.mark.slurm
def test_the_time_limit_warning_makes_the_runner_requeue_the_job(slurm_cluster, tmp_path, monkeypatch):
    folder = str(tmp_path / "run")
    toml = write_ticker_toml(tmp_path / "run.toml", folder, ticks=40, executor="slurm",
                             extra='[stages.ticker.resources]\ntime = "00:10:00"\n')
    monkeypatch.setenv(POLL_SLEEP_ENV, "0.2")  # sbatch passes the environment on to the job
    sub = submit_run(load_config(toml))
    (job_id,) = sub.submission.job_ids()
    progress = os.path.join(folder, "ticker", "progress.json")
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if json.load(open(progress))["tick"] >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    else:
        raise AssertionError(f"the ticker never reached tick 3: {slurm_cluster.jobs()}")
    # What --signal=B:USR2@N sends before the time limit, sent now.
    slurm_cluster.run("scancel", "--batch", "--signal=USR2", job_id)
    deadline = time.time() + 180
    while read_marker(DataFolder(folder), "ticker", 0) is None:
        assert time.time() < deadline, f"not committed: {slurm_cluster.jobs()}"
        time.sleep(1)
    stats = read_marker(DataFolder(folder), "ticker", 0)["stats"]
    assert 3 <= stats["resumed_from"] < 40, stats
    assert _ticks(folder) == list(range(1, 41))
    # Submitted once: only the runner's `scontrol requeue` can have started the second attempt.
    logs = os.path.join(folder, "logs", "ticker")
    text = "".join(open(os.path.join(logs, n)).read() for n in os.listdir(logs))
    assert "stopped on request (SIGUSR2)" in text and "; job requeued" in text
