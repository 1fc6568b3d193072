"""The stage registry (entry points "dcslurm.core.stages"): one broken stage spec must not
take every command down, and `stages = "all"` must not quietly mean fewer stages."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys

import pytest

from dcslurm.core import stages
from dcslurm.core.config import load_config
from dcslurm.core.errors import UserError
from dcslurm.core.runs import run_status, submit_run
from tests.core_helpers import write_run_toml


@pytest.fixture
def broken_spec(tmp_path, monkeypatch):
    """A lab's stage package whose spec raises at import, registered beside ours."""
    pkg = tmp_path / "labstages"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "spec.py").write_text("raise RuntimeError('labstages: a typo in the spec')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = md.entry_points

    def entry_points(**kw):
        found = list(real(**kw))
        if kw.get("group") == stages.ENTRY_POINT_GROUP:
            found.append(md.EntryPoint(name="labstages", value="labstages.spec", group=stages.ENTRY_POINT_GROUP))
        return found

    monkeypatch.setattr(md, "entry_points", entry_points)
    monkeypatch.setattr(stages, "_REGISTRY", None)
    monkeypatch.setattr(stages, "_BROKEN", {})
    yield
    stages._REGISTRY = None  # monkeypatch restores the old one; this drops the broken-spec one
    stages._BROKEN = {}


def test_every_stage_comes_from_an_entry_point():
    names = {e.name for e in md.entry_points(group=stages.ENTRY_POINT_GROUP)}
    assert {"download", "embed", "filter", "reshard", "train", "evaluate", "audit"} <= names
    assert stages.pipeline_stages() == ["download", "embed", "filter", "reshard", "train", "eval"]
    assert stages.broken_specs() == {}


def test_a_broken_spec_leaves_other_runs_working_and_is_named(tmp_path, broken_spec):
    cfg = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=2)
    assert not submit_run(load_config(cfg)).failed  # synth, digest, summary: not the broken package's
    _, steps = run_status(str(tmp_path / "run"))
    assert [s.counts["done"] for s in steps] == [2, 2, 1]
    assert stages.broken_specs() == {"labstages": "labstages.spec: RuntimeError: labstages: a typo in the spec"}
    with pytest.raises(UserError, match=r'stages = "all" cannot be resolved; .*labstages\.spec: RuntimeError'):
        stages.pipeline_stages()
    with pytest.raises(UserError, match=r"unknown stage 'labstage'.*labstages\.spec"):
        stages.get_stage("labstage")


def test_the_cli_loads_its_stages_without_the_source_folder_on_the_path(tmp_path):
    """The entry points are the installed package's metadata: found from any folder."""
    proc = subprocess.run([sys.executable, "-c", "from dcslurm.core.stages import registry; print(len(registry()))"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and int(proc.stdout) >= 8, proc.stderr
