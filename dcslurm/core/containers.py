"""Apptainer images for the stages: naming, build, push/pull, and the exec prefix.

Two images cover every stage: `cpu` (download, filter, reshard, the test
stages, the orchestrator's helpers) and `gpu` (embed, train, eval: the
stages whose StageSpec says gpu=True). Their definitions and locked
dependency sets live in the source checkout's `containers/` folder.

An image is named by what decides its contents, so a node that already has
an image never builds or downloads it again:

    dcslurm-<kind>-<tag>.sif,  tag = sha256(definition, lock file, this package's source)[:16]

Tasks run as `apptainer exec --cleanenv --contain [--nv] --bind ... IMAGE python3 -m
dcslurm.core.runner ...`. With --cleanenv nothing of the host environment enters the
container except what is forwarded by name at run time (S3 endpoint and
credentials, SLURM's task variables, the runner's DCSLURM_* variables), so
rendered scripts carry variable names, never secret values.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dcslurm.core.errors import UserError
from dcslurm.core.storage import DataFolder, is_remote, sha256_file

KINDS = ("cpu", "gpu")
IMAGE_DIR_ENV = "DCSLURM_IMAGE_DIR"
CONTAINERS_DIR_ENV = "DCSLURM_CONTAINERS_DIR"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the source checkout (dcslurm/, jobs/, containers/)
_SOURCE_DIRS = ("dcslurm", "jobs")
_SOURCE_FILES = ("pyproject.toml",)

# Host variables passed into the container when set (names or NAME* prefixes).
# SLURM_* and DCSLURM_* carry the task's rank and world; AWS_*/FSSPEC_S3_* the
# S3 endpoint and credentials; CUDA_VISIBLE_DEVICES the GPUs SLURM granted.
FORWARDED_ENV = ("SLURM_*", "DCSLURM_*", "AWS_*", "FSSPEC_S3_*", "CUDA_VISIBLE_DEVICES", "NCCL_*",
                 "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

# Run on the host just before apptainer: copy the forwarded variables that are
# set into APPTAINERENV_* (what --cleanenv lets through), then exec apptainer.
# A constant: values are read at run time, never written into a script.
_FORWARD_SNIPPET = (
    'for v in $(compgen -e); do case $v in '
    + "|".join(FORWARDED_ENV)
    + ') export "APPTAINERENV_$v=${!v}";; esac; done; exec "$@"'
)


def containers_dir(root: Path | None = None) -> Path:
    """The folder with cpu.def, gpu.def and their lock files (of the checkout at `root`)."""
    d = Path(root / "containers" if root else os.environ.get(CONTAINERS_DIR_ENV) or PACKAGE_ROOT / "containers")
    if not (d / "cpu.def").is_file():
        raise UserError(f"{d}: no container definitions here (containers/cpu.def); run from a dcslurm source "
                        f"checkout or set {CONTAINERS_DIR_ENV}")
    return d


def default_image_dir() -> str:
    return os.environ.get(IMAGE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "dcslurm", "images")


def kind_for_stage(stage: str) -> str:
    """`gpu` for stages that declare gpu=True, else `cpu`."""
    from dcslurm.core.stages import get_stage

    return "gpu" if get_stage(stage).gpu else "cpu"


# -- naming ---------------------------------------------------------------------

def source_digest(root: Path = PACKAGE_ROOT) -> str:
    """sha256 over this package's source files (what the image's wheel is built from)."""
    h = hashlib.sha256()
    files: list[Path] = [root / f for f in _SOURCE_FILES if (root / f).is_file()]
    for d in _SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(root / d):
            dirnames[:] = sorted(n for n in dirnames if n != "__pycache__" and not n.startswith("."))
            files += [Path(dirpath) / n for n in filenames
                      if not n.endswith((".pyc", ".pyo")) and not n.startswith((".", "#"))]
    for f in sorted(files):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()


def package_version(root: Path = PACKAGE_ROOT) -> str:
    import tomllib

    with open(root / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


@dataclass(frozen=True)
class ImageSpec:
    """One image as it would be built now: definition text, lock text, source digest."""

    kind: str
    definition: str  # the definition file's text (header possibly replaced, see with_header)
    lock: str  # the lock file's text
    source: str  # source_digest()
    version: str  # this package's version, installed in the image

    @property
    def tag(self) -> str:
        h = hashlib.sha256()
        for part in (self.kind, self.definition, self.lock, self.version, self.source):
            h.update(part.encode() + b"\0")
        return h.hexdigest()[:16]

    @property
    def filename(self) -> str:
        return f"dcslurm-{self.kind}-{self.tag}.sif"

    def with_header(self, header: str) -> ImageSpec:
        """The same definition with its header (`Bootstrap:`/`From:` lines before
        the first %section) replaced, e.g. `Bootstrap: debootstrap` where Docker
        Hub is unreachable. Every section stays as written."""
        return ImageSpec(self.kind, replace_header(self.definition, header), self.lock, self.source, self.version)


# Named headers for `containers build --header NAME`: the same Debian 12 as the
# shipped `debian:bookworm-slim`, bootstrapped from a Debian mirror (no Docker Hub).
HEADERS = {
    "debootstrap": "Bootstrap: debootstrap\nOSVersion: bookworm\nMirrorURL: http://deb.debian.org/debian\n",
}


def replace_header(definition: str, header: str) -> str:
    match = re.search(r"^%\w+", definition, flags=re.M)
    body = definition[match.start():] if match else ""
    return header.rstrip("\n") + "\n\n" + body


def image_spec(kind: str, header: str | None = None, root: Path | None = None) -> ImageSpec:
    """The `kind` image of the checkout at `root` (default: this package's own)."""
    if kind not in KINDS:
        raise UserError(f"unknown image kind {kind!r}: choose from {', '.join(KINDS)}")
    d = containers_dir(root)
    root = root or PACKAGE_ROOT
    lock = d / f"{kind}.lock"
    if not lock.is_file():
        raise UserError(f"{lock}: missing lock file (write it with `dcslurm containers lock`)")
    spec = ImageSpec(kind, (d / f"{kind}.def").read_text(), lock.read_text(), source_digest(root),
                     package_version(root))
    return spec.with_header(HEADERS.get(header, header)) if header else spec


# -- the apptainer binary -------------------------------------------------------

def find_apptainer(apptainer: str = "apptainer") -> str:
    """Full path of the apptainer command, or a one-line UserError saying how to run without it."""
    path = shutil.which(apptainer)
    if path is None:
        raise UserError(f"{apptainer}: Apptainer is not installed on this host (not found on PATH); install it, "
                        "or run without containers: set `[container] enabled = false` in the run's config")
    return path


# -- build ----------------------------------------------------------------------

@dataclass
class BuildResult:
    kind: str
    path: str
    built: bool  # False: an image with this tag was already there
    seconds: float = 0.0


def _wheel(out_dir: str, root: Path) -> str:
    """Build this package's wheel (no dependencies: those come from the lock file)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", out_dir, str(root)], check=True, stdout=subprocess.DEVNULL)
    wheels = [n for n in os.listdir(out_dir) if n.endswith(".whl")]
    if len(wheels) != 1:
        raise RuntimeError(f"{out_dir}: expected one wheel, found {wheels}")
    return os.path.join(out_dir, wheels[0])


def _ca_bundle() -> str | None:
    """The host's CA bundle as pip is told to use it (proxies that re-sign TLS need it in the build)."""
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        path = os.environ.get(var)
        if path and os.path.isfile(path):
            return path
    return None


def build_command(apptainer: str, out: str, definition: str) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) of `apptainer build`; pip inside %post trusts the host's CA bundle."""
    argv = [apptainer, "build", "--force"]
    env: dict[str, str] = {}
    bundle = _ca_bundle()
    if bundle:
        argv += ["--bind", f"{os.path.dirname(bundle)}:/mnt"]
        env["APPTAINERENV_PIP_CERT"] = f"/mnt/{os.path.basename(bundle)}"
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT"):
        if os.environ.get(var):
            env[f"APPTAINERENV_{var}"] = os.environ[var]
    return argv + [out, definition], env


def build_image(kind: str, image_dir: str | None = None, apptainer: str = "apptainer", header: str | None = None,
                force: bool = False, log: Callable[[str], None] = print, root: Path | None = None) -> BuildResult:
    """Build the `kind` image into `image_dir` unless one with the same tag is there.

    The build context is a temporary folder holding the definition, the lock
    file and this package's wheel; the image appears under its final name only
    when the build (including its %test) succeeded.
    """
    spec = image_spec(kind, header, root)
    image_dir = image_dir or default_image_dir()
    os.makedirs(image_dir, exist_ok=True)
    out = os.path.join(image_dir, spec.filename)
    if os.path.exists(out) and not force:
        return BuildResult(kind, out, built=False)
    exe = find_apptainer(apptainer)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix=f"build-{kind}-", dir=image_dir) as ctx:
        os.makedirs(os.path.join(ctx, "dist"))
        _wheel(os.path.join(ctx, "dist"), Path(root or PACKAGE_ROOT))
        with open(os.path.join(ctx, f"{kind}.def"), "w") as f:
            f.write(spec.definition)
        with open(os.path.join(ctx, f"{kind}.lock"), "w") as f:
            f.write(spec.lock)
        with open(os.path.join(ctx, "BUILD.json"), "w") as f:
            json.dump({"kind": kind, "tag": spec.tag, "version": spec.version, "source": spec.source}, f)
        tmp_out = os.path.join(ctx, spec.filename)
        argv, extra_env = build_command(exe, tmp_out, f"{kind}.def")
        log(f"building {spec.filename}: {' '.join(argv)}")
        log_path = os.path.join(image_dir, f"{spec.filename}.build.log")  # follow it with tail -f
        with open(log_path, "wb") as build_log:
            proc = subprocess.run(argv, cwd=ctx, env={**os.environ, **extra_env}, stdout=build_log,
                                  stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            with open(log_path, errors="replace") as f:
                last = [line.strip() for line in f if line.strip()][-1:] or ["(empty log)"]
            raise UserError(f"apptainer build of the {kind} image failed (exit {proc.returncode}): "
                            f"{last[0][-300:]} (full log: {log_path})")
        os.replace(tmp_out, out)
    return BuildResult(kind, out, built=True, seconds=time.time() - started)


# -- push / pull / list -----------------------------------------------------------

_IMAGE_NAME = re.compile(r"^dcslurm-(cpu|gpu)-([0-9a-f]{16})\.sif$")


def push_image(path: str, url: str, storage_options: dict | None = None) -> bool:
    """Upload an image to a folder URL (s3://... or a shared path) with a
    `.json` sidecar holding its sha256; False if it was already there."""
    name = os.path.basename(path)
    if not _IMAGE_NAME.match(name):
        raise UserError(f"{path}: not a dcslurm image name (dcslurm-<kind>-<tag>.sif)")
    folder = DataFolder(url, storage_options)
    if folder.exists(name) and folder.exists(name + ".json"):
        return False
    meta = {"name": name, "sha256": sha256_file(path), "bytes": os.path.getsize(path), "pushed": time.time()}
    folder.put_file(path, name)
    folder.write_json(name + ".json", meta)  # last: its presence says the image is complete
    return True


def pull_images(url: str, image_dir: str | None = None, storage_options: dict | None = None,
                kinds: Iterable[str] = KINDS) -> list[tuple[str, bool]]:
    """Download the images under `url` that are not in `image_dir` yet, checking
    each against its sidecar's sha256. Returns (local path, downloaded) pairs."""
    image_dir = image_dir or default_image_dir()
    os.makedirs(image_dir, exist_ok=True)
    folder = DataFolder(url, storage_options)
    names = set(folder.list())
    out = []
    for name in sorted(names):
        m = _IMAGE_NAME.match(name)
        if not m or m.group(1) not in kinds or name + ".json" not in names:
            continue
        local = os.path.join(image_dir, name)
        if os.path.exists(local):
            out.append((local, False))
            continue
        meta = folder.read_json(name + ".json")
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{name}-", dir=image_dir)
        try:
            with os.fdopen(fd, "wb") as dst, folder.open(name) as src:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            got = sha256_file(tmp)
            if got != meta.get("sha256"):
                raise UserError(f"{folder.url_of(name)}: downloaded sha256 {got[:12]} does not match the "
                                f"pushed {str(meta.get('sha256'))[:12]}")
            os.replace(tmp, local)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        out.append((local, True))
    return out


@dataclass
class LocalImage:
    kind: str
    tag: str
    path: str
    bytes: int
    current: bool  # built from this checkout's definition, lock and source


def list_images(image_dir: str | None = None, root: Path | None = None) -> list[LocalImage]:
    image_dir = image_dir or default_image_dir()
    if not os.path.isdir(image_dir):
        return []
    current = set()
    for kind in KINDS:
        with contextlib.suppress(UserError):
            current.add(image_spec(kind, root=root).filename)
    out = []
    for name in sorted(os.listdir(image_dir)):
        m = _IMAGE_NAME.match(name)
        if m:
            path = os.path.join(image_dir, name)
            out.append(LocalImage(m.group(1), m.group(2), path, os.path.getsize(path), name in current))
    return out


# -- running tasks in an image ----------------------------------------------------

def image_for(config, gpu: bool) -> str:
    """The image a step runs in: [container] gpu_image/cpu_image, else this
    checkout's image in the image folder (built or pulled beforehand)."""
    c = config.container
    kind = "gpu" if gpu else "cpu"
    explicit = c.gpu_image if gpu else c.cpu_image
    if explicit:
        if "://" in explicit:
            raise UserError(f"{config.path}: [container] {kind}_image: {explicit!r} is a URL; "
                            f"run `dcslurm containers pull` and name the local file")
        base = os.path.dirname(os.path.abspath(config.path))
        return os.path.join(base, os.path.expanduser(explicit))  # relative to the config file
    image_dir = c.image_dir or default_image_dir()
    path = os.path.join(image_dir, image_spec(kind).filename)
    if not os.path.exists(path) and c.check_host:
        raise UserError(f"{path}: no {kind} image for this checkout; run `dcslurm containers build` "
                        f"(or `containers pull URL`), or set [container] {kind}_image")
    return path


def check_host(config) -> None:
    """One-line UserError unless apptainer and the images the run's stages need are here."""
    from dcslurm.core.stages import get_stage

    find_apptainer(config.container.apptainer)
    for gpu in sorted({get_stage(s).gpu for s in config.selected_stages()}):
        image = image_for(config, gpu)
        if not os.path.exists(image):
            raise UserError(f"{image}: [container] {'gpu' if gpu else 'cpu'}_image does not exist")


def _bind_args(path: str, target: str | None = None) -> list[str]:
    """--bind for plain paths; --mount (CSV-quoted) for paths with ',' or ':' that --bind cannot express."""
    target = target or path
    if not any(c in path + target for c in ",:\"\n"):
        return ["--bind", path if path == target else f"{path}:{target}"]
    fields = ["type=bind", f"source={path}", f"destination={target}"]
    return ["--mount", ",".join('"' + f.replace('"', '""') + '"' for f in fields)]


def _local_dir(url: str) -> str | None:
    """The path to bind for a local input/output URL (the folder of a {a..b} pattern)."""
    if not url or is_remote(url):
        return None
    if "{" in url:
        url = os.path.dirname(url.split("{", 1)[0])
    return os.path.abspath(url)


def _param_paths(config) -> list[str]:
    """Absolute local paths that exist, named by the run's stage params at any depth (train
    `data`, eval `evalsets`, embed `models[].pretrained`, what a params class's `local_paths()`
    lists): inputs the tasks read besides the run folder and pool."""
    import dataclasses

    def strings(value):  # at any depth: embed's models[].pretrained, eval's extra_tasks[].evalset, ...
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from strings(v)

    out = []
    for section in config.stages.values():
        params = section.params
        if not dataclasses.is_dataclass(params):
            continue
        values = [getattr(params, f.name) for f in dataclasses.fields(params)]
        # paths inside a value (the filter spec's synsets=, centroids=, ...): the params say which
        values += getattr(params, "local_paths", list)()
        for value in strings(values):
            if value.startswith("/"):
                path = _local_dir(value)
                if path and os.path.exists(path):
                    out.append(path)
    return out


def task_binds(config) -> list[list[str]]:
    """What a task needs from the host: the run folder, pool folders and stage
    params' paths when local, scratch (at /tmp), the model cache, and [container] binds."""
    c = config.container
    binds: list[list[str]] = []
    seen: set[str] = set()
    for url in (config.run_url, config.pool.metadata, config.pool.shards, *_param_paths(config)):
        d = _local_dir(url)
        if d and d not in seen:
            seen.add(d)
            binds.append(_bind_args(d))
    if c.scratch:
        binds.append(_bind_args(c.scratch, "/tmp"))
    if c.model_cache:
        binds.append(_bind_args(c.model_cache))
    for extra in c.binds:
        binds.append(["--bind", extra])
    return binds


def exec_prefix(config, gpu: bool) -> tuple[list[str], dict[str, str]]:
    """(prefix words, environment) that run a task's command inside its image."""
    c = config.container
    apptainer = find_apptainer(c.apptainer) if c.check_host else c.apptainer
    words = ["bash", "-c", _FORWARD_SNIPPET, "dcslurm-container", apptainer, "exec", "--cleanenv", "--contain"]
    if gpu:
        words.append("--nv")
    for b in task_binds(config):
        words += b
    words += ["--pwd", "/tmp" if c.scratch else "/", image_for(config, gpu)]
    env = {}
    if c.model_cache:
        # Torch hub and Hugging Face caches live under XDG_CACHE_HOME.
        env["APPTAINERENV_XDG_CACHE_HOME"] = c.model_cache
    return words, env


# -- inside the image ---------------------------------------------------------------

def selftest(kind: str) -> int:
    """The image's %test: import the code of every stage this image runs."""
    import importlib

    from dcslurm.core.stages import registry

    failed = 0
    for name, spec in registry().items():
        if ("gpu" if spec.gpu else "cpu") != kind:
            continue
        for step in spec.steps:
            module = step.entry.split(":", 1)[0]
            try:
                importlib.import_module(module)
                print(f"ok   {name}: {module}")
            except ModuleNotFoundError as exc:
                if exc.name != module:  # a dependency the image lacks
                    failed += 1
                    print(f"FAIL {name}: {module}: {exc}")
                else:  # declared in a spec.py, its code not written yet in this source tree
                    print(f"skip {name}: {module} is not in this source tree")
            except Exception as exc:  # noqa: BLE001 - report every stage, then fail
                failed += 1
                print(f"FAIL {name}: {module}: {type(exc).__name__}: {exc}")
    print(f"dcslurm {package_version_installed()} {kind} image: {'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


def package_version_installed() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("dcslurm")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


# -- lock files -------------------------------------------------------------------

# Only in the gpu image (the cpu image's stages never import them).
GPU_ONLY = ("torch", "torchvision", "open_clip_torch", "clip_benchmark", "matplotlib", "scikit-learn")


def lock_roots(kind: str, root: Path = PACKAGE_ROOT) -> list[str]:
    """Top-level requirements of an image: the package's dependencies plus its `jobs` extra."""
    import tomllib

    with open(root / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["jobs"])
    if kind == "cpu":
        reqs = [r for r in reqs if re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() not in GPU_ONLY]
    return reqs


def resolve_lock(roots: list[str]) -> list[str]:
    """`name==version` for every distribution the roots need, as installed in this environment."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    pinned: dict[str, str] = {}
    stack = list(roots)
    while stack:
        req = Requirement(stack.pop())
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in pinned:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise UserError(f"{req.name}: not installed in this environment; install the `jobs` extra first") from None
        pinned[key] = dist.version
        for sub in dist.requires or []:
            sreq = Requirement(sub)
            if sreq.marker is None or sreq.marker.evaluate({"extra": ""}):
                stack.append(sub)
    return [f"{name}=={version}" for name, version in sorted(pinned.items())]


def write_lock(kind: str, out_dir: Path | None = None) -> Path:
    out_dir = out_dir or containers_dir()
    lines = resolve_lock(lock_roots(kind))
    path = Path(out_dir) / f"{kind}.lock"
    header = (f"# dcslurm {kind} image: every distribution pinned (from `dcslurm containers lock`).\n"
              "# Part of the image tag: editing this file gives a new image.\n")
    path.write_text(header + "\n".join(lines) + "\n")
    return path


if __name__ == "__main__":  # python -m dcslurm.core.containers selftest cpu   (the images' %test)
    if len(sys.argv) == 3 and sys.argv[1] == "selftest":
        sys.exit(selftest(sys.argv[2]))
    sys.exit("usage: python -m dcslurm.core.containers selftest cpu|gpu")
