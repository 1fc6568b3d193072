"""The download task: img2dataset over this task's parquet files.

Shard ids. img2dataset numbers shards per input file: a file of R rows gives
ceil(R / samples_per_shard) shards, and a folder's files are numbered one after
another. A task here gets a contiguous group of the pool's files, so its first
shard id is the sum of that count over the pool's files before its group (read
from their parquet footers: cheap, and a pure function of the pool). The result is
exactly the layout one img2dataset call over the whole pool writes (as DataComp's
download_upstream.py does), whatever the split into tasks, and no two tasks collide.

Why not `img2dataset.download()` itself: it has no first-shard-id argument, it
creates and deletes one shared `OUTPUT/_tmp` folder per call (concurrent tasks
would delete each other's), and it lists the whole output folder to find finished
shards. So the task assembles img2dataset's own parts the way download() does
(Reader per file, Resizer, BoundingBoxBlurrer, Downloader, WebDatasetSampleWriter,
multiprocessing_distributor) with three differences: the shard ids above, the
temporary feather files in the task's local scratch, and finished shards found by
checking only this task's shard ids.

Commit. img2dataset writes a shard's .tar and .parquet, then its _stats.json; a
shard is done iff its _stats.json parses (img2dataset's incremental rule) and the
tar and parquet agree with it (stats.shard_done), so a killed task's rerun redoes
only the other shards, overwriting their partial files. The task fails (no marker)
unless every shard of its files is done, so a resubmit finishes them.

Processes. img2dataset's multiprocessing_distributor waits forever for a worker
that died (Pool.imap_unordered never returns its item); `_distribute` runs the same
Downloader on concurrent.futures, where a dead worker breaks the pool and fails the
task within seconds. Workers die with the task process (proctree.die_with_parent).

Hostile images. img2dataset decodes every image with OpenCV before any size check;
one 30000x30000 PNG costs GBs. `BoundedResizer` reads the header first (Pillow's
Image.open decodes nothing) and refuses images above `max_image_pixels`, counted
as "image too large"; OpenCV's own limit is set to the same for formats Pillow
cannot read. Decoding happens in one thread per worker, so decoding costs a task
at most processes x one image at the limit (x 3 bytes for RGB; img2dataset's
alpha matting of an RGBA image at the limit takes float64 copies, ~8x more), on
top of up to 2 x threads downloaded files per worker, whose size img2dataset
does not limit.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import threading
import time
import urllib.request
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations calls home on import otherwise

import fsspec.config  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from img2dataset.blurrer import BoundingBoxBlurrer  # noqa: E402
from img2dataset.downloader import Downloader  # noqa: E402
from img2dataset.reader import Reader  # noqa: E402
from img2dataset.resizer import Resizer  # noqa: E402
from img2dataset.writer import WebDatasetSampleWriter  # noqa: E402
from PIL import Image  # noqa: E402

from dcslurm.core import proctree  # noqa: E402
from dcslurm.core.errors import UserError  # noqa: E402
from dcslurm.core.storage import DataFolder, is_remote  # noqa: E402
from dcslurm.core.task import TaskContext, TaskResult  # noqa: E402
from dcslurm.datacomp.pool import check_uids, read_footer  # noqa: E402
from jobs.download.stats import (  # noqa: E402
    OOM_SHARD_COUNT,
    TOO_LARGE,
    DownloadTotals,
    read_stats,
    shard_done,
    shard_name,
)


def shards_of(rows: int, samples_per_shard: int) -> int:
    """How many shards img2dataset makes of a file of `rows` rows."""
    return math.ceil(rows / samples_per_shard)


def first_shard_ids(rows: list[int], samples_per_shard: int) -> list[int]:
    """The first shard id of each file, numbering files one after another."""
    out, next_id = [], 0
    for r in rows:
        out.append(next_id)
        next_id += shards_of(r, samples_per_shard)
    return out


def _footer_rows(folder_cache: dict, url: str, storage_options: dict) -> int:
    parent, name = url.rstrip("/").rsplit("/", 1)
    folder = folder_cache.setdefault(parent, DataFolder(parent, storage_options))
    f = read_footer(folder, name)
    if f.problems:
        raise UserError(f.problems[0])
    return f.rows


@contextlib.contextmanager
def _opencv_limit(max_pixels: int):
    """OpenCV reads its decode limit from the environment when it loads: set it for the
    spawned workers (a second line behind BoundedResizer's header check)."""
    with _env_var("OPENCV_IO_MAX_IMAGE_PIXELS", str(max_pixels)):
        yield


@contextlib.contextmanager
def _env_var(key: str, value: str | None):
    """Set (or, with None, leave) environment variable `key` for the block, then restore it."""
    old = os.environ.get(key)
    if value is not None:
        os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@contextlib.contextmanager
def _fsspec_env(storage_options: dict):
    """img2dataset builds its own filesystems (also in its worker processes): hand
    them the run's storage options through fsspec's FSSPEC_S3 variable."""
    old_conf = fsspec.config.conf.get("s3")
    if storage_options:
        fsspec.config.conf["s3"] = {**(old_conf or {}), **storage_options}  # for this process
    try:  # FSSPEC_S3 for the spawned workers
        with _env_var("FSSPEC_S3", json.dumps(storage_options) if storage_options else None):
            yield
    finally:
        if old_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = old_conf


@contextlib.contextmanager
def _exit_on_sigterm():
    """SIGTERM (cancel, time limit, the local executor's kill) becomes SystemExit, so
    img2dataset's process pool is terminated on the way out instead of orphaned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class PoolDownloader(Downloader):
    """img2dataset's Downloader, fetching http:// through `proxy` when set
    ([stages.download] http_proxy). It sets urllib's opener in the worker process only:
    s3fs traffic is untouched."""

    proxy: str = ""

    def __call__(self, row):
        if self.proxy:
            urllib.request.install_opener(urllib.request.build_opener(
                urllib.request.ProxyHandler({"http": self.proxy})))
        return super().__call__(row)


def image_pixels(stream) -> int | None:
    """Width x height from an image's header (Pillow reads no pixel data in open()),
    or None when Pillow cannot identify it (OpenCV then decides, under its own limit)."""
    stream.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as im:
                return im.width * im.height
    except Image.DecompressionBombError:
        return 2 * (Image.MAX_IMAGE_PIXELS or 0) + 1  # Pillow refuses it from the header: above the limit
    except Exception:  # noqa: BLE001 - not an image Pillow knows (HTML, truncated, exotic formats)
        return None
    finally:
        stream.seek(0)


class BoundedResizer(Resizer):
    """img2dataset's Resizer, refusing images above `max_pixels` before they are decoded."""

    max_pixels: int = 0

    def __call__(self, img_stream, blurring_bbox_list=None):
        pixels = image_pixels(img_stream)
        if self.max_pixels and pixels is not None and pixels > self.max_pixels:
            return None, None, None, None, None, TOO_LARGE
        return super().__call__(img_stream, blurring_bbox_list)


def _distribute(processes: int, downloader, shards, retries: int = 1) -> None:
    """img2dataset's multiprocessing_distributor on concurrent.futures.

    Same work: each (shard_id, feather file) goes to `downloader` in a worker, shards
    that fail are retried `retries` times. Unlike multiprocessing.Pool, a worker that
    dies (kill -9, the OOM killer) raises BrokenProcessPool here at once. At most
    2 x processes shards are queued, so the reader writes feather files as needed.
    """
    pool = ProcessPoolExecutor(processes, mp_context=get_context("spawn"), initializer=proctree.die_with_parent)

    def run(items) -> list:
        failed, pending = [], set()
        items = iter(items)
        while True:
            for item in itertools.islice(items, max(0, 2 * processes - len(pending))):
                pending.add(pool.submit(downloader, item))
            if not pending:
                return failed
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                ok, row = fut.result()  # raises BrokenProcessPool when a worker died
                if not ok:
                    failed.append(row)

    try:
        failed = run(shards)
        for _ in range(retries):
            if failed:
                failed = run(failed)
    except BrokenProcessPool:
        raise RuntimeError("a download worker process died (killed, or out of memory); "
                           "its shards are not done: resubmit to retry them") from None
    finally:
        # On any way out (SIGTERM's SystemExit included) stop the workers now rather than
        # wait for their shards: Python 3.14 has kill_workers(), earlier ones need _processes.
        workers = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in workers:
            proc.kill()
        for proc in workers:
            proc.join(timeout=10)


def run(ctx: TaskContext) -> TaskResult:
    p = ctx.params
    per_shard = p.samples_per_shard
    units = ctx.step.units
    all_files = list(units.names or ())
    mine = list(ctx.shards)
    storage = ctx.plan.storage_options
    cache: dict = {}

    # Rows of every file up to the last of ours: footers only, in parallel.
    upto = mine[-1] + 1 if mine else 0
    with ThreadPoolExecutor(max_workers=16) as pool:
        rows = list(pool.map(lambda u: _footer_rows(cache, u, storage), all_files[:upto]))
    firsts = first_shard_ids(rows, per_shard)
    out = ctx.output
    out.makedirs()
    groups = [(all_files[i], firsts[i], shards_of(rows[i], per_shard)) for i in mine]  # (file, first id, shards)
    expected = [sid for _u, first, n in groups for sid in range(first, first + n)]
    done_before = {sid for sid in expected if shard_done(out, sid) is not None}
    for sid in expected:
        if sid not in done_before and read_stats(out, sid) is not None:
            # Stats that the shard's files do not agree with: redo it (and drop the stats
            # now, so a redo killed midway cannot look done either).
            ctx.log.warning("download: shard %s has stats that its tar/parquet do not match: redoing it",
                            shard_name(sid))
            out.remove(f"{shard_name(sid)}_stats.json")
    ctx.log.info("download: %d files, shards %s, %d already done", len(groups),
                 f"{expected[0]}..{expected[-1]}" if expected else "none", len(done_before))

    started = time.time()
    todo_files = [(u, first, n) for u, first, n in groups if any(s not in done_before for s in range(first, first + n))]
    if todo_files:
        _download(ctx, todo_files, done_before, per_shard)

    missing = [sid for sid in expected if shard_done(out, sid) is None]
    if missing:
        raise RuntimeError(f"{out.url}: {len(missing)} of {len(expected)} shards were not completed "
                           f"(first: {shard_name(missing[0])}); resubmit to retry them")
    stats = _task_stats(out, expected, done_before, time.time() - started)
    outputs = [f"{ctx.step.stage}/{shard_name(s)}.tar" for s in expected]
    return TaskResult(outputs=outputs, stats=stats)


def _download(ctx: TaskContext, files: list[tuple[str, int, int]], done: set[int], per_shard: int) -> None:
    p = ctx.params
    storage = ctx.plan.storage_options
    out = ctx.output
    output_folder = out.url  # img2dataset takes a URL (local path or s3://)

    pool_url, first_name = files[0][0].rstrip("/").rsplit("/", 1)
    with DataFolder(pool_url, storage).open(first_name) as fh:
        columns = pq.ParquetFile(fh).schema_arrow.names
    bbox_col = "face_bboxes" if p.blur_faces and "face_bboxes" in columns else None
    # As img2dataset.download does: the bbox column is saved with the additional columns.
    additional = ["uid"] + ([bbox_col] if bbox_col else [])

    feather_dir = os.path.join(ctx.scratch, "feather")
    os.makedirs(feather_dir, exist_ok=True)

    def reader_for(url: str, first: int) -> Reader:
        # Each task's uids are checked here too (pools too big for the submit-time check).
        parent, name = url.rsplit("/", 1)
        with DataFolder(parent, storage).open(name) as fh:
            uids = pq.read_table(fh, columns=["uid"]).column("uid").to_pylist()
        problem = check_uids(url, uids)
        if problem:
            raise UserError(problem)
        return Reader(url if is_remote(url) else os.path.abspath(url), "parquet", "url", "text", None, None,
                      list(additional), per_shard, done, feather_dir, first)

    readers = [reader_for(u, first) for u, first, _n in files]
    resizer = BoundedResizer(
        image_size=p.image_size, resize_mode=p.resize_mode,
        resize_only_if_bigger=p.resize_only_if_bigger,
        encode_quality=p.encode_quality, encode_format=p.encode_format,
        blurrer=BoundingBoxBlurrer() if bbox_col else None,
    )
    max_pixels = p.max_image_pixels
    resizer.max_pixels = max_pixels
    downloader = PoolDownloader(
        sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=p.threads,
        save_caption=True, extract_exif=True, output_folder=output_folder, column_list=readers[0].column_list,
        timeout=p.timeout, number_sample_per_shard=per_shard, oom_shard_count=OOM_SHARD_COUNT,
        compute_hash="sha256", verify_hash_type=None, encode_format=p.encode_format,
        retries=p.retries, user_agent_token=None,
        disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"], blurring_bbox_col=bbox_col,
    )
    downloader.proxy = p.http_proxy
    processes = p.processes or max(1, ctx.step.resources.cpus_per_task)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_fsspec_env(storage))
        stack.enter_context(_exit_on_sigterm())
        stack.enter_context(_opencv_limit(max_pixels))
        if downloader.proxy:
            ctx.log.info("download: http:// URLs through the proxy %s", downloader.proxy)
        _distribute(processes, downloader, itertools.chain(*readers))


def _task_stats(out: DataFolder, shard_ids: list[int], done_before: set[int], seconds: float) -> dict:
    """Sum of the shards' _stats.json: what the marker (and `status`) records."""
    totals = DownloadTotals()
    tar_bytes = 0
    for sid in shard_ids:
        totals.add(read_stats(out, sid) or {})
        tar_bytes += out.size(f"{shard_name(sid)}.tar")
    fresh = len([s for s in shard_ids if s not in done_before])
    return {
        "shards": len(shard_ids), "shards_downloaded": fresh, "shards_resumed": len(shard_ids) - fresh,
        "samples": totals.samples, "successes": totals.successes,
        "failed_to_download": totals.failed_to_download, "failed_to_resize": totals.failed_to_resize,
        "success_rate": round(totals.success_rate, 4), "failures": dict(sorted(totals.failures.items())),
        "bytes": tar_bytes, "download_seconds": round(seconds, 3),
    }
