"""CLIP training, top to bottom: DataComp's recipe on FSDP2.

    hyperparameters  <- the run's scale (dcslurm.core.scales), params override for tests
    data             <- reshard outputs (or params `data`), streams over one shuffled order (data.py)
    model            <- open_clip by name, FSDP2 per block (parallelize.py)
    loss             <- open_clip ClipLoss, local loss + gather with grad
    optimizer        <- AdamW, cosine schedule after linear warmup (open_clip's)
    global batch     <- world x micro batch x accumulation steps (exact, with a feature cache)
    checkpoints      <- DCP every N steps, and when ctx.should_stop() (the runner requeues; checkpoint.py)
    metrics          <- RUN/train/metrics.jsonl (metrics.py)
    export           <- RUN/train/model.pt, a plain open_clip state_dict

Run by the runner as one job of world_size processes (srun or the local executor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dcslurm.core.environment import World
from dcslurm.core.errors import UserError
from dcslurm.core.task import Preempted, TaskContext, TaskResult
from jobs.train import checkpoint, data, parallelize
from jobs.train.metrics import MetricsLog, peak_flops, train_flops_per_sample
from jobs.train.spec import Hyper, TrainParams, mesh_shape, reshard_step, resolve_hyper

MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class BatchShape:
    """How the global batch is spread: world_size x accum x micro_batch."""

    world_size: int
    accum: int
    micro_batch: int

    @property
    def per_rank(self) -> int:
        return self.accum * self.micro_batch


def batch_shape(global_batch: int, world_size: int, accum: int | None, micro_batch: int | None) -> BatchShape:
    """Split the global batch over ranks and accumulation steps; one-line error if it does not divide."""
    if global_batch % world_size:
        raise UserError(f"batch_size {global_batch}: not divisible by the world size {world_size}")
    per_rank = global_batch // world_size
    if not accum:
        accum = -(-per_rank // micro_batch) if micro_batch else 1
    if per_rank % accum:
        raise UserError(f"batch_size {global_batch}: {per_rank} per rank is not divisible into {accum} "
                        "accumulation steps")
    return BatchShape(world_size, accum, per_rank // accum)


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """open_clip's schedule: linear warmup to base_lr, then cosine decay to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


def make_optimizer(model: torch.nn.Module, hp: Hyper) -> torch.optim.AdamW:
    """AdamW with open_clip's groups: no weight decay on gains, biases and logit_scale."""
    def no_decay(name: str, p) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in params if not no_decay(n, p)], "weight_decay": hp.weight_decay},
    ]
    # fused: one kernel for all parameters (4x faster than foreach on CPU, also on GPUs).
    return torch.optim.AdamW(groups, lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=hp.eps, fused=True)


def training_shards(ctx: TaskContext, storage_options: dict) -> list[data.Shard]:
    """The reshard stage's shards when it is in the run, else params `data`."""
    upstream = reshard_step({s.name: s for s in ctx.plan.steps})
    if upstream is not None:
        urls = [u for u in ctx.input_names() if u.endswith(".tar")]
        sizes = data.read_size_table(ctx.run.child("reshard"))
        # A small subset can leave some reshard outputs empty: those are skipped, not errors.
        shards = [data.Shard(u, sizes.get(u.rsplit("/", 1)[-1])) for u in urls]
        shards = [s for s in shards if s.samples != 0]
        where = ctx.run.url_of("reshard")
    else:
        shards = data.list_shards(ctx.params.data, storage_options)
        where = ctx.params.data
    data.check_shards(shards, where, storage_options)
    return shards


def agreed(stop: bool, device: torch.device) -> bool:
    """True on every rank if `stop` is true on any rank (a collective: call it on all ranks),
    so that every rank stops after the same step and saves the same checkpoint."""
    flag = torch.tensor([1.0 if stop else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def init_distributed(world: World, device: torch.device, timeout_s: int) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if world.world_size == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    dist.init_process_group(backend, init_method=f"tcp://{world.master_addr}:{world.master_port}",
                            rank=world.rank, world_size=world.world_size, timeout=timeout)


def run(ctx: TaskContext) -> TaskResult:
    """The runner's entry point: set up the process group, train, tear down."""
    world = ctx.world
    device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, ctx.step.resources.cpus_per_task))
    params: TrainParams = ctx.params
    init_distributed(world, device, params.timeout_s)
    try:
        return train(ctx, params, device)
    finally:
        dist.destroy_process_group()


def train(ctx: TaskContext, params: TrainParams, device: torch.device) -> TaskResult:
    from open_clip.loss import ClipLoss

    from jobs.models import create_model

    rank, world_size = dist.get_rank(), dist.get_world_size()
    storage = ctx.plan.storage_options
    hp = resolve_hyper(ctx.scale, params)
    shape = batch_shape(hp.batch_size, world_size, params.accum, params.micro_batch)
    total_steps = hp.steps
    bf16 = params.precision == "bf16" or (params.precision == "auto" and device.type == "cuda")
    ctx.log.info("training %s: %d steps of %d (= %d ranks x %d accum x %d), lr %g, warmup %d, %s%s",
                 hp.model, total_steps, hp.batch_size, world_size, shape.accum, shape.micro_batch, hp.lr,
                 hp.warmup, "bf16" if bf16 else "fp32", ", compiled blocks" if params.compile else "")

    # Bad input fails before any model is built: the data, and a resume checkpoint of another model.
    shards = training_shards(ctx, storage)
    store = checkpoint.Checkpoints(ctx.output.child("checkpoints"), keep=params.keep_checkpoints)
    source = ctx.folder(params.resume) if params.resume else store.latest()
    if source is not None:
        checkpoint.check_model(source, hp.model)

    # Model: same seed on every rank, so the replicated logit_scale starts identical.
    model, preprocess_train, _, tokenizer = create_model(hp.model, "", "cpu", seed=ctx.seed)
    model = model.to(device)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    flops_per_sample = train_flops_per_sample(model, image_size, model.context_length, device)
    mesh = mesh_shape(params.mesh, ctx.scale.name, ctx.world.nnodes, world_size // ctx.world.nnodes,
                      params.mesh_replicas)
    ctx.log.info("device mesh %s", " x ".join(map(str, mesh)) + (" (HSDP)" if len(mesh) == 2 else " (FSDP)"))
    parallelize.parallelize(model, device, world_size, bf16, params.grad_checkpointing, params.compile,
                            params.fsdp_units, mesh)
    optimizer = make_optimizer(model, hp)

    # Resume: params `resume`, else the run's latest complete checkpoint.
    start_step, positions = 0, {}
    if source is not None:
        meta = checkpoint.load(source, model, optimizer, hp.model)
        start_step = int(meta["step"])
        positions = {int(k): v for k, v in meta.get("data_positions", {}).items()}
        ctx.log.info("resumed from %s at step %d", source.url, start_step)

    n_streams = params.data_streams or data.default_streams(hp.batch_size, world_size)
    layout = data.make_layout(hp.batch_size, n_streams, rank, world_size)
    dataset = data.StepBatches(shards, layout, positions, ctx.seed, params.shuffle_buffer,
                               preprocess_train, tokenizer, storage)
    batches = data.RankBatches(dataset, params.workers)
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank,
                       world_size=world_size)
    metrics = MetricsLog(ctx.output, start_step, world_size, flops_per_sample, peak_flops(device), device,
                         enabled=rank == 0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def save(step: int) -> None:
        all_positions: list[dict] = [None] * world_size  # type: ignore[list-item]
        dist.all_gather_object(all_positions, batches.positions)
        merged = {str(k): v for p in all_positions for k, v in p.items()}
        store.save(step, model, optimizer, {"model": hp.model, "world_size": world_size,
                                            "data_positions": merged, "n_streams": n_streams}, rank)

    step, loss_value = start_step, float("nan")
    batch_iter = iter(batches)
    for step in range(start_step, total_steps):
        # RNG is a function of (seed, rank, step): nothing to save, identical after a resume.
        torch.manual_seed(hash((ctx.seed, rank, step)) & 0x7FFF_FFFF_FFFF_FFFF)
        lr = cosine_lr(step, hp.lr, hp.warmup, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, texts = next(batch_iter)
        images, texts = images.to(device, non_blocking=True), texts.to(device, non_blocking=True)

        loss = train_step(model, loss_fn, images, texts, shape.accum, autocast)
        parallelize.sync_replicated_grads(model, world_size)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # open_clip clamps the temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        done = step + 1

        if done % params.log_every == 0 or done == total_steps:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss, op=dist.ReduceOp.SUM)
            loss_value = mean_loss.item() / world_size
            line = metrics.log(done, done * hp.batch_size, loss_value, lr, model.logit_scale.exp().item(),
                               hp.batch_size, batches.bad_samples)
            if rank == 0:
                ctx.log.info("step %d/%d loss %.4f lr %.3g %.1f samples/s", done, total_steps, loss_value,
                             lr, line["samples_per_s"])
        # Asked to stop (the time-limit warning, preemption): save and hand back to the runner,
        # which requeues the job. A request after the last step changes nothing: finish.
        preempted = agreed(ctx.should_stop(), device) and done < total_steps
        if preempted or done % params.checkpoint_every == 0 or done == total_steps:
            save(done)
        if preempted:
            raise Preempted(f"stopped at step {done}: checkpoint {checkpoint.step_name(done)} saved")

    outputs = ["train/metrics.jsonl"]
    if params.export:
        checkpoint.export_open_clip(model, ctx.output, MODEL_FILE, rank)
        outputs.insert(0, f"train/{MODEL_FILE}")
    return TaskResult(outputs=outputs, stats={
        "model": hp.model, "steps": total_steps, "samples_seen": total_steps * hp.batch_size,
        "final_loss": loss_value, "world_size": world_size, "resumed_from_step": start_step,
        "bad_samples": batches.bad_samples, "flops_per_sample": flops_per_sample,
        **{f"skipped_{k}": v for k, v in sorted(batches.skipped_members.items())},  # tar members, jobs.wds
    })


def train_step(model, loss_fn, images: torch.Tensor, texts: torch.Tensor, accum: int, autocast) -> torch.Tensor:
    """Forward and backward of one optimizer step on this rank's share of the global batch.

    With accum > 1 the gradient is still that of the contrastive loss over the
    whole global batch (open_clip's feature cache): features of every micro
    batch are computed without grad first, then each micro batch is recomputed
    with grad and its features put into the cached ones before the loss.
    """
    if accum == 1:
        with autocast:
            image_features, text_features, logit_scale = model(images, texts)
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        return loss
    image_chunks, text_chunks = images.chunk(accum), texts.chunk(accum)
    with torch.no_grad(), autocast:
        cached = [model(i, t)[:2] for i, t in zip(image_chunks, text_chunks)]
    cached_images = [c[0] for c in cached]
    cached_texts = [c[1] for c in cached]
    for j in range(accum):
        model.set_requires_gradient_sync(j == accum - 1)  # reduce-scatter once, after the last micro batch
        with autocast:
            image_features, text_features, logit_scale = model(image_chunks[j], text_chunks[j])
            all_images = torch.cat(cached_images[:j] + [image_features] + cached_images[j + 1:])
            all_texts = torch.cat(cached_texts[:j] + [text_features] + cached_texts[j + 1:])
            loss = loss_fn(all_images, all_texts, logit_scale)
        loss.backward()
    return loss
