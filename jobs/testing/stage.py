"""Test-only stage code (see spec.py)."""

from __future__ import annotations

import hashlib
import time
import uuid

from dcslurm.core.task import Preempted, TaskContext, TaskResult


def synth_bytes(seed: int, unit: int, size: int) -> bytes:
    """The deterministic content of test shard `unit`."""
    out = bytearray()
    block = f"{seed}:{unit}".encode()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out.extend(block)
    return bytes(out[:size])


def _record_execution(ctx: TaskContext) -> None:
    # One file per execution, so tests can prove no task ran after its marker existed.
    ctx.output.write_json(f"_executions/{ctx.index:06d}-{uuid.uuid4().hex}.json",
                          {"index": ctx.index, "time": time.time()})


def synth(ctx: TaskContext) -> TaskResult:
    _record_execution(ctx)
    time.sleep(ctx.params.sleep)
    if ctx.index in ctx.params.fail_tasks:
        raise RuntimeError(f"planted failure in task {ctx.index}")
    size = ctx.params.bytes_per_unit
    outputs = []
    for unit in ctx.shards:
        rel = f"shard-{unit:08d}.bin"
        ctx.output.write_bytes(rel, synth_bytes(ctx.seed, unit, size))
        outputs.append(f"{ctx.step.stage}/{rel}")
    return TaskResult(outputs=outputs, stats={"units": len(ctx.shards), "bytes": size * len(ctx.shards)})


def digest(ctx: TaskContext) -> TaskResult:
    _record_execution(ctx)
    time.sleep(ctx.params.sleep)
    lines = []
    for url in ctx.input_names():
        parent, name = url.rsplit("/", 1)
        lines.append(f"{hashlib.sha256(ctx.folder(parent).read_bytes(name)).hexdigest()}  {name}\n")
    rel = f"digest-{ctx.index:06d}.txt"
    ctx.output.write_text(rel, "".join(lines))
    return TaskResult(outputs=[f"{ctx.step.stage}/{rel}"], stats={"files": len(lines)})


def summary(ctx: TaskContext) -> TaskResult:
    _record_execution(ctx)
    parts = []
    for url in ctx.upstream_outputs("digest"):
        parent, name = url.rsplit("/", 1)
        parts.append(ctx.folder(parent).read_text(name))
    text = "".join(parts)
    ctx.output.write_text("summary.txt", text)
    ctx.output.write_json("summary.json", {"files": text.count("\n"),
                                           "sha256": hashlib.sha256(text.encode()).hexdigest()})
    return TaskResult(outputs=["summary/summary.txt", "summary/summary.json"], stats={"files": text.count("\n")})


def ticker(ctx: TaskContext) -> TaskResult:
    """Counts to `ticks`, one tick per ctx.should_stop() poll. Asked to stop, it saves its
    checkpoint (the ticks done so far) and raises Preempted; the next attempt resumes from it.
    `progress.json` (each tick) lets a test signal it mid-run."""
    _record_execution(ctx)
    state = ctx.output.read_json("checkpoint.json") if ctx.output.exists("checkpoint.json") else {"ticks": []}
    ticks, start = list(state["ticks"]), len(state["ticks"])
    total = ctx.params.ticks
    for tick in range(start + 1, total + 1):
        ticks.append(tick)
        ctx.output.write_json("progress.json", {"tick": tick})
        if ctx.should_stop() and tick < total:
            ctx.output.write_json("checkpoint.json", {"ticks": ticks})
            raise Preempted(f"stopped at tick {tick}: checkpoint saved")
    ctx.output.write_json("ticks.json", {"ticks": ticks})
    return TaskResult(outputs=["ticker/ticks.json"], stats={"ticks": total, "resumed_from": start})
