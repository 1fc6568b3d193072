"""Process and folder helpers shared by the harness daemons.

Daemons are always stopped by the PIDs they recorded (pid files read before
signalling, since daemons delete them as they exit), never by name: other
pytest sessions on the same machine run their own copies of the same
daemons.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

SETUP_HINT = "run scripts/test.sh once (as root) to install the test dependencies"

_OWNER_FILE = "owner"


def harness_base_dir() -> Path:
    """Root of every harness instance folder (short: unix socket paths live there)."""
    base = Path(os.environ.get("DCSLURM_TEST_TMP", "/tmp/dcslurm-test"))
    base.mkdir(parents=True, exist_ok=True)
    # munged refuses sockets in group/world-writable folders without sticky bit.
    if base.stat().st_mode & 0o777 != 0o755:
        try:
            base.chmod(0o755)
        except PermissionError:
            pass
    return base


def proc_start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (tells a live owner from a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may contain spaces, so split after ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def make_instance_dir(prefix: str) -> Path:
    """A fresh folder for one daemon set, tagged with this process as owner."""
    sweep_stale()
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=harness_base_dir()))
    d.chmod(0o755)
    (d / _OWNER_FILE).write_text(f"{os.getpid()} {proc_start_time(os.getpid())}\n")
    return d


def _owner_alive(d: Path) -> bool:
    try:
        pid_s, start = (d / _OWNER_FILE).read_text().split()
    except (OSError, ValueError):
        # Being created right now by another session, or not ours: leave it,
        # unless it is old.
        try:
            return time.time() - d.stat().st_mtime < 3600
        except OSError:
            return True
    return proc_start_time(int(pid_s)) == start


def sweep_stale() -> None:
    """Stop daemons and delete folders left by pytest sessions that died.

    Only processes whose command line names the dead session's folder are
    killed, so a reused pid is never hit.
    """
    base = harness_base_dir()
    for d in base.iterdir():
        if not d.is_dir() or d.name == "ports" or _owner_alive(d):
            continue
        for pidfile in d.rglob("*.pid"):
            pid = read_pid(pidfile)
            if pid and str(d) in proc_cmdline(pid):
                kill_pid(pid, timeout=10)
        shutil.rmtree(d, ignore_errors=True)


def kill_pid(pid: int, sig: int = signal.SIGTERM, timeout: float = 30.0) -> bool:
    """Signal ``pid`` and wait until it is gone; SIGKILL after ``timeout``.

    Returns True when the process had to be SIGKILLed.
    """
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return False
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def wait_for(
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.2,
    on_timeout: Callable[[], str] | None = None,
) -> T:
    """Poll ``check`` until it returns something truthy; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = on_timeout() if on_timeout else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail}")
        time.sleep(interval)


def tail(path: Path, lines: int = 30) -> str:
    try:
        data = path.read_bytes()[-64 * 1024 :].decode(errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(data.splitlines()[-lines:])


def logs_tail(paths: Iterable[Path], lines: int = 30) -> str:
    """Last lines of every existing log, with headers, for error messages."""
    parts = []
    for p in paths:
        if p.exists():
            parts.append(f"----- {p} (last {lines} lines) -----\n{tail(p, lines)}")
    return "\n".join(parts) if parts else "(no logs)"


def require_binary(name: str, search: Iterable[str] = ()) -> str:
    """Absolute path of ``name``; a clear error (never a skip) when it is missing."""
    for d in search:
        cand = Path(d) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin")
    if not found:
        raise RuntimeError(f"'{name}' not found: {SETUP_HINT}")
    return found
