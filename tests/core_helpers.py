"""Shared by the orchestrator's tests: write a run.toml for the test-only stages
and read back what a run committed."""

from __future__ import annotations

import hashlib
import json
import os
import time

from dcslurm.config import load_config
from dcslurm.runs import run_status


def write_run_toml(path, folder: str, units: int = 20, per_task: int = 1, sleep: float = 0.0,
                   executor: str = "local", extra: str = "", fail_tasks=(), digest_sleep: float = 0.0) -> str:
    text = f"""
[run]
folder = {json.dumps(folder)}
stages = ["synth", "digest", "summary"]

[executor]
kind = "{executor}"

[stages.synth]
units = {units}
units_per_task = {per_task}
sleep = {sleep}
fail_tasks = {list(fail_tasks)}

[stages.digest]
sleep = {digest_sleep}
{extra}
"""
    path = str(path)
    with open(path, "w") as f:
        f.write(text)
    return path


def tree_digest(root: str, skip=("_submissions", "_executions", "logs", "_markers", "_failures",
                                 "run.json")) -> dict[str, str]:
    """sha256 of every output file under a local run folder (bookkeeping excluded)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            if name in skip:
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def executions(run_folder: str, stage: str) -> list[dict]:
    folder = os.path.join(run_folder, stage, "_executions")
    if not os.path.isdir(folder):
        return []
    return [json.load(open(os.path.join(folder, n))) for n in sorted(os.listdir(folder))]


def wait_run_done(config_path: str, timeout: float = 300) -> None:
    cfg = load_config(config_path)
    deadline = time.time() + timeout
    while time.time() < deadline:
        _, steps = run_status(cfg.run_url, cfg.storage_options, config=cfg, with_logs=False)
        if all(s.counts["done"] == s.n_tasks for s in steps):
            return
        if any(s.counts["failed"] for s in steps) and not any(s.counts["running"] + s.counts["pending"] for s in steps):
            raise AssertionError(f"run failed: {[(s.name, s.counts) for s in steps]}")
        time.sleep(1)
    raise AssertionError(f"run not done after {timeout} s: {[(s.name, s.counts) for s in steps]}")
