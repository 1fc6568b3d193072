"""Zero-shot classification throughput: dcslurm's eval stage vs clip_benchmark 1.6.2,
side by side on the same clip_benchmark-layout set (Fashion-MNIST images) and
checkpoint (dcslurm-tiny-vit, or --model with random init), batch 64, fp32.

    .venv/bin/python benchmarks/eval_zeroshot.py [--n 1000] [--model dcslurm-tiny-vit] [--device cpu]

Prints images/s of each, the ratio, and checks that acc1/acc5/mean per-class
recall agree to 1e-6.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--model", default="dcslurm-tiny-vit")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import torch
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from clip_benchmark.models import load_clip

    from dcslurm.core.storage import DataFolder
    from dcslurm.datacomp.tasks import Task
    from jobs.evaluate.stage import Evaluator
    from jobs.models import create_model, register_configs
    from tests.test_eval_fixtures import make_classification_set

    with tempfile.TemporaryDirectory() as tmp:
        make_classification_set(os.path.join(tmp, "wds_bench_test"), n=args.n, per_shard=250)
        ckpt = os.path.join(tmp, "model.pt")
        torch.save(create_model(args.model, seed=0)[0].state_dict(), ckpt)
        task = Task(key="bench/fashion", name="bench", evalset="wds_bench_test")

        t0 = time.perf_counter()
        ev = Evaluator(args.model, ckpt, args.device, batch_size=64, num_workers=args.workers)
        ours, _ = ev.evaluate(task, DataFolder(tmp))
        ev.images.close()
        t_ours = time.perf_counter() - t0

        register_configs()
        t0 = time.perf_counter()
        model, transform, tokenizer = load_clip("open_clip", args.model, pretrained=ckpt, cache_dir=None,
                                                device=args.device)
        model.eval()
        ds = build_dataset("wds/bench", root=os.path.join(tmp, "wds_bench_test"), transform=transform,
                           split="test", download=False)
        loader = torch.utils.data.DataLoader(ds.batched(64), batch_size=None, shuffle=False,
                                             num_workers=args.workers)
        ref = zsc.evaluate(model, loader, tokenizer, ds.classes, ds.templates, args.device, amp=False)
        t_ref = time.perf_counter() - t0

    same = all(abs(ours[k] - ref[k]) <= 1e-6 for k in ("acc1", "acc5", "mean_per_class_recall"))
    print(f"model {args.model}, {args.n} images, device {args.device}, batch 64, fp32")
    print(f"dcslurm eval   : {t_ours:7.2f} s  {args.n / t_ours:8.1f} img/s (model load included)")
    print(f"clip_benchmark : {t_ref:7.2f} s  {args.n / t_ref:8.1f} img/s (model load included)")
    print(f"ratio (clip_benchmark time / ours): {t_ref / t_ours:.2f}")
    print(f"metrics equal to 1e-6: {same}  ours acc1={ours['acc1']:.4f} ref acc1={ref['acc1']:.4f}")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
