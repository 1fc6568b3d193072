"""The whole plan of a run on one page.

A run is a chain of steps (a stage has one or more steps). Each step splits
its `UnitSet` into tasks of `units_per_task` contiguous units. `make_plan` is
a pure function of (config, PlanInputs): no I/O, so it is tested without a
cluster and plans 1.28M shards in well under a second. `discover_inputs` is
the I/O half: it lists the pool once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from dcslurm.core.config import RunConfig
from dcslurm.core.errors import UserError
from dcslurm.core.plantypes import Estimate, PlanInputs, StepPlan
from dcslurm.core.shards import UnitSet, parse_brace_pattern
from dcslurm.core.stages import PlanContext, class_path, get_stage
from dcslurm.core.storage import DataFolder, join_url

PLAN_FILE = "plan.json"
RUN_TOML = "run.toml"  # a run's config in its folder, where a sweep writes one per piece
DEFAULT_MAX_TASKS = 10_000


def units_digest(units: UnitSet, layout: str, upstream: list[StepPlan]) -> str:
    """A step's unit-set identity: its units (names, pattern or count: hashed as
    stored, never expanded) and the identity and split of each step its units
    come from (`upstream`). A changed pool file list, or a changed
    `units_per_task` of a step whose tasks feed it, changes it."""
    basis = {
        "units": units.to_dict(), "layout": layout,
        "after": [[s.name, s.units_digest, s.units_per_task] for s in upstream],
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:20]


def _with_digests(steps: list[StepPlan]) -> list[StepPlan]:
    """Set each step's units_digest (in plan order). Its units come from the step
    named by `units.upstream` and from the earlier steps of its own stage (e.g.
    reshard.write splits what reshard.count counted). An earlier stage's step
    that only precedes it is not part of its identity: a run resumed with fewer
    stages keeps the identities of the steps it still plans."""
    by_name: dict[str, StepPlan] = {}
    for step in steps:
        sources = [d for d in step.depends_on if d in by_name and by_name[d].stage == step.stage]
        if step.units.upstream in by_name and step.units.upstream not in sources:
            sources.append(step.units.upstream)
        step.units_digest = units_digest(step.units, step.layout, [by_name[d] for d in sources])
        by_name[step.name] = step
    return steps


def plan_changes(old: Plan, new: Plan) -> dict[str, str]:
    """Steps of `new` whose tasks cover other units than in `old`: name -> what changed
    (in plan order). Steps that `old` does not have are left out."""
    before = {s.name: s for s in old.steps}
    out: dict[str, str] = {}
    for step in new.steps:
        was = before.get(step.name)
        if was is None or (was.units_digest == step.units_digest and was.units_per_task == step.units_per_task):
            continue
        what = []
        if was.units_per_task != step.units_per_task:
            what.append(f"units_per_task {was.units_per_task} -> {step.units_per_task}")
        if was.layout != step.layout:
            what.append(f"layout {was.layout} -> {step.layout}")
        a, b = was.units, step.units
        if a.count != b.count:
            what.append(f"{b.label} {a.count:,} -> {b.count:,}")
        elif a.to_dict() != b.to_dict():
            what.append(f"the {b.label} changed")
        if not what:
            what.append(f"its inputs changed ({', '.join(step.depends_on) or 'upstream'} changed)")
        out[step.name] = ", ".join(what)
    return out


@dataclass
class Plan:
    run_url: str
    run_name: str
    scale: str
    fingerprint: str
    steps: list[StepPlan]
    stage_params: dict  # stage name -> its params as JSON; each task binds them to the step's params_class
    seed: int = 0
    storage_options: dict = field(default_factory=dict)

    def step(self, name: str) -> StepPlan:
        for s in self.steps:
            if s.name == name:
                return s
        raise UserError(f"{self.run_url}: the plan has no step {name!r} ({', '.join(s.name for s in self.steps)})")

    def to_dict(self) -> dict:
        return {
            "run_url": self.run_url, "run_name": self.run_name, "scale": self.scale,
            "fingerprint": self.fingerprint, "seed": self.seed,
            "steps": [s.to_dict() for s in self.steps], "stage_params": self.stage_params,
            "storage_options": self.storage_options,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls(
            run_url=d["run_url"], run_name=d["run_name"], scale=d["scale"], fingerprint=d["fingerprint"],
            steps=[StepPlan.from_dict(s) for s in d["steps"]], stage_params=d["stage_params"],
            seed=d.get("seed", 0), storage_options=d.get("storage_options", {}),
        )._legacy_digests(d)

    def _legacy_digests(self, d: dict) -> Plan:
        # A plan.json from before units digests: compute them as make_plan would.
        if any("units_digest" not in s for s in d["steps"]):
            _with_digests(self.steps)
        return self

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def total_estimate(self) -> Estimate:
        return Estimate(
            gpu_hours=sum(s.estimate.gpu_hours for s in self.steps),
            bytes_written=sum(s.estimate.bytes_written for s in self.steps),
        )


def make_plan(config: RunConfig, inputs: PlanInputs) -> Plan:
    """Plan the selected stages of `config` over `inputs`. Pure: no I/O."""
    steps: dict[str, StepPlan] = {}
    previous: str | None = None
    for stage_name in config.selected_stages():
        spec = get_stage(stage_name)
        section = config.stages.get(stage_name)
        params = section.params if section is not None else (spec.params() if spec.params else None)
        params_class = class_path(spec.params)
        ctx = PlanContext(config=config, inputs=inputs, steps=steps, params=params)
        resources = config.resources_for(stage_name, spec.default_resources)
        if spec.job_shape is not None:
            resources = spec.job_shape(config, resources)
        stage_units: dict[str, UnitSet] = {}
        stage_steps: list[StepPlan] = []
        for step_spec in spec.steps:
            units = step_spec.units(ctx)
            stage_units[step_spec.name] = units
            per_task = section.units_per_task if section and section.units_per_task else 0
            if not per_task:
                # Unless configured, keep a step under DEFAULT_MAX_TASKS tasks: a marker,
                # a log and a scheduler slot per task stay cheap at xlarge.
                per_task = max(step_spec.default_units_per_task, -(-units.count // DEFAULT_MAX_TASKS))
            name = spec.step_name(step_spec)
            step = StepPlan(
                name=name, stage=stage_name, entry=step_spec.entry, layout=step_spec.layout,
                units=units, units_per_task=per_task,
                depends_on=[previous] if previous else [],
                resources=(resources if step_spec.layout != "single"
                           else dataclasses.replace(resources, nodes=1, tasks_per_node=1)),
                gpu=spec.gpu, checkpointable=step_spec.checkpointable, params_class=params_class,
            )
            steps[name] = step
            stage_steps.append(step)
            previous = name
        if spec.estimate is not None:
            est = spec.estimate(ctx, stage_units)
            # The stage's estimate is booked on its first step.
            stage_steps[0].estimate = est
    return Plan(
        run_url=config.run_url, run_name=config.run_name, scale=config.run.scale,
        fingerprint=config.fingerprint_hash(), steps=_with_digests(list(steps.values())),
        stage_params={
            name: (dataclasses.asdict(s.params) if dataclasses.is_dataclass(s.params) else s.params)
            for name, s in config.stages.items()
        },
        seed=config.run.seed, storage_options=config.storage_options,
    )


def discover_inputs(config: RunConfig) -> PlanInputs:
    """List the pool once, and read its parquet footers' row counts for the estimates
    (the I/O half of planning)."""
    metadata: tuple[str, ...] = ()
    pool_rows = None
    if config.pool.metadata:
        folder = config.folder(config.pool.metadata)
        if not folder.exists():
            raise UserError(f"{folder.url}: pool metadata folder does not exist")
        names = folder.list(suffix=".parquet")
        metadata = tuple(folder.url_of(n) for n in names)
        if not metadata:
            raise UserError(f"{folder.url}: no .parquet files in the pool metadata folder")
        pool_rows = _pool_rows(folder, names)
    shards = None
    if config.pool.shards:
        if "{" in config.pool.shards:
            shards = parse_brace_pattern(config.pool.shards)
        else:
            folder = config.folder(config.pool.shards)
            names = folder.list(suffix=".tar")
            if not names:
                raise UserError(f"{folder.url}: no .tar shards in the pool shards folder")
            shards = UnitSet(count=len(names), names=tuple(join_url(folder.url, n) for n in names), label="shards")
    return PlanInputs(metadata_files=metadata, shards=shards, pool_rows=pool_rows)


def _pool_rows(folder: DataFolder, names: list[str]) -> int:
    """The pool's rows from its parquet footers (pool.read_footer: a ranged read each, 8 at
    a time), for the estimates. An unreadable footer counts 0 here; the download/filter
    checks name that file."""
    from concurrent.futures import ThreadPoolExecutor

    from dcslurm.datacomp.pool import read_footer

    with ThreadPoolExecutor(max_workers=8) as pool:
        return sum(pool.map(lambda name: read_footer(folder, name).rows, names))


def read_plan(run: DataFolder) -> Plan:
    if not run.exists(PLAN_FILE):
        raise UserError(f"{run.url}: not a dcslurm run folder (no {PLAN_FILE}); submit a run first")
    return Plan.from_dict(run.read_json(PLAN_FILE))
