"""Download stage vs img2dataset run directly, same parquet, same settings, one run.

    .venv/bin/python benchmarks/bench_download.py [--samples 2000] [--processes 2] [--threads 16] [--rounds 2]

Both sides download the demo pool (generated once into a temp folder) through the
same server (`DemoPoolServer`, 127.0.0.1, started by this script) to local disk, with DataComp's
settings (512 px keep_ratio_largest only if bigger, jpg, retries 2, uid kept,
face_bboxes blurring) and the same processes x threads:

- stage:  `python -m dcslurm.cli submit` of a one-task download run (the real
          runner: plan, footers, shard ids, resume check, marker, report stats),
          `[stages.download] http_proxy` naming the server;
- direct: `python -c "img2dataset.download(...)"` over the pool folder, as
          DataComp's download_upstream.py calls it, with the environment's
          http_proxy naming the server.

Both are timed as whole processes (interpreter start and imports included), and
alternated for `--rounds` rounds so machine load hits both alike. Prints samples/s
of each, and the overhead of the stage (goal: under 5%).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from dcslurm.core.storage import DataFolder
from dcslurm.core.tomlfile import write_toml
from dcslurm.demo.pool import DemoPoolServer, generate_demo_pool

DIRECT = """
import os, sys
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
import img2dataset
img2dataset.download(
    url_list=sys.argv[1], output_folder=sys.argv[2], processes_count=int(sys.argv[3]),
    thread_count=int(sys.argv[4]), image_size=512, resize_mode="keep_ratio_largest",
    resize_only_if_bigger=True, encode_format="jpg", output_format="webdataset", input_format="parquet",
    url_col="url", caption_col="text", bbox_col="face_bboxes", save_additional_columns=["uid"],
    number_sample_per_shard=int(sys.argv[5]), oom_shard_count=8, retries=2, enable_wandb=False,
)
"""


def run_direct(pool: str, out: str, processes: int, threads: int, per_shard: int, proxy: str) -> float:
    env = dict(os.environ, http_proxy=proxy, no_proxy="")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", DIRECT, pool, out, str(processes), str(threads), str(per_shard)],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def run_stage(pool: str, run: str, processes: int, threads: int, per_shard: int, files: int, proxy: str) -> float:
    config = write_toml(os.path.join(os.path.dirname(run), os.path.basename(run) + ".toml"), {
        "run": {"folder": run, "stages": ["download"]},
        "pool": {"metadata": pool},
        "executor": {"kind": "local", "max_parallel": 1},
        "stages": {"download": {"units_per_task": files, "processes": processes, "threads": threads,
                                "samples_per_shard": per_shard, "http_proxy": proxy}},
    })
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dcslurm.cli", "submit", "-c", config], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def successes(folder: str) -> int:
    total = 0
    for name in os.listdir(folder):
        if name.endswith("_stats.json"):
            with open(os.path.join(folder, name)) as f:
                total += json.load(f)["successes"]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    stack = contextlib.ExitStack()  # the pool's server, up for every round of both sides
    tmp = tempfile.mkdtemp(prefix="bench-download-")
    pool = os.path.join(tmp, "pool")
    try:
        generate_demo_pool(pool, samples=args.samples, seed=0, files=args.files, heldout=0)
        server = stack.enter_context(DemoPoolServer(DataFolder(pool)))
        times: dict[str, list[float]] = {"stage": [], "direct": []}
        counts: dict[str, int] = {}
        for r in range(args.rounds):
            order = ("stage", "direct") if r % 2 == 0 else ("direct", "stage")
            for side in order:
                out = os.path.join(tmp, f"{side}-{r}")
                if side == "stage":
                    t = run_stage(pool, out, args.processes, args.threads, args.samples_per_shard, args.files,
                                  server.proxy_url)
                    counts[side] = successes(os.path.join(out, "download"))
                else:
                    t = run_direct(pool, out, args.processes, args.threads, args.samples_per_shard, server.proxy_url)
                    counts[side] = successes(out)
                times[side].append(t)
                print(f"round {r}: {side:6s} {t:7.2f} s  {args.samples / t:7.1f} samples/s", flush=True)
        assert counts["stage"] == counts["direct"], counts  # same work on both sides
        best = {k: min(v) for k, v in times.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n{args.samples} samples ({counts['stage']} downloaded), {args.files} parquet files, "
              f"{args.processes} processes x {args.threads} threads, cpu count {os.cpu_count()}, "
              f"load avg {os.getloadavg()[0]:.1f}")
        for k in ("stage", "direct"):
            print(f"{k:6s}: best {best[k]:.2f} s ({args.samples / best[k]:.1f} samples/s), "
                  f"median {med[k]:.2f} s ({args.samples / med[k]:.1f} samples/s)")
        print(f"stage / direct time (best): {best['stage'] / best['direct']:.3f}  "
              f"-> overhead {100 * (best['stage'] / best['direct'] - 1):+.1f}% (goal < 5%)")
        print(f"stage / direct time (median): {med['stage'] / med['direct']:.3f}")
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
