"""Download memory and throughput with decompression bombs in the pool, one run.

    .venv/bin/python benchmarks/bench_download_bombs.py [--small 600] [--large 20] [--rounds 2]

One download task (`python -m dcslurm.cli submit`, local executor, the real
runner) at the stage's default threads (64) and processes (cpus_per_task = 2)
over two pools served by tests/imageserver.py on 127.0.0.1:

- bombs: `--small` real photos (JPEG, 170-512 px) and `--large` one-colour PNGs of
         100-900 megapixels (1-bit, ~0.1 MB each: what a decompression bomb looks
         like), spread over the shards;
- clean: the same small photos only.

Peak memory of the task's processes (runner, workers, helpers; not the submit
process), sampled every 20 ms, two ways: the sum of PSS (shared pages split
between the processes sharing them: what the task costs the node, as a cgroup
counts it) and the sum of RSS (shared pages, e.g. torch's libraries that
img2dataset's imports pull into every worker, counted once per process: an
upper bound, what SLURM's jobacct_gather/linux reports without UsePss). Throughput: small images downloaded per second
of the task's shard wall time (first shard start to last shard end). The two
pools alternate for `--rounds` rounds; best of each is compared.
Goals (issue 17): peak RSS under 2 GB; clean / bombs throughput within 10%.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dcslurm.core.storage import DataFolder  # noqa: E402
from dcslurm.core.tomlfile import write_toml  # noqa: E402
from jobs.download.stats import DownloadTotals, read_stats_file  # noqa: E402
from tests.imageserver import ImageServer  # noqa: E402
from tests.test_download import write_pool  # noqa: E402


def _rss_pss_kb(pid: int) -> tuple[int, int]:
    """(Rss, Pss) of a process in KB, from /proc/PID/smaps_rollup; (0, 0) when it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, pss


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def run_task(pool: str, run: str) -> tuple[float, float, float, DownloadTotals]:
    """(peak PSS GB, peak RSS GB, small-image throughput in samples/s, totals) of one download task."""
    config = write_toml(run + ".toml", {
        "run": {"folder": run, "stages": ["download"]}, "pool": {"metadata": pool},
        "executor": {"kind": "local", "max_parallel": 1},
        "stages": {"download": {"samples_per_shard": 100}},  # threads, processes: the defaults
    })
    proc = subprocess.Popen([sys.executable, "-m", "dcslurm.cli", "submit", "-c", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = [0, 0]  # PSS, RSS

    def sample() -> None:
        while proc.poll() is None:
            both = [_rss_pss_kb(p) for p in _descendants(proc.pid)]
            peak[0] = max(peak[0], sum(pss for _rss, pss in both))
            peak[1] = max(peak[1], sum(rss for rss, _pss in both))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if proc.wait() != 0:
        logs = os.path.join(run, "logs", "download")
        tail = "".join(open(os.path.join(logs, n)).read()[-3000:] for n in sorted(os.listdir(logs)))
        raise SystemExit(f"the download of {pool} failed:\n{tail}")
    sampler.join()
    out = DataFolder(os.path.join(run, "download"))
    totals = DownloadTotals()
    for name in out.list(suffix="_stats.json"):
        totals.add(read_stats_file(out, name))
    return peak[0] / 1024 ** 2, peak[1] / 1024 ** 2, totals.successes / totals.wall_seconds, totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=600)
    parser.add_argument("--large", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    rng = random.Random(0)
    tmp = tempfile.mkdtemp(prefix="bench-bombs-")
    try:
        with ImageServer() as server:
            small = [(server.url("good", i), f"photo {i}") for i in range(args.small)]
            large = []
            for i in range(args.large):  # 100-900 megapixels, various aspect ratios
                mp = rng.uniform(100, 900) * 1e6
                aspect = rng.uniform(0.5, 2.0)
                w = int((mp * aspect) ** 0.5)
                large.append((server.large_url(i, w, int(mp / w)), f"large {i} {w}x{int(mp / w)}"))
            step = max(1, len(small) // max(1, len(large)))
            bomb_rows = []  # the large ones spread evenly among the photos
            for j, row in enumerate(small):
                bomb_rows.append(row)
                if j % step == step // 2 and j // step < len(large):
                    bomb_rows.append(large[j // step])
            bomb_rows += large[len(bomb_rows) - len(small):]
            pools = {"bombs": os.path.join(tmp, "bombs"), "clean": os.path.join(tmp, "clean")}
            write_pool(pools["bombs"], [bomb_rows])
            write_pool(pools["clean"], [small])
            results: dict[str, list] = {"bombs": [], "clean": []}
            for r in range(args.rounds):
                for side in (("bombs", "clean") if r % 2 == 0 else ("clean", "bombs")):
                    pss, rss, rate, totals = run_task(pools[side], os.path.join(tmp, f"{side}-{r}"))
                    results[side].append((pss, rss, rate, totals))
                    print(f"round {r}: {side:5s} peak PSS {pss:5.2f} GB, RSS {rss:5.2f} GB  "
                          f"small images {rate:6.1f}/s  "
                          f"successes {totals.successes}  failures {dict(totals.failures)}", flush=True)
        print(f"\n{args.small} photos + {args.large} PNGs of 100-900 MP, default threads (64) and "
              f"processes (2), cpu count {os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}")
        print(f"{'':12s}{'bombs':>10s}{'clean':>10s}")
        pss = {k: max(x[0] for x in v) for k, v in results.items()}
        rss = {k: max(x[1] for x in v) for k, v in results.items()}
        rate = {k: max(x[2] for x in v) for k, v in results.items()}
        print(f"{'peak PSS GB':12s}{pss['bombs']:10.2f}{pss['clean']:10.2f}   (max over rounds; goal < 2 GB)")
        print(f"{'peak RSS GB':12s}{rss['bombs']:10.2f}{rss['clean']:10.2f}   (max over rounds; sum over processes)")
        print(f"{'small img/s':12s}{rate['bombs']:10.1f}{rate['clean']:10.1f}   (best over rounds)")
        print(f"bombs / clean throughput: {rate['bombs'] / rate['clean']:.3f} (goal >= 0.90)")
        refused = results["bombs"][-1][3].failures.get("image too large", 0)
        print(f"large images refused as 'image too large': {refused} of {args.large}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
