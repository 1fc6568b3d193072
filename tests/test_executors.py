"""Executors are built from the [executor], [slurm] and [container] settings alone:
status and cancel of a run need no RunConfig (issue 21)."""

from __future__ import annotations

import pytest

import dcslurm.core.config
from dcslurm.core.config import load_config
from dcslurm.core.errors import UserError
from dcslurm.core.executors import ExecutorSettings, make_executor
from dcslurm.core.runs import cancel_run, run_status, submit_run
from tests.core_helpers import update_toml, write_run_toml


@pytest.fixture
def finished_run(tmp_path):
    cfg_path = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=3)
    assert not submit_run(load_config(cfg_path)).failed
    return cfg_path, str(tmp_path / "run")


def test_status_and_cancel_build_no_run_config(finished_run, monkeypatch):
    _, run_url = finished_run

    def no_config(*args, **kwargs):
        raise AssertionError("status/cancel built a RunConfig")

    monkeypatch.setattr(dcslurm.core.config, "parse_config", no_config)
    _, steps = run_status(run_url)
    assert [(s.name, s.counts["done"]) for s in steps] == [("synth", 3), ("digest", 3), ("summary", 1)]
    assert cancel_run(run_url) == []  # the local run has ended: nothing to stop


def test_status_of_a_container_run_needs_no_apptainer_here(finished_run, tmp_path):
    # `dcslurm sweep status` passes each piece's config: a login node without apptainer
    # (or without the images) must still see the run's state.
    cfg_path, run_url = finished_run
    update_toml(cfg_path, {"container": {"enabled": True, "apptainer": "/no/such/apptainer"}})
    cfg = load_config(cfg_path)
    with pytest.raises(UserError):  # submitting does check the host
        make_executor("local", run=cfg)
    _, steps = run_status(run_url, config=cfg)
    assert all(s.counts["done"] == s.n_tasks for s in steps)


def test_settings_alone_make_every_kind():
    for kind in ("local", "slurm", "submitit"):
        executor = make_executor(kind, ExecutorSettings())
        assert executor.kind == kind
        with pytest.raises(ValueError, match="settings alone"):
            executor.log_dir()  # submitting needs the run
    with pytest.raises(UserError, match="unknown executor"):
        make_executor("pbs", ExecutorSettings())
