"""Reshard throughput against raw sequential reading of the same input shards, bytes read
from S3, and speed against DataComp's resharder.py.

    .venv/bin/python benchmarks/bench_reshard.py [--shards 4] [--samples 10000] [--dir /tmp/bench-reshard]
        [--out-dir /dev/shm/bench-reshard] [--sections throughput,s3,datacomp]

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

Section `s3`: the same pool in a bucket of a private SeaweedFS (the test suite's
server, with its metrics on), resharded with the 30% subset; the bytes the server
sent of the pool's bucket (its own counter, every process and request included)
against the bytes of the kept samples' members plus their 512-byte headers. The
count step reads each tar once (it walks every header and json); the write step
should read only the kept spans. Goal: write's reads <= 1.1x kept + headers.

Section `datacomp`: DataComp's resharder.py (shared/datacomp/reference, run as it
is, in its own virtualenv: --datacomp-python) and this reshard on the local
executor, both with --workers processes, same shards, same 30% subset; wall
time of the whole command each. resharder.py imports img2dataset's blurrer at the
top but uses it only with --apply-blur: the benchmark gives it a stand-in module
(written under --dir) rather than img2dataset's whole download stack; its other
imports (cv2, simdjson, cloudpathlib) are installed into DataComp's virtualenv
(benchmarks/datacomp_env.py) the first time, unless --datacomp-python names another.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np
from PIL import Image
from skimage import data as skdata

from dcslurm.core.config import load_config
from dcslurm.core.runs import submit_run
from dcslurm.core.taskrun import run_task
from dcslurm.core.tomlfile import write_toml
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
    """img2dataset-like shards {:08d}.tar, each with the {:08d}_stats.json img2dataset writes beside it."""
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
        with open(os.path.join(folder, f"{shard:08d}_stats.json"), "w") as f:
            json.dump({"count": per_shard, "successes": per_shard}, f)
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
    cfg = write_config(os.path.join(root, f"{name}.toml"), run, shards, subset, tasks)
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


def write_config(path: str, run: str, shards: str, subset: str, tasks: int, workers: int = 1,
                 endpoint_url: str = "") -> str:
    doc = {
        "run": {"folder": run, "stages": ["reshard"]},
        "pool": {"shards": shards},
        # task logs beside the config: an s3:// run has no RUN/logs, and ./dcslurm-logs is the caller's cwd
        "executor": {"kind": "local", "max_parallel": workers,
                     "log_dir": os.path.join(os.path.dirname(os.path.abspath(path)), "logs")},
        "stages": {"reshard": {"subset": subset, "tasks": tasks}},
    }
    if endpoint_url:
        doc["storage"] = {"endpoint_url": endpoint_url}
    return write_toml(path, doc)


def kept_bytes(paths: list[str], subset_uids: list[str]) -> tuple[int, int]:
    """(bytes of the members of the samples whose uid is in the subset, their header bytes):
    what a reshard must read at least, each sample once however often the subset repeats it."""
    wanted = set(subset_uids)
    data = headers = 0
    for p in paths:
        members: dict[str, list[int]] = {}
        uid_of: dict[str, str] = {}
        with tarfile.open(p) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                members.setdefault(key, []).append(m.size)
                if ext == "json":
                    uid_of[key] = json.loads(tar.extractfile(m).read())["uid"]
        for key, sizes in members.items():
            if uid_of.get(key) in wanted:
                data += sum(sizes)
                headers += tarfile.BLOCKSIZE * len(sizes)
    return data, headers


def bench_s3(root: str, paths: list[str], subset: str, subset_uids: list[str], tasks: int) -> None:
    """Bytes read from S3 by a reshard of the pool in a bucket; see the module docstring."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.test_reshard_s3 import MeteredS3Server

    server = MeteredS3Server().start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)  # the task processes take credentials from the environment
    try:
        fs = server.fs()
        pool = server.make_bucket("bench-pool").removeprefix("s3://")
        out = server.make_bucket("bench-run")
        for p in paths:
            fs.put_file(p, f"{pool}/{os.path.basename(p)}")
        fs.put_file(subset, f"{out.removeprefix('s3://')}/subset.npy")
        cfg = write_config(os.path.join(root, "s3.toml"), f"{out}/run", f"s3://{pool}", f"{out}/subset.npy", tasks,
                           endpoint_url=server.endpoint_url)
        before = server.sent_bytes(pool)
        t = time.perf_counter()
        assert not submit_run(load_config(cfg)).failed
        wall = time.perf_counter() - t
        read = server.sent_bytes(pool) - before
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.close()
    total = sum(os.path.getsize(p) for p in paths)
    data, headers = kept_bytes(paths, subset_uids)
    write = read - total  # the count step reads each tar once, whole
    print(f"S3 reshard [30% subset]: {wall:.2f} s; the server sent {read / 1e6:.1f} MB of the pool's "
          f"{total / 1e6:.1f} MB; kept members {data / 1e6:.1f} MB + headers {headers / 1e6:.2f} MB")
    print(f"  count step (each tar once): {total / 1e6:.1f} MB; write step: {write / 1e6:.1f} MB "
          f"= {write / (data + headers):.3f}x kept + headers (goal <= 1.1x); whole stage: "
          f"{read / (data + headers):.2f}x kept + headers, {read / total:.2f}x the input")


def digests(folder: str) -> dict[str, str]:
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(folder)) if n.endswith(".tar")}


def output_samples(folder: str) -> int:
    """Samples in the output shards, counted from their tars (both tools' outputs alike)."""
    total = 0
    for p in glob.glob(os.path.join(folder, "*.tar")):
        with tarfile.open(p) as tar:
            total += len({m.name.split(".", 1)[0] for m in tar})
    return total


def bench_datacomp(root: str, shards: str, subset: str, tasks: int, workers: int, python: str,
                   pythonpath: str) -> None:
    """Wall time of DataComp's resharder.py and of this reshard, same shards and subset."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    reference = os.path.join(os.path.dirname(here), "shared", "datacomp", "reference", "resharder.py")
    if not os.path.exists(reference):
        reference = "/work/shared/datacomp/reference/resharder.py"
    shim = os.path.join(root, "dc-shim", "img2dataset")  # see the module docstring
    os.makedirs(shim, exist_ok=True)
    with open(os.path.join(shim, "__init__.py"), "w") as f:
        f.write('"""Stand-in: resharder.py uses img2dataset only with --apply-blur (not passed)."""\n')
    with open(os.path.join(shim, "blurrer.py"), "w") as f:
        f.write("class BoundingBoxBlurrer:  # made by every worker, called only with --apply-blur\n"
                "    def __call__(self, *a, **k):\n"
                "        raise RuntimeError('img2dataset stand-in: --apply-blur is not supported here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, os.path.dirname(shim)) if p)}
    probe = subprocess.run([python, "-c", "import cv2, simdjson, cloudpathlib, webdataset, pyarrow, tqdm"],
                           env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        print(f"DataComp resharder.py: skipped: {python} cannot import its modules "
              f"({(probe.stderr.strip().splitlines() or ['?'])[-1]}); see --datacomp-python/--datacomp-pythonpath")
        return
    # CPU seconds too (every process of the command): on a machine shared with other work the
    # wall time of a CPU-bound tool swings with the load, its CPU time much less
    dc_runs, dc_cpu, dc_digests = [], [], []
    for i in range(2):  # twice: its wall time, and whether its output is the same run to run
        out = os.path.join(root, f"dc-out{i}")
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        t, cpu = time.perf_counter(), _children_cpu()
        subprocess.run([python, reference, "-i", shards, "-o", out, "-s", subset, "-j", str(workers),
                        "--shard-size", "10000", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        dc_runs.append(time.perf_counter() - t)
        dc_cpu.append(_children_cpu() - cpu)
        dc_digests.append(digests(out))
    ours, our_cpu, our_digests, spans = [], [], [], []
    for i in range(2):
        run = os.path.join(root, f"ours-run{i}")
        shutil.rmtree(run, ignore_errors=True)
        cfg = write_config(os.path.join(root, f"ours{i}.toml"), run, shards, subset, tasks, workers)
        t, began, cpu = time.perf_counter(), time.time(), _children_cpu() + time.process_time()
        assert not submit_run(load_config(cfg)).failed
        ours.append(time.perf_counter() - t)
        our_cpu.append(_children_cpu() + time.process_time() - cpu)
        our_digests.append(digests(os.path.join(run, "reshard")))
        spans.append(step_spans(run, began))
    dc_n = output_samples(os.path.join(root, "dc-out0"))
    our_n = output_samples(os.path.join(root, "ours-run0", "reshard"))
    print(f"DataComp resharder.py -j {workers}: {min(dc_runs):.2f} s (runs: {', '.join(f'{x:.2f}' for x in dc_runs)}"
          f"; CPU {', '.join(f'{x:.1f}' for x in dc_cpu)} s), {dc_n} samples; output identical run to run: "
          f"{dc_digests[0] == dc_digests[1]}")
    print(f"reshard, local executor, {workers} at a time: {min(ours):.2f} s (runs: "
          f"{', '.join(f'{x:.2f}' for x in ours)}; CPU {', '.join(f'{x:.1f}' for x in our_cpu)} s), {our_n} samples; "
          f"output identical run to run: {our_digests[0] == our_digests[1]}")
    print(f"  speed against resharder.py (best runs): {min(dc_runs) / min(ours):.2f}x (goal >= 3x); CPU time: "
          f"{min(dc_cpu) / min(our_cpu):.2f}x less; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"  where ours went (best run; seconds from the submit, each step's first task start to its "
          f"last commit): {spans[ours.index(min(ours))]}")


def step_spans(run: str, began: float) -> str:
    """Per step of a finished run: its tasks, and when its first task started and its last
    committed (seconds after `began`), from the commit markers; the gaps between steps
    are interpreter starts and the executor's turnaround."""
    parts = []
    for step in ("reshard.count", "reshard.index", "reshard.write", "reshard.finalize"):
        markers = [json.load(open(p)) for p in glob.glob(os.path.join(run, "_markers", step, "*.json"))]
        if markers:
            first, last = min(m["started"] for m in markers), max(m["finished"] for m in markers)
            parts.append(f"{step.split('.')[1]} x{len(markers)} {first - began:.2f}-{last - began:.2f}")
    return "; ".join(parts)


def _datacomp_python() -> str:
    from datacomp_env import RESHARDER_PACKAGES, datacomp_python  # benchmarks/ is sys.path[0] when run

    return datacomp_python(RESHARDER_PACKAGES, "resharder")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples", type=int, default=10_000, help="samples per input shard (DataComp: 10,000)")
    parser.add_argument("--tasks", type=int, default=2, help="write tasks")
    parser.add_argument("--dir", default="/tmp/bench-reshard")
    parser.add_argument("--repeat", type=int, default=3, help="reshard runs per subset (best reported)")
    parser.add_argument("--out-dir", default="", help="where the runs write their shards (default: --dir); "
                        "/dev/shm leaves out this disk's write speed")
    parser.add_argument("--sections", default="throughput,s3,datacomp",
                        help="which parts to run (comma-separated: throughput, s3, datacomp)")
    parser.add_argument("--workers", type=int, default=2, help="datacomp: processes of each tool")
    parser.add_argument("--datacomp-python", default="",
                        help="datacomp: the interpreter of DataComp's environment (default: "
                        "benchmarks/datacomp_env.py builds one, with resharder.py's packages, on first use)")
    parser.add_argument("--datacomp-pythonpath", default="", help="datacomp: extra PYTHONPATH for it")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    shards = os.path.join(args.dir, "shards")
    shutil.rmtree(args.dir, ignore_errors=True)
    uids = build_pool(shards, args.shards, args.samples)
    paths = sorted(os.path.join(shards, n) for n in os.listdir(shards) if n.endswith(".tar"))
    total = sum(os.path.getsize(p) for p in paths)
    rng = np.random.default_rng(1)
    picked = [u for u in uids if rng.random() < 0.3]
    subsets = {
        "30% subset, 10% of it x2": picked + picked[: len(picked) // 10],
        "every sample once": uids,
    }
    for i, subset_uids in enumerate(subsets.values()):
        np.save(os.path.join(args.dir, f"subset{i}.npy"), uids_to_array(subset_uids))
    mb = total / 1e6
    print(f"input: {len(paths)} shards, {len(uids)} samples, {mb:.1f} MB; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    if "s3" in sections:
        bench_s3(args.dir, paths, os.path.join(args.dir, "subset0.npy"), subsets["30% subset, 10% of it x2"],
                 args.tasks)
    if "datacomp" in sections:
        bench_datacomp(args.dir, shards, os.path.join(args.dir, "subset0.npy"), args.tasks, args.workers,
                       args.datacomp_python or _datacomp_python(), args.datacomp_pythonpath)
    if "throughput" not in sections:
        return
    cold, cold_cpu = time_cat(paths, cold=True)
    print(f"cat to /dev/null, cold: wall {cold:.3f} s = {mb / cold:.0f} MB/s; CPU {cold_cpu:.3f} s")
    time_cat(paths)  # warm the page cache
    cat, cat_cpu = time_cat(paths)
    print(f"cat to /dev/null, warm: wall {cat:.3f} s = {mb / cat:.0f} MB/s; CPU {cat_cpu:.3f} s")
    copy = time_copy(paths, os.path.join(args.dir, "copy.tmp"))
    print(f"(for scale) cat into one fsync'd file on the same disk: {copy:.3f} s = {mb / copy:.0f} MB/s "
          f"= {cat / copy:.1%} of warm cat, {cold / copy:.1%} of cold cat")
    for i, label in enumerate(subsets):
        path = os.path.join(args.dir, f"subset{i}.npy")
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
