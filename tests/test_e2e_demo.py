"""The end-to-end demo (`dcslurm demo`): its configs, a small real run of the whole
workflow, and (slow) the full demo with 3 seeds."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dcslurm import demo as d
from dcslurm.config import load_config
from dcslurm.runs import plan_run


def test_configs_load_and_chain_the_runs(tmp_path):
    settings = d.DemoSettings(out=str(tmp_path), seeds=3)
    runs = d.write_configs(settings)
    assert [r.name for r in runs] == ["nofilter", "clip30", "nofilter-seed1", "clip30-seed1",
                                      "nofilter-seed2", "clip30-seed2"]
    cfgs = {r.name: load_config(r.config_path) for r in runs}
    assert cfgs["nofilter"].selected_stages() == ["download", "filter", "reshard", "train", "eval"]
    assert cfgs["nofilter"].pool.metadata == str(tmp_path / "pool")
    clip = cfgs["clip30"]
    assert clip.selected_stages() == ["embed", "filter", "reshard", "train", "eval"]
    assert clip.pool.shards == str(tmp_path / "runs" / "nofilter" / "download")
    (model,) = clip.stages["embed"].params.models
    assert model["pretrained"] == str(tmp_path / "runs" / "nofilter" / "train" / "model.pt")
    assert "clip_tiny_similarity_score" in clip.stages["filter"].params.spec
    for seed in (1, 2):
        for name in ("nofilter", "clip30"):
            c = cfgs[f"{name}-seed{seed}"]
            assert c.run.seed == seed and c.selected_stages() == ["train", "eval"]
            assert c.stages["train"].params.data == str(tmp_path / "runs" / name / "reshard")
            assert c.stages["filter"].params.spec == d.FILTER_SPECS[name]
    assert {c.stages["train"].params.samples for c in cfgs.values()} == {d.DEFAULT_TRAIN_SAMPLES}
    assert {c.stages["eval"].params.evalsets for c in cfgs.values()} == {str(tmp_path / "pool" / "heldout")}
    # On SLURM the model stages ask for CPUs only and the site's default memory (not embed's 64G
    # GPU-node default, which a small cluster rejects: "Requested node configuration is not available").
    from dcslurm.stages import registry

    for cfg in cfgs.values():
        for stage in set(cfg.selected_stages()) & {"embed", "train", "eval"}:
            res = cfg.resources_for(stage, registry()[stage].default_resources)
            assert (res.gpus_per_node, res.mem, res.cpus_per_task) == (0, "", 2), (stage, res)


def test_config_only_writes_configs_and_runs_nothing(tmp_path):
    from dcslurm.cli import app

    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--seeds", "2", "--config-only"])
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(out / "configs")) == ["clip30-seed1.toml", "clip30.toml", "nofilter-seed1.toml",
                                                   "nofilter.toml"]
    assert not (out / "pool").exists() and not (out / "runs").exists()
    # The first run plans (the pool is not there yet: a one-line error naming it).
    with pytest.raises(Exception, match="pool metadata folder does not exist"):
        plan_run(load_config(str(out / "configs" / "nofilter.toml")))


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds 0: must be >= 1"),
    (["--executor", "ssh"], "--executor 'ssh': expected local or slurm"),
    (["--samples", "3"], "--samples 3"),
    (["--out", "s3://bucket/demo"], "--out s3://bucket/demo: the demo writes to a local folder"),
])
def test_bad_options_are_one_line_errors(tmp_path, argv, message):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "dcslurm", "demo", "--out", str(tmp_path), *argv],
                          cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dcslurm: error: {message}"), proc.stderr
    assert not (tmp_path / "pool").exists()


def test_summary_mean_and_spread_across_seeds(tmp_path):
    runs = tmp_path / "runs"
    values = {"nofilter": [0.5, 0.6, 0.7], "clip30": [0.4, 0.4]}
    for name, xs in values.items():
        for seed, x in enumerate(xs):
            folder = runs / (name if seed == 0 else f"{name}-seed{seed}") / "eval"
            folder.mkdir(parents=True)
            lines = [json.dumps({"key": t["key"], "dataset": t["name"], "metrics": {"main_metric": x}})
                     for t in d.DEMO_TASKS]
            (folder / "results.jsonl").write_text("\n".join(lines) + "\n")
    by_name = {s.filter: s for s in d.summarize(str(runs), 3)}
    assert by_name["nofilter"].seeds == [0, 1, 2]
    assert by_name["nofilter"].mean("Demo shapes") == pytest.approx(0.6)
    assert by_name["nofilter"].std("Demo shapes") == pytest.approx(0.1)
    assert by_name["clip30"].seeds == [0, 1] and by_name["clip30"].std("Demo counts") == 0.0
    header, rows = d.summary_rows(list(by_name.values()))
    assert rows[0][2] == "0.600±0.100"
    assert rows[1][0] == "clip30 (2 seeds)"


def _check_demo_outputs(out: str, seeds: int) -> list[d.FilterSummary]:
    """What any completed demo must have: every run's results, a real 30% subset, a sane scorer."""
    layout = d.DemoLayout(out)
    summaries = d.summarize(layout.runs, seeds)
    for s in summaries:
        assert s.seeds == list(range(seeds)), s
        for t in d.DEMO_TASKS:
            assert len(s.scores[t["name"]]) == seeds
            assert all(0.0 <= v <= 1.0 for v in s.scores[t["name"]])
    # clip30 kept 30% of what was embedded (the downloaded samples), ranked by the tiny model's score.
    clip = os.path.join(layout.run("clip30"))
    stats = json.load(open(os.path.join(clip, "filter", "stats.json")))
    # DataComp's rule: threshold = the score at index int(N * f) sorted descending, keep >= it.
    assert int(stats["input_rows"] * 0.3) + 1 <= stats["kept_rows"] <= int(stats["input_rows"] * 0.3) + 3
    subset = np.load(os.path.join(clip, "filter", "subset.npy"))
    assert len(subset) == stats["kept_rows"]
    sizes = json.load(open(os.path.join(clip, "reshard", "sizes.json")))
    assert sum(sizes.values()) == len(subset)
    # Different seeds give different models.
    import torch

    w0 = torch.load(os.path.join(layout.run("nofilter"), "train", "model.pt"), weights_only=True)
    if seeds > 1:
        w1 = torch.load(os.path.join(layout.run("nofilter-seed1"), "train", "model.pt"), weights_only=True)
        assert not torch.equal(w0["visual.conv1.weight"], w1["visual.conv1.weight"])
    return summaries


@pytest.mark.slow
def test_small_demo_runs_the_whole_workflow(tmp_path):
    """160 samples, 2 seeds, 2 training steps each: every stage really runs. About 40 task
    processes, each importing torch: 4 to 9 minutes on 2 busy cores, hence slow."""
    from dcslurm.cli import app

    out = str(tmp_path / "demo")
    res = CliRunner().invoke(app, ["demo", "--out", out, "--samples", "160", "--seeds", "2",
                                   "--train-samples", "512"])
    assert res.exit_code == 0, res.output
    _check_demo_outputs(out, 2)
    assert "Per filter: mean±std over 2 seeds" in res.output
    # Rerunning resumes: every task is committed, nothing reruns, the pool is reused.
    res = CliRunner().invoke(app, ["demo", "--out", out, "--samples", "160", "--seeds", "2",
                                   "--train-samples", "512"])
    assert res.exit_code == 0, res.output
    assert "is complete; reusing it" in " ".join(res.output.split())  # rich wraps long paths


@pytest.mark.slow
@pytest.mark.slurm
def test_small_demo_on_the_slurm_cluster(slurm_cluster, tmp_path):
    """`dcslurm demo --executor slurm`: the same workflow as array jobs on the real cluster
    (four emulated nodes, 2 CPUs each), one seed; the results table comes out the same way."""
    from dcslurm.cli import app

    out = str(tmp_path / "demo")
    res = CliRunner().invoke(app, ["demo", "--out", out, "--samples", "160", "--seeds", "1",
                                   "--train-samples", "512", "--executor", "slurm"])
    assert res.exit_code == 0, res.output
    _check_demo_outputs(out, 1)
    assert "Per filter: mean±std over 1 seeds" in " ".join(res.output.split())
    # every task ran as a SLURM job: the sbatch scripts are in each run's logs
    layout = d.DemoLayout(out)
    for run in ("nofilter", "clip30"):
        assert list(Path(layout.run(run), "logs", "sbatch").glob("*.sbatch")), run
    slurm_cluster.wait_jobs_done(60)


@pytest.mark.slow
def test_full_demo_three_seeds(tmp_path):
    """The README's demo: 2,000 samples, 3 seeds. Trained models beat chance on colours (the
    task every seed of the recorded run learned; shapes stayed near chance, so no claim there)."""
    from dcslurm.cli import app

    out = str(tmp_path / "demo")
    res = CliRunner().invoke(app, ["demo", "--out", out])
    assert res.exit_code == 0, res.output
    summaries = _check_demo_outputs(out, 3)
    nofilter = next(s for s in summaries if s.filter == "nofilter")
    assert nofilter.mean("Demo colours") > 1 / 8
