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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dcslurm.core.errors import ConfigError, UserError
from dcslurm.core.plantypes import Estimate, PlanInputs, StepPlan
from dcslurm.core.shards import UnitSet
from dcslurm.core.tables import load_dataclass

if TYPE_CHECKING:
    from dcslurm.core.config import RunConfig
    from dcslurm.core.storage import DataFolder

LAYOUTS = ("array", "single", "distributed")


@dataclass
class PlanContext:
    """Handed to a step's `units` and the stage's `estimate`: pure data, no I/O."""

    config: RunConfig
    inputs: PlanInputs
    steps: dict[str, StepPlan]  # steps planned so far in this run, by name
    params: Any  # the stage's params dataclass instance (None: the stage takes none)

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
    # dcslurm.core.task.Preempted: the runner then catches the scheduler's stop signals for
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


# -- the one binding step ---------------------------------------------------------

def bind_params(params_class: type | None, table: dict, where: str) -> Any:
    """A stage's own keys bound to its params dataclass: defaults filled, types and values
    checked (one-line ConfigError naming `where` and the key). The same step at plan time,
    on the [stages.NAME] table, and in every task, on the plan's copy (`plan.json`'s
    stage_params): stage code reads attributes of the dataclass, never dict keys with
    defaults of their own. None for a stage without params."""
    if params_class is None:
        if table:
            raise ConfigError(f"{where}: unknown key {next(iter(table))!r} (this stage takes no parameters)")
        return None
    return load_dataclass(params_class, table, where)


def class_path(cls: type | None) -> str:
    """'module:QualName' of a class (a stage's params), as a plan records it; '' for None."""
    return f"{cls.__module__}:{cls.__qualname__}" if cls is not None else ""


def import_path(path: str) -> Any:
    """The object a 'module:name' path names (a step's entry, a params class)."""
    module_name, _, name = path.partition(":")
    obj = importlib.import_module(module_name)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


# Stages are found through this entry-point group (pyproject.toml's
# [project.entry-points."dcslurm.stages"]: NAME = "module with STAGES"), so the
# orchestrator never imports stage packages by name and a lab can add its own.
ENTRY_POINT_GROUP = "dcslurm.stages"

_REGISTRY: dict[str, StageSpec] | None = None
_BROKEN: dict[str, str] = {}  # entry point -> why its module did not load


def registry() -> dict[str, StageSpec]:
    """Every registered stage, by name, in pipeline order. A stage module that fails to
    load is left out and remembered (`broken_specs`): `status` of any run still works,
    and only a command that needs one of its stages fails, naming it."""
    global _REGISTRY
    if _REGISTRY is None:
        from importlib.metadata import entry_points

        found: dict[str, StageSpec] = {}
        points = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
        if not points:
            raise UserError(f"no stages are registered (entry points {ENTRY_POINT_GROUP!r}): install dcslurm "
                            "with pip (pip install -e . in a source checkout) rather than running it from a folder")
        for point in points:
            try:
                module = point.load()
            except Exception as exc:  # noqa: BLE001 - any error in one spec must not take the others down
                lines = str(exc).strip().splitlines()
                _BROKEN[point.name] = f"{point.value}: {type(exc).__name__}{': ' + lines[0] if lines else ''}"
                continue
            for spec in getattr(module, "STAGES", []):
                if spec.name in found:
                    raise UserError(f"stage {spec.name!r} is declared twice ({point.value} and another "
                                    f"{ENTRY_POINT_GROUP} entry point)")
                found[spec.name] = spec
        _REGISTRY = dict(sorted(found.items(), key=lambda kv: (kv[1].order, kv[0])))
    return _REGISTRY


def broken_specs() -> dict[str, str]:
    """Stage modules that did not load (entry point -> one line), after `registry()`."""
    registry()
    return dict(_BROKEN)


def _broken_note() -> str:
    broken = broken_specs()
    return "; stage specs that failed to load: " + "; ".join(broken.values()) if broken else ""


def get_stage(name: str) -> StageSpec:
    stages = registry()
    if name not in stages:
        known = ", ".join(n for n, s in stages.items() if not s.test_only)
        raise UserError(f"unknown stage {name!r}: choose from {known}{_broken_note()}")
    return stages[name]


def pipeline_stages() -> list[str]:
    """The stages `stages = "all"` selects, in order. Refused while a stage spec is broken:
    "all" must not quietly mean fewer stages."""
    names = [n for n, s in registry().items() if not s.test_only and s.in_all]
    if broken_specs():
        raise UserError(f'stages = "all" cannot be resolved{_broken_note()}')
    return names


# -- preflight checks shared by the stages ---------------------------------------

def in_run(config: RunConfig, stage: str) -> bool:
    """True when `stage` is selected in this run: its outputs are produced, not read."""
    return stage in config.selected_stages()


def require_file(url: str, storage_options: dict | None, what: str) -> str:
    """`url` (a local path or fsspec URL such as s3://) as a URL, if it is a file this
    machine can read; else a one-line UserError naming it. One byte is read, so a
    permission problem shows here rather than on a node."""
    from dcslurm.core.storage import DataFolder, is_remote

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
