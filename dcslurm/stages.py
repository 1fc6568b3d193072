"""What a stage is, to the planner, and where the stages are found.

A stage (download, embed, filter, ...) is one or more *steps*; each step is
a SLURM array (or one job) running a function `run(ctx: TaskContext)` on its
tasks. Every stage declares itself in a light module `jobs/<pkg>/spec.py`
(no torch imports there) as `STAGES = [StageSpec(...)]`; the stage's code
proper lives beside it and is imported only on the compute node.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dcslurm.errors import UserError
from dcslurm.shards import UnitSet

if TYPE_CHECKING:
    from dcslurm.config import RunConfig
    from dcslurm.plan import StepPlan
    from dcslurm.storage import DataFolder

LAYOUTS = ("array", "single", "distributed")


@dataclass(frozen=True)
class Estimate:
    """Planned cost of a step: GPU-hours (A100-equivalent) and bytes written."""

    gpu_hours: float = 0.0
    bytes_written: float = 0.0
    basis: str = ""
    warning: str = ""  # one line plan/submit print: e.g. a job shape absurd for the scale


@dataclass(frozen=True)
class PlanInputs:
    """What planning knows about the world: the pool, listed once (I/O done before)."""

    metadata_files: tuple[str, ...] = ()  # pool parquet URLs, sorted
    shards: UnitSet | None = None  # existing webdataset shards (bring your own)
    pool_rows: int | None = None  # rows of the metadata files (their footers); None = not read


@dataclass
class PlanContext:
    """Handed to a step's `units` and the stage's `estimate`: pure data, no I/O."""

    config: RunConfig
    inputs: PlanInputs
    steps: dict[str, StepPlan]  # steps planned so far in this run, by name
    params: Any  # the stage's params dataclass instance

    @property
    def scale(self):
        return self.config.scale


@dataclass(frozen=True)
class StepSpec:
    """One array (or single job) of a stage."""

    name: str  # "run" for one-step stages; else e.g. "map", "reduce", "apply"
    entry: str  # "module:function" taking a TaskContext, run on the compute node
    units: Callable[[PlanContext], UnitSet]
    layout: str = "array"
    default_units_per_task: int = 1
    # The step polls ctx.should_stop(), and on true saves a checkpoint and raises
    # dcslurm.task.Preempted: the runner then catches the scheduler's stop signals for
    # it and requeues the job on the time-limit warning (sbatch renders --signal).
    checkpointable: bool = False


@dataclass(frozen=True)
class StageSpec:
    name: str
    description: str
    steps: tuple[StepSpec, ...]
    order: int  # position in the pipeline: download 10, embed 20, ...
    params: type | None = None  # dataclass of the stage's [stages.NAME] keys
    gpu: bool = False
    default_resources: dict = field(default_factory=dict)
    # (config, resources) -> resources: the job's shape (nodes x tasks) when the config
    # does not set it, e.g. training sized from the scale. None = resources as merged.
    job_shape: Callable[[RunConfig, Any], Any] | None = None
    estimate: Callable[[PlanContext, dict[str, UnitSet]], Estimate] | None = None
    test_only: bool = False  # registered for the test suite; not in `stages = "all"`
    in_all: bool = True  # part of the DataComp workflow `stages = "all"` runs (analyses opt in)
    # Input checks run by `plan` and `submit` before anything is queued (runs.preflight_run):
    # I/O allowed, one-line UserError naming the file. Inputs an earlier stage of the same
    # run produces do not exist yet: skip those (see `in_run`).
    preflight: Callable[[RunConfig], None] | None = None
    # Problems known only once a step has run (e.g. reshard's subset uids that no shard
    # holds): lines `status` prints first. Reads the run folder; never raises for a
    # step that has not run.
    problems: Callable[[DataFolder], list[str]] | None = None

    def step_name(self, step: StepSpec) -> str:
        return self.name if len(self.steps) == 1 else f"{self.name}.{step.name}"


_REGISTRY: dict[str, StageSpec] | None = None


def registry() -> dict[str, StageSpec]:
    """All stages declared under jobs/*/spec.py, by name, in pipeline order."""
    global _REGISTRY
    if _REGISTRY is None:
        import jobs

        found: list[StageSpec] = []
        for mod in pkgutil.iter_modules(jobs.__path__):
            if not mod.ispkg:
                continue
            try:
                spec_module = importlib.import_module(f"jobs.{mod.name}.spec")
            except ModuleNotFoundError as exc:
                if exc.name == f"jobs.{mod.name}.spec":
                    continue
                raise
            found.extend(getattr(spec_module, "STAGES", []))
        found.sort(key=lambda s: (s.order, s.name))
        _REGISTRY = {s.name: s for s in found}
    return _REGISTRY


def get_stage(name: str) -> StageSpec:
    stages = registry()
    if name not in stages:
        known = ", ".join(n for n, s in stages.items() if not s.test_only)
        raise UserError(f"unknown stage {name!r}: choose from {known}")
    return stages[name]


def pipeline_stages() -> list[str]:
    """The stages `stages = "all"` selects, in order."""
    return [n for n, s in registry().items() if not s.test_only and s.in_all]


# -- where a stage's inputs come from (shared by the stages) ------------------

def shard_units(ctx: PlanContext) -> UnitSet:
    """Webdataset shards: the download stage's outputs when it is in the run,
    else the pool's own shards ([pool] shards)."""
    up = ctx.steps.get("download")
    if up is not None:
        return UnitSet(count=up.n_tasks, upstream="download", label="download tasks")
    if ctx.inputs.shards is not None:
        return ctx.inputs.shards
    raise UserError(f"{ctx.config.path}: no image shards: add the download stage or set [pool] shards")


def metadata_units(ctx: PlanContext) -> UnitSet:
    """Metadata parquet files (with .npz embeddings beside them): the embed
    stage's outputs when it is in the run, else the pool's ([pool] metadata)."""
    up = ctx.steps.get("embed")
    if up is not None:
        return UnitSet(count=up.n_tasks, upstream="embed", label="embed tasks")
    if ctx.inputs.metadata_files:
        return UnitSet(count=len(ctx.inputs.metadata_files), names=ctx.inputs.metadata_files, label="parquet files")
    raise UserError(f"{ctx.config.path}: no metadata: add the embed stage or set [pool] metadata")


def filter_in_run(steps) -> bool:
    """True when the filter stage is planned in this run (its subset.npy is then the subset)."""
    return any(s.stage == "filter" for s in steps)


def check_subset_source(ctx: PlanContext, stage: str) -> None:
    """A stage reading a subset takes it from the filter stage in the same run or
    from its `subset` param: exactly one of the two."""
    in_run = filter_in_run(ctx.steps.values())
    if in_run and ctx.params.subset:
        raise UserError(f"{ctx.config.path}: [stages.{stage}] subset: the filter stage is in this run and writes "
                        "the subset; remove `subset` or the filter stage")
    if not in_run and not ctx.params.subset:
        raise UserError(f"{ctx.config.path}: [stages.{stage}] subset: no subset: set `subset` to a .npy URL "
                        "or add the filter stage to the run")


# -- preflight checks shared by the stages ---------------------------------------

def in_run(config: RunConfig, stage: str) -> bool:
    """True when `stage` is selected in this run: its outputs are produced, not read."""
    return stage in config.selected_stages()


def require_file(url: str, storage_options: dict | None, what: str) -> str:
    """`url` (a local path or fsspec URL such as s3://) as a URL, if it is a file this
    machine can read; else a one-line UserError naming it. One byte is read, so a
    permission problem shows here rather than on a node."""
    from dcslurm.storage import DataFolder, is_remote

    if not is_remote(url):
        url = os.path.abspath(os.path.expanduser(url))
    parent, name = url.rstrip("/").rsplit("/", 1)
    try:
        with DataFolder(parent or "/", storage_options).open(name) as f:
            f.read(1)
    except FileNotFoundError:
        raise UserError(f"{url}: {what} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{url}: {what} is a folder, expected a file") from None
    except PermissionError:
        raise UserError(f"{url}: {what} is not readable (permission denied)") from None
    return url


def later_problems(run: DataFolder, stages) -> list[str]:
    """The `problems` lines of the run's stages (names, in plan order), for `status`."""
    out: list[str] = []
    for name in dict.fromkeys(stages):
        spec = registry().get(name)
        if spec is not None and spec.problems is not None:
            out += spec.problems(run)
    return out
