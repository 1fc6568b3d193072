"""Process lifetime: nothing a task starts outlives it.

The one place that knows process groups and PR_SET_PDEATHSIG. Three layers:

- The local executor starts every task in its own session (`spawn_session`) and,
  when the task's main process exits however it exits, SIGKILLs what is left of
  that session's process group (`kill_group`).
- On SLURM nothing does that for us (proctrack/linuxproc loses orphans), so the
  runner's `main()` is a small supervisor (`supervise`): it runs the task in a
  child process that leads a new session, forwards the signals a task must see
  (SLURM's --signal USR1, scancel's TERM, ...) to it, and when the child exits
  SIGKILLs the child's whole group. The child dies with the supervisor
  (PR_SET_PDEATHSIG), and a watchdog process inside the child's group holds the
  read end of a pipe whose only write end is the supervisor's: when the
  supervisor dies, even by SIGKILL, the kernel closes that end and the watchdog
  SIGKILLs the group, grandchildren included.
- Worker pools of a task call `die_with_parent` in their initializer, so a worker
  never outlives the task process that started it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h

# What a task must see: scancel / the local executor's cancel (TERM, INT, HUP) and
# SLURM's --signal before the time limit (USR2, USR1: the runner stops a checkpointable step and requeues).
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)

# The watchdog: blocks on a pipe until its writer (the supervisor) is gone, then
# SIGKILLs its own process group (the task and everything the task started). It
# imports nothing but os, so it costs ~10 ms and a few MB.
_WATCHDOG = ("import os,signal\n"
             "fd=int(os.environ['DCSLURM_WATCHDOG_FD'])\n"
             "while os.read(fd,1): pass\n"
             "os.killpg(0,signal.SIGKILL)\n")


PARENT_ENV = "DCSLURM_DIE_WITH_PARENT"  # "PID SIGNAL": set by a parent that wants its task gone with it


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux).

    The kernel ties this to the parent *thread*: call it in processes started from
    a thread that lives as long as they should (a pool's main or manager thread).
    `parent`: the pid of the process whose death should end this one, when a launcher
    (apptainer's starter) may sit between them; if it is already gone, `sig` is sent
    now. A no-op where prctl does not exist.
    """
    if not sys.platform.startswith("linux"):
        return
    ppid = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # The parent may have died before the prctl: then nobody would send it any more.
    if os.getppid() != ppid or (parent is not None and not alive(parent)):
        os.kill(os.getpid(), sig)


def alive(pid: int) -> bool:
    """True while process `pid` exists (a zombie included); False for pid <= 0."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def spawn_session(argv: list[str], **popen) -> subprocess.Popen:
    """Popen(argv) as the leader of a new session (and so of a new process group)."""
    return subprocess.Popen(argv, start_new_session=True, **popen)


def parent_env(sig: int = signal.SIGKILL) -> dict:
    """Environment asking a child that calls `die_with_parent_from_env` to get `sig`
    when this process dies. For parents with threads, where a preexec_fn is unsafe.

    SIGKILL by default: a parent that meant its children to stop gracefully has told
    them so and waited for them already (the local executor on TERM, INT and HUP);
    when it dies any other way, nothing is left to wait for a checkpoint to finish."""
    return {PARENT_ENV: f"{os.getpid()} {int(sig)}"}


def die_with_parent_from_env() -> None:
    value = os.environ.pop(PARENT_ENV, "")
    if value:
        pid, sig = (int(v) for v in value.split())
        die_with_parent(sig, parent=pid)


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Signal every process of group `pgid`; a group that is already gone is fine."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_then_kill_group(proc: subprocess.Popen) -> int:
    """Wait for a session leader from `spawn_session` to exit, SIGKILL the rest of its
    group, and return its exit code.

    The group is killed before the leader is reaped: until then its zombie keeps the
    group id from being reused by an unrelated process.
    """
    while True:
        try:
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            break
        except ChildProcessError:  # already reaped elsewhere (Popen.poll in another thread)
            break
        except InterruptedError:
            continue
    kill_group(proc.pid)
    return proc.wait()


WATCHDOG_ENV = "DCSLURM_SUPERVISOR_FD"


def supervise(argv: list[str], env: dict | None = None) -> int:
    """Run `argv` as a session leader that dies with this process; return its exit code.

    Signals in FORWARDED are passed on to the child; when it exits its group is
    SIGKILLed. A child killed by a signal gives 128 + signal, as a shell reports it.
    The child should call `guard_group()` first thing.
    """
    read_fd, write_fd = os.pipe()  # the write end stays here, and only here (close_fds)
    child_env = dict(os.environ if env is None else env, **{WATCHDOG_ENV: str(read_fd)})
    try:
        child = spawn_session(argv, env=child_env, pass_fds=(read_fd,), preexec_fn=die_with_parent)
    finally:
        os.close(read_fd)

    def forward(signum, frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        code = wait_then_kill_group(child)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(write_fd)
    return 128 - code if code < 0 else code


def guard_group() -> subprocess.Popen | None:
    """In a child of `supervise`: start the watchdog of this process's group.

    The watchdog holds the read end of the supervisor's pipe; the supervisor holds
    the only write end. When the supervisor dies, however it dies, the watchdog
    reads EOF and SIGKILLs this group: this process (PDEATHSIG got it already) and
    every descendant that stayed in the group, orphans included.
    """
    fd = os.environ.pop(WATCHDOG_ENV, "")
    if not fd:
        return None
    try:
        return subprocess.Popen([sys.executable, "-S", "-c", _WATCHDOG], pass_fds=(int(fd),),
                                env={"DCSLURM_WATCHDOG_FD": fd}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL)
    finally:
        os.close(int(fd))
