"""The download stage: img2dataset over the pool's parquet files, one array task
per group of files, writing RUN/download/{shard:08d}.tar + .parquet + _stats.json.

Light on purpose (imported on login nodes): the work is in jobs/download/stage.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from dcslurm.core.errors import UserError
from dcslurm.core.plantypes import Estimate, at_least
from dcslurm.core.scales import estimate_samples
from dcslurm.core.shards import UnitSet
from dcslurm.core.stages import PlanContext, StageSpec, StepSpec
from dcslurm.datacomp.pool import BYTES_PER_SAMPLE

RESIZE_MODES = ("no", "keep_ratio", "keep_ratio_largest", "center_crop", "border")
# Pillow's own MAX_IMAGE_PIXELS (kept literal: this module must not import Pillow).
# Pillow refuses images above twice that from the header, so higher limits cannot be honoured.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


@dataclass
class DownloadParams:
    """[stages.download]: DataComp's img2dataset settings (SPEC section 6) by default."""

    samples_per_shard: int = 10_000
    image_size: int = 512
    resize_mode: str = "keep_ratio_largest"
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    retries: int = 2
    timeout: int = 10  # seconds per request
    processes: int | None = None  # img2dataset processes per task; None = the step's cpus_per_task
    threads: int = 64  # download threads per process
    blur_faces: bool = True  # blur `face_bboxes` when the pool has that column
    # Images with more pixels are refused from their header, never decoded (counted as
    # "image too large"): decompression bombs. A worker decodes one image at a time.
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # `submit` reads every uid of pools up to this many rows (format, duplicates);
    # bigger pools get footers checked at submit and uids checked by each task.
    preflight_uid_rows: int = 20_000_000
    # "http://host:port": img2dataset fetches http:// URLs through this proxy (a site's egress
    # proxy; the demo pool's server). Not in the run's fingerprint: it says how URLs are reached,
    # not what is written, so a rerun through another proxy (another port) resumes the run.
    http_proxy: str = field(default="", metadata={"fingerprint": False})

    def validate(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError("samples_per_shard: must be >= 1")
        if self.image_size < 1:
            raise ValueError("image_size: must be >= 1")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode: expected one of {', '.join(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.encode_format not in ("jpg", "png", "webp"):
            raise ValueError(f"encode_format: expected jpg, png or webp, got {self.encode_format!r}")
        if self.retries < 0 or self.timeout < 1:
            raise ValueError("retries: must be >= 0 and timeout >= 1")
        if not 1 <= self.max_image_pixels <= 2 * DEFAULT_MAX_IMAGE_PIXELS:
            raise ValueError(f"max_image_pixels: must be between 1 and {2 * DEFAULT_MAX_IMAGE_PIXELS:,} "
                             f"(Pillow refuses to read the header of larger images)")
        at_least(self, "processes", 1, unset="cpus_per_task")
        at_least(self, "threads", 1)
        if self.http_proxy:
            _check_proxy_url(self.http_proxy)


def _check_proxy_url(url: str) -> None:
    """http_proxy: http://host:port (urllib's ProxyHandler takes it as is)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a port that is not a number or out of range
        port = None
        parts = None
    if parts is None or parts.scheme != "http" or not parts.hostname or port is None \
            or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("http_proxy: expected http://host:port")  # the value unechoed: it may hold a secret


def _units(ctx: PlanContext) -> UnitSet:
    files = ctx.inputs.metadata_files
    if not files:
        raise UserError(f"{ctx.config.path}: the download stage needs [pool] metadata (a folder of parquet files)")
    return UnitSet(count=len(files), names=files, label="parquet files")


def _estimate(ctx: PlanContext, units: dict[str, UnitSet]) -> Estimate:
    samples, basis = estimate_samples(ctx.scale, ctx.inputs.pool_rows)
    return Estimate(bytes_written=samples * BYTES_PER_SAMPLE, basis=f"{basis} x {BYTES_PER_SAMPLE // 1000} KB")


def preflight(config) -> None:
    """Reject a bad pool before anything is queued: one-line UserError naming the file.

    Reads every parquet footer (readable, `uid`/`url`/`text` present); reads
    the uid columns too (32 hex characters, no duplicates) when the pool has at
    most `preflight_uid_rows` rows. Called by `dcslurm submit` (runs.submit_run).
    """
    from dcslurm.datacomp.pool import inspect_pool

    if not config.pool.metadata:
        return  # _units reports the missing [pool] metadata at plan time
    section = config.stages.get("download")
    params = section.params if section is not None and section.params is not None else DownloadParams()
    report = inspect_pool(config.pool.metadata, config.storage_options, uids=False)
    report.raise_first()
    if report.rows <= params.preflight_uid_rows:
        report = inspect_pool(config.pool.metadata, config.storage_options, uids=True)
        report.raise_first()


STAGES = [
    StageSpec(
        name="download",
        description="img2dataset over the pool's parquet files: webdataset shards + per-shard parquet and stats",
        order=10,
        params=DownloadParams,
        default_resources={"cpus_per_task": 2, "time": "12:00:00"},
        estimate=_estimate,
        steps=(StepSpec("run", "jobs.download.stage:run", _units, default_units_per_task=1),),
        preflight=preflight,
    ),
]
