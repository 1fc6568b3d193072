"""All reads, writes, listings and commits go through `DataFolder`.

A `DataFolder` is a URL (`/local/path`, `file:///...`, `s3://bucket/prefix`)
plus fsspec storage options. It is the one place that knows:

- how a URL becomes a filesystem (s3fs for `s3://`, the local one otherwise);
- how an output is committed: written under a temporary name and renamed
  (locally: `os.replace`, atomic on POSIX) or uploaded as one object (S3: an
  object appears only when its PUT or multipart upload completes, so a crash
  never leaves a partial object under the final key);
- which errors are transient and retried, and how a storage failure becomes
  a one-line error naming the URL.

Credentials are never passed here: s3fs/botocore take them from the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import fsspec

from dcslurm.core.errors import StorageError

T = TypeVar("T")

# Exceptions worth a retry: connection drops and throttling. botocore's
# EndpointConnectionError is not an OSError, so it is matched by name.
_TRANSIENT_NAMES = {
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ResponseStreamingError",
    "ServerDisconnectedError",
    "ClientOSError",
    "SlowDown",
}


def is_remote(url: str) -> bool:
    """True for object-store URLs (anything with a scheme other than file://)."""
    return "://" in url and not url.startswith("file://")


CACHE_ENV = "DCSLURM_CACHE"  # forwarded into containers with the other DCSLURM_* variables


def cache_dir(*parts: str) -> str:
    """A path under this user's dcslurm cache ($DCSLURM_CACHE, else ~/.cache/dcslurm): fetched
    assets, the WordNet copy nltk reads. One rule, so the CLI that fetches an asset and the
    task that reads it agree on where it is."""
    return os.path.join(os.path.expanduser(os.environ.get(CACHE_ENV) or "~/.cache/dcslurm"), *parts)


def normalize_url(url: str) -> str:
    """Absolute local paths (without file://), object-store URLs unchanged."""
    url = str(url)
    if url.startswith("file://"):
        url = url[len("file://"):]
    if is_remote(url):
        return url.rstrip("/")
    return os.path.abspath(os.path.expanduser(url))


def join_url(base: str, *parts: str) -> str:
    """`base/part/...` for local paths and URLs alike."""
    clean = [p.strip("/") for p in parts if p not in ("", None)]
    if not clean:
        return base
    return posixpath.join(base.rstrip("/") if base != "/" else base, *clean)


# Defaults that make one request against an S3 endpoint that accepts connections
# and never answers fail in well under a minute: at worst max_attempts x
# read_timeout (+ botocore's backoff). botocore's own defaults with s3fs's retry
# loop on top took 321-851 s for a submit and over 900 s for `status`.
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 15.0  # s3fs's own default
DEFAULT_MAX_ATTEMPTS = 2


def s3fs_options(endpoint_url: str | None = None, profile: str | None = None,
                 max_attempts: int | None = None, connect_timeout: float | None = None,
                 read_timeout: float | None = None) -> dict:
    """fsspec storage options for s3fs from the run config's `[storage]` table.

    The one place that bounds S3 requests: connect and read timeouts and
    `max_attempts` (every attempt of one request, the first included) go to
    botocore, which retries transport errors and throttling itself (standard
    mode). The options travel to tasks in DCSLURM_STORAGE and to tools that
    build their own filesystem (fsspec's FSSPEC_S3 config), so every process
    of a run has the same bounds. `region_name` is left out on purpose: with
    it, bucket creation sends a LocationConstraint that S3-compatible servers
    reject.
    """
    options: dict[str, Any] = {}
    if endpoint_url:
        # Top-level, not in client_kwargs: it then overrides an FSSPEC_S3_ENDPOINT_URL
        # from the environment instead of clashing with it.
        options["endpoint_url"] = endpoint_url
    if profile:
        options["profile"] = profile
    options["config_kwargs"] = {
        "connect_timeout": connect_timeout or DEFAULT_CONNECT_TIMEOUT,
        "read_timeout": read_timeout or DEFAULT_READ_TIMEOUT,
        "retries": {"total_max_attempts": max_attempts or DEFAULT_MAX_ATTEMPTS, "mode": "standard"},
    }
    return options


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    names = {type(e).__name__ for e in _exception_chain(exc)}
    return bool(names & _TRANSIENT_NAMES)


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def retry(fn: Callable[[], T], what: str, attempts: int = 1, base_delay: float = 0.5) -> T:
    """Call `fn`; its errors become a one-line StorageError naming `what` (a URL).

    Transport retries are botocore's, bounded by s3fs_options: retrying here
    as well multiplied them (minutes against a silent endpoint), and a
    retried non-idempotent call can report success for something that did
    not happen (a closed file's second close() returns at once). Pass
    `attempts` > 1 only for idempotent calls that should outlast a longer
    outage. FileNotFoundError passes through unchanged.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            if is_transient(exc) and attempt < attempts:
                time.sleep(base_delay * (2 ** (attempt - 1)) * (0.5 + random.random()))
                continue
            raise StorageError(f"{what}: {_describe(exc)}") from exc
    raise AssertionError("unreachable")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class DataFolder:
    """A folder on local disk or object storage, addressed by URL."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = normalize_url(url)
        self.storage_options = dict(storage_options or {})
        self._fs = None

    def __repr__(self) -> str:
        return f"DataFolder({self.url!r})"

    def __reduce__(self):  # picklable without the live filesystem
        return (DataFolder, (self.url, self.storage_options))

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            if is_remote(self.url):
                protocol = self.url.split("://", 1)[0]
                fs = fsspec.filesystem(protocol, **self.storage_options)
                if protocol in ("s3", "s3a"):
                    _bound_s3(fs)
                self._fs = fs
            else:
                self._fs = fsspec.filesystem("file")
        return self._fs

    @property
    def is_local(self) -> bool:
        return not is_remote(self.url)

    # -- paths ------------------------------------------------------------
    def url_of(self, rel: str = "") -> str:
        return join_url(self.url, rel)

    def _path(self, rel: str = "") -> str:
        """The filesystem path fsspec wants (no scheme for s3fs)."""
        url = self.url_of(rel)
        return url.split("://", 1)[1] if is_remote(url) else url

    def child(self, rel: str) -> DataFolder:
        sub = DataFolder(self.url_of(rel), self.storage_options)
        sub._fs = self._fs
        return sub

    def local_path(self, rel: str = "") -> str | None:
        """A path on this machine's filesystem, or None for object storage."""
        return self.url_of(rel) if self.is_local else None

    # -- reads ------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        return retry(lambda: self.fs.exists(self._path(rel)), self.url_of(rel))

    def open(self, rel: str, mode: str = "rb", **kwargs):
        """Open a file for reading (writes go through `writer`)."""
        if "r" not in mode:
            raise ValueError("DataFolder.open is for reading; use writer() to write")
        return retry(lambda: self.fs.open(self._path(rel), mode, **kwargs), self.url_of(rel))

    def read_bytes(self, rel: str) -> bytes:
        return retry(lambda: self.fs.cat_file(self._path(rel)), self.url_of(rel))

    def read_ranges(self, rel: str, starts: list[int], ends: list[int]) -> list[bytes]:
        """Bytes [starts[i], ends[i]) of `rel`, one bytes object per range (fsspec's
        cat_ranges: on S3 one ranged GET each, run concurrently)."""
        path = self._path(rel)
        return retry(lambda: self.fs.cat_ranges([path] * len(starts), list(starts), list(ends), on_error="raise"),
                     self.url_of(rel))

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except json.JSONDecodeError as exc:
            raise StorageError(f"{self.url_of(rel)}: not valid JSON ({exc.msg}, line {exc.lineno})") from None

    def list(self, rel: str = "", suffix: str | None = None) -> list[str]:
        """Names (not paths) of the files directly under `rel`, sorted; [] if missing."""
        return sorted(self.list_sizes(rel, suffix))

    def list_sizes(self, rel: str = "", suffix: str | None = None) -> dict[str, int]:
        """{name: size in bytes} of the files directly under `rel`, from one listing ({} if
        missing): never one request per file, which on S3 would be a HEAD per object."""
        path = self._path(rel)

        def _ls() -> dict[str, int]:
            if self.is_local:
                try:
                    with os.scandir(path) as it:  # scandir: fast on 100k-entry folders
                        return {e.name: e.stat().st_size for e in it if e.is_file()}
                except FileNotFoundError:
                    return {}
            try:
                entries = self.fs.ls(path, detail=True, refresh=True)
            except FileNotFoundError:
                return {}
            return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
                    for e in entries if e["type"] == "file"}

        sizes = retry(_ls, self.url_of(rel))
        return {n: b for n, b in sizes.items()
                if not n.startswith(".tmp-") and (suffix is None or n.endswith(suffix))}

    def local_copy(self, rel: str, scratch: str) -> str:
        """A path on this machine holding `rel`: the file itself when local, else
        a copy downloaded into `scratch` (for libraries that want a real file)."""
        local = self.local_path(rel)
        if local is not None:
            if not os.path.exists(local):
                raise FileNotFoundError(local)
            return local
        target = os.path.join(scratch, f"{uuid.uuid4().hex}-{posixpath.basename(rel)}")
        retry(lambda: self.fs.get_file(self._path(rel), target), self.url_of(rel))
        return target

    def size(self, rel: str) -> int:
        return retry(lambda: self.fs.size(self._path(rel)), self.url_of(rel))

    def info(self, rel: str) -> dict:
        """fsspec's info of one file: size, and what changes when it is rewritten (local: mtime,
        inode; S3: ETag); `content_identity` keeps just those."""
        return retry(lambda: self.fs.info(self._path(rel)), self.url_of(rel))

    # -- commits ----------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, rel: str, mode: str = "wb") -> Iterator[Any]:
        """Write `rel` under a temporary name; commit it only if the block succeeds.

        Locally: a hidden `.tmp-` file in the same folder, fsync'd, then
        `os.replace`d onto the final name. On S3: the object itself, which
        becomes visible only when its upload completes; on error the upload
        is aborted (s3fs discards unfinished multipart uploads); a failed
        upload raises, so nothing is committed after it.
        """
        final = self._path(rel)
        if self.is_local:
            folder = os.path.dirname(final)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(final)}")
            try:
                with open(tmp, mode) as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            return
        # Object storage: a multipart upload that is completed by commit() only
        # after close() has uploaded every part (fsspec's deferred commit). close()
        # is not retried: fsspec marks a file closed even when its upload fails,
        # so a second close() returned at once and the object was never written.
        f = retry(lambda: self.fs.open(final, "wb", autocommit=False), self.url_of(rel))
        try:
            if "b" in mode:
                yield f
            else:
                text = io.TextIOWrapper(f, encoding="utf-8", write_through=True)
                yield text
                text.detach()  # f stays open for close() + commit() below
            retry(f.close, self.url_of(rel))
            retry(f.commit, self.url_of(rel))
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()  # aborts the multipart upload; an unfinished one is never an object
            raise

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Commit `data` as `rel` atomically."""
        if self.is_local:
            with self.writer(rel) as f:
                f.write(data)
        else:
            retry(lambda: self.fs.pipe_file(self._path(rel), data), self.url_of(rel))

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))

    def put_file(self, local_path: str, rel: str) -> None:
        """Commit a local file as `rel` (copy + atomic rename, or one upload)."""
        if self.is_local:
            with open(local_path, "rb") as src, self.writer(rel) as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        else:
            retry(lambda: self.fs.put_file(local_path, self._path(rel)), self.url_of(rel))

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write `rel` only if it does not exist yet; False if it does (one winner among
        racing writers). Locally: O_CREAT|O_EXCL; on S3: a PUT with If-None-Match: *,
        which the server refuses with 412 when the key exists."""
        if self.is_local:
            # Written in full under a temporary name, then hard-linked to `rel`: link() is
            # atomic and fails if `rel` exists, so a reader never sees a half-written file
            # (an O_EXCL create then write would show it empty for a moment).
            path = self._path(rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True

        def _put() -> bool:
            try:
                self.fs.pipe_file(self._path(rel), data, mode="create")
            except FileExistsError:
                return False
            except OSError as exc:
                # s3fs maps a 412 to FileExistsError only when the error names the
                # If-None-Match condition; SeaweedFS (and others) send a bare 412.
                error = getattr(exc.__cause__, "response", {}).get("Error", {})
                if error.get("Code") in ("PreconditionFailed", "412"):
                    return False
                raise
            return True

        return retry(_put, self.url_of(rel))

    def remove(self, rel: str) -> None:
        def _rm() -> None:
            try:
                self.fs.rm_file(self._path(rel))
            except FileNotFoundError:
                pass

        retry(_rm, self.url_of(rel))

    def makedirs(self, rel: str = "") -> None:
        if self.is_local:
            os.makedirs(self._path(rel), exist_ok=True)

    def check_reachable(self) -> None:
        """Raise a one-line StorageError if the folder's storage cannot be reached."""
        try:
            if self.is_local:
                parent = self.url
                while not os.path.exists(parent):
                    parent = os.path.dirname(parent)
                if not os.access(parent, os.W_OK):
                    raise StorageError(f"{self.url}: not writable ({parent} is read-only for this user)")
                return
            bucket = self._path().split("/", 1)[0]
            retry(lambda: self.fs.ls(bucket, refresh=True), self.url)
        except StorageError:
            raise
        except FileNotFoundError:
            raise StorageError(f"{self.url}: bucket does not exist") from None
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"{self.url}: {_describe(exc)}") from exc


def _bound_s3(fs: Any) -> None:
    """Make [storage] max_attempts and timeouts the only bounds of an s3fs request.

    - s3fs retries read timeouts 5 times on top of botocore's attempts: set to 1.
      (An attribute, not an option: s3fs takes no such keyword.)
    - botocore sends `Expect: 100-continue` with every PUT body (objects, parts),
      and aiohttp waits for the `100 Continue` with no timeout at all: an upload to
      an endpoint that stopped answering hung for good (a stage hung 8.5 min).
      Without the header the body is sent at once and the read timeout applies.
    """
    fs.retries = 1
    from botocore.handlers import add_expect_header

    fs.s3.meta.events.unregister("before-call.s3", add_expect_header)


def content_identity(info: dict) -> dict:
    """What tells one version of a stored file from another without reading it, from fsspec's
    `info` of it: its size, and what a rewrite changes (object storage: the ETag; a
    filesystem: mtime and inode). Recorded beside what was derived from the file."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return {"size": int(info["size"]), "etag": str(etag)}
    return {"size": int(info["size"]), "mtime": info.get("mtime"), "ino": info.get("ino")}


def sha256_file(path: str) -> str:
    """sha256 (hex) of a local file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_bytes_url(url: str, storage_options: dict | None = None) -> bytes:
    """Read a whole file given its full URL."""
    parent, name = url.rstrip("/").rsplit("/", 1)
    return DataFolder(parent, storage_options).read_bytes(name)
