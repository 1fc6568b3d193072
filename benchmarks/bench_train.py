"""Training throughput: our FSDP2 trainer vs open_clip_train (DDP), same everything.

Both train dcslurm-tiny-vit on the same webdataset shards (real images:
scikit-learn's digits), 2 ranks x 1 CPU thread (gloo), the same global batch,
1 DataLoader worker per rank, fp32, local loss + gather with grad, no
activation checkpointing. Prints samples/s of both (median over log
intervals after warm-up) and the ratio ours / open_clip_train.

    .venv/bin/python benchmarks/bench_train.py [--steps 40] [--batch 64]

open_clip_train runs unmodified except for two shims in its launcher, both
printed below: its DDP call passes device_ids=[cpu], which DDP rejects for CPU
modules (dropped here), and webdataset 0.2.111 ends each shard with an {} EOF
marker that open_clip_train's grouping (written for webdataset <= 0.2.86)
crashes on (turned off with eof_value=None).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LAUNCHER = f'''
import functools, sys
sys.path.insert(0, {ROOT!r})
import torch
from jobs.models import register_configs
register_configs()
_DDP = torch.nn.parallel.DistributedDataParallel
class CpuDDP(_DDP):  # shim 1: open_clip_train passes device_ids=[cpu]
    def __init__(self, module, device_ids=None, **kw):
        cpu = bool(device_ids) and str(device_ids[0]) == "cpu"
        super().__init__(module, device_ids=None if cpu else device_ids, **kw)
torch.nn.parallel.DistributedDataParallel = CpuDDP
import open_clip_train.data as ocd  # shim 2: webdataset 0.2.111's per-shard EOF marker
ocd.tar_file_expander = functools.partial(ocd.tar_file_expander, eof_value=None)
from open_clip_train.main import main
main(sys.argv[1:])
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ours(tmp: str, data: str, batch: int, steps: int, log_every: int) -> list[float]:
    from dcslurm.core.config import load_config
    from dcslurm.core.runs import submit_run
    from tests.train_helpers import read_metrics, write_train_toml

    folder = os.path.join(tmp, "ours")
    toml = write_train_toml(os.path.join(tmp, "ours.toml"), folder, data, tasks_per_node=2,
                            batch_size=batch, samples=batch * steps, log_every=log_every,
                            checkpoint_every=10 * steps, workers=1, data_streams=8, shuffle_buffer=64,
                            grad_checkpointing=False, precision="fp32", export=False)
    failed = submit_run(load_config(toml)).failed
    if failed:
        raise SystemExit(f"our trainer failed: see {folder}/logs/train")
    return [m["samples_per_s"] for m in read_metrics(folder)]


def run_open_clip(tmp: str, data: str, n_shards: int, batch: int, steps: int, log_every: int) -> list[float]:
    launcher = os.path.join(tmp, "open_clip_launch.py")
    with open(launcher, "w") as f:
        f.write(LAUNCHER)
    port = free_port()
    args = [
        "--train-data", os.path.join(data, "{00000000..%08d}.tar" % (n_shards - 1)),
        "--train-num-samples", str(batch * steps), "--dataset-type", "webdataset", "--dataset-resampled",
        "--batch-size", str(batch // 2), "--workers", "1", "--epochs", "1", "--lr", "1e-3", "--warmup", "20",
        "--model", "dcslurm-tiny-vit", "--precision", "fp32", "--local-loss", "--gather-with-grad",
        "--dist-backend", "gloo", "--logs", os.path.join(tmp, "oc_logs"), "--name", "bench",
        "--save-frequency", "0", "--log-every-n-steps", str(log_every), "--seed", "0",
    ]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        out = open(os.path.join(tmp, f"oc_rank{rank}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, launcher, *args], env=env, stdout=out,
                                      stderr=subprocess.STDOUT))
    if any(p.wait() for p in procs):
        raise SystemExit(f"open_clip_train failed: see {tmp}/oc_rank0.log")
    text = open(os.path.join(tmp, "oc_rank0.log")).read()
    # "Batch (t): X" is the mean step time since the previous log line.
    return [batch / float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", text)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64, help="global batch (2 ranks)")
    parser.add_argument("--log-every", type=int, default=5)
    args = parser.parse_args()
    from tests.train_helpers import write_shards

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = os.path.join(tmp, "shards")
        n_shards = 8
        write_shards(data, n_shards=n_shards, per_shard=64)
        results = {}
        for name, fn in (("ours (FSDP2)", lambda: run_ours(tmp, data, args.batch, args.steps, args.log_every)),
                         ("open_clip_train (DDP)", lambda: run_open_clip(tmp, data, n_shards, args.batch,
                                                                          args.steps, args.log_every))):
            started = time.time()
            rates = fn()
            steady = rates[2:] if len(rates) > 3 else rates  # skip warm-up intervals
            results[name] = statistics.median(steady)
            print(f"{name:24s} {results[name]:8.1f} samples/s  (median of {len(steady)} intervals; "
                  f"all: {', '.join(f'{r:.0f}' for r in rates)}; wall {time.time() - started:.0f} s)")
        ours, ref = results["ours (FSDP2)"], results["open_clip_train (DDP)"]
        print(f"ratio ours / open_clip_train: {ours / ref:.2f}  "
              f"(dcslurm-tiny-vit, global batch {args.batch}, 2 ranks x 1 thread, gloo, fp32, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
