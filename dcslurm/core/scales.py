"""The compute scales: DataComp's Table 2, plus `debug` and `tiny`.

This table is the one source of truth for every stage: the trainer reads its
hyperparameters here, the planner its cost estimates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dcslurm.core.errors import UserError


@dataclass(frozen=True)
class ScaleConfig:
    """One compute scale. `pool_size` equals `samples_seen` in DataComp."""

    name: str
    pool_size: int
    samples_seen: int
    model: str  # open_clip model name
    batch_size: int  # global batch
    lr: float
    warmup: int  # steps
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    train_macs: float
    # Published A100-hours for training, where the paper gives them; else
    # derived from train_macs at the small scale's rate (see estimate_train_gpu_hours).
    published_train_gpu_hours: float | None
    source: str
    # GPUs the training job asks for when the config does not set its shape
    # ([slurm] / [stages.train.resources] nodes, tasks_per_node); see TRAIN_GPUS_BASIS.
    train_gpus: int = 1

    @property
    def steps(self) -> int:
        """Optimizer steps to see `samples_seen` samples at `batch_size`."""
        return -(-self.samples_seen // self.batch_size)

    def to_dict(self) -> dict:
        return asdict(self) | {"steps": self.steps}


# open_clip's defaults for the settings Table 2 does not list.
_OPEN_CLIP_DEFAULTS = dict(beta1=0.9, eps=1e-6, weight_decay=0.2)

SCALES: dict[str, ScaleConfig] = {
    s.name: s
    for s in [
        ScaleConfig(
            name="tiny", pool_size=2_000, samples_seen=40_960, model="dcslurm-tiny-vit",
            batch_size=256, lr=1e-3, warmup=20, beta2=0.98, train_macs=0.0,
            published_train_gpu_hours=None, source="dcslurm: runs on 2 CPU cores in minutes", train_gpus=1,
            **_OPEN_CLIP_DEFAULTS,
        ),
        ScaleConfig(
            name="debug", pool_size=128_000, samples_seen=128_000, model="ViT-B-32",
            batch_size=1024, lr=1e-4, warmup=500, beta2=0.98, train_macs=9.5e14,
            published_train_gpu_hours=None, source="DataComp reference code (debug scale)", train_gpus=1,
            **_OPEN_CLIP_DEFAULTS,
        ),
        ScaleConfig(
            name="small", pool_size=12_800_000, samples_seen=12_800_000, model="ViT-B-32",
            batch_size=4096, lr=5e-4, warmup=500, beta2=0.98, train_macs=9.5e16,
            published_train_gpu_hours=4.0, source="DataComp Table 2", train_gpus=1,
            **_OPEN_CLIP_DEFAULTS,
        ),
        ScaleConfig(
            name="medium", pool_size=128_000_000, samples_seen=128_000_000, model="ViT-B-32",
            batch_size=4096, lr=5e-4, warmup=500, beta2=0.98, train_macs=9.5e17,
            published_train_gpu_hours=None, source="DataComp Table 2", train_gpus=8,
            **_OPEN_CLIP_DEFAULTS,
        ),
        ScaleConfig(
            name="large", pool_size=1_280_000_000, samples_seen=1_280_000_000, model="ViT-B-16",
            batch_size=8192, lr=5e-4, warmup=500, beta2=0.98, train_macs=2.6e19,
            published_train_gpu_hours=None, source="DataComp Table 2", train_gpus=128,
            **_OPEN_CLIP_DEFAULTS,
        ),
        ScaleConfig(
            name="xlarge", pool_size=12_800_000_000, samples_seen=12_800_000_000, model="ViT-L-14",
            batch_size=90112, lr=1e-3, warmup=10_000, beta2=0.95, train_macs=1.1e21,
            published_train_gpu_hours=81.0 * 512, source="DataComp Table 2", train_gpus=512,
            **_OPEN_CLIP_DEFAULTS,
        ),
    ]
}

# Basis of the cost estimates (documented in `dcslurm plan --help` and README):
# - training: the published 4 A100-hours at small (9.5e16 MACs) give a rate of
#   MACs per A100-hour; other scales scale by their MACs unless the paper
#   publishes their hours (xlarge: 81 h x 512 A100s).
# - embedding: clip-retrieval's A100 anchors, 2,500 img/s for B/32 and 312
#   img/s for L/14, for the two default models.
# - bytes: DataComp's published sizes, about 35 KB per downloaded sample, and
#   metadata parquet 3 GB / embeddings npz 75 GB per 12.8M samples.
# - job shape (train_gpus): small 1 A100 and xlarge 512 A100s are DataComp's
#   published setups (Table 2: 4 h on one A100; 81 h on 512). medium and large
#   are dcslurm's choice, not published: whole 8-GPU nodes keeping the wall time
#   near the small scale's (medium 40 A100-h on 8 -> 5 h; large ~1,100 A100-h on
#   128 -> 8.6 h). tiny runs on CPU; debug fits one GPU.
# - samples: the pool's parquet rows when planning read them (PlanInputs.pool_rows),
#   else image shards x SAMPLES_PER_SHARD, else the scale's pool size.
TRAIN_GPUS_BASIS = ("small 1 and xlarge 512 A100s: DataComp Table 2; medium 8 and large 128: "
                    "dcslurm's whole-node choice")
MACS_PER_A100_HOUR = 9.5e16 / 4.0
BYTES_PER_SAMPLE_IMAGES = 35_000
BYTES_PER_SAMPLE_METADATA = 3e9 / 12.8e6
BYTES_PER_SAMPLE_EMBEDDINGS = 75e9 / 12.8e6
EMBED_A100_SECONDS_PER_SAMPLE = 1 / 2500 + 1 / 312
SAMPLES_PER_SHARD = 10_000  # img2dataset's shard size in DataComp (SPEC section 2)


def get_scale(name: str) -> ScaleConfig:
    """The scale called `name`, or a one-line error listing the known ones."""
    try:
        return SCALES[name]
    except KeyError:
        raise UserError(f"unknown scale {name!r}: choose one of {', '.join(SCALES)}") from None


def estimate_train_gpu_hours(scale: ScaleConfig) -> float:
    if scale.published_train_gpu_hours is not None:
        return scale.published_train_gpu_hours
    return scale.train_macs / MACS_PER_A100_HOUR


def estimate_samples(scale: ScaleConfig, pool_rows: int | None, shards=None) -> tuple[int, str]:
    """Samples a stage over the pool sees, and what the figure rests on (for the basis).

    `shards` (a UnitSet) are the stage's input shards when they are the pool's own
    ([pool] shards: SAMPLES_PER_SHARD each); None or the download stage's outputs
    mean the pool's metadata rows, as many as `pool_rows` (read from the parquet
    footers when the plan was made; an upper bound: some downloads fail), or the
    scale's pool size when those were not read.
    """
    if shards is not None and shards.upstream != "download":
        n = shards.count * SAMPLES_PER_SHARD
        return n, f"{n:,} samples ({shards.count:,} shards x {SAMPLES_PER_SHARD:,})"
    if pool_rows is not None:
        return pool_rows, f"{pool_rows:,} samples (the pool's parquet rows)"
    return scale.pool_size, f"{scale.pool_size:,} samples ({scale.name} pool size)"
