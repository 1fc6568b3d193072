"""Real Apptainer: build the CPU image, run its %test, run stages inside it on
the local executor and on the real SLURM cluster, push/pull it through S3.

Docker Hub is unreachable here, so the CPU definition is built with its
header swapped for `Bootstrap: debootstrap` (the same Debian 12 from the
Debian mirror); every other section is built as shipped. Needs apptainer on
PATH (scripts/apptainer-host.sh sets it up on Debian 12). The build takes a
few minutes: the whole module is marked slow + apptainer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from dcslurm.core import containers
from dcslurm.core.config import load_config
from dcslurm.core.runs import submit_run
from dcslurm.core.stages import registry
from dcslurm.core.storage import sha256_file
from dcslurm.core.tomlfile import write_toml
from tests.core_helpers import merge_tables, tree_digest, wait_run_done

# The first test also builds the image: 2-20 minutes, depending on how loaded the machine is.
pytestmark = [pytest.mark.apptainer, pytest.mark.slow, pytest.mark.timeout(2700)]

OUTPUT_DIRS = ("synth/", "digest/", "summary/")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def apptainer() -> str:
    path = shutil.which("apptainer")
    if path is None and os.geteuid() == 0:
        # Debian 12 has no apptainer package: set up sid's inside a trixie root (about a minute).
        subprocess.run(["bash", str(REPO / "scripts" / "apptainer-host.sh")], check=True, timeout=900)
        path = shutil.which("apptainer")
    if path is None:
        pytest.fail("apptainer is not on PATH: run scripts/apptainer-host.sh (as root) first")
    return path


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    """A copy of this checkout's package source and container files: the images are
    built from it, so edits to the working tree during the (minutes long) build do
    not change what the tests expect. DCSLURM_TEST_CHECKOUT names an earlier
    snapshot to reuse (with DCSLURM_TEST_IMAGE_DIR: its image is not rebuilt)."""
    if os.environ.get("DCSLURM_TEST_CHECKOUT"):
        return Path(os.environ["DCSLURM_TEST_CHECKOUT"])
    root = tmp_path_factory.mktemp("checkout")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    for d in ("dcslurm", "jobs", "containers"):
        shutil.copytree(REPO / d, root / d, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.fixture(scope="module")
def cpu_image(apptainer, snapshot, tmp_path_factory) -> containers.BuildResult:
    """The CPU image, built now from this checkout (debootstrap header). Setting
    DCSLURM_TEST_IMAGE_DIR keeps images between sessions (reused while unchanged)."""
    image_dir = os.environ.get("DCSLURM_TEST_IMAGE_DIR") or tmp_path_factory.mktemp("images")
    result = containers.build_image("cpu", str(image_dir), apptainer=apptainer, header="debootstrap",
                                    log=lambda s: None, root=snapshot)
    print(f"built {result.path} in {result.seconds:.0f} s, {os.path.getsize(result.path) / 1e6:.0f} MB")
    return result


def test_build_runs_its_test_and_a_second_build_reuses_it(apptainer, cpu_image, snapshot):
    assert cpu_image.built or os.environ.get("DCSLURM_TEST_IMAGE_DIR")
    spec = containers.image_spec("cpu", header="debootstrap", root=snapshot)
    assert os.path.basename(cpu_image.path) == spec.filename
    # The image's %test (it also ran at build time): every CPU stage imports inside the image.
    proc = subprocess.run([apptainer, "test", cpu_image.path], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cpu image: ok" in proc.stdout
    for name, stage in registry().items():
        if not stage.gpu:
            assert f" {name}: " in proc.stdout
    # The package inside is the one this checkout's tag names.
    inside = subprocess.run([apptainer, "exec", "--cleanenv", cpu_image.path, "cat", "/opt/dcslurm/BUILD.json"],
                            capture_output=True, text=True, timeout=120)
    assert json.loads(inside.stdout)["source"] == containers.source_digest(snapshot) == spec.source
    # Unchanged definition, lock and source: nothing is built again.
    mtime = os.path.getmtime(cpu_image.path)
    started = time.time()
    again = containers.build_image("cpu", os.path.dirname(cpu_image.path), apptainer=apptainer,
                                   header="debootstrap", log=lambda s: None, root=snapshot)
    assert not again.built and again.path == cpu_image.path
    assert os.path.getmtime(cpu_image.path) == mtime and time.time() - started < 30


def _run_toml(folder: Path, run: Path, executor: str, image: str | None, apptainer: str,
              stages: str = "test", pool: Path | None = None) -> str:
    """A small run of the test-only stages (`test`) or of the filter stage over `pool`."""
    if image:
        # Scratch of its own (not the host's /tmp), so the task sees only what is bound: the
        # run folder, the pool folder, scratch, and the entries file the filter spec names
        # (found in the spec string, never listed by hand: containers._param_paths).
        scratch = folder / "scratch"
        scratch.mkdir(exist_ok=True)
        container = {"enabled": True, "apptainer": apptainer, "cpu_image": image, "scratch": str(scratch)}
    else:
        container = {"enabled": False}
    if stages == "test":
        body = {"run": {"stages": ["synth", "digest", "summary"]},
                "stages": {"synth": {"units": 4, "bytes_per_unit": 2048}}}
    else:
        body = {"run": {"stages": ["filter"], "seed": 3}, "pool": {"metadata": str(pool / "pool")},
                "stages": {"filter": {"spec": FILTER_SPEC.format(entries=pool / "entries.txt"), "units_per_task": 2}}}
    doc = {"executor": {"kind": executor}, "container": container, "run": {"folder": str(run)}}
    return write_toml(folder / f"{run.name}.toml", merge_tables(doc, body))


FILTER_SPEC = "clip_score(l14, fraction=0.45) then basic then metaclip(entries={entries}, t=4)"


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory) -> Path:
    """4 DataComp-format metadata files (parquet + npz) and a MetaCLIP entries file."""
    from jobs.filter.synthetic import write_pool

    root = tmp_path_factory.mktemp("pool")
    write_pool(str(root / "pool"), n_files=4, rows_per_file=60, seed=5, dims=(8, 12))
    (root / "entries.txt").write_text("dog\ncat\nbeach\na\nthe\nsofa\ncar\n")
    return root


def _outputs(run: Path, dirs=OUTPUT_DIRS) -> dict[str, str]:
    return {k: v for k, v in tree_digest(str(run)).items() if k.startswith(dirs)}


def _interpreters(run: Path) -> set[str]:
    """The interpreters that ran the run's tasks, from the runner's first log line of each task."""
    found = set()
    for log in (run / "logs").rglob("*.log"):
        found |= set(re.findall(r"\(rank \d+/\d+, python (\S+)\)", log.read_text(errors="replace")))
    return found


IMAGE_PYTHON = "/opt/dcslurm/venv/bin/python3"  # containers/cpu.def's venv: exists only inside the image


def test_stages_in_the_image_on_the_local_executor_match_a_run_without(apptainer, cpu_image, tmp_path):
    plain = tmp_path / "plain run"
    boxed = tmp_path / "container run"
    assert not submit_run(load_config(_run_toml(tmp_path, plain, "local", None, apptainer))).failed
    assert not submit_run(load_config(_run_toml(tmp_path, boxed, "local", cpu_image.path, apptainer))).failed
    assert _outputs(plain) and _outputs(boxed) == _outputs(plain)
    # the same outputs, and every task of the boxed run ran on the image's interpreter
    assert _interpreters(boxed) == {IMAGE_PYTHON} and IMAGE_PYTHON not in _interpreters(plain)


@pytest.mark.slurm
def test_filter_in_the_image_on_slurm_matches_a_run_without(apptainer, cpu_image, slurm_cluster, small_pool,
                                                            tmp_path):
    plain = tmp_path / "plain run"
    boxed = tmp_path / "container run"
    plain_cfg = _run_toml(tmp_path, plain, "slurm", None, apptainer, "filter", small_pool)
    boxed_cfg = _run_toml(tmp_path, boxed, "slurm", cpu_image.path, apptainer, "filter", small_pool)
    submit_run(load_config(plain_cfg))
    submit_run(load_config(boxed_cfg))
    wait_run_done(plain_cfg, timeout=400)
    wait_run_done(boxed_cfg, timeout=400)
    slurm_cluster.wait_jobs_done(60)
    scripts = list((boxed / "logs" / "sbatch").glob("*.sbatch"))
    assert len(scripts) == 5 and all("apptainer exec --cleanenv --contain" in s.read_text() for s in scripts)
    # Every file the filter wrote, except its .npz intermediates (zip members carry their write time).
    filtered = {k: v for k, v in _outputs(boxed, ("filter/",)).items() if not k.endswith(".npz")}
    assert "filter/subset.npy" in filtered and "filter/stats.json" in filtered
    assert filtered == {k: v for k, v in _outputs(plain, ("filter/",)).items() if not k.endswith(".npz")}
    assert len(np.load(plain / "filter" / "subset.npy")) > 0
    assert _interpreters(boxed) == {IMAGE_PYTHON} and IMAGE_PYTHON not in _interpreters(plain)


@pytest.mark.s3
def test_push_then_pull_from_s3_gives_the_same_bytes(cpu_image, s3_server, s3_bucket, tmp_path):
    url = f"{s3_bucket}/images/"
    assert containers.push_image(cpu_image.path, url, s3_server.storage_options())
    got = containers.pull_images(url, str(tmp_path / "pulled"), s3_server.storage_options())
    assert [os.path.basename(p) for p, downloaded in got if downloaded] == [os.path.basename(cpu_image.path)]
    assert sha256_file(got[0][0]) == sha256_file(cpu_image.path)
