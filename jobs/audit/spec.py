"""Audit stages (order 70): light module, no numpy/torch (the orchestrator imports it on login nodes).

    [stages.audit]        who a filter keeps and drops, per group (filteraudit.py)
    subset = ""           # subset .npy; leave empty when the filter stage is in the run
    groups = ""           # groups file; "" = jobs/audit/groups.toml

    [stages.audit_bias]   dataset classification between sources (bias.py)
    sources = [{name = "a", metadata = "pool-a/"}, {name = "b", metadata = "pool-b/", subset = "s.npy"}]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dcslurm.core.errors import UserError
from dcslurm.core.shards import UnitSet
from dcslurm.core.stages import PlanContext, StageSpec, StepSpec
from jobs.inputs import check_subset_source, filter_in_run, metadata_units

TRANSFORMS = ("grayscale", "mean_colour", "lowpass", "highpass", "pixel_shuffle", "patch_shuffle", "edges")
EMBEDDING_FEATURES = ("img", "txt")
SOURCE_KEYS = {"name", "metadata", "subset", "shards"}


@dataclass
class AuditParams:
    subset: str = ""  # subset .npy URL; empty when the filter stage is in the run (its subset.npy)
    groups: str = ""  # groups file (TOML); empty = jobs/audit/groups.toml
    columns: list[str] = field(default_factory=list)  # more metadata columns to group by, e.g. ["demo_kind"]
    alpha: float = 0.05  # family-wise significance of the "kept at a lower rate" test (Bonferroni)
    rare_share: float = 0.05  # a group under this share of the raw pool is "rare"

    def validate(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError("alpha: must be in (0, 1)")
        if not 0 < self.rare_share <= 1:
            raise ValueError("rare_share: must be in (0, 1]")


@dataclass
class BiasParams:
    # Each source: {name, metadata = folder of parquet + npz, subset = .npy (optional), shards = folder of tars
    # (needed for image transformations)}. Empty: this run's own pool (embed outputs or [pool] metadata) against
    # the part of it its filter stage keeps, i.e. how distinguishable the filtered subset is from the pool.
    sources: list[dict] = field(default_factory=list)
    samples: int = 1000  # items sampled per source (seeded, by uid)
    model: str = ""  # embedding key prefix in the npz (<model>_img, <model>_txt); "" = the first *_img key
    features: list[str] = field(default_factory=lambda: ["img"])  # img, txt and/or TRANSFORMS
    test_fraction: float = 0.3
    tasks: int = 1  # array tasks of the sample and images steps

    def validate(self) -> None:
        if self.sources:  # empty = the run's pool vs its filtered subset (checked at plan time)
            validate_sources(self.sources)
        for f in self.features:
            if f not in EMBEDDING_FEATURES + TRANSFORMS:
                raise ValueError(f"features: unknown {f!r} (known: {', '.join(EMBEDDING_FEATURES + TRANSFORMS)})")
        if not self.features:
            raise ValueError("features: needs at least one")
        if self.samples < 2:
            raise ValueError("samples: must be >= 2")
        if not 0 < self.test_fraction < 1:
            raise ValueError("test_fraction: must be in (0, 1)")
        if self.tasks < 1:
            raise ValueError("tasks: must be >= 1")
        if any(f in TRANSFORMS for f in self.features) and not (
                self.sources and all(s.get("shards") for s in self.sources)):
            raise ValueError("sources: image transformations need `shards` (a folder of tars) for every source")


def validate_sources(sources: list[dict]) -> None:
    if len(sources) < 2:
        raise ValueError("sources: needs at least two (name, metadata[, subset, shards])")
    names = set()
    for i, s in enumerate(sources):
        if not isinstance(s, dict):
            raise ValueError(f"sources[{i}]: expected a table {{name, metadata, subset, shards}}")
        unknown = set(s) - SOURCE_KEYS
        if unknown:
            raise ValueError(f"sources[{i}]: unknown key {sorted(unknown)[0]!r} "
                             f"(known: {', '.join(sorted(SOURCE_KEYS))})")
        for key in ("name", "metadata"):
            if not isinstance(s.get(key), str) or not s.get(key):
                raise ValueError(f"sources[{i}] {key}: expected a non-empty string")
        if s["name"] in names:
            raise ValueError(f"sources[{i}] name: {s['name']!r} is used twice")
        names.add(s["name"])


def _audit_units(ctx: PlanContext) -> UnitSet:
    check_subset_source(ctx, "audit")
    return metadata_units(ctx)


def _bias_tasks(ctx: PlanContext) -> UnitSet:
    if not ctx.params.sources:
        if not filter_in_run(ctx.steps.values()):
            raise UserError(f"{ctx.config.path}: [stages.audit_bias] sources: none given: list two or more sources, "
                            "or add the filter stage to the run (then the pool is compared with its filtered subset)")
        metadata_units(ctx)  # the run has metadata (raises the usual one-line error if not)
    return UnitSet(count=ctx.params.tasks, label="parts of the sources' files")


def _single(ctx: PlanContext) -> UnitSet:
    return UnitSet(count=1, label="task")


STAGES = [
    StageSpec(
        name="audit", order=70, params=AuditParams, in_all=False,
        description="filter audit: raw and kept rows per group (keywords, domain, language, sizes), map-reduce",
        steps=(
            StepSpec("count", "jobs.audit.stage:count", _audit_units, default_units_per_task=1),
            StepSpec("report", "jobs.audit.stage:report", _audit_units, layout="single"),
        ),
    ),
    StageSpec(
        name="audit_bias", order=70, params=BiasParams, in_all=False,
        description="dataset-bias probe: linear classifier telling sources apart, per feature set",
        steps=(
            StepSpec("sample", "jobs.audit.stage:bias_sample", _bias_tasks, default_units_per_task=1),
            StepSpec("images", "jobs.audit.stage:bias_images", _bias_tasks, default_units_per_task=1),
            StepSpec("probe", "jobs.audit.stage:bias_probe", _single, layout="single"),
        ),
    ),
]
