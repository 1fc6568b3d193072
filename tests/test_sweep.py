"""`dcslurm sweep`: one pool, a shared upstream (download, embed), branches of filter x seeds."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tomllib

import pytest
from typer.testing import CliRunner

from dcslurm.core import sweep as sw
from dcslurm.core.tomlfile import dumps, write_toml
from tests.core_helpers import merge_tables

FILTERS = {
    "nofilter": "no_filter",
    "clip30": "clip_score(score=clip_tiny_similarity_score, fraction=0.3)",
    "clip60": "clip_score(score=clip_tiny_similarity_score, fraction=0.6)",
}
CPU = {"resources": {"gpus_per_node": 0, "cpus_per_task": 1, "mem": "1000M", "time": "00:20:00"}}


POOL_PROXY: dict[str, str] = {}  # pool -> its DemoPoolServer's address (the `pool` fixture's)


def sweep_toml(path, folder: str, pool: str, executor: str = "local", branches: list[dict] | None = None,
               extra_run: dict | None = None, seeds=(0, 1), extra: dict | None = None) -> str:
    """A sweep over the demo pool with the tiny model (random init: no weights offline).
    `branches`: the [[branches]] tables (default: one a FILTERS entry); `extra_run`: more [run]
    keys; `extra`: more tables, merged in."""
    from dcslurm.demo.workflow import DEMO_TASKS

    tasks = (DEMO_TASKS[0], DEMO_TASKS[3])
    if branches is None:
        branches = [{"name": n, "filter": spec} for n, spec in FILTERS.items()]
    doc = {
        "run": {"folder": folder, "scale": "tiny", **(extra_run or {})},
        "sweep": {"seeds": list(seeds)},
        "pool": {"metadata": pool},
        "executor": {"kind": executor, "max_parallel": 2},
        "slurm": {"max_array_size": 1000},
        "stages": {
            # img2dataset writes samples in completion order: one thread makes it the pool's order;
            # the download fetches through the pool fixture's server
            "download": {"processes": 1, "threads": 1, "http_proxy": POOL_PROXY.get(pool, "http://127.0.0.1:9"),
                         **CPU},
            "embed": {"models": [{"name": "tiny", "model": "dcslurm-tiny-vit", "pretrained": ""}], "device": "cpu",
                      "workers": 0, "batch_size": 32, **CPU},
            "reshard": {"samples_per_shard": 32, **CPU},
            "train": {"samples": 64, "batch_size": 16, "workers": 0, **CPU},
            "eval": {"tasks": [t["key"] for t in tasks], "evalsets": os.path.join(pool, "heldout"), "num_workers": 0,
                     **CPU, "extra_tasks": [dict(t) for t in tasks]},
        },
        "branches": branches,
    }
    return write_toml(path, merge_tables(doc, extra or {}))


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from dcslurm.core.storage import DataFolder
    from dcslurm.demo.pool import DemoPoolServer, generate_demo_pool

    out = str(tmp_path_factory.mktemp("sweep-pool") / "pool")
    generate_demo_pool(out, samples=48, seed=0, files=2, heldout=12)
    with DemoPoolServer(DataFolder(out)) as server:  # what the sweeps' download fetches through
        POOL_PROXY[out] = server.proxy_url
        yield out


def _cli(*argv, cwd=None):
    return subprocess.run([sys.executable, "-m", "dcslurm", *argv], capture_output=True, text=True, cwd=cwd)


# -- validation: one line, exit 2, nothing written --------------------------------

@pytest.mark.parametrize("branches, extra_run, message", [
    ([{"name": "a", "filter": "no_filter"}, {"name": "a", "filter": "no_filter"}], None,
     "[[branches]] #2 name: 'a' is also branch #1's"),
    ([{"name": "../up", "filter": "no_filter"}], None, "[[branches]] #1 name: '../up' is not a folder-safe"),
    ([{"name": "x", "filter": "clip_score(fraction=3)"}], None, "[stages.filter] spec"),
    ([{"name": "x", "filter": "no_filter", "seeds": []}], None, "[[branches]] #1 seeds: needs at least one"),
    ([{"name": "x", "filtr": "no_filter"}], None, "[[branches]] #1: unknown key 'filtr'"),
    ([], None, "no [[branches]]"),
    ([{"name": "x", "filter": "no_filter"}], {"stages": ["train"]}, "[run] stages: set by the sweep"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, branches, extra_run, message):
    path = sweep_toml(tmp_path / "sweep.toml", str(tmp_path / "sweep"), str(tmp_path / "no-pool"),
                      branches=branches, extra_run=extra_run)
    proc = _cli("sweep", "-c", path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dcslurm: error: sweep.toml: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "sweep").exists()


def test_a_branch_that_fails_its_checks_queues_nothing(tmp_path, pool):
    """A branch's filter names a file that does not exist: refused before the upstream
    (whose own checks pass) is queued or anything is written."""
    missing = str(tmp_path / "targets.npy")
    branches = [{"name": "ok", "filter": "no_filter"}, {"name": "img", "filter": f"image_based(targets={missing})"}]
    path = sweep_toml(tmp_path / "sweep.toml", str(tmp_path / "sweep"), pool, branches=branches)
    proc = _cli("sweep", "-c", path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dcslurm: error: {missing}: "), proc.stderr
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("command", ["status", "cancel"])
def test_status_and_cancel_of_a_folder_that_is_no_sweep(tmp_path, command):
    proc = _cli("sweep", command, str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"dcslurm: error: {tmp_path}: not a dcslurm sweep folder (no sweep.toml); "
                                   "submit a sweep first")


# -- planning --------------------------------------------------------------------

def test_dry_run_plans_every_piece_and_writes_nothing(tmp_path, pool):
    path = sweep_toml(tmp_path / "sweep.toml", str(tmp_path / "sweep"), pool)
    res = CliRunner().invoke(_app(), ["sweep", "-c", path, "--dry-run"], terminal_width=250)
    assert res.exit_code == 0, res.output
    names = ["upstream"] + [f"{n}-seed{s}" for n in FILTERS for s in (0, 1)]
    for n in names:
        assert n in res.output
    assert "dry run: 7 pieces" in res.output
    assert not (tmp_path / "sweep").exists()
    s = sw.load_sweep(path)
    assert [p.name for p in s.pieces] == names
    plans = {pp.piece.name: pp for pp in sw.plan_sweep(s)}
    assert [st.stage for st in plans["upstream"].plan.steps] == ["download", "embed"]
    first, later = plans["clip30-seed0"], plans["clip30-seed1"]
    assert first.waits_for == "upstream" and later.waits_for == "clip30-seed0"
    assert {st.stage for st in first.plan.steps} == {"filter", "reshard", "train", "eval"}
    assert {st.stage for st in later.plan.steps} == {"train", "eval"}
    # The branch reads what the upstream will write: 2 pool files of 24 rows, one shard each.
    up = s.upstream.folder
    assert first.piece.config.pool.shards == f"{up}/download"
    assert first.piece.config.pool.metadata == f"{up}/embed"
    assert first.plan.steps[0].units.names == (f"{up}/embed/00000000.parquet", f"{up}/embed/00000001.parquet")
    assert later.piece.config.stages["train"].params.data == f"{first.piece.folder}/reshard"
    assert later.piece.config.run.seed == 1 and later.piece.config.stages["filter"].params.spec == FILTERS["clip30"]


def test_written_run_toml_is_the_piece_config(tmp_path, pool):
    """`dcslurm submit -c SWEEP/runs/X/run.toml` by hand is the same run as the sweep's piece."""
    from dcslurm.core.config import load_config

    s = sw.load_sweep(sweep_toml(tmp_path / "sweep.toml", str(tmp_path / "sweep"), pool))
    sw.write_sweep(s)
    for p in s.pieces:
        by_hand = load_config(os.path.join(p.folder, "run.toml"))
        assert by_hand.fingerprint() == p.config.fingerprint(), p.name
        assert by_hand.selected_stages() == p.config.selected_stages()
    again = sw.read_sweep(s.folder)
    assert [p.config.fingerprint() for p in again.pieces] == [p.config.fingerprint() for p in s.pieces]
    assert tomllib.loads(dumps(s.raw)) == s.raw


# -- SLURM: everything queued at once, afterok on the shared upstream -----------------

def test_slurm_queues_every_piece_at_once_with_afterok(tmp_path, pool, monkeypatch):
    """Fake sbatch (records its dependency, returns ids): the branches' first jobs wait on the
    upstream's last (embed) job, a later seed's on its first seed's reshard."""
    from dcslurm.core import slurm

    queued: list[tuple[str, list[str], str]] = []  # (job name, extra args, id)

    def fake_sbatch(path, extra=()):
        name = next(s.strip().split("=", 1)[1] for s in open(path) if s.startswith("#SBATCH --job-name="))
        queued.append((name, list(extra), str(1000 + len(queued))))
        return queued[-1][2]

    monkeypatch.setattr(slurm, "sbatch", fake_sbatch)
    monkeypatch.setattr(slurm, "squeue", lambda ids: [])
    path = sweep_toml(tmp_path / "sweep.toml", str(tmp_path / "sweep"), pool, executor="slurm")
    results = sw.submit_sweep(sw.load_sweep(path), log=lambda *a: None)
    assert [r.piece for r in results] == ["upstream"] + [f"{n}-seed{s}" for n in FILTERS for s in (0, 1)]
    by_name = {name: (extra, jid) for name, extra, jid in queued}
    assert len(by_name) == len(queued) and "dcslurm.sweep.upstream.download" in by_name, sorted(by_name)
    job = lambda piece, step: by_name[f"dcslurm.sweep.{piece}.{step}"]  # noqa: E731
    assert job("upstream", "download")[0] == []
    assert job("upstream", "embed")[0] == [f"--dependency=afterok:{job('upstream', 'download')[1]}"]
    embed_id = job("upstream", "embed")[1]
    for n in FILTERS:
        assert job(f"{n}-seed0", "filter.prepare")[0] == [f"--dependency=afterok:{embed_id}"]
        assert job(f"{n}-seed1", "train")[0] == [f"--dependency=afterok:{job(f'{n}-seed0', 'reshard.finalize')[1]}"]
        # Within a piece, steps chain as in any run.
        assert job(f"{n}-seed1", "eval.run")[0] == [f"--dependency=afterok:{job(f'{n}-seed1', 'train')[1]}"]
    # Every piece recorded its jobs: status and cancel see the whole sweep.
    monkeypatch.setattr(slurm, "sacct_states", lambda ids: None)  # a site without accounting
    monkeypatch.setattr(slurm, "squeue", lambda ids: [slurm.QueuedTask(i, None, "PENDING", "") for i in ids])
    states = {p.piece: p.state for p in sw.sweep_status(str(tmp_path / "sweep"))}
    assert states == {r.piece: "pending" for r in results}
    cancelled: list[str] = []
    monkeypatch.setattr(slurm, "scancel", lambda ids: cancelled.extend(ids))
    out = sw.cancel_sweep(str(tmp_path / "sweep"))
    assert set(out) == set(states) and sorted(cancelled) == sorted(jid for _, _, jid in queued)


def _app():
    from dcslurm.cli import app

    return app


# -- the whole sweep on the demo pool (slow) ------------------------------------------

def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _markers(run: str) -> dict[str, tuple[int, str]]:
    out = {}
    for root, _, files in os.walk(os.path.join(run, "_markers")):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, run)] = (os.stat(p).st_mtime_ns, _digest(p))
    return out


@pytest.mark.slow
def test_sweep_of_three_filters_two_seeds_equals_each_branch_run_alone(tmp_path, pool):
    """3 filters x 2 seeds, local executor: the upstream runs once (its markers are written
    once and untouched by the branches and by a resubmit), and each branch's subset,
    training shards, model and eval results equal those of the branch run as its own run."""
    from dcslurm.core.config import load_config
    from dcslurm.core.plan import discover_inputs
    from dcslurm.core.runs import submit_run

    folder = str(tmp_path / "sweep")
    path = sweep_toml(tmp_path / "sweep.toml", folder, pool)
    res = CliRunner().invoke(_app(), ["sweep", "-c", path])
    assert res.exit_code == 0, res.output
    s = sw.load_sweep(path)
    up = s.upstream.folder
    up_markers = _markers(up)
    assert {k.split("/")[1] for k in up_markers} == {"download", "embed"}
    # Done once, before any branch started: every upstream marker is older than every branch's.
    branch_markers = [m for p in s.pieces[1:] for m, _ in _markers(p.folder).values()]
    assert len(branch_markers) > 6 and max(m for m, _ in up_markers.values()) < min(branch_markers)
    # Branch planning before the upstream ran predicts exactly what it wrote.
    predicted = sw.branch_inputs(s)
    listed = discover_inputs(s.pieces[1].config)
    assert predicted.metadata_files == listed.metadata_files and predicted.shards.names == listed.shards.names
    assert all(st.state == "done" for st in sw.sweep_status(folder))

    # Each branch alone: an ordinary run over the upstream's outputs with the filter in
    # [stages.filter] (seed 1 filtering and resharding itself, not sharing seed 0's).
    for name, seed in [(n, 0) for n in FILTERS] + [("clip30", 1)]:
        piece = next(p for p in s.pieces if p.name == f"{name}-seed{seed}")
        first = next(p for p in s.pieces if p.name == f"{name}-seed0")
        doc = json.loads(json.dumps(first.raw))
        doc["run"].update(folder=str(tmp_path / "alone" / piece.name), seed=seed)
        alone = tmp_path / f"{piece.name}.toml"
        alone.write_text(dumps(doc))
        train = seed == 1  # training is bit-exact on the CPU: the same model, the same scores
        r = submit_run(load_config(str(alone), stages=["filter", "reshard"] + (["train", "eval"] if train else [])))
        assert not r.failed
        ours, theirs = first.folder, str(tmp_path / "alone" / piece.name)
        assert _digest(f"{ours}/filter/subset.npy") == _digest(f"{theirs}/filter/subset.npy")
        shards = sorted(f for f in os.listdir(f"{ours}/reshard") if f.endswith(".tar") or f == "sizes.json")
        assert len(shards) > 1
        for f in shards:
            assert _digest(f"{ours}/reshard/{f}") == _digest(f"{theirs}/reshard/{f}"), f
        if train:
            assert _digest(f"{piece.folder}/train/model.pt") == _digest(f"{theirs}/train/model.pt")
            assert (open(f"{piece.folder}/eval/results.jsonl").read()
                    == open(f"{theirs}/eval/results.jsonl").read())
    # Seeds differ; a resubmit of the whole sweep runs nothing and leaves the upstream untouched.
    assert (_digest(f"{folder}/runs/nofilter-seed0/train/model.pt")
            != _digest(f"{folder}/runs/nofilter-seed1/train/model.pt"))
    res = CliRunner().invoke(_app(), ["sweep", "-c", path])
    assert res.exit_code == 0, res.output
    assert _markers(up) == up_markers


def test_real_slurm_queues_the_sweep_at_once_and_cancels_it(slurm_cluster, tmp_path, pool):
    """On the test cluster: every piece queued in one go, the branches' first jobs held by
    afterok on the upstream's embed job; `sweep status` sees them, `sweep cancel` ends them."""
    from dcslurm.core.submission import load_submissions

    folder = str(tmp_path / "sweep")
    path = sweep_toml(tmp_path / "sweep.toml", folder, pool, executor="slurm", seeds=(0, 1))
    try:
        results = sw.submit_sweep(sw.load_sweep(path), log=lambda *a: None)
        assert all(r.jobs for r in results)
        s = sw.read_sweep(folder)
        job_of = {}
        for p in s.pieces:
            (sub,) = load_submissions(p.config.folder())
            job_of.update({(p.name, step): ss.chunks[0].job_id for step, ss in sub.steps.items()})
        embed = job_of[("upstream", "embed")]
        for n in FILTERS:
            shown = slurm_cluster.run("scontrol", "show", "job", job_of[(f"{n}-seed0", "filter.prepare")]).stdout
            assert f"Dependency=afterok:{embed}" in shown, shown
            shown = slurm_cluster.run("scontrol", "show", "job", job_of[(f"{n}-seed1", "train")]).stdout
            assert f"Dependency=afterok:{job_of[(f'{n}-seed0', 'reshard.finalize')]}" in shown, shown
        states = {p.piece: p.state for p in sw.sweep_status(folder)}
        assert set(states) == {p.name for p in s.pieces} and set(states.values()) <= {"pending", "running"}, states
        res = CliRunner().invoke(_app(), ["sweep", "cancel", folder])
        assert res.exit_code == 0 and "upstream: cancelled" in res.output, res.output
        slurm_cluster.wait_jobs_done(60)
    finally:  # this sweep's jobs only, whatever failed above
        import contextlib

        with contextlib.suppress(Exception):
            sw.cancel_sweep(folder)


def test_every_branch_filter_shares_one_derived_cache_in_the_upstream(tmp_path, pool):
    """The branches' filters read and write one derived-column folder (language ID, caption lengths,
    ...: computed once for the pool), in the upstream run; a [stages.filter] derived_cache wins."""
    s = sw.load_sweep(sweep_toml(tmp_path / "sweep.toml", str(tmp_path / "sweep"), pool))
    firsts = [p for p in s.pieces if p.branch and p.first]
    assert len(firsts) == len(FILTERS)
    for p in firsts:
        assert p.config.stages["filter"].params.derived_cache == f"{s.upstream.folder}/{sw.DERIVED}"
    path = sweep_toml(tmp_path / "own.toml", str(tmp_path / "sweep2"), pool,
                      branches=[{"name": "a", "filter": "no_filter"}],
                      extra={"stages": {"filter": {"derived_cache": f"{tmp_path}/shared"}}})
    own = sw.load_sweep(path)
    assert [p.config.stages["filter"].params.derived_cache for p in own.pieces if p.branch and p.first] == \
        [f"{tmp_path}/shared"]
