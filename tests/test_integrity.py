"""Commits that cannot lie (issue 16 items 4 and 9, issue 17 item 5).

- A marker says which units it covers; a run folder whose markers were made
  with another split (`units_per_task`) or another pool file list is refused
  at submit in one line, and the runner does not take a marker that covers
  other units for "done".
- An S3 endpoint that accepts connections and never answers fails every
  command in well under a minute (bounded timeouts and attempts).
- Config ranges and credentials by content: one line naming file and key,
  never the value.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcslurm.core.config import load_config, parse_config
from dcslurm.core.errors import ConfigError, StorageError, UserError
from dcslurm.core.markers import commit_marker, read_marker
from dcslurm.core.plan import PLAN_FILE
from dcslurm.core.runs import plan_run, submit_run
from dcslurm.core.storage import DataFolder, s3fs_options
from dcslurm.core.taskrun import run_task
from dcslurm.core.tomlfile import write_toml
from tests.core_helpers import executions, write_run_toml

# -- markers know their units -------------------------------------------------------------


def _set_per_task(path: str, per_task: int) -> None:
    text = open(path).read()
    start = text.index("units_per_task = ")
    end = text.index("\n", start)
    open(path, "w").write(text[:start] + f"units_per_task = {per_task}" + text[end:])


def test_changed_units_per_task_with_markers_is_refused_before_anything_runs(tmp_path):
    run = tmp_path / "run"
    path = write_run_toml(tmp_path / "run.toml", str(run), units=6, per_task=1)
    assert not submit_run(load_config(path)).failed
    ran = len(executions(str(run), "synth"))
    _set_per_task(path, 2)  # tasks 0..2 now cover units 0-1, 2-3, 4-5: markers 0..2 covered 0, 1, 2
    with pytest.raises(UserError) as info:
        submit_run(load_config(path))
    line = str(info.value)
    assert "\n" not in line and line.startswith(f"{run}: ") and "synth" in line and "units_per_task 1 -> 2" in line
    assert len(executions(str(run), "synth")) == ran  # nothing ran
    # The same through the CLI: exit 2, one line.
    proc = subprocess.run([sys.executable, "-m", "dcslurm", "submit", "-c", path], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    (err,) = proc.stderr.strip().splitlines()
    assert err.startswith(f"dcslurm: error: {run}: ") and "units_per_task" in err


def _parquet(path, first: int, rows: int = 3) -> None:
    uids = [f"{i:032x}" for i in range(first, first + rows)]
    pq.write_table(pa.table({"uid": uids, "url": [f"http://127.0.0.1:9/{u}.jpg" for u in uids],
                             "text": ["a photo"] * rows}), str(path))


def test_changed_pool_file_list_with_markers_is_refused(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    for i, name in enumerate(("a", "c", "d")):
        _parquet(pool / f"{name}.parquet", 10 * i)
    run = tmp_path / "run"
    path = write_toml(tmp_path / "run.toml", {"run": {"folder": str(run), "stages": ["download"]},
                                              "pool": {"metadata": str(pool)},
                                              "executor": {"log_dir": f"{tmp_path}/logs"}})
    cfg = load_config(path)
    # The run folder as a finished download leaves it: run.json, plan.json, a marker per task
    # (written by the code a submit and the runner use, without downloading anything).
    folder = cfg.folder()
    plan = plan_run(cfg)
    from dcslurm.core.runs import RUN_FILE
    folder.write_json(RUN_FILE, {"fingerprint": cfg.fingerprint(), "fingerprint_hash": cfg.fingerprint_hash(),
                                 "config_path": path, "created": time.time()})
    folder.write_text(PLAN_FILE, plan.to_json())
    step = plan.step("download")
    for i in range(step.n_tasks):
        # Markers as older dcslurm wrote them (no units): the check rests on plan.json alone.
        commit_marker(folder, step.name, i, [], {}, 0.0)
    # A file sorted into the middle: task 1 would now be b.parquet, and c.parquet's marker would say it is done.
    _parquet(pool / "b.parquet", 100)
    with pytest.raises(UserError) as info:
        submit_run(load_config(path))
    line = str(info.value)
    assert "\n" not in line and line.startswith(f"{run}: ") and "download" in line and "3 -> 4" in line


def test_legacy_markers_are_kept_while_the_plan_is_unchanged(tmp_path):
    """Markers written before they carried their units (no start/stop/digest) and a plan.json
    without step digests: a resubmit with the same config and split runs nothing again."""
    run = tmp_path / "run"
    path = write_run_toml(tmp_path / "run.toml", str(run), units=4, per_task=1)
    assert not submit_run(load_config(path)).failed
    for step in ("synth", "digest", "summary"):
        for name in os.listdir(run / "_markers" / step):
            marker = DataFolder(str(run)).read_json(f"_markers/{step}/{name}")
            for key in ("start", "stop", "units_digest"):
                marker.pop(key, None)
            DataFolder(str(run)).write_json(f"_markers/{step}/{name}", marker)
    plan = DataFolder(str(run)).read_json(PLAN_FILE)
    for s in plan["steps"]:
        s.pop("units_digest", None)
    DataFolder(str(run)).write_json(PLAN_FILE, plan)
    ran = len(executions(str(run), "synth"))
    result = submit_run(load_config(path))
    assert not result.failed and not any(result.pending.values())
    assert len(executions(str(run), "synth")) == ran
    # ... but a changed split is refused even with legacy markers.
    _set_per_task(path, 3)
    with pytest.raises(UserError, match="units_per_task 1 -> 3"):
        submit_run(load_config(path))


def test_runner_redoes_a_task_whose_marker_covers_other_units(tmp_path):
    run = tmp_path / "run"
    path = write_run_toml(tmp_path / "run.toml", str(run), units=6, per_task=1)
    assert not submit_run(load_config(path)).failed
    # plan.json replaced behind the submit check's back (e.g. by a copy of another run's plan).
    _set_per_task(path, 2)
    plan = plan_run(load_config(path))
    DataFolder(str(run)).write_text(PLAN_FILE, plan.to_json())
    ran = len(executions(str(run), "synth"))
    assert run_task(str(run), "synth", 1) == 0
    assert len(executions(str(run), "synth")) == ran + 1  # marker 1 covered unit 1, task 1 is units 2-3
    marker = read_marker(DataFolder(str(run)), "synth", 1)
    assert (marker["start"], marker["stop"]) == (2, 4)
    assert marker["outputs"] == ["synth/shard-00000002.bin", "synth/shard-00000003.bin"]
    # Now it matches: a second run skips it.
    assert run_task(str(run), "synth", 1) == 0
    assert len(executions(str(run), "synth")) == ran + 1


# -- an S3 endpoint that never answers ------------------------------------------------------


@pytest.fixture
def black_hole():
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)  # kept open, never read from or written to
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def test_status_against_a_silent_endpoint_fails_in_one_line_within_a_minute(black_hole, tmp_path):
    env = dict(os.environ, AWS_ACCESS_KEY_ID="AKIDTEST", AWS_SECRET_ACCESS_KEY="test-only")
    for k in ("AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        env.pop(k, None)
    t0 = time.monotonic()
    # `timeout` bounds the test even if the command hangs (the old code took 321-900+ s).
    proc = subprocess.run(["timeout", "90", sys.executable, "-m", "dcslurm", "status", "s3://bucket/run",
                           "--endpoint-url", black_hole], capture_output=True, text=True, env=env)
    elapsed = time.monotonic() - t0
    print(f"status against a silent endpoint: exit {proc.returncode} after {elapsed:.1f} s")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("dcslurm: error: s3://bucket/run") and "timeout" in line.lower()
    assert elapsed < 60


def test_datafolder_ops_against_a_silent_endpoint_honour_the_configured_timeouts(black_hole, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-only")
    cfg = parse_config({"run": {"folder": "s3://bucket/run", "stages": ["synth"]},
                        "storage": {"endpoint_url": black_hole, "connect_timeout": 1, "read_timeout": 1.5,
                                    "max_attempts": 1}})
    folder = cfg.folder()
    for name, op in [("exists", lambda: folder.exists("plan.json")),
                     ("read", lambda: folder.read_bytes("plan.json")),
                     ("list", lambda: folder.list("_markers/x")),
                     ("write", lambda: folder.write_bytes("a.bin", b"x")),
                     ("writer", lambda: _write_with_writer(folder))]:
        t0 = time.monotonic()
        with pytest.raises(StorageError) as info:
            op()
        elapsed = time.monotonic() - t0
        assert "\n" not in str(info.value) and str(info.value).startswith("s3://bucket/run/"), name
        assert elapsed < 10, f"{name} took {elapsed:.1f} s with read_timeout 1.5 s and one attempt"


def _write_with_writer(folder: DataFolder) -> None:
    with folder.writer("b.bin") as f:
        f.write(b"x" * 100)


def test_storage_defaults_bound_every_request():
    opts = s3fs_options(endpoint_url="http://127.0.0.1:9")
    conf = opts["config_kwargs"]
    attempts = conf["retries"]["total_max_attempts"]
    # The worst case of one request against a silent endpoint: every attempt waits its whole timeout.
    assert attempts * max(conf["connect_timeout"], conf["read_timeout"]) < 60
    cfg = parse_config({"run": {"folder": "s3://b/run", "stages": ["synth"]}})
    assert cfg.storage_options["config_kwargs"] == conf  # what tasks get in DCSLURM_STORAGE too


# -- config ranges and credentials ---------------------------------------------------------


@pytest.mark.parametrize("raw, message", [
    ({"stages": {"synth": {"units_per_task": 0}}}, r"\[stages.synth\] units_per_task: must be >= 1"),
    ({"stages": {"synth": {"units_per_task": -3}}}, r"\[stages.synth\] units_per_task: must be >= 1"),
    ({"executor": {"max_parallel": -1}}, r"\[executor\] max_parallel: must be >= 0"),
    ({"slurm": {"cpus_per_task": 0}}, r"\[slurm\] cpus_per_task: must be >= 1"),
    ({"slurm": {"array_throttle": -1}}, r"\[slurm\] array_throttle: must be >= 0"),
    ({"slurm": {"nodes": 0}}, r"\[slurm\] nodes: must be >= 1"),
    ({"stages": {"synth": {"resources": {"cpus_per_task": 0}}}},
     r"\[stages.synth\].resources cpus_per_task: must be >= 1"),
    ({"stages": {"synth": {"resources": {"array_throttle": -2}}}},
     r"\[stages.synth\].resources array_throttle: must be >= 0"),
    ({"storage": {"connect_timeout": 0}}, r"\[storage\] connect_timeout: must be > 0"),
    ({"storage": {"read_timeout": -1}}, r"\[storage\] read_timeout: must be > 0"),
    ({"storage": {"max_attempts": 0}}, r"\[storage\] max_attempts: must be >= 1"),
])
def test_out_of_range_values_are_one_line_naming_file_and_key(raw, message):
    raw = {"run": {"folder": "/x", "stages": ["synth"]}, **raw}
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(raw, "/somewhere/run.toml")
    assert str(info.value).startswith("run.toml: ") and "\n" not in str(info.value)


SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYzEXAMPLEKEY"


@pytest.mark.parametrize("raw, key", [
    ({"storage": {"endpoint_url": f"https://AKIAIOSFODNN7EXAMPLE:{SECRET}@s3.example.org"}},
     r"\[storage\] endpoint_url"),
    ({"storage": {"endpoint_url": f"https://user:{SECRET}@s3.example.org"}}, r"\[storage\] endpoint_url"),
    ({"slurm": {"setup": ["module load x", f"export AWS_SECRET_ACCESS_KEY={SECRET}"]}}, r"\[slurm\] setup"),
    ({"slurm": {"extra_sbatch": [f"--export=ALL,MY_SECRET_TOKEN={SECRET}"]}}, r"\[slurm\] extra_sbatch"),
    ({"stages": {"synth": {"resources": {"setup": [f"AWS_SESSION_TOKEN={SECRET} ./x"]}}}},
     r"\[stages.synth\].resources setup"),
    ({"slurm": {"setup": [f"echo AKIAIOSFODNN7EXAMPLE {SECRET}"]}}, r"\[slurm\] setup"),
])
def test_credentials_are_refused_by_content_and_never_echoed(raw, key, tmp_path):
    raw = {"run": {"folder": "/x", "stages": ["synth"]}, **raw}
    with pytest.raises(ConfigError, match=key + r": .*credential") as info:
        parse_config(raw, "/somewhere/run.toml")
    text = str(info.value)
    assert SECRET not in text and "AKIAIOSFODNN7EXAMPLE" not in text and "\n" not in text


def test_plain_values_that_mention_keys_are_not_credentials():
    cfg = parse_config({"run": {"folder": "/x", "stages": ["synth"]},
                        "storage": {"endpoint_url": "https://s3.example.org:9000"},
                        "slurm": {"setup": ["export HF_TOKEN=$HF_TOKEN", "module load tokenizers",
                                            "export TOKENIZERS_PARALLELISM=false",
                                            "export AWS_SECRET_ACCESS_KEY=\"$(cat ~/.aws/secret)\""],
                                  "extra_sbatch": ["--export=ALL"]}})
    assert cfg.slurm.setup[0] == "export HF_TOKEN=$HF_TOKEN"


def test_wrong_typed_values_are_not_echoed():
    with pytest.raises(ConfigError) as info:
        parse_config({"run": {"folder": "/x", "seed": SECRET}}, "run.toml")
    assert str(info.value) == "run.toml: [run] seed: expected integer, got a string"
    with pytest.raises(ConfigError) as info:
        parse_config({"run": {"folder": "/x"}, "storage": {"profile": [SECRET]}}, "run.toml")
    assert SECRET not in str(info.value) and "[storage] profile: expected string" in str(info.value)
