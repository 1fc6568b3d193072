"""Embed stage declaration (light: no torch import; the planner imports it).

One array task embeds `units_per_task` webdataset shards with every
configured open_clip model and writes, per shard, beside nothing else:

    RUN/embed/{stem}.npz      <name>_img, <name>_txt: float16, L2-normalised
    RUN/embed/{stem}.parquet  uid, metadata columns, clip_<name>_similarity_score
    RUN/embed/{stem}.tarindex where each sample's members lie in the tar (jobs.wds): reshard's
                              count step reads it instead of the tar

The index is a file of its own, not parquet columns: it covers every sample of the tar
(embed's parquet only those it embedded) and keeps the parquet DataComp's.

The parquet is written last and is the shard's commit (see stage.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dcslurm.core.plantypes import Estimate, at_least
from dcslurm.core.scales import BYTES_PER_SAMPLE_EMBEDDINGS, BYTES_PER_SAMPLE_METADATA, estimate_samples
from dcslurm.core.stages import PlanContext, StageSpec, StepSpec, in_run
from jobs.inputs import shard_units

# DataComp's two scoring models (SPEC section 2: b32 and l14, OpenAI weights).
DEFAULT_MODELS = (
    {"name": "b32", "model": "ViT-B-32", "pretrained": "openai"},
    {"name": "l14", "model": "ViT-L-14", "pretrained": "openai"},
)
MODEL_KEYS = {"name", "model", "pretrained"}
_NAME = re.compile(r"[a-z][a-z0-9_]*")

# clip-retrieval's A100 rates (img/s); other models are booked at the B/32 rate.
A100_IMAGES_PER_SECOND = {"ViT-B-32": 2500.0, "ViT-L-14": 312.0}


@dataclass
class EmbedParams:
    """[stages.embed] keys."""

    # Each model: {name = "b32", model = "ViT-B-32", pretrained = "openai" | "/path/ckpt.pt" | ""}.
    # `name` gives the output keys: <name>_img, <name>_txt, clip_<name>_similarity_score.
    models: list[dict] = field(default_factory=lambda: [dict(m) for m in DEFAULT_MODELS])
    batch_size: int = 256
    workers: int | None = None  # decoding processes; None = the task's cpus_per_task - 1
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    gpu_decode: bool = False  # decode JPEGs on the device (nvjpeg via torchvision.io.decode_jpeg)
    # The nodes have no internet (most clusters): a named pretrained tag must already be in
    # open_clip's weights cache, checked at plan/submit. false: the nodes may download it.
    offline: bool = True

    def validate(self) -> None:
        if not self.models:
            raise ValueError("models: needs at least one model")
        names = set()
        for i, m in enumerate(self.models):
            unknown = set(m) - MODEL_KEYS
            if unknown:
                raise ValueError(f"models[{i}]: unknown key {sorted(unknown)[0]!r} (known: name, model, pretrained)")
            for key in ("name", "model"):
                if not isinstance(m.get(key), str) or not m.get(key):
                    raise ValueError(f"models[{i}] {key}: expected a non-empty string")
            if not isinstance(m.get("pretrained", ""), str):
                raise ValueError(f"models[{i}] pretrained: expected a string (tag, file path, or \"\" for random init)")
            if not _NAME.fullmatch(m["name"]):
                raise ValueError(f"models[{i}] name: {m['name']!r} must be lower-case letters, digits, _ (e.g. 'b32')")
            if m["name"] in names:
                raise ValueError(f"models[{i}] name: {m['name']!r} is used twice")
            names.add(m["name"])
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")
        at_least(self, "workers", 0, unset="cpus_per_task - 1")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")


def _estimate(ctx: PlanContext, units: dict) -> Estimate:
    samples, basis = estimate_samples(ctx.scale, ctx.inputs.pool_rows, units["run"])
    models = ctx.params.models if ctx.params is not None else list(DEFAULT_MODELS)
    if ctx.scale.name == "tiny":
        seconds = 0.0
    else:
        seconds = samples * sum(1.0 / A100_IMAGES_PER_SECOND.get(m["model"], 2500.0) for m in models)
    return Estimate(
        gpu_hours=seconds / 3600.0,
        bytes_written=samples * (BYTES_PER_SAMPLE_METADATA + BYTES_PER_SAMPLE_EMBEDDINGS * len(models) / 2),
        basis=f"{basis}; clip-retrieval A100 rates (B/32 2,500 img/s, L/14 312 img/s); "
              "DataComp's metadata and npz sizes",
    )


def _preflight(config) -> None:
    """At plan and submit: every model's weights (checkpoint files readable; tags known
    and, offline, cached) and, without the download stage, the pool's shards."""
    from jobs.models import check_weights

    params = config.stages["embed"].params or EmbedParams()
    for i, m in enumerate(params.models):
        check_weights(m["model"], m.get("pretrained", ""), config.storage_options, online=not params.offline,
                      where=f"[stages.embed] models[{i}] ({m['name']}): ")
    if not in_run(config, "download") and config.pool.shards:
        from jobs.train.inputs import check_shards, list_shards

        check_shards(list_shards(config.pool.shards, config.storage_options), config.pool.shards,
                     config.storage_options, what="pool shard")


STAGES = [
    StageSpec(
        name="embed",
        description="CLIP image/text embeddings and similarity scores per shard (DataComp npz + parquet)",
        order=20,
        params=EmbedParams,
        gpu=True,
        default_resources={"gpus_per_node": 1, "cpus_per_task": 8, "mem": "64G", "time": "04:00:00"},
        estimate=_estimate, preflight=_preflight,
        steps=(StepSpec("run", "jobs.embed.stage:run", shard_units, default_units_per_task=1),),
    ),
]
