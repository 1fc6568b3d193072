"""The run configuration: one TOML file, validated into dataclasses.

Every error is one line that starts with the file and the key at fault.
Credentials are refused: they come from the environment, never the file.
This module checks the generic sections and the generic keys of each [stages.NAME]
(units_per_task, resources); the stage's own keys are bound to its params dataclass by
the one binding step, stages.bind_params, which a task runs again on its plan's copy.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from dcslurm.core.errors import ConfigError
from dcslurm.core.plantypes import Resources, at_least
from dcslurm.core.scales import SCALES, ScaleConfig
from dcslurm.core.stages import bind_params, get_stage, pipeline_stages, registry
from dcslurm.core.storage import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_READ_TIMEOUT,
    DataFolder,
    normalize_url,
    s3fs_options,
)
from dcslurm.core.tables import load_dataclass, read_toml, shown


@dataclass
class RunSection:
    folder: str  # the run folder URL: RUN
    scale: str = "tiny"
    stages: list[str] | str = "all"
    name: str = ""
    seed: int = 0


@dataclass
class PoolSection:
    metadata: str = ""  # folder of DataComp metadata parquet (+ npz)
    shards: str = ""  # existing webdataset shards: a folder or a {a..b} pattern


@dataclass
class StorageSection:
    endpoint_url: str = ""
    profile: str = ""
    # Bounds on every S3 request (see storage.s3fs_options): a silent endpoint
    # fails a command in about max_attempts x read_timeout seconds.
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # attempts per request, the first included
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT  # seconds
    read_timeout: float = DEFAULT_READ_TIMEOUT  # seconds without a byte from the server

    def validate(self) -> None:
        at_least(self, "max_attempts", 1)
        for key in ("connect_timeout", "read_timeout"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}: must be > 0 (seconds)")


@dataclass
class ExecutorSection:
    kind: str = "local"  # local | slurm | submitit
    max_parallel: int = 0  # local: tasks at once; 0 = cores / cpus_per_task
    log_dir: str = ""  # on a filesystem the compute nodes share
    # kind = "submitit": submitit's executor to queue through: "slurm", or "local" (its
    # LocalExecutor: the tasks run on this machine, step after step)
    submitit_cluster: str = "slurm"

    def validate(self) -> None:
        at_least(self, "max_parallel", 0)
        if self.submitit_cluster not in ("slurm", "local"):
            raise ValueError(f"submitit_cluster: expected 'slurm' or 'local', got {shown(self.submitit_cluster)}")


@dataclass
class SlurmSection(Resources):
    python: str = ""  # interpreter on the compute nodes; default: this one
    max_array_size: int = 0  # 0 = read from `scontrol show config`

    def validate(self) -> None:
        super().validate()
        at_least(self, "max_array_size", 0)


@dataclass
class ContainerSection:
    enabled: bool = False
    cpu_image: str = ""
    gpu_image: str = ""
    binds: list[str] = field(default_factory=list)  # extra apptainer --bind specs
    apptainer: str = "apptainer"
    image_dir: str = ""  # where built/pulled images are; default $DCSLURM_IMAGE_DIR or ~/.cache/dcslurm/images
    scratch: str = "/tmp"  # host folder bound as the task's /tmp (node-local disk); "" = apptainer's own
    model_cache: str = ""  # host folder for torch/Hugging Face caches (XDG_CACHE_HOME inside)
    python: str = "python3"  # the interpreter inside the images
    # Not a TOML key: `dcslurm render` writes scripts for another host, so it skips
    # checking that apptainer and the images exist here.
    check_host: bool = field(default=True, init=False, repr=False)


@dataclass
class StageSection:
    """The generic keys of [stages.NAME]; the rest are the stage's params."""

    units_per_task: int | None = None  # None (not set) = the stage's default
    resources: dict = field(default_factory=dict)
    params: Any = None  # the stage's params dataclass (stages.bind_params); None: it takes none

    def validate(self) -> None:
        if self.units_per_task is not None:
            at_least(self, "units_per_task", 1)


@dataclass
class RunConfig:
    path: str  # where it was loaded from, for error messages
    run: RunSection
    pool: PoolSection
    storage: StorageSection
    executor: ExecutorSection
    slurm: SlurmSection
    container: ContainerSection
    stages: dict[str, StageSection]
    raw: dict

    @property
    def scale(self) -> ScaleConfig:
        return SCALES[self.run.scale]

    @property
    def run_url(self) -> str:
        return self.run.folder

    @property
    def storage_options(self) -> dict:
        """fsspec options for s3:// URLs (no credentials: those come from the environment)."""
        s = self.storage
        return s3fs_options(
            endpoint_url=s.endpoint_url or None,
            profile=s.profile or None,
            max_attempts=s.max_attempts,
            connect_timeout=s.connect_timeout,
            read_timeout=s.read_timeout,
        )

    def folder(self, url: str | None = None) -> DataFolder:
        return DataFolder(url or self.run.folder, self.storage_options)

    @property
    def run_name(self) -> str:
        return self.run.name or os.path.basename(self.run.folder.rstrip("/")) or "run"

    def selected_stages(self) -> list[str]:
        stages = self.run.stages
        return pipeline_stages() if stages == "all" else list(stages)

    def resources_for(self, stage: str, defaults: dict) -> Resources:
        """Site [slurm] defaults, then the stage's defaults, then [stages.NAME.resources]."""
        site = {f.name: getattr(self.slurm, f.name) for f in dataclasses.fields(Resources)}
        merged = {**site, **{k: v for k, v in defaults.items()}}
        section = self.stages.get(stage)
        if section is not None:
            merged.update(section.resources)
        return Resources(**merged)

    def fingerprint(self) -> dict:
        """What decides a run's outputs: a rerun with other values would mix runs."""
        return {
            "scale": self.run.scale,
            "seed": self.run.seed,
            "pool": dataclasses.asdict(self.pool),
            "stages": {
                name: _jsonable(s.params) for name, s in sorted(self.stages.items())
            },
        }

    def fingerprint_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        # A field marked metadata={"fingerprint": False} says how a task reaches or caches its
        # inputs (a proxy, a cache folder), not what it writes: changing it must not refuse the run.
        skip = {f.name for f in dataclasses.fields(obj) if f.metadata.get("fingerprint") is False}
        return {k: v for k, v in dataclasses.asdict(obj).items() if k not in skip}
    return obj


# -- validation ---------------------------------------------------------------

_SECTIONS = {
    "run": RunSection,
    "pool": PoolSection,
    "storage": StorageSection,
    "executor": ExecutorSection,
    "slurm": SlurmSection,
    "container": ContainerSection,
    "stages": None,
}


def parse_config(raw: dict, path: str = "run.toml", scale: str | None = None,
                 stages: list[str] | None = None, executor: str | None = None) -> RunConfig:
    """Validate a parsed TOML document (plus CLI overrides) into a RunConfig."""
    name = os.path.basename(path)
    for key in raw:
        if key not in _SECTIONS:
            close = difflib.get_close_matches(key, list(_SECTIONS), n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            raise ConfigError(f"{name}: unknown section [{key}]{hint}")
    if "run" not in raw:
        raise ConfigError(f"{name}: missing section [run] (it names the run folder: folder = \"...\")")
    run = load_dataclass(RunSection, raw["run"], f"{name}: [run]")
    if scale is not None:
        run.scale = scale
    if stages is not None:
        run.stages = stages
    if run.scale not in SCALES:
        raise ConfigError(f"{name}: [run] scale: unknown scale {shown(run.scale)}; choose one of {', '.join(SCALES)}")
    if not run.folder.strip():
        raise ConfigError(f"{name}: [run] folder: must not be empty")
    base_dir = os.path.dirname(os.path.abspath(path))
    run.folder = _resolve(run.folder, base_dir)

    pool = load_dataclass(PoolSection, raw.get("pool", {}), f"{name}: [pool]")
    pool.metadata = _resolve(pool.metadata, base_dir) if pool.metadata else ""
    if pool.shards and "{" not in pool.shards:
        pool.shards = _resolve(pool.shards, base_dir)
    elif pool.shards and not ("://" in pool.shards and not pool.shards.startswith("file://")):
        pool.shards = os.path.join(base_dir, pool.shards) if not os.path.isabs(pool.shards) else pool.shards

    storage = load_dataclass(StorageSection, raw.get("storage", {}), f"{name}: [storage]")
    execu = load_dataclass(ExecutorSection, raw.get("executor", {}), f"{name}: [executor]")
    if executor is not None:
        execu.kind = executor
    if execu.kind not in ("local", "slurm", "submitit"):
        raise ConfigError(f"{name}: [executor] kind: expected 'local', 'slurm' or 'submitit', "
                          f"got {shown(execu.kind)}")
    if execu.log_dir:
        execu.log_dir = _resolve(execu.log_dir, base_dir)
    slurm = load_dataclass(SlurmSection, raw.get("slurm", {}), f"{name}: [slurm]")
    _check_time(slurm.time, f"{name}: [slurm] time")
    container = load_dataclass(ContainerSection, raw.get("container", {}), f"{name}: [container]")

    stage_tables = raw.get("stages", {})
    if not isinstance(stage_tables, dict):
        raise ConfigError(f"{name}: [stages] must be a table of [stages.NAME] tables")
    known = registry()
    if run.stages != "all":
        if isinstance(run.stages, str):
            raise ConfigError(f"{name}: [run] stages: expected \"all\" or a list of stage names")
        for s in run.stages:
            try:
                get_stage(s)
            except Exception as exc:
                raise ConfigError(f"{name}: [run] stages: {exc}") from None
    sections: dict[str, StageSection] = {}
    for stage_name in set(stage_tables) | set(run.stages if run.stages != "all" else pipeline_stages()):
        if stage_name not in known:
            raise ConfigError(
                f"{name}: [stages.{stage_name}]: unknown stage (known: {', '.join(pipeline_stages())})"
            )
        spec = known[stage_name]
        table = dict(stage_tables.get(stage_name, {}))
        where = f"{name}: [stages.{stage_name}]"
        generic = {k: table.pop(k) for k in ("units_per_task", "resources") if k in table}
        section = load_dataclass(StageSection, generic, where)
        resources = load_dataclass(Resources, section.resources, f"{where}.resources")
        section.resources = {k: v for k, v in dataclasses.asdict(resources).items() if k in section.resources}
        if "time" in section.resources:
            _check_time(section.resources["time"], f"{where}.resources time")
        section.params = bind_params(spec.params, table, where)
        sections[stage_name] = section
    return RunConfig(
        path=path, run=run, pool=pool, storage=storage, executor=execu, slurm=slurm,
        container=container, stages=sections, raw=raw,
    )


def load_config(path: str, scale: str | None = None, stages: list[str] | None = None,
                executor: str | None = None) -> RunConfig:
    """Read and validate a run.toml."""
    return parse_config(read_toml(path), path, scale=scale, stages=stages, executor=executor)


def _resolve(url: str, base_dir: str) -> str:
    """Relative local paths are relative to the config file's folder."""
    if "://" in url and not url.startswith("file://"):
        return normalize_url(url)
    if url.startswith("file://"):
        url = url[len("file://"):]
    url = os.path.expanduser(url)
    return normalize_url(url if os.path.isabs(url) else os.path.join(base_dir, url))


def _check_time(value: str, where: str) -> None:
    """SLURM time limits: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    if not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", value or ""):
        raise ConfigError(f"{where}: expected a SLURM time limit like '04:00:00' or '2-00:00:00', got {shown(value)}")


def slurm_time_hours(value: str) -> float:
    """A SLURM time limit (the forms _check_time accepts) in hours: MM, MM:SS, HH:MM:SS,
    D-HH, D-HH:MM, D-HH:MM:SS."""
    days, _, rest = value.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 3:  # HH:MM:SS
        h, m, s = parts
    else:  # MM[:SS]
        h, (m, s) = 0, (parts + [0])[:2]
    return int(days or 0) * 24 + h + m / 60 + s / 3600
