"""Submit and status tell the truth on a real SLURM cluster (issue 16 items 7, 8, 10):
jobs queued before a later sbatch failed are recorded, an squeue that cannot reach
the controller is "unknown", and a `%` in the log folder is a literal `%`."""

from __future__ import annotations

import os
import re

import pytest

from dcslurm.core.config import load_config
from dcslurm.core.errors import UserError
from dcslurm.core.runs import cancel_run, run_status, submit_run
from dcslurm.core.submission import load_submissions
from tests.core_helpers import update_toml, write_run_toml

pytestmark = pytest.mark.slurm


def test_jobs_queued_before_a_failing_sbatch_are_recorded_seen_and_cancelled(slurm_cluster, tmp_path,
                                                                             monkeypatch):
    # synth queues; digest's sbatch fails (no such partition): synth's job must be on record.
    cfg_path = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run"), units=2, executor="slurm", sleep=60,
                              extra={"stages": {"digest": {"resources": {"partition": "no-such-partition"}}},
                                     "slurm": {"time": "00:05:00"}})
    cfg = load_config(cfg_path)
    with pytest.raises(UserError, match=r"no-such-partition|[Ii]nvalid partition") as exc:
        submit_run(cfg)
    (sub,) = load_submissions(cfg.folder())
    (job,) = sub.job_ids()
    assert list(sub.steps) == ["synth"] and job in str(exc.value)  # the error names the queued job
    _, steps = run_status(cfg.run_url, config=cfg)
    synth = steps[0]
    assert synth.counts["running"] + synth.counts["pending"] == 2, synth.counts
    # A resubmit waits for them instead of queueing them twice.
    with pytest.raises(UserError, match="still queued or running"):
        submit_run(load_config(cfg_path))
    # Item 8 on the real commands: an squeue that cannot reach slurmctld (a closed port;
    # short timeouts so that it gives up in well under a second) is "unknown".
    with open(slurm_cluster.env["SLURM_CONF"]) as f:
        conf = re.sub(r"(?m)^SlurmctldPort=.*$", "SlurmctldPort=9", f.read())
    (tmp_path / "unreachable.conf").write_text(conf + "\nMessageTimeout=1\nTCPTimeout=1\n")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "unreachable.conf"))
    _, steps = run_status(cfg.run_url, config=cfg)
    assert steps[0].counts["unknown"] == 2 and steps[0].counts["failed"] == 0, steps[0].counts
    assert steps[0].unknown_reason.startswith("cannot reach SLURM (squeue: ")
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    assert cancel_run(cfg.run_url) == [job]
    slurm_cluster.wait_jobs_done(60)
    _, steps = run_status(cfg.run_url, config=cfg)
    assert steps[0].counts["running"] + steps[0].counts["pending"] == 0


def test_percent_in_the_log_folder_is_literal(slurm_cluster, tmp_path):
    log_dir = tmp_path / "logs 100%j %A"
    cfg_path = write_run_toml(tmp_path / "run.toml", str(tmp_path / "run 50%"), units=2, executor="slurm",
                              extra={"slurm": {"time": "00:05:00"}})
    update_toml(cfg_path, {"executor": {"log_dir": str(log_dir)}})
    cfg = load_config(cfg_path, stages=["synth"])
    result = submit_run(cfg)
    (chunk,) = result.submission.steps["synth"].chunks
    slurm_cluster.wait_jobs_done(120)
    _, steps = run_status(cfg.run_url, config=cfg)
    assert steps[0].counts["done"] == 2, (steps[0].counts, [f.error for f in steps[0].failed])
    for i in (0, 1):
        assert os.path.exists(log_dir / "synth" / f"{chunk.job_id}_{i}.log")
