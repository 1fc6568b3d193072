"""dcslurm.core.proctree: nothing a task starts outlives it, whichever process dies first
and however (normal exit, SIGKILL of the task, SIGKILL of its supervisor), and the
signals a task must see reach it. Real processes, checked in /proc."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from dcslurm.core import proctree
from tests.test_download_hostile import alive

# A task: leaves a grandchild that would outlive it (a plain `sleep`, no PDEATHSIG),
# prints the pids, reports SIGUSR1, then sleeps or exits with a code.
TASK = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    from dcslurm.core import proctree
    proctree.guard_group()
    g = subprocess.Popen(["sleep", "120"])
    signal.signal(signal.SIGUSR1, lambda *a: print("got USR1", flush=True))
    action = sys.argv[1]
    if action == "slow_term":  # as training does: SIGTERM starts a checkpoint, which takes a while
        signal.signal(signal.SIGTERM, lambda *a: time.sleep(120))
    print("pids", os.getpid(), g.pid, flush=True)
    if action == "exit":
        sys.exit(7)
    while True:
        time.sleep(0.05)
""")

SUPERVISOR = textwrap.dedent("""
    import sys
    from dcslurm.core import proctree
    proctree.die_with_parent_from_env()  # as the runner's main does
    sys.exit(proctree.supervise([sys.executable, sys.argv[1], sys.argv[2]]))
""")


@pytest.fixture
def scripts(tmp_path):
    (tmp_path / "task.py").write_text(TASK)
    (tmp_path / "sup.py").write_text(SUPERVISOR)
    return tmp_path


def _start(scripts, action: str) -> tuple[subprocess.Popen, list[int]]:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    sup = subprocess.Popen([sys.executable, str(scripts / "sup.py"), str(scripts / "task.py"), action],
                           stdout=subprocess.PIPE, text=True, env=env)
    line = sup.stdout.readline()
    assert line.startswith("pids"), line
    return sup, [int(x) for x in line.split()[1:]]


def _gone(pids, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while alive(pids) and time.time() < deadline:
        time.sleep(0.05)
    return not alive(pids)


def test_the_group_is_killed_when_the_task_exits(scripts):
    sup, (task, grandchild) = _start(scripts, "exit")
    assert sup.wait(timeout=30) == 7  # the task's exit code comes through
    assert _gone([task, grandchild])


def test_the_group_is_killed_when_the_task_is_sigkilled(scripts):
    sup, (task, grandchild) = _start(scripts, "sleep")
    os.kill(task, signal.SIGKILL)
    assert sup.wait(timeout=30) == 128 + signal.SIGKILL
    assert _gone([task, grandchild])


def test_a_sigkilled_supervisor_takes_the_task_and_its_orphans_with_it(scripts):
    sup, (task, grandchild) = _start(scripts, "sleep")
    os.kill(sup.pid, signal.SIGKILL)
    sup.wait(timeout=30)
    assert _gone([task, grandchild])  # PDEATHSIG for the task, the watchdog for the grandchild


def test_signals_are_forwarded_to_the_task(scripts):
    sup, (task, grandchild) = _start(scripts, "sleep")
    try:
        sup.send_signal(signal.SIGUSR1)  # SLURM's --signal before the time limit
        assert sup.stdout.readline().strip() == "got USR1"
        sup.send_signal(signal.SIGTERM)  # scancel
        assert sup.wait(timeout=30) == 128 + signal.SIGTERM
        assert _gone([task, grandchild])
    finally:
        sup.kill()


def test_spawn_session_and_wait_then_kill_group_as_the_local_executor_uses_them():
    proc = proctree.spawn_session(["bash", "-c", "sleep 120 & echo $!"], stdout=subprocess.PIPE, text=True)
    orphan = int(proc.stdout.readline())
    assert os.getpgid(orphan) == proc.pid != os.getpgid(0)
    assert proctree.wait_then_kill_group(proc) == 0
    assert _gone([orphan])


def test_die_with_parent_kills_a_worker_whose_parent_is_sigkilled(tmp_path):
    # The parent starts a worker that calls die_with_parent (as download's pool initializer does).
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import subprocess, sys, time
        w = subprocess.Popen([sys.executable, "-c",
            "from dcslurm.core import proctree; proctree.die_with_parent(); import time; "
            "print('ready', flush=True); time.sleep(120)"],
            stdout=subprocess.PIPE, text=True)
        assert w.stdout.readline() == "ready\\n"
        print(w.pid, flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    worker = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    assert _gone([worker])


def test_die_with_parent_from_env_stops_a_child_whose_parent_is_already_gone():
    dead = subprocess.Popen(["true"])
    dead.wait()
    child = subprocess.Popen([sys.executable, "-c",
                              "from dcslurm.core import proctree; proctree.die_with_parent_from_env(); "
                              "import time; time.sleep(120)"],
                             env=dict(os.environ, PYTHONPATH=os.getcwd(),
                                      **{proctree.PARENT_ENV: f"{dead.pid} {int(signal.SIGTERM)}"}))
    assert child.wait(timeout=30) == -signal.SIGTERM


def test_a_sigkilled_launcher_takes_its_tasks_at_once_even_one_slow_to_stop(scripts):
    """The local executor's place: it starts the supervisor with proctree.parent_env(). When it
    is SIGKILLed, its tasks go within seconds, even a task whose SIGTERM handler would take
    minutes (a checkpoint); a graceful stop is the launcher's to ask for while it lives."""
    launcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, subprocess, sys, time
        from dcslurm.core import proctree
        sup = subprocess.Popen([sys.executable, {str(scripts / "sup.py")!r}, {str(scripts / "task.py")!r},
                                "slow_term"], env={{**os.environ, **proctree.parent_env()}})
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    line = launcher.stdout.readline()
    assert line.startswith("pids"), line
    task, grandchild = (int(x) for x in line.split()[1:])
    launcher.kill()
    launcher.wait()
    try:
        assert _gone([task, grandchild])
    finally:
        for pid in (task, grandchild):  # on failure: no leftover for the next test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
