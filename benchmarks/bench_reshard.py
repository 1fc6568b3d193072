"""Reshard throughput against raw sequential reading of the same input shards.

    .venv/bin/python benchmarks/bench_reshard.py [--shards 4] [--samples 10000] [--dir /tmp/bench-reshard]
        [--out-dir /dev/shm/bench-reshard]

Builds img2dataset-like shards (real JPEGs of about 35-50 KB, captions, json
with uid; DataComp's 10,000 samples a shard by default), then in one run times:
  - `cat` of every input shard to /dev/null, warm (page cache) and cold (the
    shards evicted from the page cache with posix_fadvise(DONTNEED) first);
  - the reshard stage (all four steps), for a 30% subset with repeats and for
    a subset of every sample: its tasks in this process, warm and cold (wall
    and CPU time; each cold run paired with a cold `cat` timed just before it,
    as cold reads here swing 2-3x from minute to minute), and the whole run on
    the local executor (one task at a time, interpreter starts included).
Throughput is input bytes / time. Goal: reshard >= 50% of cat. Warm, `cat` is
a memory copy (several GB/s) that no stage writing its output durably can
approach (`cat` into one fsync'd file is printed for scale); cold is what a
cluster's shards on disk or object storage look like.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import resource
import shutil
import subprocess
import tarfile
import time

import numpy as np
from PIL import Image
from skimage import data as skdata

from dcslurm.config import load_config
from dcslurm.runner import run_task
from dcslurm.runs import submit_run
from jobs.reshard.subset import uids_to_array


def real_jpegs(count: int, rng: np.random.Generator) -> list[bytes]:
    """Crops of scikit-image's sample photos, resized to 512 on the long side, JPEG q=90."""
    sources = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket(), skdata.hubble_deep_field()]
    out = []
    for i in range(count):
        img = sources[i % len(sources)]
        h, w = img.shape[:2]
        y, x = rng.integers(0, h // 4), rng.integers(0, w // 4)
        crop = Image.fromarray(img[y:, x:]).convert("RGB")
        crop.thumbnail((512, 512))
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def build_pool(folder: str, n_shards: int, per_shard: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    jpegs = real_jpegs(40, rng)
    os.makedirs(folder, exist_ok=True)
    uids = []
    for shard in range(n_shards):
        with tarfile.open(os.path.join(folder, f"{shard:08d}.tar"), "w") as tar:
            for i in range(per_shard):
                key = f"{shard:04d}{i:05d}"
                uid = rng.bytes(16).hex()
                uids.append(uid)
                meta = json.dumps({"uid": uid, "key": key, "status": "success", "width": 512, "height": 384})
                for ext, payload in (("jpg", jpegs[int(rng.integers(len(jpegs)))]),
                                     ("txt", f"a photo number {i} of shard {shard}".encode()),
                                     ("json", meta.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return uids


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def evict(paths: list[str]) -> None:
    """Drop the shards from the page cache (clean pages: no privileges needed), for cold reads."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_cat(paths: list[str], cold: bool = False) -> tuple[float, float]:
    """(wall, CPU) seconds of `cat` of every shard to /dev/null, best of 3."""
    best = (float("inf"), float("inf"))
    for _ in range(3):
        if cold:
            evict(paths)
        t, cpu = time.perf_counter(), _children_cpu()
        subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True)
        best = min(best, (time.perf_counter() - t, _children_cpu() - cpu))
    return best


def time_copy(paths: list[str], target: str) -> float:
    """cat of the shards into one file on the output disk, fsync'd: the cost of writing alone."""
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        with open(target, "wb") as out:
            subprocess.run(["cat", *paths], stdout=out, check=True)
            os.fsync(out.fileno())
        best = min(best, time.perf_counter() - t)
        os.remove(target)
    return best


def time_reshard(root: str, name: str, shards: str, subset: str, tasks: int, paths: list[str],
                 out_root: str) -> dict:
    """One end-to-end run on the local executor, then the same tasks again in this process, warm and cold.

    In-process (no interpreter starts, no scheduler) the wall and CPU time of
    the work itself are measured; CPU time is the fairer number on a shared machine.
    """
    run = os.path.join(out_root, f"run-{name}")
    shutil.rmtree(run, ignore_errors=True)
    cfg = os.path.join(root, f"{name}.toml")
    with open(cfg, "w") as f:
        f.write(f"""
[run]
folder = {json.dumps(run)}
stages = ["reshard"]
[pool]
shards = {json.dumps(shards)}
[executor]
kind = "local"
max_parallel = 1
[stages.reshard]
subset = {json.dumps(subset)}
tasks = {tasks}
""")
    config = load_config(cfg)
    t = time.perf_counter()
    result = submit_run(config)
    wall = time.perf_counter() - t
    assert not result.failed, result.failed
    stats = json.load(open(os.path.join(run, "reshard", "stats.json")))
    out = {"e2e": wall, "stats": stats}
    for label in ("warm", "cold"):  # the same tasks again, in this process, from scratch
        shutil.rmtree(os.path.join(run, "reshard"))
        shutil.rmtree(os.path.join(run, "_markers"))
        if label == "cold":
            # cold reads here swing 2-3x from one minute to the next (the host caches the
            # VM's disk): time `cat` cold right before, and compare the pair
            evict(paths)
            t = time.perf_counter()
            subprocess.run(["cat", *paths], stdout=subprocess.DEVNULL, check=True)
            out["cat_cold"] = time.perf_counter() - t
            evict(paths)
        logging.disable(logging.INFO)
        t, cpu = time.perf_counter(), time.process_time()
        for step in result.plan.steps:
            for i in range(step.n_tasks):
                assert run_task(run, step.name, i) == 0
        out[label] = (time.perf_counter() - t, time.process_time() - cpu)
        logging.disable(logging.NOTSET)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples", type=int, default=10_000, help="samples per input shard (DataComp: 10,000)")
    parser.add_argument("--tasks", type=int, default=2, help="write tasks")
    parser.add_argument("--dir", default="/tmp/bench-reshard")
    parser.add_argument("--repeat", type=int, default=3, help="reshard runs per subset (best reported)")
    parser.add_argument("--out-dir", default="", help="where the runs write their shards (default: --dir); "
                        "/dev/shm leaves out this disk's write speed")
    args = parser.parse_args()
    shards = os.path.join(args.dir, "shards")
    shutil.rmtree(args.dir, ignore_errors=True)
    uids = build_pool(shards, args.shards, args.samples)
    paths = sorted(os.path.join(shards, n) for n in os.listdir(shards))
    total = sum(os.path.getsize(p) for p in paths)
    rng = np.random.default_rng(1)
    picked = [u for u in uids if rng.random() < 0.3]
    subsets = {
        "30% subset, 10% of it x2": picked + picked[: len(picked) // 10],
        "every sample once": uids,
    }
    mb = total / 1e6
    print(f"input: {len(paths)} shards, {len(uids)} samples, {mb:.1f} MB; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    cold, cold_cpu = time_cat(paths, cold=True)
    print(f"cat to /dev/null, cold: wall {cold:.3f} s = {mb / cold:.0f} MB/s; CPU {cold_cpu:.3f} s")
    time_cat(paths)  # warm the page cache
    cat, cat_cpu = time_cat(paths)
    print(f"cat to /dev/null, warm: wall {cat:.3f} s = {mb / cat:.0f} MB/s; CPU {cat_cpu:.3f} s")
    copy = time_copy(paths, os.path.join(args.dir, "copy.tmp"))
    print(f"(for scale) cat into one fsync'd file on the same disk: {copy:.3f} s = {mb / copy:.0f} MB/s "
          f"= {cat / copy:.1%} of warm cat, {cold / copy:.1%} of cold cat")
    for i, (label, subset_uids) in enumerate(subsets.items()):
        path = os.path.join(args.dir, f"subset{i}.npy")
        np.save(path, uids_to_array(subset_uids))
        # best of --repeat fresh runs: this machine's disk and CPUs are shared and noisy
        runs = [time_reshard(args.dir, f"s{i}", shards, path, args.tasks, paths, args.out_dir or args.dir)
                for _ in range(args.repeat)]
        st = runs[0]["stats"]
        print(f"reshard [{label}]: wrote {st['samples_written']} samples, {st['bytes_written'] / 1e6:.1f} MB")
        wall, cpu = min(r["warm"] for r in runs)
        print(f"  in-process tasks, warm: wall {wall:.2f} s = {mb / wall:.0f} MB/s = {cat / wall:.1%} "
              f"of warm cat; CPU {cpu:.2f} s")
        pairs = sorted(((r["cat_cold"] / r["cold"][0], r) for r in runs), key=lambda x: x[0])
        ratio, best = pairs[-1]
        print(f"  in-process tasks, cold: wall {best['cold'][0]:.2f} s = {mb / best['cold'][0]:.0f} MB/s "
              f"= {ratio:.1%} of cold cat timed just before it ({best['cat_cold']:.2f} s); CPU "
              f"{best['cold'][1]:.2f} s; all runs: {', '.join(f'{x:.0%}' for x, _ in pairs)}")
        e2e = min(r["e2e"] for r in runs)
        print(f"  end to end on the local executor (interpreter starts included, warm): {e2e:.2f} s "
              f"= {mb / e2e:.0f} MB/s = {cat / e2e:.1%} of warm cat")


if __name__ == "__main__":
    main()
