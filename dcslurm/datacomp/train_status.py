"""`dcslurm status`: the training stage's last metrics line and checkpoint (no torch)."""

from __future__ import annotations

import json

from dcslurm.core.storage import DataFolder


def last_metrics(run: DataFolder) -> dict | None:
    """The last line of RUN/train/metrics.jsonl, or None."""
    if not run.exists("train/metrics.jsonl"):
        return None
    lines = [x for x in run.read_text("train/metrics.jsonl").splitlines() if x.strip()]
    return json.loads(lines[-1]) if lines else None


def latest_checkpoint(run: DataFolder) -> str | None:
    names = [n for n in run.list("train/checkpoints", suffix=".json") if n.startswith("step-")]
    return names[-1][: -len(".json")] if names else None


def status_section(plan, run_url: str, console) -> None:
    """Print the training progress of a run that has a train step."""
    step = next((s for s in plan.steps if s.stage == "train"), None)
    if step is None:
        return
    run = DataFolder(run_url, plan.storage_options)
    line = last_metrics(run)
    if line is None:
        console.print("train: no metrics yet")
        return
    mfu = f", MFU {line['mfu']:.1%}" if line.get("mfu") is not None else ""
    console.print(
        f"train: step {line['step']:,}, {line['samples']:,} samples, loss {line['loss']:.4f}, "
        f"lr {line['lr']:.3g}, {line['samples_per_s']:,.1f} samples/s "
        f"({line['samples_per_s_per_device']:,.1f} per device){mfu}, memory {line['memory_gb']:.2f} GB; "
        f"last complete checkpoint: {latest_checkpoint(run) or 'none'}")
