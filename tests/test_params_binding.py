"""One binding step (stages.bind_params) turns a stage's keys into its params dataclass: at plan
time from [stages.NAME], and in every task from the plan's copy. Stage code reads typed
attributes; "the scale's value" is a key left out (None), never a 0 or -1 that stage code must
know to replace."""

from __future__ import annotations

import pytest

from dcslurm.core.config import load_config, parse_config
from dcslurm.core.errors import ConfigError
from dcslurm.core.plan import PLAN_FILE, make_plan
from dcslurm.core.plantypes import PlanInputs
from dcslurm.core.runs import submit_run
from dcslurm.core.storage import DataFolder
from dcslurm.core.taskrun import run_task
from jobs.testing.spec import SynthParams
from jobs.train.spec import TrainParams, resolve_hyper
from tests.core_helpers import write_run_toml


def test_a_task_gets_its_stage_params_dataclass_bound_from_the_plan(tmp_path):
    cfg = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=2)
    assert not submit_run(load_config(cfg)).failed
    run = DataFolder(str(tmp_path / "run"))
    plan = run.read_json(PLAN_FILE)
    synth = next(s for s in plan["steps"] if s["name"] == "synth")
    assert synth["params_class"] == "jobs.testing.spec:SynthParams"
    assert plan["stage_params"]["synth"] == vars(SynthParams(units=2))


def test_a_plan_whose_params_do_not_fit_the_class_is_refused_in_one_line(tmp_path, caplog):
    """A plan.json edited by hand, or written by another dcslurm version: the task names the
    file and the key, exits 2, and never runs the stage."""
    cfg = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=1)
    assert not submit_run(load_config(cfg)).failed
    run = DataFolder(str(tmp_path / "run"))
    plan = run.read_json(PLAN_FILE)
    plan["stage_params"]["synth"]["bytes_per_unit"] = "many"
    run.write_json(PLAN_FILE, plan)
    run.remove("_markers/synth/000000.json")
    with caplog.at_level("ERROR"):
        assert run_task(run.url, "synth", 0) == 2
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("plan.json: stage_params synth bytes_per_unit: expected integer, got a string" in line
               for line in lines), lines
    assert not run.exists("_markers/synth/000000.json")


@pytest.mark.parametrize("key, value", [("batch_size", 0), ("samples", 0), ("lr", 0.0), ("micro_batch", 0),
                                        ("warmup", -1)])
def test_zero_is_not_a_hidden_default(tmp_path, key, value):
    raw = {"run": {"folder": str(tmp_path / "run"), "stages": ["train"]},
           "stages": {"train": {"data": str(tmp_path), key: value}}}
    with pytest.raises(ConfigError, match=rf"\[stages\.train\] {key}: must be .*leave it out"):
        parse_config(raw, str(tmp_path / "run.toml"))


def test_keys_left_out_are_the_scales_and_keys_set_are_taken_as_written(tmp_path):
    from dcslurm.core.scales import SCALES

    raw = {"run": {"folder": str(tmp_path / "run"), "stages": ["train"], "scale": "small"},
           "stages": {"train": {"data": str(tmp_path), "warmup": 0}}}
    params = parse_config(raw, str(tmp_path / "run.toml")).stages["train"].params
    assert isinstance(params, TrainParams) and params.batch_size is None
    hp = resolve_hyper(SCALES["small"], params)
    assert (hp.batch_size, hp.lr, hp.warmup) == (SCALES["small"].batch_size, SCALES["small"].lr, 0)
    # an empty model name is no model: the scale's, as the preflight check takes it
    assert resolve_hyper(SCALES["small"], TrainParams(model="")).model == SCALES["small"].model


def test_the_plan_records_each_steps_params_class(tmp_path):
    raw = {"run": {"folder": str(tmp_path / "run"), "stages": ["synth", "digest", "summary"]}}
    plan = make_plan(parse_config(raw, str(tmp_path / "run.toml")), PlanInputs())
    assert {s.name: s.params_class for s in plan.steps} == {
        "synth": "jobs.testing.spec:SynthParams", "digest": "jobs.testing.spec:DigestParams", "summary": ""}
