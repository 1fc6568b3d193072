"""Per-task cost of running tasks inside the Apptainer image vs. on the host.

Runs the same small run of the test-only stages (synth -> digest -> summary,
N + N + 1 tasks, one at a time) with the local executor twice: `[container]
enabled = false` (the reference: the host interpreter) and inside the CPU
image. Prints seconds per task for each and the ratio; checks both runs wrote
identical outputs.

    python benchmarks/container_overhead.py IMAGE.sif [--tasks 8]

IMAGE.sif: a CPU image of this checkout (`dcslurm containers build --kind cpu`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dcslurm.core.config import load_config  # noqa: E402
from dcslurm.core.runs import submit_run  # noqa: E402
from dcslurm.core.tomlfile import write_toml  # noqa: E402


def write_config(folder: str, name: str, tasks: int, image: str | None, apptainer: str) -> str:
    container = ({"enabled": True, "apptainer": apptainer, "cpu_image": image,
                  "scratch": os.path.join(folder, "scratch")} if image else {"enabled": False})
    os.makedirs(os.path.join(folder, "scratch"), exist_ok=True)
    return write_toml(os.path.join(folder, f"{name}.toml"), {
        "run": {"folder": os.path.join(folder, name), "stages": ["synth", "digest", "summary"]},
        "executor": {"kind": "local", "max_parallel": 1},
        "container": container,
        "stages": {"synth": {"units": tasks}},
    })


def outputs(run: str) -> dict[str, str]:
    out = {}
    for stage in ("synth", "digest", "summary"):
        for dirpath, dirnames, names in os.walk(os.path.join(run, stage)):
            dirnames[:] = [d for d in dirnames if d != "_executions"]  # per-attempt bookkeeping (random ids)
            for n in names:
                p = os.path.join(dirpath, n)
                out[os.path.relpath(p, run)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def timed_run(config: str) -> float:
    started = time.perf_counter()
    result = submit_run(load_config(config))
    if result.failed:
        raise SystemExit(f"{config}: tasks failed: {result.failed}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("image")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--apptainer", default=shutil.which("apptainer") or "apptainer")
    args = parser.parse_args()
    n_tasks = 2 * args.tasks + 1
    with tempfile.TemporaryDirectory(prefix="dcslurm-bench-") as tmp:
        host = timed_run(write_config(tmp, "host", args.tasks, None, args.apptainer))
        boxed = timed_run(write_config(tmp, "container", args.tasks, os.path.abspath(args.image), args.apptainer))
        same = outputs(os.path.join(tmp, "host")) == outputs(os.path.join(tmp, "container"))
    print(f"{n_tasks} tasks, one at a time, local executor")
    print(f"host interpreter (reference): {host:6.1f} s  {host / n_tasks:.2f} s/task")
    print(f"apptainer exec (CPU image):   {boxed:6.1f} s  {boxed / n_tasks:.2f} s/task")
    print(f"ratio container/host: {boxed / host:.2f}x; overhead {(boxed - host) / n_tasks:+.2f} s/task; "
          f"outputs identical: {same}")


if __name__ == "__main__":
    main()
