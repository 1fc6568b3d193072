"""Issue 16's soak: at least 100 random SIGKILLs of any process of a run (the `dcslurm submit`
process, a task's runner, an img2dataset worker, a training rank), across download, embed,
filter, reshard, train and eval, each followed by a resubmission; every completed pass must
equal an undisturbed run byte for byte, no trial may hang, and nothing may outlive its run.

The workflow is the demo workflow of tests/test_reliability.py on a tiny demo pool, run by
the local executor as a user runs it (`python -m dcslurm submit -c run.toml`, a subprocess).
Download runs with one process and one thread, so img2dataset writes samples in the pool's
order and its shards are comparable byte for byte (with threads > 1 only the content sets
would be). Training runs as two ranks so that a rank can be killed on its own.

A pass is one fresh run folder. Within a pass the kills go in stage order (a stage's quota of
kills, then the next stage's; STAGE_SHARE spreads them by what a kill costs): a trial starts
`dcslurm submit`, walks /proc for the descendants of the submit process (by parent pid), tells
which stage runs from the runner's argv (`python -m dcslurm.core.runner RUN STEP INDEX`), waits a
random moment within the time the stage took in the undisturbed run, and SIGKILLs one process
chosen at random (first a kind, then a process of that kind). The submit then ends (killed, or
after the failed step) and every process of the run must be gone within ORPHAN_GRACE_S; the
next trial resubmits. A kill the run absorbs (the submit goes on to another step, e.g. after a
watchdog was killed) arms the next kill in the same trial. A trial without a kill must complete
the run; the pass's outputs are then compared with the undisturbed run's: every file under the
six stages' folders, byte for byte, except wall-clock fields (VOLATILE_KEYS), tar members'
mtimes, and training's intermediate checkpoints (NOT_OUTPUTS).

Knobs (environment): DCSLURM_SOAK_KILLS (default 100; e.g. 6 for a quick smoke run, one kill
a stage), DCSLURM_SOAK_PASSES (default: one pass per ~34 kills), DCSLURM_SOAK_SEED (default 0),
DCSLURM_SOAK_TRIAL_TIMEOUT (seconds one submit may take, default 2.5 x the undisturbed run),
DCSLURM_SOAK_TIMEOUT (the whole test, default 3600).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import subprocess
import sys
import tarfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import pytest

from dcslurm.core.config import load_config
from dcslurm.core.errors import UserError
from dcslurm.core.runs import run_status
from tests.reliability_helpers import kill_all, pids_with_env, proc_env_value, process_tree
from tests.test_reliability import PIPELINE, _pipeline_toml

TAG_ENV = "DCSLURM_SOAK_TAG"  # every process of a trial inherits it: found even when orphaned
KILLS = int(os.environ.get("DCSLURM_SOAK_KILLS", "100"))
PASSES = int(os.environ.get("DCSLURM_SOAK_PASSES", "0")) or max(1, math.ceil(KILLS / 34))
SEED = int(os.environ.get("DCSLURM_SOAK_SEED", "0"))
# One submit may take this long: the undisturbed run's time, 2.5 times over (at least 240 s).
TRIAL_TIMEOUT_S = float(os.environ.get("DCSLURM_SOAK_TRIAL_TIMEOUT", "0"))
ORPHAN_GRACE_S = 5.0  # a process of the run still alive this long after its submit ended outlived it
POLL_S = 0.02
# The submit process orphans everything it runs when killed; it is one kind among the others,
# at half their weight so that most kills land inside the tasks.
# A watchdog (dcslurm/core/proctree.py) only acts when its runner dies: killing it changes nothing,
# the run goes on (counted as absorbed), so it gets a quarter weight.
KIND_WEIGHT = {"submit": 0.5, "watchdog": 0.25}

# Run-specific values, left out of the comparison: wall-clock times and speeds in the JSON
# outputs (img2dataset's shard stats, the training metrics) and tar members' mtimes. Everything
# else is compared byte for byte.
VOLATILE_KEYS = {
    "download": {"duration", "start_time", "end_time"},
    "train": {"time", "samples_per_s", "samples_per_s_per_device", "tflops_per_device", "memory_gb", "mfu"},
}
# Training's resume state, not an output (its marker names model.pt and metrics.jsonl): a resumed
# run keeps other intermediate checkpoints than an undisturbed one.
NOT_OUTPUTS = ("train/checkpoints/",)


def _normalized(run: str, rel: str, data: bytes) -> bytes:
    if rel.endswith(".tar"):
        # img2dataset stamps each member with the time it wrote it: compare the members in order,
        # names, modes and bytes, everything but the mtime.
        h = hashlib.sha256()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for m in tar:
                body = tar.extractfile(m).read() if m.isfile() else b""
                h.update(f"{m.name}\0{m.mode}\0{m.type}\0{m.size}\0".encode() + hashlib.sha256(body).digest())
        return h.digest()
    if not rel.endswith((".json", ".jsonl")):
        return data
    data = data.replace(run.encode(), b"RUN")  # e.g. reshard's stats name the subset file's path
    volatile = VOLATILE_KEYS.get(rel.split("/", 1)[0])
    if not volatile:
        return data
    docs = [json.loads(line) for line in data.splitlines() if line.strip()] if rel.endswith(".jsonl") \
        else [json.loads(data)]
    return json.dumps([{k: v for k, v in d.items() if k not in volatile} for d in docs], sort_keys=True).encode()


def run_outputs(run: str) -> dict[str, str]:
    """sha256 of every file under the six stages' folders (JSON with its timings dropped)."""
    out = {}
    for stage in PIPELINE:
        for dirpath, _, names in os.walk(os.path.join(run, stage)):
            for name in names:
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, run)
                if rel.startswith(NOT_OUTPUTS):
                    continue
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(_normalized(run, rel, f.read())).hexdigest()
    return out


@dataclass
class Proc:
    pid: int
    kind: str  # submit | runner | trainer rank | img2dataset worker | watchdog | <stage> child
    stage: str | None = None  # None: the submit process, or a process outside any task
    step: str | None = None


def _kind_of_child(argv: list[str], stage: str) -> str:
    if any("DCSLURM_WATCHDOG_FD" in a for a in argv):
        return "watchdog"  # dcslurm/core/proctree.py's: it SIGKILLs the task's group when the runner dies
    return "img2dataset worker" if stage == "download" else f"{stage} child"


def classify(submit_pid: int, stage_of: dict[str, str]) -> list[Proc]:
    """The live processes of a submit: it and its descendants, each with its kind, stage and step."""
    tree = process_tree(submit_pid)
    runner_step = {}
    for pid, (_, argv) in tree.items():
        if "dcslurm.core.runner" in argv:
            i = argv.index("dcslurm.core.runner")
            if len(argv) > i + 2:
                runner_step[pid] = argv[i + 2]
    procs = []
    for pid, (_, argv) in tree.items():
        if pid == submit_pid:
            procs.append(Proc(pid, "submit"))
            continue
        up, hops = pid, 0
        while up not in runner_step and up in tree and hops < 64:  # the nearest runner at or above pid
            up, hops = tree[up][0], hops + 1
        if up not in runner_step:
            procs.append(Proc(pid, "other"))
            continue
        step = runner_step[up]
        stage = stage_of.get(step, step)
        if up == pid:
            ranks = int(proc_env_value(pid, "DCSLURM_WORLD_SIZE") or "1")
            procs.append(Proc(pid, "trainer rank" if ranks > 1 else "runner", stage, step))
        else:
            procs.append(Proc(pid, _kind_of_child(argv, stage), stage, step))
    return procs


def watch_stages(submit: subprocess.Popen, stage_of: dict[str, str]) -> dict[str, float]:
    """Run alongside an undisturbed submit: how long each stage's processes were seen (seconds)."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    while submit.poll() is None:
        now = time.time()
        for p in classify(submit.pid, stage_of):
            if p.stage:
                first.setdefault(p.stage, now)
                last[p.stage] = now
        time.sleep(POLL_S)
    return {s: last[s] - first[s] for s in first}


@dataclass
class Soak:
    tmp: str
    toml_args: dict
    stage_of: dict[str, str]
    spans: dict[str, float]
    reference: dict[str, str]
    rng: random.Random
    kills: list[tuple[str, str]] = field(default_factory=list)  # (stage, kind)
    problems: list[str] = field(default_factory=list)
    trials: int = 0
    passes: int = 0
    identical: int = 0
    absorbed: int = 0  # kills after which the submit went on to another step (e.g. of a watchdog)
    live: subprocess.Popen | None = None
    owed: dict[str, int] = field(default_factory=dict)  # kills per stage still to do
    trial_timeout: float = 240.0
    trial_deadline: float = 0.0
    tag: str = ""

    def submit(self, path: str, tag: str, log: str) -> subprocess.Popen:
        self.tag = tag
        self.live = subprocess.Popen([sys.executable, "-m", "dcslurm", "submit", "-c", path],
                                     stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **{TAG_ENV: tag}))
        return self.live

    def hunt(self, submit: subprocess.Popen, quota: dict[str, int]) -> list[tuple[str, str]]:
        """While the submit lives: once the next stage with kills left (or a later one) runs,
        SIGKILL a random process of the run at a random moment within that stage's undisturbed
        duration. A kill the run absorbs (the submit starts another step) arms the next one;
        otherwise the submit's end ends the trial. Returns the (stage, kind) killed."""
        killed: list[tuple[str, str]] = []
        kill_at = None
        killed_step = None  # the step of the last kill, until the submit is seen past it
        while submit.poll() is None and time.time() < self.trial_deadline:
            target = next((s for s in PIPELINE if quota.get(s)), None)
            procs = classify(submit.pid, self.stage_of)
            steps = {p.step for p in procs if p.step}
            if killed_step is not None:
                if not steps - {killed_step}:
                    time.sleep(POLL_S)
                    continue
                self.absorbed += 1
                killed_step = None
            if target is None:
                break
            running = {p.stage for p in procs if p.stage}
            if kill_at is None and any(PIPELINE.index(s) >= PIPELINE.index(target) for s in running):
                kill_at = time.time() + self.rng.uniform(0, max(self.spans.get(target, 1.0), 0.2))
            if kill_at is not None and time.time() >= kill_at and running:
                stage = min(running, key=PIPELINE.index)  # the stages run one after the other
                candidates = [p for p in procs if p.stage == stage or p.kind == "submit"]
                kinds = sorted({p.kind for p in candidates})
                kind = self.rng.choices(kinds, weights=[KIND_WEIGHT.get(k, 1.0) for k in kinds])[0]
                victim = self.rng.choice([p for p in candidates if p.kind == kind])
                if kill_all([victim.pid]):
                    killed.append((stage, kind))
                    # A kill past the target (the target stage finished first) counts for its own
                    # stage; the earlier stages' kills left are owed to the next pass.
                    for s in PIPELINE[:PIPELINE.index(stage)]:
                        quota[s] = 0
                    quota[stage] = max(0, quota.get(stage, 0) - 1)
                    self.owed[stage] = max(0, self.owed.get(stage, 0) - 1)
                    killed_step = victim.step or min((p for p in procs if p.step),
                                                     key=lambda p: PIPELINE.index(p.stage)).step
                    kill_at = None
            time.sleep(POLL_S)
        return killed

    def end_trial(self, submit: subprocess.Popen, tag: str, what: str) -> int | None:
        """Wait (bounded) for the submit to end, then for every process of the run to be gone."""
        try:
            code = submit.wait(timeout=max(0.0, self.trial_deadline - time.time()))
        except subprocess.TimeoutExpired:
            stuck = {pid: " ".join(process_tree(pid).get(pid, (0, ["?"]))[1])[:120]
                     for pid in pids_with_env(TAG_ENV, tag)}
            self.problems.append(f"hang: submit still running {self.trial_timeout:.0f} s after {what}; "
                                 f"processes: {stuck}")
            kill_all(pids_with_env(TAG_ENV, tag))
            submit.wait(timeout=30)
            code = None
        deadline = time.time() + ORPHAN_GRACE_S
        while (left := pids_with_env(TAG_ENV, tag)) and time.time() < deadline:
            time.sleep(0.1)
        if left:
            names = [" ".join(process_tree(pid).get(pid, (0, ["?"]))[1])[:100] for pid in left]
            self.problems.append(f"orphans: {len(left)} processes outlived the submit after {what}: {names}")
            kill_all(left)  # so that they cannot race the next trial; the test fails on them anyway
        return code

    def run_pass(self, quota: dict[str, int]) -> None:
        self.passes += 1
        run = os.path.join(self.tmp, f"pass{self.passes}")
        path = _pipeline_toml(os.path.join(self.tmp, f"pass{self.passes}.toml"), run, **self.toml_args)
        cfg = load_config(path)
        log = os.path.join(self.tmp, f"pass{self.passes}.log")
        quota = dict(quota)
        for _ in range(sum(quota.values()) * 2 + 4):  # bounded: each trial kills, or completes the run
            tag = uuid.uuid4().hex
            self.trials += 1
            trial_started = time.time()
            self.trial_deadline = trial_started + self.trial_timeout
            submit = self.submit(path, tag, log)
            killed = self.hunt(submit, quota)
            self.kills.extend(killed)
            code = self.end_trial(submit, tag, f"SIGKILL of {killed}" if killed else "an undisturbed trial")
            try:
                _, status = run_status(cfg.run_url, cfg.storage_options, config=cfg, with_logs=False)
            except UserError as exc:  # the submit died before it wrote the plan
                self.problems.append(f"pass {self.passes}: no status after {killed or 'an undisturbed trial'} "
                                     f"(exit {code}): {exc}; see {log}")
                return
            complete = all(s.counts["done"] == s.n_tasks for s in status)
            with open(os.path.join(self.tmp, "trials.jsonl"), "a") as f:  # where the time went
                f.write(json.dumps({"pass": self.passes, "killed": killed, "exit": code, "complete": complete,
                                    "seconds": round(time.time() - trial_started, 1)}) + "\n")
            if complete:
                if code != 0 and not killed:
                    self.problems.append(f"pass {self.passes}: the run is complete but submit exited {code}")
                break
            if not killed:
                # Nothing was killed and the run is not complete: a failure of its own, e.g. a
                # stuck marker or a half-written output an earlier kill left behind.
                failed = [(s.name, s.counts) for s in status if s.counts["done"] < s.n_tasks]
                self.problems.append(f"pass {self.passes}: an undisturbed submit (exit {code}) left the run "
                                     f"incomplete: {failed}; see {log}")
                return
        else:
            self.problems.append(f"pass {self.passes}: did not complete within its trials; see {log}")
            return
        got = run_outputs(run)
        if got == self.reference:
            self.identical += 1
        else:
            diff = sorted(k for k in set(got) | set(self.reference) if got.get(k) != self.reference.get(k))
            self.problems.append(f"pass {self.passes}: outputs differ from the undisturbed run: {diff[:10]}")


# Kills per stage, in proportion to these shares: a kill costs a resubmission plus the restart of
# the killed task, which is seconds for filter and reshard (no torch) and 10-20 s for the stages
# that import torch and open_clip; every stage gets at least one kill.
# Download's window is short on this tiny pool (its two tasks; a resubmit redoes only what is
# unfinished): a pass places about one kill there, so its share is the smallest.
STAGE_SHARE = {"download": 1, "embed": 2, "filter": 3, "reshard": 3, "train": 2, "eval": 2}


def _shares(kills: int) -> dict[str, int]:
    """`kills` split over the stages by STAGE_SHARE (largest remainders), at least one each."""
    total = sum(STAGE_SHARE.values())
    exact = {s: kills * w / total for s, w in STAGE_SHARE.items()}
    out = {s: int(x) for s, x in exact.items()}
    for s in sorted(exact, key=lambda s: out[s] - exact[s])[:kills - sum(out.values())]:
        out[s] += 1
    if kills >= len(PIPELINE):
        for s in PIPELINE:
            if not out[s]:
                donor = max(out, key=out.get)
                out[donor], out[s] = out[donor] - 1, 1
    return out


@pytest.fixture
def served_pool(tmp_path):
    """A 64-sample demo pool and its server (the runs' http_proxy), up for the whole soak: the
    server is this test's, not the run's, so no kill reaches it."""
    from dcslurm.core.storage import DataFolder
    from dcslurm.demo.pool import DemoPoolServer, generate_demo_pool

    pool = str(tmp_path / "pool")
    generate_demo_pool(pool, samples=64, seed=0, files=2, heldout=24)
    with DemoPoolServer(DataFolder(pool)) as server:
        yield pool, server.proxy_url


@pytest.mark.soak
@pytest.mark.timeout(int(os.environ.get("DCSLURM_SOAK_TIMEOUT", "3600")))  # the whole soak; each trial is bounded too
def test_sigkill_soak_every_pass_equals_the_undisturbed_run(tmp_path, served_pool):
    from dcslurm.demo.workflow import DEMO_TASKS
    from tests.test_embed import save_tiny_checkpoint

    started = time.time()
    pool, proxy = served_pool
    ckpt = save_tiny_checkpoint(str(tmp_path / "scorer.pt"), 0)
    toml_args = dict(pool=pool, ckpt=ckpt, executor="local", http_proxy=proxy,
                     eval_tasks=(DEMO_TASKS[0], DEMO_TASKS[3]), train_ranks=2)
    ref = str(tmp_path / "reference")
    path = _pipeline_toml(tmp_path / "reference.toml", ref, **toml_args)
    stage_of = {s.name: s.stage for s in read_plan_of(path).steps}
    submit = subprocess.Popen([sys.executable, "-m", "dcslurm", "submit", "-c", path],
                              stdout=open(tmp_path / "reference.log", "wb"), stderr=subprocess.STDOUT)
    spans = watch_stages(submit, stage_of)
    assert submit.wait() == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert set(spans) == set(PIPELINE), f"the /proc walk did not see every stage run: {spans}"
    reference_s = time.time() - started
    soak = Soak(str(tmp_path), toml_args, stage_of, spans, run_outputs(ref), random.Random(SEED))
    assert {k.split("/")[0] for k in soak.reference} == set(PIPELINE)
    soak.owed = _shares(KILLS)
    soak.trial_timeout = TRIAL_TIMEOUT_S or max(240.0, 2.5 * reference_s)
    try:
        # A kill is placed only while its stage runs, so a pass places fewer than it owes:
        # passes go on (bounded) until every kill is placed.
        while sum(soak.owed.values()) and soak.passes < 5 * PASSES + 2 and not any("hang" in p for p in soak.problems):
            # Each pass takes its share of what is owed; the last passes take all of it.
            passes_left = max(1, PASSES - soak.passes)
            soak.run_pass({s: math.ceil(n / passes_left) for s, n in soak.owed.items()})
    finally:  # interrupted or failed: stop this test's processes (by their tag), nothing else
        if soak.live is not None and soak.live.poll() is None:
            kill_all(pids_with_env(TAG_ENV, soak.tag))
    by_stage = Counter(s for s, _ in soak.kills)
    by_kind = Counter(k for _, k in soak.kills)
    summary = (f"SIGKILL soak: {len(soak.kills)} kills in {soak.trials} trials "
               f"(by stage: {', '.join(f'{s} {by_stage[s]}' for s in PIPELINE)}; "
               f"by process: {', '.join(f'{k} {n}' for k, n in by_kind.most_common())}), "
               f"{soak.absorbed} absorbed by the run, "
               f"{soak.identical}/{soak.passes} passes identical to the undisturbed run, "
               f"{sum('hang' in p for p in soak.problems)} hangs, {sum('orphans' in p for p in soak.problems)} "
               f"trials with orphans, wall {time.time() - started:.0f} s (undisturbed run {reference_s:.0f} s)")
    print(summary)
    for p in soak.problems:
        print("  problem:", p)
    assert not soak.problems, summary + "\n" + "\n".join(soak.problems)
    assert len(soak.kills) >= KILLS, summary
    if KILLS >= len(PIPELINE):
        assert set(by_stage) == set(PIPELINE), summary
    assert soak.identical == soak.passes, summary


def read_plan_of(path: str):
    """The plan `dcslurm submit` will make for a config (its step names map to stages)."""
    from dcslurm.core.plan import discover_inputs, make_plan

    cfg = load_config(path)
    return make_plan(cfg, discover_inputs(cfg))
