"""Run folders on a real S3 endpoint (SeaweedFS over HTTP on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from dcslurm.core.config import load_config
from dcslurm.core.runs import run_status, submit_run
from dcslurm.core.storage import DataFolder
from tests.core_helpers import tree_digest, wait_run_done, write_run_toml

pytestmark = pytest.mark.s3


def _s3_outputs(folder: DataFolder) -> dict[str, str]:
    out = {}
    for stage in ("synth", "digest", "summary"):
        for name in folder.list(stage):
            out[f"{stage}/{name}"] = hashlib.sha256(folder.read_bytes(f"{stage}/{name}")).hexdigest()
    return out


def _toml(tmp_path, name, folder, s3_server, executor="local", units=6):
    return write_run_toml(tmp_path / f"{name}.toml", folder, units=units, executor=executor,
                          extra={"storage": {"endpoint_url": s3_server.endpoint_url},
                                 "executor": {"log_dir": f"{tmp_path}/logs-{name}"}})


def test_run_folder_on_s3_matches_local(tmp_path, s3_server, s3_bucket):
    local = write_run_toml(tmp_path / "local.toml", str(tmp_path / "local"), units=6)
    submit_run(load_config(local))
    reference = {k: v for k, v in tree_digest(str(tmp_path / "local")).items()
                 if k.startswith(("synth/", "digest/", "summary/")) and "_executions" not in k}
    cfg = load_config(_toml(tmp_path, "s3", f"{s3_bucket}/run with space", s3_server))
    assert not submit_run(cfg).failed
    folder = cfg.folder()
    assert _s3_outputs(folder) == reference
    _, steps = run_status(cfg.run_url, cfg.storage_options)
    assert all(s.counts["done"] == s.n_tasks for s in steps)
    # Nothing temporary is left in the bucket.
    assert not [p for p in s3_server.fs().find(s3_bucket.removeprefix("s3://")) if "/.tmp-" in p]


@pytest.mark.slurm
def test_slurm_run_with_s3_run_folder(tmp_path, s3_server, s3_bucket, slurm_cluster):
    local = write_run_toml(tmp_path / "local.toml", str(tmp_path / "local"), units=6)
    submit_run(load_config(local))
    reference = {k: v for k, v in tree_digest(str(tmp_path / "local")).items()
                 if k.startswith(("synth/", "digest/", "summary/")) and "_executions" not in k}
    path = _toml(tmp_path, "slurm", f"{s3_bucket}/run", s3_server, executor="slurm")
    cfg = load_config(path)
    submit_run(cfg)
    wait_run_done(path, timeout=300)
    slurm_cluster.wait_jobs_done(60)
    assert _s3_outputs(cfg.folder()) == reference
    # The scripts carry the endpoint but never the credentials.
    for sub in cfg.folder().list("_submissions"):
        record = cfg.folder().read_json(f"_submissions/{sub}")
        for step in record["steps"].values():
            for chunk in step["chunks"]:
                text = open(chunk["script"]).read()
                assert s3_server.endpoint_url in text and s3_server.secret_key not in text


def test_wrong_credentials_are_one_line(tmp_path, s3_server, s3_bucket):
    # A fresh process: fsspec caches filesystems (and their credentials) per process.
    path = _toml(tmp_path, "bad", f"{s3_bucket}/run", s3_server)
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY="wrong", FSSPEC_S3_SECRET="wrong")
    proc = subprocess.run([sys.executable, "-m", "dcslurm", "submit", "-c", path], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"dcslurm: error: {s3_bucket}/run") and s3_server.secret_key not in line
    assert not s3_server.fs().find(s3_bucket.removeprefix("s3://"))  # nothing written
