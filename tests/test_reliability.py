"""The reliability suite: runs disturbed by the failures a cluster has, then resubmitted,
end with outputs identical to an undisturbed run.

Default suite (about 2-3 minutes, real SLURM cluster and real S3 server):
- the S3 server SIGKILLed mid-stage: no partial or temporary object is left, the
  markers only name complete outputs, and the rerun completes to identical outputs;
- one emulated node dies mid-run (its slurmd and every process of its jobs
  SIGKILLed): after it comes back, resubmission completes the run identically;
- shell metacharacters in the run folder on the real cluster: quoted, inert.

Slow (`--runslow`):
- the whole workflow (download -> embed -> filter -> reshard -> train -> eval) on the
  demo pool on SLURM, with a running array task SIGKILLed in every stage and a
  resubmission after each kill, equals the same run on the local executor byte for byte;
- a training job requeued twice (scontrol requeue) finishes with the undisturbed weights.

Per-stage kill tests live beside each stage (see the map in the issue report):
tests/test_core_slurm.py, test_download.py, test_reshard.py, test_train_slurm.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import tarfile
import time

import pytest

from dcslurm.core.config import load_config
from dcslurm.core.markers import done_indexes, read_marker
from dcslurm.core.runs import run_status, submit_run
from dcslurm.core.storage import DataFolder
from dcslurm.core.tomlfile import write_toml
from tests.core_helpers import tree_digest, update_toml, wait_run_done, write_run_toml
from tests.reliability_helpers import kill_all, only_outputs, pids_on_node, runner_pids

TEST_STAGES = ("synth/", "digest/", "summary/")
UNITS = 6  # synth tasks of the S3 test


def _synth_outputs(folder: str) -> dict[str, str]:
    return {k: v for k, v in only_outputs(tree_digest(folder), TEST_STAGES).items() if "_executions" not in k}


def _synth_reference(tmp_path, units: int, bytes_per_unit: int = 4096) -> dict[str, str]:
    path = write_run_toml(tmp_path / "ref.toml", str(tmp_path / "ref"), units=units)
    _set_bytes(path, bytes_per_unit)
    assert not submit_run(load_config(path)).failed
    return _synth_outputs(str(tmp_path / "ref"))


def _set_bytes(path: str, bytes_per_unit: int) -> None:
    update_toml(path, {"stages": {"synth": {"bytes_per_unit": bytes_per_unit}}})


def _add_executor_keys(path: str, keys: str) -> None:
    """Add `keys` (TOML lines) to the [executor] table write_run_toml wrote."""
    update_toml(path, f"[executor]\n{keys}")


# -- the S3 server dies mid-stage --------------------------------------------------------

@pytest.mark.s3
def test_s3_killed_mid_stage_leaves_no_partial_object_and_rerun_completes(tmp_path, s3_server, s3_bucket):
    size = 3 * 1024 * 1024  # 3 MB objects: an upload is in flight when the server dies
    reference = _synth_reference(tmp_path, units=UNITS, bytes_per_unit=size)
    run_url = f"{s3_bucket}/run"
    path = write_run_toml(tmp_path / "run.toml", run_url, units=UNITS, sleep=1.0,
                          extra={"storage": {"endpoint_url": s3_server.endpoint_url}})
    _add_executor_keys(path, f'log_dir = "{tmp_path}/logs"\nmax_parallel = 2\n')
    _set_bytes(path, size)
    cfg = load_config(path)
    # A real `dcslurm submit` process, as a user runs it (its pid marks the run active while it lives).
    # botocore's own retries off: the test waits for our retries only, not for minutes of backoff.
    first = subprocess.Popen([sys.executable, "-m", "dcslurm", "submit", "-c", path],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, AWS_MAX_ATTEMPTS="1", AWS_RETRY_MODE="standard"))
    folder = cfg.folder()
    deadline = time.time() + 120
    while len(done_indexes(folder, "synth")) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert len(done_indexes(folder, "synth")) >= 2, "synth never got going"
    s3_server.kill()
    killed_at = time.time()
    _, stderr = first.communicate(timeout=240)
    print(f"first attempt ended {time.time() - killed_at:.1f} s after the kill, exit {first.returncode}: "
          f"{stderr.strip().splitlines()[-1:]}")
    assert first.returncode != 0  # it did not pretend to succeed
    s3_server.start()
    fs = s3_server.fs()
    objects = fs.find(run_url.removeprefix("s3://"))
    assert not [p for p in objects if "/.tmp-" in p]
    # Every object under a stage's folder is whole: equal to the reference's file of that name.
    committed = done_indexes(folder, "synth")
    assert len(committed) < UNITS, "the whole stage finished before the server died: nothing was tested"
    fs.invalidate_cache()
    unreadable = []
    for p in objects:
        rel = p.split("/run/", 1)[1]
        if rel.startswith(TEST_STAGES) and "_executions" not in rel:
            try:
                data = fs.cat_file(p)
            except FileNotFoundError:  # listed but gone: the server dropped an upload it had begun
                unreadable.append(rel)
                continue
            assert hashlib.sha256(data).hexdigest() == reference[rel], f"partial object {rel}"
    for index in committed:  # a marker names only outputs that exist whole
        for out in read_marker(folder, "synth", index)["outputs"]:
            assert out in reference and out not in unreadable and folder.exists(out)
    print(f"{len(committed)}/{UNITS} synth tasks committed before the kill; listed but unreadable: {unreadable}")
    assert not submit_run(load_config(path)).failed
    got = {}
    fs.invalidate_cache()
    for p in fs.find(run_url.removeprefix("s3://")):
        rel = p.split("/run/", 1)[1]
        if rel.startswith(TEST_STAGES) and "_executions" not in rel:
            got[rel] = hashlib.sha256(fs.cat_file(p)).hexdigest()
    assert got == reference


# -- a node dies mid-run ----------------------------------------------------------------

@pytest.mark.slurm
def test_node_dying_mid_run_leaves_it_resumable(slurm_cluster, tmp_path):
    units = 16
    reference = _synth_reference(tmp_path, units=units)
    run = str(tmp_path / "run")
    path = write_run_toml(tmp_path / "run.toml", run, units=units, executor="slurm", sleep=4.0,
                          extra={"slurm": {"time": "00:10:00"}})
    cfg = load_config(path)
    submit_run(cfg)
    deadline = time.time() + 120
    while not pids_on_node("n2") and time.time() < deadline:
        time.sleep(0.2)
    assert pids_on_node("n2"), f"no task ever ran on n2: {slurm_cluster.node_states()}"
    # The node crashes: its slurmd, then every process its jobs had (slurmstepd, runners).
    slurm_cluster.stop_node("n2", sig=9)
    killed = kill_all(pids_on_node("n2"))
    assert killed
    state = slurm_cluster.wait_node_state("n2", {"down*", "idle*", "down", "mixed*", "allocated*"}, timeout=90)
    print(f"n2 is {state!r} after the crash; killed {len(killed)} processes")
    slurm_cluster.start_node("n2")
    slurm_cluster.wait_jobs_done(300)  # what SLURM requeued runs; what it failed stays failed
    before = done_indexes(cfg.folder(), "synth")
    resumed_at = time.time()
    second = submit_run(cfg)  # resubmission queues exactly what is not committed
    assert set(second.pending.get("synth", [])) == set(range(units)) - before
    wait_run_done(path, timeout=300)
    slurm_cluster.wait_jobs_done(60)
    assert _synth_outputs(run) == reference
    from tests.core_helpers import executions

    again = [e["index"] for e in executions(run, "synth") if e["time"] >= resumed_at]
    assert set(again).isdisjoint(before)  # nothing committed ran again


@pytest.mark.slurm
def test_shell_metacharacters_in_the_run_folder_are_inert_on_slurm(slurm_cluster, tmp_path, monkeypatch):
    from dcslurm.core.errors import UserError

    monkeypatch.chdir(tmp_path)
    reference = _synth_reference(tmp_path, units=3)
    evil = str(tmp_path / "run $(touch PWNED1); `touch PWNED2` 'q' & x>y|z *")
    path = write_run_toml(tmp_path / "run.toml", evil, units=3, executor="slurm")
    cfg = load_config(path)
    submit_run(cfg)
    wait_run_done(path, timeout=240)
    slurm_cluster.wait_jobs_done(60)
    assert _synth_outputs(evil) == reference
    # A double quote cannot go into an #SBATCH line (the job name): refused in one line, nothing queued.
    quoted = write_run_toml(tmp_path / "quoted.toml", str(tmp_path / 'run "dq"'), units=3, executor="slurm")
    with pytest.raises(UserError, match="contains a newline or double quote") as err:
        submit_run(load_config(quoted))
    assert "\n" not in str(err.value) and not slurm_cluster.jobs()
    found = [os.path.join(d, n) for d, _, names in os.walk(tmp_path) for n in names if n.startswith("PWNED")]
    assert not found


# -- the whole workflow, killed in every stage (slow) -------------------------------------

PIPELINE = ("download", "embed", "filter", "reshard", "train", "eval")
# What the stages commit that must be identical (bookkeeping, timings and logs excluded).
COMPARED = {
    "download": (".tar", ".parquet"),
    "embed": (".parquet", ".npz"),
    "filter": ("subset.npy",),
    "reshard": (".tar", "sizes.json"),
    "train": ("model.pt",),
    "eval": ("results.jsonl",),
}


def _content_digest(path: str) -> str:
    """sha256 of what a file holds: tar members in order (names and bytes, not mtimes),
    parquet rows, npz arrays, state_dict tensors; other files byte for byte."""
    h = hashlib.sha256()
    if path.endswith(".tar"):
        with tarfile.open(path) as tar:
            for m in tar:
                h.update(m.name.encode() + b"\0" + hashlib.sha256(tar.extractfile(m).read()).digest())
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        h.update(pq.read_table(path).to_pandas().to_json(orient="split").encode())
    elif path.endswith(".npz"):
        import numpy as np

        with np.load(path) as z:
            for k in sorted(z.files):
                h.update(k.encode() + z[k].tobytes())
    elif path.endswith(".pt"):
        import torch

        for k, v in sorted(torch.load(path, weights_only=True).items()):
            h.update(k.encode() + v.numpy().tobytes())
    else:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _pipeline_outputs(run: str) -> dict[str, str]:
    out = {}
    for rel in tree_digest(run):
        stage = rel.split("/", 1)[0]
        if stage in COMPARED and rel.count("/") == 1 and rel.endswith(COMPARED[stage]):
            out[rel] = _content_digest(os.path.join(run, rel))
    return out


def _pipeline_toml(path, run: str, pool: str, ckpt: str, executor: str, http_proxy: str,
                   eval_tasks: tuple | None = None, train_ranks: int = 1) -> str:
    """The demo workflow's run config, downloading through `http_proxy` (the demo pool's server);
    `eval_tasks` (default: every demo task) and `train_ranks` (processes of the one training job)
    let tests/test_sigkill_soak.py make it cheaper or wider."""
    from dcslurm.demo.workflow import DEMO_TASKS

    cpu = {"resources": {"gpus_per_node": 0, "cpus_per_task": 1, "mem": "1000M", "time": "00:20:00"}}
    eval_tasks = DEMO_TASKS if eval_tasks is None else eval_tasks
    stages = {
        # threads = 1: img2dataset writes samples in completion order; one thread makes it the pool's order
        "download": {"processes": 1, "threads": 1, "http_proxy": http_proxy, **cpu},
        "embed": {"models": [{"name": "tiny", "model": "dcslurm-tiny-vit", "pretrained": ckpt}], "device": "cpu",
                  "workers": 0, "batch_size": 32, "units_per_task": 1, **cpu},
        "filter": {"spec": "clip_score(score=clip_tiny_similarity_score, fraction=0.5)", **cpu},
        "reshard": {"samples_per_shard": 32, **cpu},
        "train": {"samples": 64, "batch_size": 16, "workers": 0, "checkpoint_every": 2,
                  "resources": {**cpu["resources"], "tasks_per_node": train_ranks}},
        "eval": {"tasks": [t["key"] for t in eval_tasks], "evalsets": os.path.join(pool, "heldout"),
                 "num_workers": 0, **cpu, "extra_tasks": list(eval_tasks)},
    }
    return write_toml(path, {"run": {"folder": run, "scale": "tiny", "stages": list(PIPELINE)},
                             "pool": {"metadata": pool}, "executor": {"kind": executor, "max_parallel": 2},
                             "stages": stages})


@pytest.fixture(scope="module")
def demo_pipeline(tmp_path_factory):
    """A 160-sample demo pool served for the module's runs, a random tiny scorer, and the
    undisturbed local run's outputs."""
    from dcslurm.demo.pool import DemoPoolServer, generate_demo_pool
    from tests.test_embed import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("pipeline")
    pool = str(root / "pool")
    generate_demo_pool(pool, samples=160, seed=0, files=4, heldout=24)
    ckpt = save_tiny_checkpoint(str(root / "scorer.pt"), 0)
    ref = str(root / "reference")
    with DemoPoolServer(DataFolder(pool)) as server:
        result = submit_run(load_config(_pipeline_toml(root / "ref.toml", ref, pool, ckpt, "local", server.proxy_url)))
        assert not result.failed, result.failed
        outputs = _pipeline_outputs(ref)
        assert {k.split("/")[0] for k in outputs} == set(PIPELINE)
        yield {"root": root, "pool": pool, "ckpt": ckpt, "reference": outputs, "proxy": server.proxy_url}


def _kill_one_running_task(run: str, steps: list[str], rng: random.Random, cluster, timeout: float) -> str:
    """SIGKILL a running task of one of `steps`; "" when the queue empties or on timeout."""
    deadline = time.time() + timeout
    next_queue_check = 0.0
    while time.time() < deadline:
        for step in steps:
            pids = runner_pids(run, step)
            if pids:
                pid = rng.choice(pids)
                kill_all([pid])
                return f"SIGKILL {step} pid {pid}"
        if time.time() > next_queue_check:
            if not cluster.jobs():
                return ""
            next_queue_check = time.time() + 2
        time.sleep(0.05)
    return ""


@pytest.mark.slow
@pytest.mark.slurm
def test_kills_in_every_stage_then_resubmission_equal_the_undisturbed_run(slurm_cluster, demo_pipeline,
                                                                          tmp_path):
    rng = random.Random(0)
    run = str(tmp_path / "run")
    path = _pipeline_toml(tmp_path / "run.toml", run, demo_pipeline["pool"], demo_pipeline["ckpt"], "slurm",
                          demo_pipeline["proxy"])
    cfg = load_config(path)
    kills: dict[str, str] = {}
    for attempt in range(len(PIPELINE) + 2):
        result = submit_run(cfg)
        # Kill a running task of the next undisturbed stage; a stage that recovers by itself
        # (a requeued train job) lets the queue go on, so the next stage is the next target.
        while (target := next((s for s in PIPELINE if s not in kills), None)) is not None:
            steps = [p.name for p in result.plan.steps if p.stage == target]
            what = _kill_one_running_task(run, steps, rng, slurm_cluster, timeout=600)
            if not what:
                break  # the queue emptied (the kill failed the chain): resubmit
            kills[target] = what
        slurm_cluster.wait_jobs_done(900)
        _, status = run_status(cfg.run_url, cfg.storage_options, config=cfg, with_logs=False)
        if all(s.counts["done"] == s.n_tasks for s in status):
            break
    assert set(kills) == set(PIPELINE), kills
    assert all(s.counts["done"] == s.n_tasks for s in status), [(s.name, s.counts) for s in status]
    print("kills:", json.dumps(kills, indent=1), f"resubmissions: {attempt}")
    assert _pipeline_outputs(run) == demo_pipeline["reference"]


# -- training requeued twice (slow) ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.slurm
def test_training_requeued_twice_finishes_with_the_undisturbed_weights(slurm_cluster, tmp_path, monkeypatch):
    """Extends tests/test_train_slurm.py's single requeue: two `scontrol requeue`s of one
    2-node job, each at a later step; the weights equal the uninterrupted local run's."""
    from dcslurm.core.task import POLL_SLEEP_ENV
    from tests.test_train import assert_bit_equal, final_weights, run_train
    from tests.test_train_slurm import slurm_toml, wait_committed, wait_step
    from tests.train_helpers import read_metrics, write_shards

    steps = 20
    shards = str(tmp_path / "shards")
    write_shards(shards, n_shards=4, per_shard=24)
    reference, failed = run_train(tmp_path, "reference", shards, tasks_per_node=2, samples=16 * steps,
                                  checkpoint_every=100)
    assert not failed
    path, folder = slurm_toml(tmp_path, "requeued", shards)
    monkeypatch.setenv(POLL_SLEEP_ENV, "0.5")  # each step 0.5 s slower (test-only; the job inherits it)
    sub = submit_run(load_config(path))
    (job_id,) = sub.submission.job_ids()
    for at_step in (4, 10):
        wait_step(folder, at_step)
        slurm_cluster.run("scontrol", "requeue", job_id)
        time.sleep(2)
    marker = wait_committed(folder, slurm_cluster)
    assert 10 <= marker["stats"]["resumed_from_step"] < steps, marker["stats"]
    assert_bit_equal(final_weights(folder), final_weights(reference))
    assert [m["step"] for m in read_metrics(folder)] == list(range(1, steps + 1))
    logs = os.listdir(os.path.join(folder, "logs", "train"))
    assert DataFolder(folder).exists("train/model.pt") and logs


def test_a_resumed_rank_reports_only_its_own_stream_positions():
    """The cause of the double-requeue divergence: after a resume every rank started with every
    stream's position from the checkpoint, so at the next save the gather let rank 1's stale copy
    of rank 0's streams overwrite rank 0's (a third attempt then re-read rank 0's samples)."""
    from jobs.train import data

    from_checkpoint = {0: 16, 1: 16, 2: 16, 3: 16}
    merged = {}
    for rank in range(2):
        layout = data.make_layout(16, 4, rank, 2)
        dataset = data.StepBatches([], layout, from_checkpoint, 0, 1, None, None, {})
        positions = data.RankBatches(dataset, 0).positions
        assert set(positions) == set(layout.rank_streams)
        positions = {s: p + 24 for s, p in positions.items()}  # six more steps of 4 samples a stream
        merged.update(positions)  # what the save's all_gather merge does, rank by rank
    assert merged == {0: 40, 1: 40, 2: 40, 3: 40}


# -- the train stage's saves on a full disk (issue 16 item 11) -------------------------------

@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: a real filesystem that runs out of space (needs root; skipped otherwise)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _trained_model():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(128, 128)  # 64 KiB of weights, 192 KiB with Adam's moments
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 128)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_checkpoint_save_on_a_full_disk_says_so_in_one_line(full_disk, one_rank_group):
    from jobs.train import checkpoint

    model, optimizer = _trained_model()
    store = checkpoint.Checkpoints(DataFolder(full_disk))
    with pytest.raises(RuntimeError) as err:  # was: "[enforce fail at inline_container.cc:672] . unexpected pos"
        store.save(2, model, optimizer, {"model": "linear"}, rank=0)
    message = f"{type(err.value).__name__}: {err.value}"
    print(message)
    assert "\n" not in message and "unexpected pos" not in message
    assert message.startswith(f"DiskFull: {full_disk}/step-00000002: disk full: no space left on device")
    assert store.complete_steps() == []  # nothing half-written is resumable


@pytest.mark.parametrize("where", ["output", "scratch"])
def test_exporting_the_model_to_a_full_disk_says_so_in_one_line(full_disk, one_rank_group, tmp_path,
                                                                 monkeypatch, where):
    import tempfile

    from jobs.train import checkpoint

    model, _ = _trained_model()
    output = DataFolder(full_disk if where == "output" else str(tmp_path / "out"))
    if where == "scratch":  # torch.save into a full scratch folder: the errno is lost inside torch
        monkeypatch.setattr(tempfile, "tempdir", full_disk)
    with pytest.raises(RuntimeError) as err:
        checkpoint.export_open_clip(model, output, "model.pt", rank=0)
    message = f"{type(err.value).__name__}: {err.value}"
    print(message)
    assert "\n" not in message and "disk full: no space left on device" in message
    assert message.startswith(f"DiskFull: {full_disk}/"), message
