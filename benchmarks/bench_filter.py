"""CLIP-score top-30% + basic filter: dcslurm's map-reduce engine vs a straightforward pandas version.

    .venv/bin/python benchmarks/bench_filter.py --rows 12800000 [--scale-check 4] [--workers 2]

The reference does what DataComp's baselines do, in one process: load every
parquet into one DataFrame, sort all L/14 scores for the 30% threshold, run
the basic rule's per-row language ID / word counts / uid conversion over the
whole table, select. Ours is `clip_score(l14, fraction=0.3) then basic` run
by jobs/filter/engine.py in one process (map, reduce, apply, write: the same
code a SLURM run uses, one task). Both use the same fastText lid.176.ftz
model; the subsets must be byte-identical. Each side runs in its own
subprocess, so its peak RSS (ru_maxrss) is its own. `--scale-check 4` also
runs ours on 4x the rows, to show its peak memory does not grow with the pool.
`--workers 2` also runs ours with two processes (files mapped and applied in
parallel, as SLURM array tasks would), printing that wall-time ratio too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SCORE = "clip_l14_similarity_score"


def run_ours(pool: str, out: str, fraction: float, workers: int = 1) -> dict:
    from dcslurm.storage import DataFolder
    from jobs.filter import engine

    work = tempfile.mkdtemp(prefix="bench-filter-work-")
    try:
        stats = engine.run_local(f"clip_score(l14, fraction={fraction}) then basic", engine.list_inputs(pool),
                                 DataFolder(work), out, seed=0, workers=workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"kept": stats["kept_rows"], "rows": stats["input_rows"]}


def run_reference(pool: str, out: str, fraction: float) -> dict:
    import numpy as np
    import pandas as pd

    from jobs.filter.rules import fasttext_model

    model = fasttext_model("")
    paths = sorted(os.path.join(pool, n) for n in os.listdir(pool) if n.endswith(".parquet"))
    df = pd.concat([pd.read_parquet(p, columns=["uid", "text", "original_width", "original_height", SCORE])
                    for p in paths], ignore_index=True)
    df["text"] = df.text.fillna("")  # DataComp's code would stop on a null caption
    n = int(len(df) * fraction)
    threshold = -np.sort(-df[SCORE].values)[n]
    clip_mask = df[SCORE] >= threshold
    lang = df.text.apply(lambda x: model.predict(x.replace("\n", " "))[0][0].split("__label__")[1])
    words = df.text.apply(lambda x: len(x.split()))
    chars = df.text.apply(len)
    uid_int = df.uid.apply(int, base=16)
    upper = (uid_int // 2**64).astype("uint64")
    lower = (uid_int % 2**64).astype("uint64")
    uids = np.array(list(zip(upper, lower)), "u8,u8")
    lo = np.minimum(df.original_width, df.original_height)
    hi = np.maximum(df.original_width, df.original_height)
    mask = clip_mask & (lang == "en") & (words > 2) & (chars > 5) & (lo >= 200) & (hi / lo <= 3.0)
    subset = uids[mask.to_numpy()]
    subset.sort()
    np.save(out, subset)
    return {"kept": int(len(subset)), "rows": int(len(df))}


def child(which: str, pool: str, out: str, fraction: float, workers: int) -> None:
    t0 = time.perf_counter()
    info = run_ours(pool, out, fraction, workers) if which == "ours" else run_reference(pool, out, fraction)
    info["seconds"] = time.perf_counter() - t0
    me, kids_usage = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds: on a shared, overloaded machine wall time measures the neighbours too
    info["cpu_seconds"] = me.ru_utime + me.ru_stime + kids_usage.ru_utime + kids_usage.ru_stime
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest worker process
    info["peak_rss_mb"] = own / 1024
    info["peak_worker_rss_mb"] = kids / 1024
    print(json.dumps(info))


def measure(which: str, pool: str, out: str, fraction: float, workers: int = 1) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", which, "--pool", pool, "--out", out,
                           "--fraction", str(fraction), "--workers", str(workers)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def make_pool(folder: str, rows: int, rows_per_file: int, seed: int) -> float:
    from jobs.filter.synthetic import write_metadata_fast

    t0 = time.perf_counter()
    write_metadata_fast(folder, rows, rows_per_file, seed)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=12_800_000, help="rows in the pool (DataComp small: 12.8M)")
    ap.add_argument("--rows-per-file", type=int, default=200_000)
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--scale-check", type=int, default=4, help="also run ours on this many times the rows (0: skip)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--workers", type=int, default=0,
                    help="also time ours with this many processes for map/apply (0: skip)")
    ap.add_argument("--dir", default="", help="where to write the pools (default: a temp folder, removed)")
    ap.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--pool", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.pool, args.out, args.fraction, args.workers or 1)
        return
    base = args.dir or tempfile.mkdtemp(prefix="bench-filter-")
    try:
        pool = os.path.join(base, "pool")
        gen = make_pool(pool, args.rows, args.rows_per_file, seed=0)
        print(f"pool: {args.rows:,} rows in {-(-args.rows // args.rows_per_file)} parquet files "
              f"(generated in {gen:.0f} s)", flush=True)
        ours = measure("ours", pool, os.path.join(base, "ours.npy"), args.fraction)
        print(f"ours      : {ours['seconds']:8.1f} s wall {ours['cpu_seconds']:8.1f} s CPU  "
              f"peak RSS {ours['peak_rss_mb']:7.0f} MB  kept {ours['kept']:,}  (one process)", flush=True)
        if args.workers > 1:
            par = measure("ours", pool, os.path.join(base, "ours_par.npy"), args.fraction, args.workers)
            print(f"ours x{args.workers}   : {par['seconds']:8.1f} s  peak RSS {par['peak_rss_mb']:7.0f} MB main, "
                  f"{par['peak_worker_rss_mb']:.0f} MB largest worker; same subset: "
                  f"{sha(os.path.join(base, 'ours_par.npy')) == sha(os.path.join(base, 'ours.npy'))}")
        if not args.skip_reference:
            ref = measure("reference", pool, os.path.join(base, "ref.npy"), args.fraction)
            same = sha(os.path.join(base, "ours.npy")) == sha(os.path.join(base, "ref.npy"))
            print(f"reference : {ref['seconds']:8.1f} s wall {ref['cpu_seconds']:8.1f} s CPU  "
                  f"peak RSS {ref['peak_rss_mb']:7.0f} MB  kept {ref['kept']:,}")
            print(f"identical subsets: {same}")
            print(f"speedup: {ref['cpu_seconds'] / ours['cpu_seconds']:.1f}x in CPU time, "
                  f"{ref['seconds'] / ours['seconds']:.1f}x in wall time   "
                  f"memory: ours {ours['peak_rss_mb'] / 1024:.2f} GB vs reference {ref['peak_rss_mb'] / 1024:.2f} GB")
            if args.workers > 1:
                print(f"speedup with {args.workers} processes (the map/apply files in parallel, as array tasks "
                      f"would be): {ref['seconds'] / par['seconds']:.1f}x in wall time, "
                      f"{(par['peak_rss_mb'] + (args.workers - 1) * par['peak_worker_rss_mb']) / 1024:.2f} GB "
                      f"peak in all (main + workers)")
            if not same:
                raise SystemExit("subsets differ")
        if args.scale_check:
            big = os.path.join(base, "pool_x")
            rows = args.rows * args.scale_check
            shutil.rmtree(pool, ignore_errors=True)
            gen = make_pool(big, rows, args.rows_per_file, seed=1)
            ours_big = measure("ours", big, os.path.join(base, "ours_x.npy"), args.fraction)
            print(f"ours x{args.scale_check} ({rows:,} rows, generated in {gen:.0f} s): {ours_big['seconds']:.1f} s wall "
                  f"{ours_big['cpu_seconds']:.1f} s CPU  "
                  f"peak RSS {ours_big['peak_rss_mb']:.0f} MB (x{ours_big['peak_rss_mb'] / ours['peak_rss_mb']:.2f} "
                  f"of the {args.rows:,}-row run)")
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
