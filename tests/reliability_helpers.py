"""Shared by the tests that find and kill task processes (/proc readers), and test_reliability.py: compare outputs."""

from __future__ import annotations

import os
import signal


def proc_args(pid: str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return None


def proc_env(pid: str) -> dict[bytes, bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    except OSError:
        return {}


def runner_pids(run_url: str, step: str | None = None) -> list[int]:
    """PIDs of `dcslurm.core.runner` processes of a run (of one step if given), on any emulated node."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        args = proc_args(pid)
        if not args or "dcslurm.core.runner" not in args or run_url not in args:
            continue
        if step is None or step in args:
            pids.append(int(pid))
    return pids


def pids_on_node(node: str) -> list[int]:
    """PIDs of every job process SLURM started on emulated node `node` (found by SLURMD_NODENAME)."""
    want = node.encode()
    return [int(pid) for pid in filter(str.isdigit, os.listdir("/proc"))
            if int(pid) != os.getpid() and proc_env(pid).get(b"SLURMD_NODENAME") == want]


def kill_all(pids: list[int]) -> list[int]:
    """SIGKILL each pid (a crash); returns those that were alive."""
    killed = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


def only_outputs(digest: dict[str, str], stage_dirs: tuple[str, ...]) -> dict[str, str]:
    """The entries of a tree digest under the stages' output folders."""
    return {k: v for k, v in digest.items() if k.startswith(stage_dirs)}


def _ppid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
    return int(stat[stat.rindex(b")") + 2:].split()[1])


def process_tree(root: int) -> dict[int, tuple[int, list[str]]]:
    """`root` and every live descendant of it (walked through /proc by parent pid): pid -> (ppid, argv)."""
    children: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        ppid = _ppid(pid)
        if ppid is not None:
            children.setdefault(ppid, []).append(int(pid))
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        args = proc_args(str(pid))
        if not args or not args[0]:  # gone, or a zombie (no cmdline): nothing to kill
            continue
        tree[pid] = (_ppid(str(pid)) or 0, args)
        todo.extend(children.get(pid, []))
    return tree


def pids_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment has name=value: a run's processes, orphans included
    (an orphan is re-parented to init, so a walk from its old parent no longer finds it)."""
    key, want = name.encode(), value.encode()
    return [int(pid) for pid in filter(str.isdigit, os.listdir("/proc"))
            if int(pid) != os.getpid() and proc_env(pid).get(key) == want and (proc_args(pid) or [""])[0]]


def proc_env_value(pid: int, name: str) -> str | None:
    value = proc_env(str(pid)).get(name.encode())
    return None if value is None else value.decode(errors="replace")
