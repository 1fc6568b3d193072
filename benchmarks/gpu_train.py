"""GPU training throughput and MFU of our trainer: ViT-B-32 and ViT-L-14 on one GPU.

One short call on one H100 (a few minutes): for each model, the trainer's own
pieces (parallelize: FSDP2 + bf16 + optional compile / activation
checkpointing; train_step with ClipLoss; AdamW) at the largest batch that fits
(tried largest first); prints samples/s, TFLOP/s and MFU (model FLOPs from
torch's FlopCounterMode, 3 x forward, over the dense bf16 peak) at the largest
batch. Inputs are random tensors already on the GPU: this measures
the model step, not JPEG decoding (which the DataLoader workers overlap).

    python benchmarks/gpu_train.py                 # the GPU run (about 5 min on an H100)
    python benchmarks/gpu_train.py --smoke         # CPU check of the code path (tiny model)

Goal (issue 7): MFU >= 45% for ViT-L-14 on an H100; open_clip's published
LAION runs were 11-16% on A100s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from jobs.train import parallelize  # noqa: E402
from jobs.train.metrics import peak_flops, train_flops_per_sample  # noqa: E402
from jobs.train.spec import Hyper  # noqa: E402
from jobs.train.train import make_optimizer, train_step  # noqa: E402


def measure(name: str, batch: int, device: torch.device, bf16: bool, compile_blocks: bool, ckpt: bool,
            steps: int, warmup: int) -> dict:
    """samples/s and MFU of `steps` optimizer steps at `batch` (raises torch.OutOfMemoryError)."""
    import open_clip
    from open_clip.loss import ClipLoss

    from jobs.models import register_configs

    register_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(name, device=device)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    flops = train_flops_per_sample(model, size, model.context_length, device)
    parallelize.parallelize(model, device, 1, bf16, ckpt, compile_blocks)
    hp = Hyper(name, batch, batch * steps, 5e-4, 0, 0.9, 0.98, 1e-6, 0.2)
    optimizer = make_optimizer(model, hp)
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True)
    images = torch.randn(batch, 3, size, size, device=device)
    texts = torch.randint(0, 49408, (batch, model.context_length), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> float:
        loss = train_step(model, loss_fn, images, texts, 1, autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss = float(loss.detach())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    per_s = steps * batch / seconds
    peak = peak_flops(device)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {"model": name, "batch": batch, "samples_per_s": round(per_s, 1),
            "tflops": round(per_s * flops / 1e12, 1), "mfu": round(per_s * flops / peak, 4) if peak else None,
            "memory_gb": round(mem, 1), "compile": compile_blocks, "grad_checkpointing": ckpt,
            "loss": round(loss, 4) if math.isfinite(loss) else None}


def largest_batch(name: str, batches: list[int], device, bf16, compile_blocks, ckpt, steps, warmup,
                  deadline: float) -> dict | None:
    """The result at the largest batch in `batches` (tried largest first) that fits."""
    for batch in sorted(batches, reverse=True):
        if time.time() > deadline:
            print(f"  {name}: time budget spent before a batch fitted", flush=True)
            return None
        try:
            result = measure(name, batch, device, bf16, compile_blocks, ckpt, steps, warmup)
        except torch.OutOfMemoryError:
            print(f"  {name} batch {batch}: out of memory", flush=True)
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
        print("  " + json.dumps(result), flush=True)
        return result
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="CPU check with the tiny model")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="give up on a model whose batches have not fitted by then")
    parser.add_argument("--json", default="", help="also write the results here as JSON")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    deadline = time.time() + args.budget_s
    if args.smoke:
        plans = [("dcslurm-tiny-vit", [8, 16], 2, 1)]
    else:
        plans = [("ViT-B-32", [512, 1024, 2048], 10, 3), ("ViT-L-14", [64, 128, 256], 6, 2)]
    print(f"device: {torch.cuda.get_device_name(device) if cuda else 'cpu'}; peak bf16 "
          f"{(peak_flops(device) or 0) / 1e12:.0f} TFLOP/s; compile {not args.no_compile and cuda}; "
          f"activation checkpointing {args.grad_checkpointing}", flush=True)
    summary = []
    for i, (name, batches, steps, warmup) in enumerate(plans):
        # Share the time budget: the first model may use at most half.
        model_deadline = min(deadline, time.time() + args.budget_s / 2) if i == 0 else deadline
        best = largest_batch(name, batches, device, cuda, cuda and not args.no_compile, args.grad_checkpointing,
                             steps, warmup, model_deadline)
        summary.append(best)
    print("\nresult (largest batch that fits, per model):")
    for best in summary:
        if best:
            mfu = f"{best['mfu']:.1%}" if best["mfu"] is not None else "n/a (no peak for this device)"
            print(f"  {best['model']:16s} batch {best['batch']:5d}: {best['samples_per_s']:9.1f} samples/s, "
                  f"{best['tflops']:6.1f} TFLOP/s, MFU {mfu}, {best['memory_gb']:.1f} GB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device) if cuda else "cpu", "smoke": args.smoke,
                       "compile": cuda and not args.no_compile, "grad_checkpointing": args.grad_checkpointing,
                       "results": [b for b in summary if b]}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
