"""Shared by the orchestrator's tests: write a run.toml for the test-only stages (through
dcslurm.core.tomlfile, the one TOML writer) and read back what a run committed."""

from __future__ import annotations

import hashlib
import json
import os
import time
import tomllib

from dcslurm.core.config import load_config
from dcslurm.core.runs import run_status
from dcslurm.core.tomlfile import write_toml


def write_run_toml(path, folder: str, units: int = 20, per_task: int = 1, sleep: float = 0.0,
                   executor: str = "local", extra: dict | str = "", fail_tasks=(), digest_sleep: float = 0.0) -> str:
    """A run of the test-only stages synth -> digest -> summary. `extra`: more tables, merged
    in (a dict, or TOML text: read first, so the file is still written by the one writer)."""
    doc = {
        "run": {"folder": folder, "stages": ["synth", "digest", "summary"]},
        "executor": {"kind": executor},
        "stages": {
            "synth": {"units": units, "units_per_task": per_task, "sleep": sleep, "fail_tasks": list(fail_tasks)},
            "digest": {"sleep": digest_sleep},
        },
    }
    return write_toml(path, merge_tables(doc, extra))


def merge_tables(base: dict, more: dict | str) -> dict:
    """`base` with `more`'s tables merged in, key by key at every depth (`more` wins);
    `more` may be TOML text (callers' extra tables), read with tomllib first."""
    if isinstance(more, str):
        more = tomllib.loads(more)
    out = dict(base)
    for key, value in more.items():
        out[key] = merge_tables(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


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


def write_ticker_toml(path, folder: str, ticks: int = 5, executor: str = "local", extra: dict | str = "") -> str:
    """A run of the test-only checkpointable stage `ticker` (jobs/testing); `extra` as in write_run_toml."""
    doc = {"run": {"folder": folder, "stages": ["ticker"]}, "executor": {"kind": executor},
           "stages": {"ticker": {"ticks": ticks}}}
    return write_toml(path, merge_tables(doc, extra))


def update_toml(path, more: dict | str) -> str:
    """Rewrite the TOML file `path` with `more`'s tables merged in (as in merge_tables): a test's
    change to a config a helper wrote, through the one writer rather than by editing its text."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    return write_toml(path, merge_tables(doc, more))
