"""The training stage, as the planner sees it (light: no torch import here).

One step, layout "distributed": a single job of nodes x tasks_per_node ranks
(srun on SLURM, N local processes with the local executor). Hyperparameters
come from the run's scale (dcslurm.core.scales); the params below only override
them for tests and small experiments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dcslurm.core.config import slurm_time_hours
from dcslurm.core.errors import UserError
from dcslurm.core.plantypes import Estimate, at_least
from dcslurm.core.scales import TRAIN_GPUS_BASIS, ScaleConfig, estimate_train_gpu_hours
from dcslurm.core.shards import UnitSet
from dcslurm.core.stages import PlanContext, StageSpec, StepSpec, in_run


@dataclass
class TrainParams:
    data: str = ""  # input shards when reshard is not in the run: a folder or a {a..b}.tar pattern
    # Left out (None): the scale's model, batch, samples, lr and warmup (dcslurm.core.scales).
    model: str | None = None  # open_clip model name
    batch_size: int | None = None  # global batch
    samples: int | None = None  # samples seen
    lr: float | None = None
    warmup: int | None = None  # warmup steps
    accum: int | None = None  # gradient accumulation steps; None = the fewest that fit micro_batch
    micro_batch: int | None = None  # samples per rank per forward; None = global batch / world (no accumulation)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    grad_checkpointing: bool = True
    compile: bool = False
    fsdp_units: str = "auto"  # block | model | auto (per block from 50M parameters up)
    mesh: str = "auto"  # fsdp (shard over all ranks) | hsdp (shard within a node, replicate across) | auto
    mesh_replicas: int | None = None  # hsdp: replica groups; None = one per node (tests force 2 on one machine)
    workers: int = 2  # DataLoader workers per rank
    data_streams: int | None = None  # streams, evenly spaced in the data order; None = a multiple of the world >= 64
    shuffle_buffer: int = 256  # samples shuffled within a shard
    log_every: int = 10  # steps between metrics lines
    checkpoint_every: int = 500  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # complete checkpoints kept (older ones are removed)
    export: bool = True  # write RUN/train/model.pt (plain open_clip state_dict) at the end
    resume: str = ""  # a checkpoint folder to start from (default: the run's latest complete one)
    timeout_s: int = 600  # collective timeout: a dead rank fails the job after this long

    def validate(self) -> None:
        for key in ("batch_size", "samples", "accum", "micro_batch", "mesh_replicas", "data_streams"):
            at_least(self, key, 1, unset="the default")
        if self.lr is not None and not self.lr > 0:
            raise ValueError("lr: must be > 0 (leave it out for the scale's)")
        at_least(self, "warmup", 0, unset="the scale's")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision: expected auto, bf16 or fp32, got {self.precision!r}")
        if self.fsdp_units not in ("auto", "block", "model"):
            raise ValueError(f"fsdp_units: expected auto, block or model, got {self.fsdp_units!r}")
        if self.mesh not in ("auto", "fsdp", "hsdp"):
            raise ValueError(f"mesh: expected auto, fsdp or hsdp, got {self.mesh!r}")
        if self.log_every < 1 or self.checkpoint_every < 1:
            raise ValueError("log_every / checkpoint_every: must be >= 1")
        if self.workers < 0:
            raise ValueError("workers: must be >= 0")


@dataclass(frozen=True)
class Hyper:
    """The resolved hyperparameters of a training run (scale + overrides)."""

    model: str
    batch_size: int
    samples: int
    lr: float
    warmup: int
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    @property
    def steps(self) -> int:
        return -(-self.samples // self.batch_size)


def _given(value, default):
    return default if value is None else value


def resolve_hyper(scale: ScaleConfig, params: TrainParams) -> Hyper:
    """The scale's hyperparameters with the params that are set applied."""
    return Hyper(
        model=params.model or scale.model,  # "" names no model: the scale's, as plan and preflight take it
        batch_size=_given(params.batch_size, scale.batch_size),
        samples=_given(params.samples, scale.samples_seen),
        lr=_given(params.lr, scale.lr),
        warmup=_given(params.warmup, scale.warmup),
        beta1=scale.beta1, beta2=scale.beta2, eps=scale.eps, weight_decay=scale.weight_decay,
    )


# Scales trained on hundreds of GPUs: there, sharding the model over every rank makes each
# layer's all-gather cross the inter-node network; HSDP keeps the all-gathers inside a node
# (NVLink) and sends only one gradient all-reduce per step across nodes.
HSDP_SCALES = ("large", "xlarge")


def mesh_shape(mode: str, scale: str, nodes: int, tasks_per_node: int, replicas: int | None = None
               ) -> tuple[int, ...]:
    """The device mesh: (world,) for FSDP over all ranks, (replicas, shards) for HSDP.

    "auto" is HSDP at the large scales when the job spans several nodes of several
    tasks each, else FSDP; "hsdp" replicates across nodes (or `replicas` groups).
    """
    world = nodes * tasks_per_node
    if mode == "auto":
        mode = "hsdp" if scale in HSDP_SCALES and nodes > 1 and tasks_per_node > 1 else "fsdp"
    if mode == "fsdp":
        return (world,)
    replicas = replicas or nodes
    if world % replicas:
        raise UserError(f"[stages.train] mesh hsdp: {world} ranks ({nodes} nodes x {tasks_per_node} tasks) "
                        f"do not split into {replicas} replica groups")
    return (replicas, world // replicas)


def reshard_step(steps: dict) -> str | None:
    """The last step of the reshard stage in this run, if it is there."""
    names = [name for name, step in steps.items() if step.stage == "reshard"]
    return names[-1] if names else None


def _units(ctx: PlanContext) -> UnitSet:
    up = reshard_step(ctx.steps)
    if up is not None:
        return UnitSet(count=ctx.steps[up].n_tasks, upstream=up, label="reshard tasks")
    if not ctx.params.data:
        raise ValueError("train needs the reshard stage earlier in the run, or [stages.train] data")
    return UnitSet(count=1, label="dataset")


DEFAULT_GPUS_PER_NODE = 8  # when neither [slurm] nor the train resources say
# Per-rank batches outside this range are a job shape wrong for the scale: above, one
# rank's activations do not fit an A100 at these models; below, the GPUs idle.
PER_RANK_BATCH = (16, 4096)


def _shape_set(config) -> bool:
    """True when the config sets the training job's shape itself."""
    keys = ("nodes", "tasks_per_node")
    section = config.stages.get("train")
    return (any(k in (config.raw.get("slurm") or {}) for k in keys)
            or (section is not None and any(k in section.resources for k in keys)))


def job_shape(config, res):
    """The training job sized from the scale (`ScaleConfig.train_gpus`) when the config
    sets neither nodes nor tasks_per_node: whole nodes of `gpus_per_node` ([slurm] or
    the train resources; 8 if unset), one rank per GPU."""
    if _shape_set(config):
        return res
    gpus = max(1, config.scale.train_gpus)
    per_node = res.gpus_per_node or DEFAULT_GPUS_PER_NODE
    nodes, tasks = (1, gpus) if gpus <= per_node else (-(-gpus // per_node), per_node)
    gpus_per_node = res.gpus_per_node
    if not gpus_per_node and not res.gres and config.scale.name != "tiny":  # tiny trains on CPU
        gpus_per_node = tasks
    return dataclasses.replace(res, nodes=nodes, tasks_per_node=tasks, gpus_per_node=gpus_per_node)


def shape_warning(scale: ScaleConfig, hp: Hyper, res, gpu_hours: float) -> str:
    """One line when the job shape is absurd for the scale, else ""."""
    world = res.nodes * res.tasks_per_node
    shape = f"{res.nodes} nodes x {res.tasks_per_node} tasks"
    per_rank = hp.batch_size / world
    if not PER_RANK_BATCH[0] <= per_rank <= PER_RANK_BATCH[1] and scale.name not in ("tiny", "debug"):
        return (f"train: {shape} gives {per_rank:,.0f} samples per rank of the {hp.batch_size:,} global batch "
                f"(sensible: {PER_RANK_BATCH[0]:,} to {PER_RANK_BATCH[1]:,}); DataComp used "
                f"{scale.train_gpus:,} GPUs at {scale.name}")
    wall = gpu_hours / world
    limit = slurm_time_hours(res.time)
    if wall > limit and not res.requeue:
        return (f"train: about {wall:,.1f} h on {shape} ({gpu_hours:,.0f} A100-h) exceeds the time limit "
                f"{res.time} and requeue is off: the job will not finish")
    return ""


def _estimate(ctx: PlanContext, units: dict) -> Estimate:
    params = ctx.params
    hp = resolve_hyper(ctx.scale, params)
    res = ctx.steps["train"].resources  # as planned: the config's shape or job_shape's
    world = res.nodes * res.tasks_per_node
    per_rank = hp.batch_size // world if hp.batch_size % world == 0 else hp.batch_size / world
    # GPU-hours scale with samples seen: the table's figure is for the scale's own samples.
    hours = estimate_train_gpu_hours(ctx.scale) * hp.samples / ctx.scale.samples_seen
    shape = mesh_shape(params.mesh, ctx.scale.name, res.nodes, res.tasks_per_node, params.mesh_replicas)
    mesh = f"HSDP mesh {shape[0]} x {shape[1]}" if len(shape) == 2 else f"FSDP mesh {shape[0]}"
    sized = "" if _shape_set(ctx.config) else f" (sized from the scale: {TRAIN_GPUS_BASIS})"
    basis = (f"{hp.model}, {hp.samples:,} samples, global batch {hp.batch_size:,} "
             f"= {res.nodes} nodes x {res.tasks_per_node} tasks x {per_rank:,} per rank{sized}, {mesh}, "
             f"{hp.steps:,} steps, "
             f"lr {hp.lr:g}, warmup {hp.warmup:,}, AdamW b1 {hp.beta1:g} b2 {hp.beta2:g} eps {hp.eps:g} "
             f"wd {hp.weight_decay:g}, cosine; A100-h from DataComp Table 2 ({ctx.scale.name})")
    return Estimate(gpu_hours=hours, basis=basis, warning=shape_warning(ctx.scale, hp, res, hours))


def _preflight(config) -> None:
    """At plan and submit: one-line errors for missing or empty `data` shards, a `resume`
    checkpoint that is missing, incomplete or of another model, and an unknown model name."""
    from jobs.models import check_weights
    from jobs.train.inputs import check_model, check_shards, list_shards

    params = config.stages["train"].params or TrainParams()
    model = params.model or config.scale.model
    check_weights(model, "", config.storage_options, where="[stages.train] model: ")
    if params.data and not in_run(config, "reshard"):  # reshard's outputs do not exist yet; the task checks them
        check_shards(list_shards(params.data, config.storage_options), params.data, config.storage_options)
    if params.resume:
        check_model(config.folder(params.resume), model)


STAGES = [
    StageSpec(
        name="train", description="FSDP2 CLIP training at the scale's hyperparameters", order=50,
        params=TrainParams, gpu=True, estimate=_estimate,
        default_resources={"requeue": True}, job_shape=job_shape, preflight=_preflight,
        # checkpointable: stops on ctx.should_stop() with a checkpoint; the runner requeues.
        steps=(StepSpec("run", "jobs.train.train:run", _units, layout="distributed", checkpointable=True),),
    ),
]
