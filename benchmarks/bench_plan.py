"""Orchestrator speed at xlarge: `plan` and a dry-run `submit` over 1.28M shards
(10k samples each) against the 10 s budget, and `status` of such a run on
local storage against the 5 s budget. Each command runs as a user runs it
(a fresh `dcslurm` process), and the script prints measured/budget ratios.

    python benchmarks/bench_plan.py [--shards 1280000] [--per-task 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from dcslurm.core.tomlfile import write_toml

BUDGET_PLAN_S = 10.0
BUDGET_STATUS_S = 5.0


def _timed(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dcslurm", *args], capture_output=True, text=True,
                          env=dict(os.environ, COLUMNS="200"))
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"dcslurm {' '.join(args)} failed:\n{proc.stderr}")
    return elapsed, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=1_280_000)
    parser.add_argument("--per-task", type=int, default=100, help="shards per embed task")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-plan-")
    run = os.path.join(tmp, "run")
    config = write_toml(os.path.join(tmp, "run.toml"), {
        "run": {"folder": run, "scale": "xlarge", "stages": ["embed", "filter", "reshard", "train", "eval"]},
        "pool": {"shards": f"s3://datacomp/xlarge/shards/{{{0:08d}..{args.shards - 1:08d}}}.tar"},
        "executor": {"kind": "slurm", "log_dir": f"{tmp}/logs"},
        "slurm": {"partition": "gpu", "array_throttle": 512, "max_array_size": 1001},
        "stages": {"embed": {"units_per_task": args.per_task}, "eval": {"evalsets": "s3://datacomp/evalsets"}},
    })
    # --no-checks: the pool and eval sets named here do not exist; the budget is for planning.
    plan_s, out = _timed(["plan", "-c", config, "--json", "--no-checks"])
    plan = json.loads(out)
    tasks = sum(s["tasks"] for s in plan["steps"])
    dry_s, _ = _timed(["submit", "-c", config, "--dry-run", "--no-checks", "--out", os.path.join(tmp, "sbatch")])
    scripts = len(os.listdir(os.path.join(tmp, "sbatch")))

    # A run folder as it looks mid-run: the plan, and a marker for every embed task.
    from dcslurm.core.config import load_config
    from dcslurm.core.markers import commit_marker
    from dcslurm.core.runs import plan_run
    from dcslurm.core.storage import DataFolder

    full = plan_run(load_config(config))
    folder = DataFolder(run)
    folder.write_text("plan.json", full.to_json())
    embed = full.step("embed")
    t0 = time.perf_counter()
    for i in range(embed.n_tasks):
        commit_marker(folder, "embed", i, [f"embed/{i:08d}.parquet"], {"samples": 10_000 * args.per_task}, 0.0)
    write_s = time.perf_counter() - t0
    status_s, _ = _timed(["status", run, "--json"])

    print(f"xlarge: {args.shards:,} shards, {tasks:,} tasks in {len(plan['steps'])} steps, {scripts} sbatch files")
    print(f"plan           {plan_s:6.2f} s   budget {BUDGET_PLAN_S:.0f} s   ratio {plan_s / BUDGET_PLAN_S:.2f}")
    print(f"submit --dry-run {dry_s:4.2f} s   budget {BUDGET_PLAN_S:.0f} s   ratio {dry_s / BUDGET_PLAN_S:.2f}")
    print(f"status         {status_s:6.2f} s   budget {BUDGET_STATUS_S:.0f} s   ratio {status_s / BUDGET_STATUS_S:.2f}"
          f"   ({embed.n_tasks:,} markers; writing them took {write_s:.1f} s)")


if __name__ == "__main__":
    main()
