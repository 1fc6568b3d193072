"""The orchestrator on a real SLURM cluster (tests/infra): arrays split above
MaxArraySize, throttles, afterok chains, kills and resubmission, status
without and with accounting."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from dcslurm.core.config import load_config
from dcslurm.core.markers import done_indexes
from dcslurm.core.runs import cancel_run, run_status, submit_run
from tests.core_helpers import executions, tree_digest, wait_run_done, write_run_toml
from tests.reliability_helpers import proc_args

pytestmark = pytest.mark.slurm

OUTPUT_DIRS = ("synth/", "digest/", "summary/")


def _outputs(folder) -> dict[str, str]:
    return {k: v for k, v in tree_digest(str(folder)).items() if k.startswith(OUTPUT_DIRS)}


def _runner_pids(run_folder: str, step: str, index: int) -> list[int]:
    """PIDs of the runner processes of one task (all emulated nodes are this host)."""
    want = ["dcslurm.core.runner", run_folder, step, str(index)]
    return [int(pid) for pid in filter(str.isdigit, os.listdir("/proc"))
            if all(w in (proc_args(pid) or []) for w in want)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run on the local executor: the outputs every SLURM run must equal."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = write_run_toml(tmp / "ref.toml", str(tmp / "ref"), units=100,
                         extra={"stages": {"digest": {"resources": {"cpus_per_task": 1}}}})
    assert not submit_run(load_config(cfg)).failed
    return _outputs(tmp / "ref")


def test_hundred_task_array_throttled_completes_like_local(slurm_cluster, tmp_path, reference):
    run = tmp_path / "run dir"
    cfg_path = write_run_toml(tmp_path / "run.toml", str(run), units=100, executor="slurm",
                              extra={"slurm": {"array_throttle": 10, "time": "00:10:00"}})
    cfg = load_config(cfg_path)
    result = submit_run(cfg)
    synth_chunks = result.submission.steps["synth"].chunks
    # MaxArraySize=40 on the test cluster: 100 tasks need three submissions.
    assert [c.offset for c in synth_chunks] == [0, 39, 78]
    script = open(synth_chunks[0].script).read()
    assert "#SBATCH --array=0-38%10" in script
    wait_run_done(cfg_path, timeout=400)
    slurm_cluster.wait_jobs_done(60)
    assert _outputs(run) == reference
    _, steps = run_status(cfg.run_url, config=cfg)
    assert all(s.counts["done"] == s.n_tasks for s in steps)


def test_killed_tasks_resubmit_to_identical_outputs(slurm_cluster, tmp_path, reference):
    run = tmp_path / "run"
    cfg_path = write_run_toml(tmp_path / "run.toml", str(run), units=100, executor="slurm", sleep=1.5,
                              extra={"slurm": {"time": "00:10:00"}})
    cfg = load_config(cfg_path)
    first = submit_run(cfg)
    chunks = first.submission.steps["synth"].chunks
    folder = cfg.folder()
    deadline = time.time() + 180
    while len(done_indexes(folder, "synth")) < 15 and time.time() < deadline:
        time.sleep(0.3)
    rng = random.Random(0)
    victims = rng.sample(sorted(set(range(100)) - done_indexes(folder, "synth")), 10)
    killed_by_signal = []
    for n, index in enumerate(victims):
        chunk = next(c for c in chunks if index in c.indexes)
        pids = _runner_pids(str(run), "synth", index)
        if n % 2 == 0 and pids:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)  # the task's process dies under SLURM
            killed_by_signal.append(index)
        else:
            slurm_cluster.run("scancel", f"{chunk.job_id}_{index - chunk.offset}", check=False)
    slurm_cluster.wait_jobs_done(300)  # digest/summary are killed: their dependency can never be met
    committed = done_indexes(folder, "synth")
    assert committed.isdisjoint(victims) and len(committed) <= 90
    _, steps = run_status(cfg.run_url, config=cfg)
    synth = next(s for s in steps if s.name == "synth")
    assert synth.counts["done"] == len(committed)
    failed = {f.index: f for f in synth.failed}
    for index in killed_by_signal:
        assert index in failed and failed[index].log.endswith(".log")
    resubmitted_at = time.time()
    second = submit_run(cfg)
    assert sorted(second.pending["synth"]) == sorted(set(range(100)) - committed)
    wait_run_done(cfg_path, timeout=400)
    slurm_cluster.wait_jobs_done(60)
    assert _outputs(run) == reference
    after = [e for e in executions(str(run), "synth") if e["time"] >= resubmitted_at]
    assert {e["index"] for e in after}.isdisjoint(committed)  # nothing ran again once committed


def test_status_reports_failed_task_log_and_error_without_accounting(slurm_cluster, tmp_path):
    cfg_path = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=3, executor="slurm",
                              fail_tasks=[1])
    cfg = load_config(cfg_path)
    submit_run(cfg)
    slurm_cluster.wait_jobs_done(120)
    _, steps = run_status(cfg.run_url, config=cfg)
    synth, digest = steps[0], steps[1]
    assert synth.counts["done"] == 2 and synth.counts["failed"] == 1
    (failed,) = synth.failed
    assert "planted failure in task 1" in failed.error and os.path.exists(failed.log)
    assert digest.counts["not started"] == digest.n_tasks


def test_cancel_stops_queued_and_running_jobs(slurm_cluster, tmp_path):
    cfg_path = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=30, executor="slurm",
                              sleep=30)
    cfg = load_config(cfg_path)
    submit_run(cfg)
    deadline = time.time() + 60
    while not slurm_cluster.jobs() and time.time() < deadline:
        time.sleep(0.2)
    cancelled = cancel_run(cfg.run_url)
    assert cancelled
    slurm_cluster.wait_jobs_done(60)
    assert done_indexes(cfg.folder(), "synth") == set()


def test_status_uses_sacct_where_accounting_exists(slurm_cluster_acct, tmp_path):
    from dcslurm.core.executors.slurm import SlurmExecutor
    from dcslurm.core.submission import load_submissions

    cfg_path = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=2, executor="slurm",
                              fail_tasks=[0])
    cfg = load_config(cfg_path)
    submit_run(cfg)
    slurm_cluster_acct.wait_jobs_done(120)
    sub = load_submissions(cfg.folder())[-1]
    deadline = time.time() + 60
    states = None
    while time.time() < deadline:  # slurmdbd records job ends asynchronously
        states = SlurmExecutor(run=cfg).final_states(sub)
        if states and ("synth", 0) in states and ("synth", 1) in states:
            break
        time.sleep(1)
    assert states is not None and states[("synth", 0)] == "FAILED" and states[("synth", 1)] == "COMPLETED"
    _, steps = run_status(cfg.run_url, config=cfg)
    (failed,) = steps[0].failed
    assert failed.index == 0 and "planted failure in task 0" in failed.error
