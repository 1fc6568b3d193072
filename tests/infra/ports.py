"""Free TCP ports for test daemons, safe against concurrent pytest sessions.

Binding to port 0 and closing is racy when several sessions start daemons at
the same time, so each port handed out here is also *reserved*: an exclusive
``flock`` on ``<base>/ports/<port>.lock`` held by this process until
``release_ports`` (or process exit, when the kernel drops the lock). Every
session using this module therefore gets distinct ports. Ports are drawn
below the kernel's ephemeral range so that outgoing connections do not grab
them between the check and the daemon's bind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path

from .procs import harness_base_dir

# Lowest port we hand out; the highest is below the ephemeral range.
_LOW = 10000
_held: dict[int, int] = {}  # port -> fd of its lock file


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(low, _LOW + 2000)


def _lock_dir() -> Path:
    d = harness_base_dir() / "ports"
    d.mkdir(parents=True, exist_ok=True)
    return d


def port_is_free(port: int) -> bool:
    """True when nothing listens on ``port`` on any address (TCP)."""
    # Binding the wildcard address fails if anything is bound to 127.0.0.1
    # or 0.0.0.0 on that port; no SO_REUSEADDR so TIME_WAIT counts as busy
    # only for listeners, which is what daemons care about.
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this host
        try:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            if family == socket.AF_INET6:
                continue  # IPv6 present but unusable: ignore
            return False
        finally:
            s.close()
    return True


def _try_lock(port: int) -> int | None:
    path = _lock_dir() / f"{port}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def reserve_ports(count: int, offsets: Sequence[int] = (0,), attempts: int = 5000) -> list[int]:
    """Reserve ``count`` base ports; for each, ``base + off`` is free for all ``offsets``.

    Every ``base + off`` is locked and returned ports are distinct across
    bases (weed needs ``port`` and ``port + 10000`` for its gRPC twins).
    """
    high = _ephemeral_low() - 1 - max(offsets)
    if high <= _LOW:
        raise RuntimeError(f"no room for ports with offsets {offsets}")
    rng = random.Random(os.urandom(8))
    chosen: list[int] = []
    for _ in range(attempts):
        if len(chosen) == count:
            return chosen
        base = rng.randint(_LOW, high)
        wanted = [base + off for off in offsets]
        if any(p in _held for p in wanted):
            continue
        fds: list[tuple[int, int]] = []
        ok = True
        for p in wanted:
            fd = _try_lock(p)
            if fd is None or not port_is_free(p):
                if fd is not None:
                    os.close(fd)
                ok = False
                break
            fds.append((p, fd))
        if not ok:
            for _p, fd in fds:
                os.close(fd)
            continue
        for p, fd in fds:
            _held[p] = fd
        chosen.append(base)
    release_ports(p + off for p in chosen for off in offsets)
    raise RuntimeError(f"could not find {count} free ports with offsets {offsets}")


def free_port() -> int:
    """One reserved free port."""
    return reserve_ports(1)[0]


def release_ports(ports: Iterable[int]) -> None:
    """Drop reservations (the daemons that used the ports are gone)."""
    for p in list(ports):
        fd = _held.pop(p, None)
        if fd is not None:
            os.close(fd)
