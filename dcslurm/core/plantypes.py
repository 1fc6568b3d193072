"""Plain data types of planning, shared by the config, the stage specs, the plan and the
tasks: what a task asks the scheduler for (Resources), what a step is planned to cost
(Estimate), what planning knows of the pool (PlanInputs), and one planned step (StepPlan).

A leaf: it imports only another leaf (shards), so config.py, stages.py and plan.py all build
on it without importing one another in a circle (pyproject.toml's import-linter contracts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dcslurm.core.shards import ShardRange, UnitSet, task_range


def at_least(obj: Any, key: str, low: int, unset: str = "") -> None:
    """A dataclass's validate(): ValueError("key: must be >= low") when it is less. With
    `unset` (what a key left out means), None is that default and the message says so."""
    value = getattr(obj, key)
    if unset and value is None:
        return
    if value < low:
        raise ValueError(f"{key}: must be >= {low}" + (f" (leave it out for {unset})" if unset else ""))


@dataclass
class Resources:
    """What one task of a step asks SLURM for. Site defaults in [slurm]."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = "04:00:00"
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    gres: str = ""
    cpus_per_task: int = 1
    mem: str = ""
    constraint: str = ""
    array_throttle: int = 0  # at most this many array tasks at once (%N); 0 = no limit
    requeue: bool = True
    # --signal=USR2@N: warn the tasks this long before the time limit (USR2: NCCL may catch USR1)
    signal_seconds: int = 120
    extra_sbatch: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)  # e.g. "module load cuda/12"

    def validate(self) -> None:
        for key in ("nodes", "tasks_per_node", "cpus_per_task"):
            at_least(self, key, 1)
        for key in ("gpus_per_node", "array_throttle", "signal_seconds"):
            at_least(self, key, 0)


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
class StepPlan:
    name: str  # "download", "filter.map", ...
    stage: str
    entry: str  # "module:function" run on the compute node
    layout: str  # array | single | distributed
    units: UnitSet
    units_per_task: int
    depends_on: list[str]
    resources: Resources
    gpu: bool
    estimate: Estimate = field(default_factory=Estimate)
    # The identity of this step's units and of everything upstream of them (see
    # units_digest()); a marker records it with its [start, stop), so a commit
    # made under another split or pool is never taken for this task's.
    units_digest: str = ""
    checkpointable: bool = False  # StepSpec.checkpointable: the runner's stop/requeue protocol
    # The stage's params dataclass ("module:Class"; "" = none): the runner binds the plan's
    # stage_params to it (stages.bind_params), importing that module alone, not the registry.
    params_class: str = ""

    @property
    def n_tasks(self) -> int:
        if self.layout != "array":
            return 1
        return max(1, -(-self.units.count // self.units_per_task)) if self.units.count else 0

    def shards(self, index: int) -> ShardRange:
        """The units of task `index`."""
        if self.layout != "array":
            return ShardRange(0, self.units.count)
        return task_range(self.units.count, self.units_per_task, index)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "stage": self.stage, "entry": self.entry, "layout": self.layout,
            "units": self.units.to_dict(), "units_per_task": self.units_per_task,
            "depends_on": self.depends_on, "resources": dataclasses.asdict(self.resources),
            "gpu": self.gpu, "estimate": dataclasses.asdict(self.estimate),
            "units_digest": self.units_digest, "checkpointable": self.checkpointable,
            "params_class": self.params_class,
        }

    @classmethod
    def from_dict(cls, d: dict) -> StepPlan:
        return cls(
            name=d["name"], stage=d["stage"], entry=d["entry"], layout=d["layout"],
            units=UnitSet.from_dict(d["units"]), units_per_task=d["units_per_task"],
            depends_on=list(d["depends_on"]), resources=Resources(**d["resources"]),
            gpu=d["gpu"], estimate=Estimate(**d["estimate"]),
            # plan.json files written before digests existed: recomputed by Plan.from_dict
            units_digest=d.get("units_digest", ""),
            checkpointable=d.get("checkpointable", False), params_class=d.get("params_class", ""),
        )
