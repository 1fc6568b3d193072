"""The filter stage: DataComp baselines, MetaCLIP balancing, VAS, as map-reduce (see engine.py).

    [stages.filter]
    spec = "clip_score(l14, fraction=0.45) then vas(target=pool, fraction=0.30)"

Light module: the orchestrator imports it on login nodes (no numpy/torch here).
"""

from __future__ import annotations

from dataclasses import dataclass

from dcslurm.shards import UnitSet
from dcslurm.stages import PlanContext, StageSpec, StepSpec, metadata_units
from jobs.filter.filterspec import parse_spec


@dataclass
class FilterParams:
    spec: str = "no_filter"  # the filter-spec language of jobs/filter/filterspec.py

    def validate(self) -> None:
        parse_spec(self.spec)  # raises ValueError("spec: ...") -> one-line config error


def _metadata(ctx: PlanContext) -> UnitSet:
    return metadata_units(ctx)


STAGES = [
    StageSpec(
        name="filter", order=30, params=FilterParams,
        description="select a subset of the pool: DataComp baselines, MetaCLIP balancing, VAS (map-reduce)",
        steps=(
            StepSpec("prepare", "jobs.filter.stage:prepare", _metadata, layout="single"),
            StepSpec("map", "jobs.filter.stage:map_files", _metadata, default_units_per_task=1),
            StepSpec("reduce", "jobs.filter.stage:reduce", _metadata, layout="single"),
            StepSpec("apply", "jobs.filter.stage:apply", _metadata, default_units_per_task=1),
            StepSpec("write", "jobs.filter.stage:write", _metadata, layout="single"),
        ),
    ),
]
