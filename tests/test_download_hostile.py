"""The download stage under hostile conditions, with real img2dataset against a real
HTTP server on 127.0.0.1: a SIGKILLed runner (nothing it started survives, the
resubmit equals an undisturbed run), a worker killed mid-run (the task fails in
seconds instead of hanging), stats a shard's files do not agree with (the shard is
redone), and decompression bombs (refused from the header and counted)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcslurm.core.config import load_config
from dcslurm.core.markers import read_marker
from dcslurm.core.runs import submit_run
from dcslurm.core.storage import DataFolder
from tests.imageserver import ImageServer
from tests.test_download import shard_contents, write_config, write_pool

PARAMS = {"processes": 1, "threads": 2, "samples_per_shard": 10}


# -- processes, from /proc ------------------------------------------------------------

def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(rest[1]), rest[0]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def descendants(root: int) -> list[int]:
    """Every live process below `root` (breadth first)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append(int(name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(0), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pids) -> list[int]:
    """Those of `pids` that still run (a zombie has exited: it only waits to be reaped)."""
    return [p for p in pids if (st := _stat(p)) is not None and st[1] != "Z"]


def wait_for(cond, timeout: float, what: str):
    deadline = time.time() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.time() < deadline, what
        time.sleep(0.1)


def kill_tree(pid: int) -> None:
    """Test cleanup on failure: SIGKILL a process and everything below it, by pid."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- one pool, one undisturbed run ------------------------------------------------------

@pytest.fixture(scope="module")
def slow_pool(tmp_path_factory):
    """A pool whose shards 0-1 are fast and 2-3 slow (so kills land in them), and the
    shard contents of an undisturbed run over it: what every disturbed run must equal."""
    tmp = tmp_path_factory.mktemp("hostile")
    with ImageServer() as server:
        rows = [(server.url("good", i), f"good {i}") for i in range(20)]
        rows += [(server.url("slow", 100 + i, delay=1.4), f"slow {i}") for i in range(20)]
        write_pool(str(tmp / "pool"), [rows])
        cfg = write_config(tmp / "ref.toml", str(tmp / "ref"), str(tmp / "pool"), params=PARAMS)
        assert not submit_run(load_config(cfg)).failed
        ref = DataFolder(str(tmp / "ref"))
        yield {"pool": str(tmp / "pool"), "contents": shard_contents(ref), "ref": ref, "server": server}


def _start_submit(tmp_path, pool: str) -> tuple[subprocess.Popen, str]:
    cfg = write_config(tmp_path / "run.toml", str(tmp_path / "run"), pool, params=PARAMS)
    proc = subprocess.Popen([sys.executable, "-m", "dcslurm.cli", "submit", "-c", cfg],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, cfg


def _wait_shard(proc: subprocess.Popen, out, shard: int) -> None:
    wait_for(lambda: (out / f"{shard:08d}_stats.json").exists() or proc.poll() is not None, 180,
             f"shard {shard} never finished")
    assert proc.poll() is None, "the run ended before the kill"


def _runners(root: int) -> list[int]:
    """The `python -m dcslurm.core.runner` processes below `root`, outermost first."""
    return [p for p in descendants(root) if "dcslurm.core.runner" in _cmdline(p)]


def _workers(root: int) -> list[int]:
    """img2dataset's worker processes (multiprocessing spawn) below `root`."""
    return [p for p in descendants(root) if "spawn_main" in _cmdline(p)]


@pytest.mark.parametrize("which", ["outermost", pytest.param("innermost", marks=pytest.mark.slow)])
def test_sigkilled_runner_leaves_no_process_and_the_resubmit_equals_an_undisturbed_run(
        slow_pool, tmp_path, which):
    out = tmp_path / "run" / "download"
    proc, cfg = _start_submit(tmp_path, slow_pool["pool"])
    try:
        _wait_shard(proc, out, 1)
        wait_for(lambda: _workers(proc.pid), 30, "no img2dataset worker")
        task_tree = descendants(proc.pid)
        runners = _runners(proc.pid)
        victim = runners[0] if which == "outermost" else runners[-1]
        os.kill(victim, signal.SIGKILL)
        # Nothing the task started survives it: workers, watchdog, multiprocessing's helpers.
        deadline = time.time() + 3  # a slow shard takes 7 s: an orphan would still be at it
        while alive(task_tree) and time.time() < deadline:
            time.sleep(0.1)
        assert not alive(task_tree), [(p, _cmdline(p)) for p in alive(task_tree)]
        proc.wait(timeout=60)  # the executor saw the task end and stops (its exit code: test_cli's business)
    finally:
        kill_tree(proc.pid)
    assert not (out / "00000003_stats.json").exists()

    assert not submit_run(load_config(cfg)).failed
    assert shard_contents(DataFolder(str(tmp_path / "run"))) == slow_pool["contents"]


def test_a_killed_worker_fails_the_task_in_seconds_and_the_resubmit_completes(slow_pool, tmp_path):
    out = tmp_path / "run" / "download"
    proc, cfg = _start_submit(tmp_path, slow_pool["pool"])
    try:
        _wait_shard(proc, out, 1)
        workers = wait_for(lambda: _workers(proc.pid), 30, "no img2dataset worker")
        killed = time.time()
        os.kill(workers[0], signal.SIGKILL)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the task still runs 30 s after its worker was killed")
        seconds = time.time() - killed
    finally:
        kill_tree(proc.pid)
    log = open(tmp_path / "run" / "logs" / "download" / "local-000000.log").read()
    errors = [line for line in log.splitlines() if "task failed:" in line]
    assert errors and "download worker process died" in errors[-1], log[-2000:]
    print(f"the task failed {seconds:.1f} s after its worker was killed")

    assert not submit_run(load_config(cfg)).failed
    assert shard_contents(DataFolder(str(tmp_path / "run"))) == slow_pool["contents"]


def test_a_shard_whose_files_disagree_with_its_stats_is_redone(slow_pool, tmp_path):
    """Stats beside a tar cut short (a foreign writer, a redo killed midway) are not trusted."""
    run = tmp_path / "run"
    shutil.copytree(slow_pool["ref"].url, run)
    shutil.rmtree(run / "_markers")  # as after a failed task: the shards decide
    for f in ("plan.json", "run.json"):
        (run / f).unlink(missing_ok=True)
    (run / "download" / "00000001.tar").write_bytes((run / "download" / "00000001.tar").read_bytes()[:20_000])
    cfg = write_config(tmp_path / "run.toml", str(run), slow_pool["pool"], params=PARAMS)
    assert not submit_run(load_config(cfg)).failed
    assert shard_contents(DataFolder(str(run))) == slow_pool["contents"]
    stats = read_marker(DataFolder(str(run)), "download", 0)["stats"]
    assert stats["shards_resumed"] == 3 and stats["shards_downloaded"] == 1


def _shard(folder, sid: int, samples: int, rows: int, stats: dict | None = None) -> None:
    name = f"{sid:08d}"
    with tarfile.open(folder / f"{name}.tar", "w") as tar:
        for k in range(samples):
            for ext, data in (("jpg", b"\xff\xd8\xff" + bytes(600)), ("txt", b"caption"), ("json", b"{}")):
                info = tarfile.TarInfo(f"{sid:08d}{k:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"key": [str(i) for i in range(rows)]}), folder / f"{name}.parquet")
    (folder / f"{name}_stats.json").write_text(json.dumps(stats or {"count": rows, "successes": samples}))


def test_shard_done_checks_tar_and_parquet_against_the_stats(tmp_path):
    from jobs.download.stats import shard_done

    folder = DataFolder(str(tmp_path))
    _shard(tmp_path, 0, samples=3, rows=5)
    assert shard_done(folder, 0)["successes"] == 3
    _shard(tmp_path, 1, samples=3, rows=5, stats={"count": 5, "successes": 4})  # fewer samples than successes
    _shard(tmp_path, 2, samples=3, rows=5, stats={"count": 6, "successes": 3})  # fewer rows than tried
    _shard(tmp_path, 3, samples=3, rows=5)
    (tmp_path / "00000003.tar").unlink()  # missing tar
    _shard(tmp_path, 4, samples=3, rows=5)
    (tmp_path / "00000004.parquet").write_bytes(b"PAR1 torn")  # unreadable parquet
    _shard(tmp_path, 5, samples=3, rows=5)
    data = (tmp_path / "00000005.tar").read_bytes()
    (tmp_path / "00000005.tar").write_bytes(data[:512 * 8 + 100])  # cut inside the last sample's data
    _shard(tmp_path, 6, samples=0, rows=4)  # every sample failed: an empty tar is right
    assert [i for i in range(7) if shard_done(folder, i) is not None] == [0, 6]


# -- decompression bombs ------------------------------------------------------------------

LARGE = [(20_000, 20_000), (16_000, 10_000), (30_000, 30_000), (10_000, 8_900)]  # 89 MP: under the limit


def test_huge_images_are_refused_from_their_header_and_counted(tmp_path):
    with ImageServer() as server:
        rows = [(server.url("good", i), f"good {i}") for i in range(12)]
        rows += [(server.large_url(i, w, h), f"large {i}") for i, (w, h) in enumerate(LARGE)]
        write_pool(str(tmp_path / "pool"), [rows])
        cfg = write_config(tmp_path / "run.toml", str(tmp_path / "run"), str(tmp_path / "pool"),
                           params={"processes": 1, "threads": 8, "samples_per_shard": 100})
        assert not submit_run(load_config(cfg)).failed
    stats = read_marker(DataFolder(str(tmp_path / "run")), "download", 0)["stats"]
    assert stats["failures"] == {"image too large": 3}  # all but the 89 MP one, under the default limit
    assert stats["successes"] == 13 and stats["failed_to_resize"] == 3
    table = pq.read_table(tmp_path / "run" / "download" / "00000000.parquet").to_pylist()
    refused = {r["url"].split("?")[0].rsplit("/", 1)[1] for r in table if r["error_message"] == "image too large"}
    assert refused == {"0.png", "1.png", "2.png"}


def test_bounded_resizer_refuses_from_the_header_at_the_configured_limit():
    from PIL import Image

    from jobs.download.stage import BoundedResizer, image_pixels

    def png(w: int, h: int) -> io.BytesIO:
        buf = io.BytesIO()
        Image.fromarray(np.full((h, w, 3), 200, np.uint8)).save(buf, format="PNG")
        buf.seek(0)
        return buf

    resizer = BoundedResizer(image_size=64, resize_mode="keep_ratio_largest", resize_only_if_bigger=True)
    resizer.max_pixels = 300 * 200
    img, w, h, ow, oh, err = resizer(png(300, 200))
    assert err is None and (ow, oh) == (300, 200) and max(w, h) == 64
    assert resizer(png(301, 200))[-1] == "image too large"
    assert image_pixels(io.BytesIO(b"<html>not an image</html>")) is None  # OpenCV decides those
    assert resizer(io.BytesIO(b"<html>not an image</html>"))[-1] == "Image decoding error"


def test_max_image_pixels_is_validated():
    from jobs.download.spec import DownloadParams

    DownloadParams(max_image_pixels=1000).validate()
    for bad in (0, 10**9):
        with pytest.raises(ValueError, match="max_image_pixels"):
            DownloadParams(max_image_pixels=bad).validate()
