"""Containers without building real images (seconds): image naming, build
reuse, push/pull, the exec prefix the executors use, rendered sbatch scripts
(quoting, no credentials, run through bash), and the missing-apptainer error.

A stand-in `apptainer` (a script that records its arguments and environment)
takes the place of the real one here; tests/test_containers_apptainer.py
builds and runs real images.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from dcslurm.cli.render import render_run
from dcslurm.core import containers
from dcslurm.core.config import load_config
from dcslurm.core.errors import UserError
from dcslurm.core.executors import make_executor
from dcslurm.core.tomlfile import write_toml

REPO = Path(__file__).resolve().parent.parent
SECRET = "SeCrEt-value-that-must-never-be-written-7f3a"
KEY_ID = "AKIA-key-id-that-must-never-be-written-91c2"

# Records argv (after the program name) and the APPTAINERENV_* variables as one
# JSON line per call; `build` writes the definition's text as the "image".
FAKE_APPTAINER = textwrap.dedent(f"""\
    #!{sys.executable}
    import json, os, sys
    record = os.environ["FAKE_APPTAINER_RECORD"]
    env = {{k: v for k, v in os.environ.items() if k.startswith("APPTAINERENV_")}}
    with open(record, "a") as f:
        f.write(json.dumps({{"argv": sys.argv[1:], "env": env, "cwd": os.getcwd()}}) + "\\n")
    if sys.argv[1] == "build":
        out, definition = sys.argv[-2], sys.argv[-1]
        with open(definition, "rb") as src, open(out, "wb") as dst:
            dst.write(b"SIF:" + src.read())
    """)


def make_fake_apptainer(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "apptainer"
    path.write_text(FAKE_APPTAINER)
    path.chmod(0o755)
    return path


def calls(record: Path) -> list[dict]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    record = tmp_path / "apptainer-calls.jsonl"
    monkeypatch.setenv("FAKE_APPTAINER_RECORD", str(record))
    return make_fake_apptainer(tmp_path / "fakebin"), record


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A private copy of the package source and containers/ (tests edit it; the
    shared working tree may change under a running test)."""
    root = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    for d in ("dcslurm", "jobs", "containers"):
        shutil.copytree(REPO / d, root / d, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", root)
    return root


@pytest.fixture
def defs(checkout) -> Path:
    return checkout / "containers"


# -- naming -------------------------------------------------------------------------

def test_tag_is_stable_and_changes_with_definition_lock_and_kind(defs, checkout):
    cpu = containers.image_spec("cpu", root=checkout)
    assert cpu.tag == containers.image_spec("cpu", root=checkout).tag
    assert cpu.filename == f"dcslurm-cpu-{cpu.tag}.sif"
    gpu = containers.image_spec("gpu", root=checkout)
    assert gpu.tag != cpu.tag

    (defs / "cpu.def").write_text((defs / "cpu.def").read_text().replace("%post\n", "%post\n    true\n", 1))
    changed_def = containers.image_spec("cpu", root=checkout)
    assert changed_def.tag != cpu.tag
    assert containers.image_spec("gpu", root=checkout).tag == gpu.tag  # the other image is untouched

    with open(defs / "cpu.lock", "a") as f:
        f.write("# a comment is a change too\n")
    assert containers.image_spec("cpu", root=checkout).tag not in (cpu.tag, changed_def.tag)


def test_header_swap_keeps_every_section_and_names_a_different_image(defs, checkout):
    shipped = containers.image_spec("cpu", root=checkout)
    swapped = containers.image_spec("cpu", header="debootstrap", root=checkout)
    assert shipped.definition.count("Bootstrap: docker") == 1
    assert swapped.definition.startswith("Bootstrap: debootstrap\nOSVersion: bookworm\n")
    body = shipped.definition[shipped.definition.index("\n%"):]
    assert swapped.definition.endswith(body)
    assert swapped.tag != shipped.tag


# -- build ----------------------------------------------------------------------------

def test_build_twice_builds_once_and_a_changed_definition_builds_a_new_tag(tmp_path, fake, defs, checkout):
    apptainer, record = fake
    images = tmp_path / "images"
    first = containers.build_image("cpu", str(images), apptainer=str(apptainer), log=lambda s: None, root=checkout)
    assert first.built and os.path.basename(first.path) == containers.image_spec("cpu", root=checkout).filename
    again = containers.build_image("cpu", str(images), apptainer=str(apptainer), log=lambda s: None, root=checkout)
    assert not again.built and again.path == first.path
    assert len(calls(record)) == 1

    (defs / "cpu.def").write_text((defs / "cpu.def").read_text() + "\n%labels\n    changed yes\n")
    third = containers.build_image("cpu", str(images), apptainer=str(apptainer), log=lambda s: None, root=checkout)
    assert third.built and third.path != first.path
    assert len(calls(record)) == 2
    # The build context held the wheel and lock; the image is what apptainer wrote.
    build_call = calls(record)[0]
    assert build_call["argv"][:2] == ["build", "--force"]
    assert Path(first.path).read_bytes().startswith(b"SIF:")
    assert {p.name for p in images.glob("*.sif")} == {os.path.basename(first.path), os.path.basename(third.path)}


def test_build_command_trusts_the_host_ca_bundle(monkeypatch, tmp_path):
    bundle = tmp_path / "certs" / "ca.pem"
    bundle.parent.mkdir()
    bundle.write_text("x")
    monkeypatch.setenv("PIP_CERT", str(bundle))
    argv, env = containers.build_command("apptainer", "out.sif", "cpu.def")
    assert argv == ["apptainer", "build", "--force", "--bind", f"{bundle.parent}:/mnt", "out.sif", "cpu.def"]
    assert env["APPTAINERENV_PIP_CERT"] == "/mnt/ca.pem"


# -- push / pull ------------------------------------------------------------------------

def _fake_image(folder: Path, kind: str = "cpu", payload: bytes = b"image bytes " * 1000) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(payload).hexdigest()[:16]
    path = folder / f"dcslurm-{kind}-{tag}.sif"
    path.write_bytes(payload)
    return path


def _push_pull_roundtrip(url: str, tmp_path: Path, storage_options: dict | None = None) -> None:
    image = _fake_image(tmp_path / "built", payload=os.urandom(3 << 20))  # several MB: multipart on S3
    assert containers.push_image(str(image), url, storage_options)
    assert not containers.push_image(str(image), url, storage_options)  # already there
    pulled_dir = tmp_path / "pulled"
    got = containers.pull_images(url, str(pulled_dir), storage_options)
    assert got == [(str(pulled_dir / image.name), True)]
    assert (pulled_dir / image.name).read_bytes() == image.read_bytes()
    assert containers.pull_images(url, str(pulled_dir), storage_options) == [(str(pulled_dir / image.name), False)]
    assert containers.pull_images(url, str(tmp_path / "gpu-only"), storage_options, kinds=["gpu"]) == []
    assert [i.path for i in containers.list_images(str(pulled_dir))] == [str(pulled_dir / image.name)]


def test_push_pull_through_a_shared_folder_gives_the_same_bytes(tmp_path):
    _push_pull_roundtrip(str(tmp_path / "shared images"), tmp_path)


@pytest.mark.s3
def test_push_pull_through_s3_gives_the_same_bytes(tmp_path, s3_server, s3_bucket):
    _push_pull_roundtrip(f"{s3_bucket}/images/", tmp_path, s3_server.storage_options())


def test_pull_refuses_an_image_whose_bytes_do_not_match(tmp_path):
    remote = tmp_path / "remote"
    image = _fake_image(tmp_path / "built")
    containers.push_image(str(image), str(remote))
    (remote / image.name).write_bytes(b"tampered")
    with pytest.raises(UserError, match="does not match"):
        containers.pull_images(str(remote), str(tmp_path / "pulled"))
    assert not list((tmp_path / "pulled").iterdir())  # nothing half-written left behind


# -- the exec prefix ----------------------------------------------------------------------

def _config(tmp_path: Path, folder: str, container: dict, stages=("synth", "digest", "summary"),
            executor: str = "slurm", tables: dict | None = None, **more) -> str:
    """A run with this [container]; [stages.NAME] from `tables` (default: 3 synth units), `more` other tables."""
    return write_toml(tmp_path / "run.toml", {
        "run": {"folder": folder, "stages": list(stages)}, "executor": {"kind": executor},
        "container": container, "stages": tables or {"synth": {"units": 3}}, **more})


def test_disabled_containers_run_the_plain_interpreter(tmp_path):
    cfg = load_config(_config(tmp_path, str(tmp_path / "run"), {"enabled": False}))
    launcher = make_executor("local", run=cfg).launcher(step_gpu=True)
    assert launcher.prefix == [] and launcher.python == sys.executable


def test_enabled_containers_exec_in_the_image_with_only_the_needed_binds(tmp_path, fake, monkeypatch):
    apptainer, _ = fake
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    cpu, gpu = _fake_image(tmp_path / "img", "cpu"), _fake_image(tmp_path / "img", "gpu", b"gpu")
    metadata = tmp_path / "pool meta"
    metadata.mkdir()
    cfg = load_config(_config(
        tmp_path, str(tmp_path / "run"),
        {"enabled": True, "apptainer": str(apptainer), "cpu_image": str(cpu), "gpu_image": str(gpu),
         "model_cache": str(tmp_path / "models")},
        pool={"metadata": str(metadata)}))
    executor = make_executor("slurm", run=cfg)
    cpu_launcher, gpu_launcher = executor.launcher(False), executor.launcher(True)
    for launcher, image in ((cpu_launcher, cpu), (gpu_launcher, gpu)):
        p = launcher.prefix
        assert p[:3] == ["bash", "-c", containers._FORWARD_SNIPPET]
        assert p[4:8] == [str(apptainer), "exec", "--cleanenv", "--contain"]
        assert p[-1] == str(image) and launcher.python == "python3"
        binds = [p[i + 1] for i, w in enumerate(p) if w == "--bind"]
        assert binds == [str(tmp_path / "run"), str(metadata), "/tmp", str(tmp_path / "models")]
        assert launcher.env == {"APPTAINERENV_XDG_CACHE_HOME": str(tmp_path / "models")}
        assert SECRET not in json.dumps([p, launcher.env])
    assert "--nv" in gpu_launcher.prefix and "--nv" not in cpu_launcher.prefix


def test_files_a_filter_spec_names_are_bound_at_their_own_paths(tmp_path, fake, monkeypatch):
    """synsets=, centroids=, a glob of targets, the fetched lid.176.bin: --contain hides the host's
    files, and they sit inside the spec string, not in a params field of their own."""
    apptainer, _ = fake
    monkeypatch.setenv("DCSLURM_CACHE", str(tmp_path / "cache"))
    assets = tmp_path / "cache" / "assets"
    assets.mkdir(parents=True)
    (assets / "lid.176.bin").write_bytes(b"model")
    files = tmp_path / "files"
    (files / "in1k").mkdir(parents=True)
    for name in ("in21k.txt", "centroids.npy", "in1k/t_0.pt"):
        (files / name).write_bytes(b"x")
    spec = (f"text_based(synsets={files}/in21k.txt) & image_based(targets={files}/in1k/t_*.pt, "
            f"centroids={files}/centroids.npy) then clip_score(l14, fraction=0.3)")
    cfg = load_config(_config(
        tmp_path, str(tmp_path / "run"),
        {"enabled": True, "apptainer": str(apptainer), "cpu_image": str(_fake_image(tmp_path / "img", "cpu"))},
        stages=("filter",), tables={"filter": {"spec": spec}}, pool={"metadata": str(tmp_path / "meta")}))
    p = make_executor("slurm", run=cfg).launcher(False).prefix
    binds = [p[i + 1] for i, w in enumerate(p) if w == "--bind"]
    # the fetched model through [stages.filter] lid_model (resolved when the config was read), then the spec's files
    assert binds == [str(tmp_path / "run"), str(tmp_path / "meta"), str(assets / "lid.176.bin"),
                     str(files / "in21k.txt"), str(files / "in1k"), str(files / "centroids.npy"), "/tmp"]


def test_paths_inside_list_params_are_bound(tmp_path, fake):
    """embed's models[].pretrained: a local checkpoint inside a list of tables."""
    apptainer, _ = fake
    ckpt = tmp_path / "ckpts" / "b32.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    models = [{"name": "b32", "model": "ViT-B-32", "pretrained": str(ckpt)},
              {"name": "l14", "model": "ViT-L-14", "pretrained": "openai"}]
    cfg = load_config(_config(
        tmp_path, str(tmp_path / "run"),
        {"enabled": True, "apptainer": str(apptainer), "gpu_image": str(_fake_image(tmp_path / "img", "gpu"))},
        stages=("embed",), tables={"embed": {"models": models, "offline": False}},
        pool={"shards": str(tmp_path / "shards")}))
    p = make_executor("slurm", run=cfg).launcher(True).prefix
    assert str(ckpt) in [p[i + 1] for i, w in enumerate(p) if w == "--bind"]


def test_paths_that_bind_cannot_express_use_mount():
    assert containers._bind_args("/a b/c") == ["--bind", "/a b/c"]
    assert containers._bind_args("/data", "/tmp") == ["--bind", "/data:/tmp"]
    assert containers._bind_args('/x,y:"z"') == [
        "--mount", '"type=bind","source=/x,y:""z""","destination=/x,y:""z"""']


def test_missing_apptainer_is_one_line_error_saying_how_to_run_without(tmp_path):
    cfg_path = _config(tmp_path, str(tmp_path / "run"),
                       {"enabled": True, "apptainer": "dcslurm-no-such-apptainer"}, executor="local")
    with pytest.raises(UserError) as err:
        make_executor("local", run=load_config(cfg_path)).launcher(False)
    assert "\n" not in str(err.value) and "[container] enabled = false" in str(err.value)
    # The same through the command line: one line on stderr, exit 2, nothing run.
    proc = subprocess.run([sys.executable, "-m", "dcslurm", "submit", "--config", cfg_path],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [s for s in proc.stderr.splitlines() if s.strip() and "%" not in s and "━" not in s]
    assert len(lines) == 1 and "dcslurm-no-such-apptainer" in lines[0] and "enabled = false" in lines[0]
    assert not (tmp_path / "run" / "synth").exists()


def test_missing_image_says_how_to_get_one(tmp_path, fake, monkeypatch):
    apptainer, _ = fake
    monkeypatch.setenv(containers.IMAGE_DIR_ENV, str(tmp_path / "empty"))
    cfg = load_config(_config(tmp_path, str(tmp_path / "run"),
                              {"enabled": True, "apptainer": str(apptainer)}))
    with pytest.raises(UserError, match="containers build"):
        make_executor("slurm", run=cfg).launcher(False)


# -- rendered scripts --------------------------------------------------------------------

HOSTILE = "we ird 'q' $(touch PWNED) `touch PWNED2` ;&|<>"
CACHE_NAME = 'cache, with: comma "dq"'  # --bind cannot hold it: goes through --mount


def _hostile_setup(tmp_path: Path, fake, stages=("synth", "digest", "summary"), tables: dict | None = None):
    apptainer, record = fake
    root = tmp_path / HOSTILE
    root.mkdir(exist_ok=True)
    weird_bin = root / 'bin "dq" $(x)'
    weird_app = make_fake_apptainer(weird_bin)
    image = _fake_image(root / 'images "dq"')
    cache = root / CACHE_NAME
    cfg_path = _config(
        root, str(root / "run folder"),
        {"enabled": True, "apptainer": str(weird_app), "cpu_image": str(image), "gpu_image": str(image),
         "model_cache": str(cache)},
        stages=stages, tables=tables)
    return root, cfg_path, weird_app, image, record


def test_render_scripts_pass_bash_n_quote_everything_and_hold_no_credentials(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    root, cfg_path, weird_app, image, record = _hostile_setup(tmp_path, fake)
    out = root / "scripts out"
    # Through the command line, as a user would.
    proc = subprocess.run([sys.executable, "-m", "dcslurm", "render", "--config", cfg_path, "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    names = sorted(os.listdir(out))
    assert names == ["digest.0000.sbatch", "submit.sh", "summary.sbatch", "synth.0000.sbatch"]
    for name in names:
        text = (out / name).read_text()
        check = subprocess.run(["bash", "-n", str(out / name)], capture_output=True, text=True)
        assert check.returncode == 0, f"{name}: {check.stderr}"
        assert SECRET not in text and KEY_ID not in text
    synth = (out / "synth.0000.sbatch").read_text()
    assert "--cleanenv" in synth and "exec bash -c" in synth
    assert "#SBATCH --array=0-2" in synth
    # The script body, run by bash as SLURM would run it (array task 1 of job 77),
    # starts the container with exactly the words we meant, whatever the paths hold.
    env = {**os.environ, "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_ID": "78",
           "FAKE_APPTAINER_RECORD": str(record)}
    run = subprocess.run(["bash", str(out / "synth.0000.sbatch")], env=env, cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    (call,) = calls(record)
    run_folder = str(root / "run folder")
    cache = str(root / CACHE_NAME)
    mount_cache = ",".join('"' + f.replace('"', '""') + '"' for f in
                           ("type=bind", f"source={cache}", f"destination={cache}"))
    assert call["argv"] == [
        "exec", "--cleanenv", "--contain", "--bind", run_folder, "--bind", "/tmp", "--mount", mount_cache,
        "--pwd", "/tmp", str(image), "python3", "-m", "dcslurm.core.runner", run_folder, "synth", "1",
        "--log", f"{run_folder}/logs/synth/77_1.log"]
    # Credentials and the task's SLURM variables reach the container from the environment at run time.
    assert call["env"]["APPTAINERENV_AWS_SECRET_ACCESS_KEY"] == SECRET
    assert call["env"]["APPTAINERENV_AWS_ACCESS_KEY_ID"] == KEY_ID
    assert call["env"]["APPTAINERENV_SLURM_ARRAY_TASK_ID"] == "1"
    assert set(json.loads(call["env"]["APPTAINERENV_DCSLURM_STORAGE"])) == {"config_kwargs"}  # request bounds only
    assert call["env"]["APPTAINERENV_XDG_CACHE_HOME"] == cache
    # Nothing in any path was executed.
    assert not list(tmp_path.rglob("PWNED*"))


def test_render_multi_node_training_runs_srun_inside_the_allocation_and_each_rank_in_the_gpu_image(
        tmp_path, fake, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    shards = tmp_path / HOSTILE / "shards"  # submit checks the training shards exist and are not empty
    shards.mkdir(parents=True)
    for i in range(2):
        with tarfile.open(shards / f"{i:08d}.tar", "w") as tar:
            member = tarfile.TarInfo(f"{i:03d}.txt")
            member.size = 5
            tar.addfile(member, io.BytesIO(b"a cat"))
    train = {"data": str(shards) + "/{00000000..00000001}.tar",
             "resources": {"nodes": 2, "tasks_per_node": 4, "gpus_per_node": 4}}
    root, cfg_path, weird_app, image, record = _hostile_setup(tmp_path, fake, stages=("train",),
                                                              tables={"train": train})
    out = root / "sbatch"
    names = render_run(cfg_path, str(out))
    assert names == ["train.sbatch", "submit.sh"]
    script = (out / "train.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(out / "train.sbatch")]).returncode == 0
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=4" in script
    assert "#SBATCH --gpus-per-node=4" in script and SECRET not in script
    # srun starts one containerized rank per task; a fake srun runs two ranks here.
    fake_srun = root / "fakebin2"
    fake_srun.mkdir()
    (fake_srun / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                                    'for r in 0 1; do SLURM_PROCID=$r "$@" || exit; done\n')
    (fake_srun / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_srun}:{os.environ['PATH']}", "SLURM_JOB_ID": "90",
           "SLURM_NTASKS": "8", "FAKE_APPTAINER_RECORD": str(record)}
    run = subprocess.run(["bash", str(out / "train.sbatch")], env=env, cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    ranks = calls(record)
    assert [c["env"]["APPTAINERENV_SLURM_PROCID"] for c in ranks] == ["0", "1"]
    for c in ranks:
        assert c["argv"][:4] == ["exec", "--cleanenv", "--contain", "--nv"]
        assert c["argv"][-8:-2] == ["python3", "-m", "dcslurm.core.runner", str(root / "run folder"), "train", "0"]


def test_cli_build_push_pull_list(tmp_path, fake, defs, checkout):
    apptainer, record = fake
    images, shared, pulled = tmp_path / "images", tmp_path / "shared", tmp_path / "pulled"

    def cli(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "dcslurm", "containers", *args], capture_output=True,
                              text=True, cwd=tmp_path, env={**os.environ, "COLUMNS": "300"})
        assert proc.returncode == 0, proc.stderr + proc.stdout
        return proc.stdout

    build = ["build", "--stage", "filter", "--apptainer", str(apptainer), "--image-dir", str(images),
             "--push", str(shared), "--source", str(checkout)]
    first = cli(*build)
    assert "built " in first and "pushed to" in first
    second = cli(*build)
    assert "up to date" in second and "already in" in second
    assert len(calls(record)) == 1
    name = containers.image_spec("cpu", root=checkout).filename
    assert "pulled" in cli("pull", str(shared), "--image-dir", str(pulled))
    assert (pulled / name).read_bytes() == (images / name).read_bytes()
    listing = cli("list", "--image-dir", str(pulled), "--source", str(checkout))
    assert name.split("-")[2].removesuffix(".sif") in listing and "yes" in listing  # current checkout's tag


def test_binds_cover_local_stage_inputs(tmp_path, fake):
    apptainer, _ = fake
    shards = tmp_path / "my shards"
    shards.mkdir()
    image = _fake_image(tmp_path / "img")
    cfg_path = _config(tmp_path, str(tmp_path / "run"),
                       {"enabled": True, "apptainer": str(apptainer), "cpu_image": str(image),
                        "gpu_image": str(image), "scratch": ""},
                       stages=("train",), tables={"train": {"data": str(shards) + "/{00000000..00000003}.tar"}})
    prefix = make_executor("slurm", run=load_config(cfg_path)).launcher(True).prefix
    binds = [prefix[i + 1] for i, w in enumerate(prefix) if w == "--bind"]
    assert binds == [str(tmp_path / "run"), str(shards)]  # no scratch bind: apptainer's own /tmp
    assert prefix[prefix.index("--pwd") + 1] == "/"


# -- lock files ---------------------------------------------------------------------

# The image's %test (containers.selftest) in this environment, but as if only what the image's
# lock file pins were installed: a module whose distribution the lock leaves out cannot import.
LOCK_ONLY_SELFTEST = textwrap.dedent("""
    import importlib.abc, importlib.metadata as md, re, sys
    from dcslurm.core import containers
    kind, lock = sys.argv[1], sys.argv[2]
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
    pinned = {norm(l.split("==")[0]) for l in open(lock) if "==" in l and not l.startswith("#")}
    pinned.add("dcslurm")  # the image installs this package's own wheel besides the lock
    owners = md.packages_distributions()

    class OnlyLocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            dists = owners.get(name.split(".")[0], [])
            if dists and not any(norm(d) in pinned for d in dists):
                raise ModuleNotFoundError(f"No module named {name!r} (not in {lock})", name=name)
            return None

    sys.meta_path.insert(0, OnlyLocked())
    sys.exit(containers.selftest(kind))
""")


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_the_lock_file_holds_every_distribution_the_images_stages_import(kind):
    """What the image's %test finds after a 10-minute build, in seconds: each stage of the image
    imports with only the lock's distributions (the pixel limit's PIL once was missing)."""
    proc = subprocess.run([sys.executable, "-c", LOCK_ONLY_SELFTEST, kind, str(REPO / "containers" / f"{kind}.lock")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout and f"{kind} image: ok" in proc.stdout, proc.stdout
