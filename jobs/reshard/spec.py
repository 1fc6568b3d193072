"""Reshard: write a subset of the image shards as new training shards.

Four steps, because output shard ids must be global and independent of how
the work is split:

  reshard.count    array over the input shards (four a task unless units_per_task
                   says otherwise): per shard, how many samples
                   the subset keeps (sum of each uid's multiplicity), and where
                   each kept sample's members lie in its tar (_counts/*.npz),
                   from embed's member index of the tar ({stem}.tarindex, see
                   jobs/wds.py) where one describes it, else by reading the tar;
  reshard.index    one task: the global order of the kept samples (input
                   shard starts), the number of output shards, uids found/missing;
  reshard.write    array over `tasks` parts: part p writes output shards
                   split_evenly(n_shards, tasks, p), shard s holding global
                   samples [s * samples_per_shard, (s + 1) * samples_per_shard),
                   copied from the spans count recorded (no second walk), up to
                   cpus_per_task shards of a task at once, committed in order;
  reshard.finalize one task: sizes.json (the size table training reads) and stats.json.

Inputs: shard_units (download outputs or [pool] shards) and the subset:
RUN/filter/subset.npy when the filter stage is in the run, else params `subset`.
Outputs: RUN/reshard/{shard:08d}.tar, {shard:08d}_stats.json, sizes.json, stats.json.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcslurm.core.errors import UserError
from dcslurm.core.plantypes import Estimate, at_least
from dcslurm.core.scales import estimate_samples
from dcslurm.core.shards import UnitSet
from dcslurm.core.stages import PlanContext, StageSpec, StepSpec, in_run, require_file
from dcslurm.core.storage import DataFolder
from jobs.inputs import check_subset_source, shard_units

BYTES_PER_SAMPLE = 35_000  # DataComp: about 35 KB a sample (jpg + txt + json)


@dataclass
class ReshardParams:
    subset: str = ""  # subset .npy URL; leave empty when the filter stage is in the run
    samples_per_shard: int = 10_000
    tasks: int | None = None  # write parts (one write task each at units_per_task = 1); None = one per count task
    shuffle: bool = False  # seeded order: input shards permuted, then samples within each output shard
    shuffle_seed: int = 0

    def validate(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError("samples_per_shard: must be >= 1")
        at_least(self, "tasks", 1, unset="one write task per count task")


def _count_units(ctx: PlanContext) -> UnitSet:
    check_subset_source(ctx, "reshard")
    return shard_units(ctx)


def _single(ctx: PlanContext) -> UnitSet:
    return UnitSet(count=1, label="task")


def _write_units(ctx: PlanContext) -> UnitSet:
    tasks = ctx.params.tasks or ctx.steps["reshard.count"].n_tasks
    return UnitSet(count=max(1, tasks), label="output parts")


def _estimate(ctx: PlanContext, units: dict) -> Estimate:
    samples, basis = estimate_samples(ctx.scale, ctx.inputs.pool_rows, units["count"])
    return Estimate(bytes_written=samples * BYTES_PER_SAMPLE,
                    basis=f"upper bound: every input sample kept once, {basis} x 35 KB")


COUNT_SHARDS_PER_TASK = 4  # input shards a count task reads unless [stages.reshard] units_per_task says
SAMPLE_UIDS = 1024  # subset rows read at plan/submit: the head of the file, never all of it
POOL_ROWS_READ = 20_000_000  # pool uid rows read at most while looking for a sampled uid


def _preflight(config) -> None:
    """At plan and submit, for a given `subset` (the filter stage not in the run): its .npy
    header (dtype u8,u8, one dimension, not empty), the first rows sorted, and (with
    [pool] metadata) that the pool holds at least one of its first uids. How many of
    the subset's uids the shards lack is known after reshard.index: `status` shows it."""
    params = config.stages["reshard"].params or ReshardParams()
    if in_run(config, "filter") or not params.subset:
        return  # check_subset_source reports a missing or doubled subset at plan time
    head = read_subset_head(params.subset, config.storage_options, SAMPLE_UIDS)
    if config.pool.metadata:
        check_uids_in_pool(head, params.subset, config.pool.metadata, config.storage_options)


def read_subset_head(url: str, storage_options: dict, rows: int):
    """The first `rows` rows of subset file `url` as u8,u8; reads its .npy header and
    those rows only. One-line UserError for a wrong dtype, shape, order or no rows."""
    import numpy as np
    from numpy.lib import format as npy

    from jobs.reshard.subset import SUBSET_DTYPE, check_dtype, check_sorted

    url = require_file(url, storage_options, "subset file")
    parent, name = url.rsplit("/", 1)
    with DataFolder(parent, storage_options).open(name) as f:
        try:
            version = npy.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = npy.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = npy.read_array_header_2_0(f)
            else:  # 3.0 (utf-8 field names) has no public reader
                shape, fortran, dtype = npy._read_array_header(f, version)
        except ValueError as exc:
            raise UserError(f"{url}: not a readable .npy subset file ({str(exc).splitlines()[0]})") from None
        # A zero-stride view has the file's shape and dtype without its data, so the
        # stage's own check_dtype judges it (one set of rules, one message).
        check_dtype(np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * len(shape)), url)
        if shape[0] == 0:
            raise UserError(f"{url}: subset has no rows (nothing to reshard)")
        n = min(rows, shape[0])
        data = f.read(n * dtype.itemsize)
    head = np.frombuffer(data, dtype=dtype, count=len(data) // dtype.itemsize).astype(SUBSET_DTYPE)
    check_sorted(head, url)
    return head


def check_uids_in_pool(head, subset_url: str, metadata_url: str, storage_options: dict) -> None:
    """One-line UserError when none of the subset's `head` uids is in the pool (a subset of
    another pool). Stops at the first file holding one; reads at most POOL_ROWS_READ uids."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from jobs.reshard.subset import pair_to_uid

    wanted = pa.array(sorted({pair_to_uid(hi, lo) for hi, lo in head.tolist()}))
    folder = DataFolder(metadata_url, storage_options)
    read = 0
    for name in folder.list(suffix=".parquet"):
        if read >= POOL_ROWS_READ:
            return  # too big to settle here: reshard.index counts the missing uids (status shows them)
        with folder.open(name) as fh:
            try:
                uids = pc.utf8_lower(pq.read_table(fh, columns=["uid"]).column("uid").cast(pa.string()))
            except Exception:  # noqa: BLE001 - a bad pool file is the download/filter preflight's to report
                continue
        read += len(uids)
        if pc.any(pc.is_in(uids, value_set=wanted)).as_py():
            return
    raise UserError(f"{subset_url}: none of its first {len(wanted)} uids is in the pool {folder.url} "
                    f"({read:,} uids read): a subset of another pool?")


def _problems(run: DataFolder) -> list[str]:
    """What reshard.index found (its marker's stats): subset uids no input shard holds,
    and input shards that did not exist. Nothing before index has run."""
    from dcslurm.core.markers import read_marker

    marker = read_marker(run, "reshard.index", 0)
    stats = (marker or {}).get("stats", {})
    out = []
    if stats.get("uids_missing"):
        out.append(f"reshard: {stats['uids_missing']:,} of the subset's {stats.get('subset_uids', 0):,} uids are in "
                   "no input shard (failed downloads, or a subset of another pool)")
    if stats.get("input_shards_missing"):
        out.append(f"reshard: {stats['input_shards_missing']:,} input shards did not exist (counted as empty)")
    return out


STAGES = [
    StageSpec(
        name="reshard",
        description="write the subset's samples as new webdataset shards (repeats, size table)",
        order=40,
        params=ReshardParams,
        default_resources={"cpus_per_task": 2, "time": "04:00:00"},
        estimate=_estimate, preflight=_preflight, problems=_problems,
        steps=(
            # A shard's count is about 0.25 s of work against about 0.5 s to start a task's
            # interpreters (and seconds for a scheduler's job step): four shards a task.
            StepSpec("count", "jobs.reshard.stage:count", _count_units,
                     default_units_per_task=COUNT_SHARDS_PER_TASK),
            StepSpec("index", "jobs.reshard.stage:index", _single, layout="single"),
            StepSpec("write", "jobs.reshard.stage:write", _write_units, default_units_per_task=1),
            StepSpec("finalize", "jobs.reshard.stage:finalize", _single, layout="single"),
        ),
    ),
]
