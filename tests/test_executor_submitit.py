"""`[executor] kind = "submitit"` (issue 21): the runner through submitit's CommandFunction,
arrays through map_array per MaxArraySize chunk, afterok between steps; outputs identical to
the local and sbatch executors'; status and cancel from the run folder alone."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest

submitit = pytest.importorskip("submitit")

from dcslurm.core.config import load_config  # noqa: E402
from dcslurm.core.errors import UserError  # noqa: E402
from dcslurm.core.executors import make_executor  # noqa: E402
from dcslurm.core.markers import done_indexes  # noqa: E402
from dcslurm.core.runs import cancel_run, plan_run, run_status, submit_run  # noqa: E402
from dcslurm.core.submission import load_submissions  # noqa: E402
from tests.core_helpers import tree_digest, update_toml, wait_run_done, write_run_toml  # noqa: E402
from tests.reliability_helpers import proc_args  # noqa: E402

OUTPUT_DIRS = ("synth/", "digest/", "summary/")


def _outputs(folder) -> dict[str, str]:
    return {k: v for k, v in tree_digest(str(folder)).items() if k.startswith(OUTPUT_DIRS)}


def _submitit_toml(path, folder, cluster: str, executor_keys: str = "", **kw) -> str:
    cfg_path = write_run_toml(path, str(folder), executor="submitit", **kw)
    return update_toml(cfg_path, f'[executor]\nsubmitit_cluster = "{cluster}"\n{executor_keys}')


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run on the local executor: what every other executor must write."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = write_run_toml(tmp / "ref.toml", str(tmp / "ref"), units=4)
    assert not submit_run(load_config(cfg)).failed
    return _outputs(tmp / "ref")


# -- submitit's LocalExecutor: fast, no cluster -------------------------------------------

def test_local_cluster_writes_what_the_local_executor_writes(tmp_path, reference):
    cfg_path = _submitit_toml(tmp_path / "run.toml", tmp_path / "run", "local", units=4,
                              executor_keys="max_parallel = 2\n")
    result = submit_run(load_config(cfg_path))
    assert not result.failed
    assert _outputs(tmp_path / "run") == reference
    (sub,) = load_submissions(load_config(cfg_path).folder())
    assert sub.executor == "submitit" and sub.finished
    # One submitit job per task, each with its own log; markers say done.
    synth = sub.steps["synth"]
    assert sorted(i for c in synth.chunks for i in c.indexes) == [0, 1, 2, 3]
    _, steps = run_status(str(tmp_path / "run"))
    assert all(s.counts["done"] == s.n_tasks for s in steps)
    log = make_executor("submitit").log_path(sub, "synth", synth.chunks[0], synth.chunks[0].indexes[0])
    assert log.endswith("_0_log.err") and "task synth[" in open(log).read()


def test_local_cluster_failed_task_stops_the_run_and_status_names_it(tmp_path):
    cfg_path = _submitit_toml(tmp_path / "run.toml", tmp_path / "run", "local", units=3, fail_tasks=[1])
    result = submit_run(load_config(cfg_path))
    assert result.failed == {"synth": [1]}
    _, steps = run_status(str(tmp_path / "run"))
    synth, digest = steps[0], steps[1]
    assert synth.counts["done"] == 2 and synth.counts["failed"] == 1, synth.counts
    (failed,) = synth.failed
    assert "planted failure in task 1" in failed.error and failed.log.endswith("_0_log.err")
    assert digest.counts["not started"] == digest.n_tasks  # as afterok: never started


def _processes_of(folder) -> dict[int, list[str]]:
    """pid -> argv of the processes whose command line names a path in `folder`: the runners,
    submitit's controllers and job wrappers (their folder is the step's log folder)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        args = proc_args(pid) or []
        if any(a == str(folder) or a.startswith(f"{folder}/") for a in args):
            out[int(pid)] = args
    return out


def test_local_cluster_cancel_stops_every_task(tmp_path):
    run = tmp_path / "run"
    cfg_path = _submitit_toml(tmp_path / "run.toml", run, "local", units=2, sleep=120,
                              executor_keys="max_parallel = 2\n")
    with open(tmp_path / "submit.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dcslurm", "submit", "-c", cfg_path], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:  # both tasks under way: a runner supervisor and its task each
            if sum("dcslurm.core.runner" in a for a in _processes_of(run).values()) >= 4:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"tasks not started: {(tmp_path / 'submit.log').read_text()[-2000:]}")
        assert cancel_run(str(run)) == [f"submitit local pid {proc.pid}"]
        assert proc.wait(timeout=60) != 0
        deadline = time.time() + 30
        while _processes_of(run) and time.time() < deadline:
            time.sleep(0.5)
        assert _processes_of(run) == {}  # nothing the run started outlives it
    finally:
        if proc.poll() is None:
            proc.kill()
    assert done_indexes(load_config(cfg_path).folder(), "synth") == set()
    _, steps = run_status(str(run))
    assert steps[0].counts["running"] + steps[0].counts["pending"] == 0 and steps[0].counts["done"] == 0


def test_dry_run_writes_the_sbatch_executors_scripts(tmp_path):
    cfg_path = _submitit_toml(tmp_path / "run.toml", tmp_path / "run", "slurm", units=3)
    result = submit_run(load_config(cfg_path), dry_run=True, script_dir=str(tmp_path / "scripts"))
    assert not result.submission.job_ids()
    assert sorted(os.listdir(tmp_path / "scripts")) == ["digest.0000.sbatch", "submit.sh", "summary.sbatch",
                                                        "synth.0000.sbatch"]


def test_missing_submitit_is_one_line(tmp_path, monkeypatch):
    cfg_path = _submitit_toml(tmp_path / "run.toml", tmp_path / "run", "local", units=1)
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'dcslurm\[submitit\]'"):
        submit_run(load_config(cfg_path))


def test_sbatch_parameters_match_the_sbatch_executor(tmp_path):
    """What submitit writes for a step: resources, %throttle, afterok, requeue, signal."""
    from submitit.slurm.slurm import _make_sbatch_string

    cfg_path = _submitit_toml(
        tmp_path / "run.toml", tmp_path / "run", "slurm", units=10,
        extra='[slurm]\npartition = "gpu"\naccount = "proj"\nqos = "high"\ntime = "01:30:00"\nmem = "4G"\n'
              'array_throttle = 3\nsignal_seconds = 60\nextra_sbatch = ["--exclusive", "--comment=x y"]\n'
              'setup = ["module load cuda"]\n')
    cfg = load_config(cfg_path)
    plan = plan_run(cfg)
    executor = make_executor("submitit", run=cfg)
    step = plan.step("synth")
    ex = executor._executor(submitit, plan, step, str(tmp_path / "logs"), ["101", "102"], 10)
    text = _make_sbatch_string(command="CMD", folder=str(tmp_path / "logs"), map_count=10, **ex._executor.parameters)
    for line in ("--partition=gpu", "--account=proj", "--qos=high", "--time=01:30:00", "--mem=4G",
                 "--array=0-9%3", "--dependency=afterok:101:102", "--requeue", "--kill-on-invalid-dep=yes",
                 "--signal=USR2@60", "--exclusive", "--comment='x y'", "--job-name=dcslurm.run.synth",
                 "--cpus-per-task=1", "--nodes=1", "--ntasks-per-node=1"):
        assert f"#SBATCH {line}\n" in text, (line, text)
    assert "module load cuda" in text
    short = dataclasses.replace(step, resources=dataclasses.replace(step.resources, extra_sbatch=["-p gpu"]))
    with pytest.raises(UserError, match="long options"):
        executor._executor(submitit, plan, short, str(tmp_path / "logs"), [], 10)
    with pytest.raises(UserError, match="must not contain '%'"):
        executor._executor(submitit, plan, step, str(tmp_path / "logs 50%"), [], 10)


def test_runner_command_carries_storage_and_container_prefix(tmp_path):
    cfg_path = _submitit_toml(tmp_path / "run.toml", tmp_path / "run", "slurm", units=2)
    cfg = load_config(cfg_path)
    plan = plan_run(cfg)
    func = make_executor("submitit", run=cfg)._function(submitit, plan, plan.step("synth"))
    assert isinstance(func, submitit.helpers.CommandFunction)
    words = func.command
    assert words[0] == "env" and words[1].startswith("DCSLURM_STORAGE=")
    assert words[-4:] == ["-m", "dcslurm.core.runner", plan.run_url, "synth"]
    # With [container] enabled: the apptainer prefix dcslurm.core.containers builds, before the image's python.
    from dcslurm.core.containers import exec_prefix

    cfg.container.enabled, cfg.container.check_host = True, False  # as `dcslurm render`: no images here
    func = make_executor("submitit", run=cfg)._function(submitit, plan, plan.step("synth"))
    prefix, _ = exec_prefix(cfg, False)
    assert func.command[2:] == [*prefix, "python3", "-m", "dcslurm.core.runner", plan.run_url, "synth"]


# -- the real test SLURM cluster ---------------------------------------------------------

@pytest.mark.slurm
def test_slurm_arrays_chunks_afterok_and_outputs_like_sbatch(slurm_cluster, tmp_path, reference):
    # max_array_size 3: array ids 0..1, so 4 tasks are cut into [0, 1], [2, 3] (offsets 0 and 2).
    cfg_path = _submitit_toml(tmp_path / "run.toml", tmp_path / "run", "slurm", units=4, sleep=3,
                              extra='[slurm]\ntime = "00:05:00"\nmax_array_size = 3\n')
    cfg = load_config(cfg_path)
    result = submit_run(cfg)
    sub = result.submission
    synth, digest = sub.steps["synth"], sub.steps["digest"]
    assert [c.indexes for c in synth.chunks] == [[0, 1], [2, 3]] and all(c.array for c in synth.chunks)
    shown = slurm_cluster.run("scontrol", "show", "job", digest.chunks[0].job_id).stdout
    assert f"Dependency=afterok:{synth.chunks[0].job_id}" in shown, shown
    assert f"{synth.chunks[1].job_id}" in shown.split("Dependency=", 1)[1].split()[0], shown
    _, steps = run_status(cfg.run_url)  # from the run folder alone: squeue on the recorded ids
    assert steps[0].counts["running"] + steps[0].counts["pending"] + steps[0].counts["done"] == 4
    wait_run_done(cfg_path, timeout=300)
    slurm_cluster.wait_jobs_done(60)
    assert _outputs(tmp_path / "run") == reference
    # The sbatch executor on the same cluster writes the same.
    ref_path = write_run_toml(tmp_path / "sbatch.toml", str(tmp_path / "sbatch"), units=4, executor="slurm",
                              extra='[slurm]\ntime = "00:05:00"\n')
    submit_run(load_config(ref_path))
    wait_run_done(ref_path, timeout=300)
    slurm_cluster.wait_jobs_done(60)
    assert _outputs(tmp_path / "sbatch") == _outputs(tmp_path / "run")
    log = make_executor("submitit").log_path(sub, "synth", synth.chunks[1], 3)
    assert log.endswith(f"{synth.chunks[1].job_id}_1_0_log.err") and "task synth[3]" in open(log).read()


@pytest.mark.slurm
def test_slurm_failed_task_status_and_cancel_without_config(slurm_cluster, tmp_path):
    cfg_path = _submitit_toml(tmp_path / "run.toml", tmp_path / "run", "slurm", units=3, fail_tasks=[1],
                              extra='[slurm]\ntime = "00:05:00"\n')
    cfg = load_config(cfg_path)
    submit_run(cfg)
    slurm_cluster.wait_jobs_done(120)
    _, steps = run_status(cfg.run_url)
    synth, digest = steps[0], steps[1]
    assert synth.counts["done"] == 2 and synth.counts["failed"] == 1, synth.counts
    (failed,) = synth.failed
    assert "planted failure in task 1" in failed.error and os.path.exists(failed.log)
    assert digest.counts["not started"] == digest.n_tasks  # afterok never met: kill-on-invalid-dep

    # cancel from the folder alone: scancel of the recorded ids.
    cfg_path = _submitit_toml(tmp_path / "long.toml", tmp_path / "long", "slurm", units=6, sleep=30,
                              extra='[slurm]\ntime = "00:05:00"\n')
    cfg = load_config(cfg_path)
    sub = submit_run(cfg).submission
    deadline = time.time() + 60
    while not slurm_cluster.jobs() and time.time() < deadline:
        time.sleep(0.2)
    assert sorted(cancel_run(cfg.run_url)) == sorted(sub.job_ids())
    slurm_cluster.wait_jobs_done(60)
    assert done_indexes(cfg.folder(), "synth") == set()
    _, steps = run_status(cfg.run_url)
    assert steps[0].counts["running"] + steps[0].counts["pending"] == 0



@pytest.mark.slurm
def test_slurm_accounting_states_map_to_task_indexes(slurm_cluster_acct, tmp_path):
    # Chunks [0, 1] (an array) and [2] (a plain job: map_array of one task): sacct's rows
    # must land on the task each array id ran.
    cfg_path = _submitit_toml(tmp_path / "run.toml", tmp_path / "run", "slurm", units=3, fail_tasks=[1],
                              extra='[slurm]\ntime = "00:05:00"\nmax_array_size = 3\n')
    cfg = load_config(cfg_path)
    sub = submit_run(cfg).submission
    assert [(c.indexes, c.array) for c in sub.steps["synth"].chunks] == [([0, 1], True), ([2], False)]
    slurm_cluster_acct.wait_jobs_done(120)
    executor = make_executor("submitit")
    deadline = time.time() + 60
    states = None
    while time.time() < deadline:  # slurmdbd records job ends asynchronously
        states = executor.final_states(load_submissions(cfg.folder())[-1])
        if states and all(("synth", i) in states for i in range(3)):
            break
        time.sleep(1)
    assert states and [states[("synth", i)] for i in range(3)] == ["COMPLETED", "FAILED", "COMPLETED"], states
