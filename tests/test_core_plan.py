"""Planning is a pure function of (config, inputs); sharding and sbatch rendering."""

from __future__ import annotations

import subprocess

import pytest

from dcslurm.core.config import parse_config
from dcslurm.core.errors import UserError
from dcslurm.core.plan import Plan, make_plan
from dcslurm.core.plantypes import PlanInputs
from dcslurm.core.sbatch import TaskLauncher, render_step_script, render_submit_script
from dcslurm.core.shards import (
    ChunkedIndexes,
    chunk_for_max_array_size,
    compress_indexes,
    expand_indexes,
    parse_brace_pattern,
    split_evenly,
    split_units,
    task_range,
)


def _config(folder="/runs/r", units=100, per_task=1, **extra):
    raw = {"run": {"folder": folder, "stages": ["synth", "digest", "summary"]},
           "stages": {"synth": {"units": units, "units_per_task": per_task}}}
    raw.update(extra)
    return parse_config(raw, "run.toml")


def test_plan_is_pure_and_splits_into_contiguous_ranges():
    plan = make_plan(_config(units=10, per_task=3), PlanInputs())
    assert [s.name for s in plan.steps] == ["synth", "digest", "summary"]
    synth, digest, summary = plan.steps
    assert synth.n_tasks == 4 and [len(synth.shards(i)) for i in range(4)] == [3, 3, 3, 1]
    assert digest.units.upstream == "synth" and digest.n_tasks == 4 and digest.depends_on == ["synth"]
    assert summary.layout == "single" and summary.n_tasks == 1
    again = make_plan(_config(units=10, per_task=3), PlanInputs())
    assert plan.to_json() == again.to_json()
    assert Plan.from_dict(plan.to_dict()).to_json() == plan.to_json()


def test_shard_helpers():
    assert split_units(7, 3) == [r for r in split_units(7, 3)]
    assert [(r.start, r.stop) for r in split_units(7, 3)] == [(0, 3), (3, 6), (6, 7)]
    assert task_range(7, 3, 2).stop == 7
    with pytest.raises(IndexError):
        task_range(7, 3, 3)
    parts = [split_evenly(10, 3, i) for i in range(3)]
    assert [(p.start, p.stop) for p in parts] == [(0, 4), (4, 7), (7, 10)]
    assert compress_indexes([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert expand_indexes("0-2,5,7-8%4") == [0, 1, 2, 5, 7, 8]
    units = parse_brace_pattern("s3://b/shards/{00000000..01279999}.tar")
    assert units.count == 1_280_000 and units.name(0) == "s3://b/shards/00000000.tar"
    assert units.name(1_279_999) == "s3://b/shards/01279999.tar"
    with pytest.raises(UserError):
        parse_brace_pattern("s3://b/shards/x.tar")


def test_chunks_respect_max_array_size():
    chunks = chunk_for_max_array_size(list(range(0, 2500)), 1001)
    assert [c.offset for c in chunks] == [0, 1000, 2000]
    assert all(max(c.array_ids) < 1001 and min(c.array_ids) >= 0 for c in chunks)
    assert sum(len(c.indexes) for c in chunks) == 2500
    only_late = chunk_for_max_array_size([1500, 1501, 2999], 1001)
    assert [(c.offset, c.array_ids) for c in only_late] == [(1000, [500, 501]), (2000, [999])]


def test_xlarge_plan_is_compact():
    cfg = _config(units=1_280_000, per_task=100)
    plan = make_plan(cfg, PlanInputs())
    assert plan.steps[0].n_tasks == 12_800
    assert len(plan.to_json()) < 10_000  # no per-shard lists in the plan


HOSTILE = "/tmp/a dir/it's \"$(touch /tmp/pwned)\" `id`; rm -rf ~"


def test_rendered_script_quotes_everything_and_has_no_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SUPERSECRET")
    run_folder = str(tmp_path / "run $(touch pwned1) 'q' ;x")
    cfg = _config(folder=run_folder, units=5, storage={"endpoint_url": "http://127.0.0.1:1"},
                  slurm={"partition": "gpu", "setup": ["echo setup-line"], "array_throttle": 2})
    plan = make_plan(cfg, PlanInputs())
    launcher = TaskLauncher(python="/opt/py thon/bin/python3")
    log_dir = str(tmp_path / "logs $(touch pwned2)")
    script = render_step_script(plan, plan.steps[0], launcher, log_dir, ChunkedIndexes(0, [0, 1, 2, 3, 4]))
    assert "SUPERSECRET" not in script
    assert "#SBATCH --array=0-4%2" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    # Run the body with a fake python that prints its arguments: the hostile
    # folder name must arrive as one argument, and nothing may execute.
    fake = tmp_path / "fakepy"
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    fake.chmod(0o755)
    launcher = TaskLauncher(python=str(fake))
    script = render_step_script(plan, plan.steps[0], launcher, log_dir, ChunkedIndexes(0, [0, 1, 2, 3, 4]))
    env = {"PATH": "/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_JOB_ID": "77",
           "ARGS_OUT": str(tmp_path / "args.txt")}
    subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, check=True, capture_output=True)
    args = (tmp_path / "args.txt").read_text().splitlines()
    assert args == ["-m", "dcslurm.core.runner", run_folder, "synth", "3", "--log", f"{log_dir}/synth/77_3.log"]
    assert not list(tmp_path.glob("pwned*")) and not (tmp_path / "pwned1").exists()


def test_directive_values_that_sbatch_cannot_hold_are_refused(tmp_path):
    cfg = _config(units=2, slurm={"partition": 'gpu"\n#SBATCH --uid=0'})
    plan = make_plan(cfg, PlanInputs())
    with pytest.raises(UserError, match="newline or double quote"):
        render_step_script(plan, plan.steps[0], TaskLauncher("python3"), "/logs", ChunkedIndexes(0, [0, 1]))


def test_submit_script_chains_dependencies():
    text = render_submit_script([("JOB_0", "a.sbatch", []), ("JOB_1", "b.sbatch", [0])])
    assert 'JOB_1=$(sbatch --parsable --dependency="afterok:${JOB_0}" b.sbatch' in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_submit_script_makes_the_log_folders_and_waits_for_another_runs_jobs():
    """A sweep branch rendered by hand waits for its upstream's jobs too (`after`), and the
    --output folders exist before the first sbatch (SLURM does not make them)."""
    text = render_submit_script([("JOB_0", "a.sbatch", []), ("JOB_1", "b.sbatch", [0])],
                                log_dirs=["/logs/run/a", "/logs/my run/b"], after=["101", "102"])
    assert "mkdir -p /logs/run/a '/logs/my run/b'\n" in text
    assert text.index("mkdir -p") < text.index("sbatch --parsable")
    assert 'JOB_0=$(sbatch --parsable --dependency="afterok:101:102" a.sbatch' in text
    assert 'JOB_1=$(sbatch --parsable --dependency="afterok:${JOB_0}" b.sbatch' in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
