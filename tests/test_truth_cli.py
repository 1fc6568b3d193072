"""The CLI, submit and status tell the truth (issue 16 items 1, 6, 8, 11, 12; issue 17 item 6):
exit codes through the real console script, a lock against two submits at once,
an squeue that fails is "unknown" (never "nothing is running"), one-line errors
for a full disk and a read-only log folder, and the local executor's status
(stopped before start, killed by a signal, cancel ids)."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from dcslurm.core.config import load_config
from dcslurm.core.errors import UserError
from dcslurm.core.plan import PLAN_FILE
from dcslurm.core.runs import RUN_FILE, cancel_run, plan_run, run_status, submit_run
from dcslurm.core.submission import JobChunk, StepSubmission, Submission, load_submissions, save_submission
from tests.core_helpers import update_toml, write_run_toml

DCSLURM = os.path.join(os.path.dirname(sys.executable), "dcslurm")


def _cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([DCSLURM, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _children_running(ppid: int, word: str) -> list[int]:
    """PIDs whose parent is `ppid` and whose command line holds `word`."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if parent == ppid and word in cmd:
            out.append(int(pid))
    return out


def _set_executor(cfg_path: str, line: str) -> None:
    """Add `line` to the [executor] table of a run.toml from write_run_toml."""
    update_toml(cfg_path, f"[executor]\n{line}\n")


def _wait_for(pred, timeout: float = 60.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# -- item 1: exit codes -------------------------------------------------------------------

def test_submit_exit_code_is_0_when_done_and_1_when_a_task_failed(tmp_path):
    ok = write_run_toml(tmp_path / "ok.toml", str(tmp_path / "ok"), units=1)
    proc = _cli("submit", "-c", ok)
    assert proc.returncode == 0, proc.stderr
    bad = write_run_toml(tmp_path / "bad.toml", str(tmp_path / "bad"), units=2, fail_tasks=[1])
    proc = _cli("submit", "-c", bad)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "synth: 1 tasks failed" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [["filter", "run"], ["assets", "verify"], ["submit"],
                                  ["status", "--no-such-option", "x"]])
def test_missing_or_unknown_option_is_a_usage_error_exit_2(argv):
    proc = _cli(*argv)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "Usage: dcslurm" in proc.stderr and "Error:" in proc.stderr


# -- item 12: the local executor's status and cancel --------------------------------------

def test_output_into_a_closed_pipe_ends_without_a_traceback():
    """`dcslurm scales | head -1`: the reader goes away; the CLI stops quietly (exit 1, as rich
    does), never a traceback (once: an AttributeError on typer._click's missing Abort)."""
    proc = subprocess.Popen([DCSLURM, "scales"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "COLUMNS": "80"})
    proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does once it has its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 1)
    assert "Traceback" not in err, err


def test_sigkilled_local_task_is_reported_as_killed_by_signal(tmp_path):
    cfg = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=1, sleep=60)
    sub = subprocess.Popen([DCSLURM, "submit", "-c", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        (task,) = _wait_for(lambda: _children_running(sub.pid, "dcslurm.core.runner"), what="the task")
        time.sleep(1.0)  # let it log a few INFO lines: the report must not be the last of them
        os.kill(task, signal.SIGKILL)
        assert sub.wait(60) == 1
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    _, steps = run_status(str(tmp_path / "run"))
    (failed,) = steps[0].failed
    assert "killed by signal 9 (SIGKILL)" in failed.error, failed.error


def test_tasks_stopped_before_they_started_are_not_started_and_cancel_names_each_job_once(tmp_path):
    cfg = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=3, sleep=60)
    _set_executor(cfg, "max_parallel = 1")
    sub = subprocess.Popen([DCSLURM, "submit", "-c", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: _children_running(sub.pid, "dcslurm.core.runner"), what="the first task")
        cancelled = cancel_run(str(tmp_path / "run"))
        assert cancelled == [f"local pid {sub.pid}"]
        sub.wait(60)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    _, steps = run_status(str(tmp_path / "run"))
    synth = steps[0]
    assert synth.counts["failed"] == 1 and synth.counts["not started"] == 2, synth.counts
    assert "signal" in synth.failed[0].error or "cancel" in synth.failed[0].error, synth.failed[0].error
    assert steps[1].counts["not started"] == steps[1].n_tasks and not steps[1].failed


# -- item 8: squeue failing is "unknown" ------------------------------------------------------

def _fake_slurm_bin(tmp_path, squeue_rc: int = 1) -> str:
    """A PATH folder with an squeue that cannot reach the controller and an sbatch that would queue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(
        "#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller (connect failure)' >&2\n"
        f"exit {squeue_rc}\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho queued >> {tmp_path}/sbatch-calls\necho 4242\n")
    (bin_dir / "sacct").write_text("#!/bin/sh\nexit 1\n")
    for name in ("squeue", "sbatch", "sacct"):
        os.chmod(bin_dir / name, 0o755)
    return str(bin_dir)


def _slurm_run_with_queued_jobs(tmp_path) -> str:
    """A run folder whose submission record says synth's 3 tasks were queued as job 100."""
    cfg_path = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=3, executor="slurm",
                              extra={"slurm": {"max_array_size": 1000}})
    cfg = load_config(cfg_path)
    plan = plan_run(cfg)
    run = cfg.folder()
    run.write_json(RUN_FILE, {"fingerprint": cfg.fingerprint(), "fingerprint_hash": cfg.fingerprint_hash(),
                              "config_path": cfg_path, "created": time.time()})
    run.write_text(PLAN_FILE, plan.to_json())
    logs = tmp_path / "logs" / "synth"
    logs.mkdir(parents=True)
    (logs / "100_0.log").write_text("INFO started\n")  # a running task has a log already
    save_submission(run, Submission(executor="slurm", steps={"synth": StepSubmission(
        "synth", str(logs), [JobChunk("100", [0, 1, 2], 0, True)])}))
    return cfg_path


def test_squeue_failure_makes_status_say_unknown_and_submit_refuse(tmp_path, monkeypatch):
    cfg_path = _slurm_run_with_queued_jobs(tmp_path)
    monkeypatch.setenv("PATH", _fake_slurm_bin(tmp_path) + os.pathsep + os.environ["PATH"])
    _, steps = run_status(str(tmp_path / "run"))
    synth = steps[0]
    assert synth.counts["failed"] == 0 and synth.counts["not started"] == 0, synth.counts
    assert synth.counts["unknown"] == 3
    assert "cannot reach SLURM" in synth.unknown_reason and "Unable to contact" in synth.unknown_reason
    with pytest.raises(UserError, match=r"cannot tell whether .* still queued or running"):
        submit_run(load_config(cfg_path))
    assert not (tmp_path / "sbatch-calls").exists()  # nothing queued twice
    proc = _cli("status", str(tmp_path / "run"), env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 0, proc.stderr
    assert "cannot reach SLURM (squeue: " in proc.stdout and "running/pending unknown" in proc.stdout
    proc = _cli("submit", "-c", cfg_path, env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "cannot tell" in proc.stderr, proc.stderr


def test_squeue_that_says_a_job_left_the_queue_is_still_fine(tmp_path, monkeypatch):
    _slurm_run_with_queued_jobs(tmp_path)
    bin_dir = tmp_path / "bin2"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    os.chmod(bin_dir / "squeue", 0o755)
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ["PATH"])
    _, steps = run_status(str(tmp_path / "run"))
    assert steps[0].counts["unknown"] == 0 and not steps[0].unknown_reason
    assert steps[0].counts["failed"] == 1 and steps[0].counts["not started"] == 2  # only task 0 left a log


# -- item 11: one line, naming the path --------------------------------------------------------

def test_disk_full_while_saving_the_submission_record_is_one_line(tmp_path, monkeypatch, capsys):
    from dcslurm import cli
    from dcslurm.core import storage

    cfg = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=1)
    real = storage.DataFolder.write_bytes

    def full(self, rel, data):
        if rel.startswith("_submissions/"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(self.url, ".tmp-x"))
        return real(self, rel, data)

    monkeypatch.setattr(storage.DataFolder, "write_bytes", full)
    monkeypatch.setattr(sys, "argv", ["dcslurm", "submit", "-c", cfg])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"dcslurm: error: {tmp_path / 'run'}/_submissions/0001.json: ")
    assert "No space left on device" in err[-1]


@pytest.fixture
def read_only_dir(tmp_path):
    """A really read-only folder (root ignores permission bits): a read-only tmpfs."""
    path = tmp_path / "ro"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_read_only_log_dir_is_one_line_naming_it(tmp_path, read_only_dir, executor, monkeypatch):
    if executor == "slurm":
        monkeypatch.setenv("PATH", _fake_slurm_bin(tmp_path) + os.pathsep + os.environ["PATH"])
    cfg = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=1, executor=executor,
                         extra={"slurm": {"max_array_size": 1000}})
    _set_executor(cfg, f'log_dir = "{read_only_dir}/logs"')
    proc = _cli("submit", "-c", cfg, env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"dcslurm: error: {read_only_dir}/logs") and "read-only" in proc.stderr
    assert not (tmp_path / "sbatch-calls").exists()


# -- item 6: two submits of one run folder at once ---------------------------------------------

def _two_submits_at_once(cfg_path: str, monkeypatch) -> list:
    """Two submit_run calls in threads, both held just past the checks until the other
    arrives there too (at most 3 s): the race of two submits at the same moment, made certain."""
    import dcslurm.core.runs as runs

    arrived = []
    cond = threading.Condition()
    real = runs.pending_tasks

    def pending_tasks_after_the_other(run, plan):
        with cond:
            arrived.append(1)
            cond.notify_all()
            cond.wait_for(lambda: len(arrived) >= 2, timeout=3)
        return real(run, plan)

    monkeypatch.setattr(runs, "pending_tasks", pending_tasks_after_the_other)
    results: list = [None, None]

    def one(n):
        try:
            results[n] = submit_run(load_config(cfg_path))
        except UserError as exc:
            results[n] = exc

    threads = [threading.Thread(target=one, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def test_two_submits_at_once_one_runs_the_other_is_refused_local(tmp_path, monkeypatch):
    cfg = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=2)
    results = _two_submits_at_once(cfg, monkeypatch)
    refused = [r for r in results if isinstance(r, UserError)]
    assert len(refused) == 1, results
    line = str(refused[0])
    assert line.startswith(f"{tmp_path / 'run'}: another submit of this run folder is under way")
    assert f"host {socket.gethostname()} pid {os.getpid()} since " in line
    execs = os.listdir(tmp_path / "run" / "synth" / "_executions")
    assert len(execs) == 2  # each task ran once
    assert len(load_submissions(load_config(cfg).folder())) == 1
    assert not os.path.exists(tmp_path / "run" / "_submit.lock")  # released


def test_stale_lock_of_a_dead_submit_on_this_host_is_taken_over(tmp_path):
    cfg = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=1)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "_submit.lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": dead.pid, "time": time.time() - 5}))
    assert not submit_run(load_config(cfg)).failed


def test_lock_held_on_another_host_is_refused_saying_how_to_clear(tmp_path):
    cfg = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "_submit.lock").write_text(json.dumps(
        {"host": "elsewhere-node", "pid": 1234, "time": time.time() - 5}))
    with pytest.raises(UserError, match=r"host elsewhere-node pid 1234 .* remove .*_submit.lock"):
        submit_run(load_config(cfg))


@pytest.mark.s3
def test_two_submits_at_once_on_s3_one_is_refused(tmp_path, s3_bucket, s3_server, monkeypatch):
    run_url = f"{s3_bucket}/run"
    cfg = write_run_toml(tmp_path / "run.toml", run_url, units=2,
                         extra={"storage": {"endpoint_url": s3_server.endpoint_url}})
    _set_executor(cfg, f'log_dir = "{tmp_path}/logs"')
    results = _two_submits_at_once(cfg, monkeypatch)
    refused = [r for r in results if isinstance(r, UserError)]
    assert len(refused) == 1, results
    assert str(refused[0]).startswith(f"{run_url}: another submit of this run folder is under way")
    run = load_config(cfg).folder()
    assert len(run.list("synth/_executions")) == 2 and len(load_submissions(run)) == 1
    assert not run.exists("_submit.lock")


# -- issue 17 item 6: a subset of the stages is the same run ----------------------------------

def test_submitting_a_subset_of_the_stages_resumes_the_same_run(tmp_path):
    cfg = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=2)
    assert not submit_run(load_config(cfg, stages=["synth"])).failed  # first a part of the run...
    assert not submit_run(load_config(cfg)).failed  # ...then all of it
    again = submit_run(load_config(cfg, stages=["synth", "digest"]))  # a subset once all ran: nothing to do
    assert again.pending == {"synth": [], "digest": []}
    stored = json.load(open(tmp_path / "run" / RUN_FILE))["fingerprint"]["stages"]
    assert set(stored) == {"synth", "digest", "summary"}  # run.json keeps every stage the run has had
    # A stage whose parameters changed is still refused, subset or not.
    changed = write_run_toml(tmp_path / "changed.toml", str(tmp_path / "run"), units=3)
    with pytest.raises(UserError, match=r"created by another config .* differs in stages.synth.units"):
        submit_run(load_config(changed, stages=["synth"]))
