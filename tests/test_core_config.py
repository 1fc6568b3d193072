"""Run configuration and scale table: exact published values, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dcslurm.core.config import load_config, parse_config
from dcslurm.core.errors import ConfigError, UserError
from dcslurm.core.scales import SCALES, get_scale


def test_scales_json_gives_the_published_numbers():
    out = subprocess.run([sys.executable, "-m", "dcslurm", "scales", "--json"], capture_output=True, text=True,
                         check=True).stdout
    scales = json.loads(out)
    published = {  # DataComp Table 2
        "small": (12_800_000, "ViT-B-32", 4096, 5e-4, 500, 0.98, 9.5e16),
        "medium": (128_000_000, "ViT-B-32", 4096, 5e-4, 500, 0.98, 9.5e17),
        "large": (1_280_000_000, "ViT-B-16", 8192, 5e-4, 500, 0.98, 2.6e19),
        "xlarge": (12_800_000_000, "ViT-L-14", 90112, 1e-3, 10_000, 0.95, 1.1e21),
    }
    for name, (pool, model, batch, lr, warmup, beta2, macs) in published.items():
        s = scales[name]
        assert (s["pool_size"], s["samples_seen"], s["model"], s["batch_size"], s["lr"], s["warmup"],
                s["beta2"], s["train_macs"]) == (pool, pool, model, batch, lr, warmup, beta2, macs)
        assert (s["beta1"], s["eps"], s["weight_decay"]) == (0.9, 1e-6, 0.2)
    assert scales["debug"]["batch_size"] == 1024 and scales["debug"]["samples_seen"] == 128_000
    assert scales["debug"]["lr"] == 1e-4 and scales["debug"]["model"] == "ViT-B-32"
    assert "tiny" in scales


def test_unknown_scale_is_one_line():
    with pytest.raises(UserError, match="unknown scale 'huge'"):
        get_scale("huge")
    with pytest.raises(ConfigError, match=r"run.toml: \[run\] scale: unknown scale 'huge'"):
        parse_config({"run": {"folder": "/tmp/x", "scale": "huge"}}, "run.toml")


@pytest.mark.parametrize("raw, message", [
    ({}, r"missing section \[run\]"),
    ({"run": {}}, r"\[run\]: missing required key 'folder'"),
    ({"run": {"folder": "/x", "sclae": "tiny"}}, r"unknown key 'sclae' \(did you mean 'scale'\?\)"),
    ({"run": {"folder": "/x", "seed": "one"}}, r"\[run\] seed: expected integer, got a string$"),
    ({"run": {"folder": "/x"}, "slurm": {"partiton": "gpu"}}, r"did you mean 'partition'"),
    ({"run": {"folder": "/x"}, "slurm": {"time": "forever"}}, r"\[slurm\] time: expected a SLURM time limit"),
    ({"run": {"folder": "/x"}, "slurm": {"cpus_per_task": 2.5}}, r"cpus_per_task: expected integer"),
    ({"run": {"folder": "/x"}, "storage": {"secret": "abc"}}, r"credentials must not be written"),
    ({"run": {"folder": "/x"}, "storage": {"aws_access_key_id": "abc"}}, r"credentials must not be written"),
    ({"run": {"folder": "/x"}, "executor": {"kind": "k8s"}}, r"expected 'local', 'slurm' or 'submitit'"),
    ({"run": {"folder": "/x"}, "slrum": {}}, r"unknown section \[slrum\] \(did you mean \[slurm\]\?\)"),
    ({"run": {"folder": "/x", "stages": ["synth", "nope"]}}, r"unknown stage 'nope'"),
    ({"run": {"folder": "/x", "stages": ["synth"]}, "stages": {"synth": {"unitz": 3}}},
     r"\[stages.synth\]: unknown key 'unitz'"),
    ({"run": {"folder": "/x", "stages": ["synth"]}, "stages": {"synth": {"units": -1}}},
     r"\[stages.synth\] units: must be >= 0"),
    ({"run": {"folder": "/x", "stages": ["synth"]}, "stages": {"synth": {"resources": {"mem": 4}}}},
     r"\[stages.synth\].resources mem: expected string"),
])
def test_bad_config_is_one_line_error_naming_the_key(raw, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(raw, "/somewhere/run.toml")
    text = str(info.value)
    assert "\n" not in text and text.startswith("run.toml:")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "absent.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nfolder=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad))


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "run.toml").write_text('[run]\nfolder = "out/run"\nstages = ["synth"]\n[pool]\nmetadata = "pool"\n')
    cfg = load_config(str(tmp_path / "run.toml"))
    assert cfg.run_url == str(tmp_path / "out/run")
    assert cfg.pool.metadata == str(tmp_path / "pool")


def test_resources_merge_site_then_stage(tmp_path):
    cfg = parse_config({
        "run": {"folder": "/x", "stages": ["synth"]},
        "slurm": {"partition": "cpu", "time": "01:00:00", "setup": ["module load x"]},
        "stages": {"synth": {"resources": {"time": "00:10:00", "cpus_per_task": 4}}},
    })
    res = cfg.resources_for("synth", {"mem": "8G"})
    assert (res.partition, res.time, res.cpus_per_task, res.mem, res.setup) == (
        "cpu", "00:10:00", 4, "8G", ["module load x"])


def test_storage_options_have_no_credentials():
    cfg = parse_config({"run": {"folder": "s3://b/run", "stages": ["synth"]},
                        "storage": {"endpoint_url": "http://127.0.0.1:9", "profile": "lab"}})
    opts = cfg.storage_options
    assert (opts["endpoint_url"], opts["profile"]) == ("http://127.0.0.1:9", "lab")
    # Beside them only the bounds of every request (timeouts, attempts): no key, secret or token.
    assert set(opts) == {"endpoint_url", "profile", "config_kwargs"}
    assert set(opts["config_kwargs"]) == {"connect_timeout", "read_timeout", "retries"}
    assert cfg.run_url == "s3://b/run"


def test_every_scale_is_in_the_table():
    assert set(SCALES) == {"tiny", "debug", "small", "medium", "large", "xlarge"}
