"""Our zero-shot numbers equal clip_benchmark 1.6.2's, run in-process on the same
eval sets (real offline images) with the same tiny checkpoint."""

from __future__ import annotations

import pytest

from dcslurm.core.storage import DataFolder
from dcslurm.datacomp.tasks import Task
from jobs.evaluate.stage import Evaluator
from tests.test_eval_fixtures import make_classification_set, make_retrieval_set, make_tiny_checkpoint

torch = pytest.importorskip("torch")
clip_benchmark = pytest.importorskip("clip_benchmark")


@pytest.fixture(scope="module")
def evalsets(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalsets")
    make_classification_set(str(root / "wds_fashion_test"), n=200, per_shard=80)
    make_retrieval_set(str(root / "wds_fashion_captions_test"), n=120, per_shard=50)
    ckpt = make_tiny_checkpoint(str(root / "model.pt"))
    return root, ckpt


def clip_benchmark_run(root, ckpt: str, name: str, task: str) -> dict:
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from clip_benchmark.metrics import zeroshot_retrieval as zsr
    from clip_benchmark.models import load_clip

    from jobs.models import register_configs

    register_configs()
    torch.manual_seed(0)
    model, transform, tokenizer = load_clip("open_clip", "dcslurm-tiny-vit", pretrained=ckpt, cache_dir=None,
                                            device="cpu")
    model.eval()
    ds = build_dataset(f"wds/{name}", root=str(root / f"wds_{name}_test"), transform=transform, split="test",
                       download=False, task=task)
    loader = torch.utils.data.DataLoader(ds.batched(64), batch_size=None, shuffle=False, num_workers=0)
    if task == "zeroshot_classification":
        return zsc.evaluate(model, loader, tokenizer, ds.classes, ds.templates, "cpu", amp=False)
    return zsr.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])


def ours(root, ckpt: str, task: Task) -> dict:
    evaluator = Evaluator("dcslurm-tiny-vit", ckpt, "cpu", batch_size=64, num_workers=2)
    metrics, stats = evaluator.evaluate(task, DataFolder(str(root)))
    evaluator.images.close()
    return metrics, stats


def test_classification_equals_clip_benchmark(evalsets):
    root, ckpt = evalsets
    mine, stats = ours(root, ckpt, Task(key="demo/fashion", name="Fashion", evalset="wds_fashion_test",
                                        main_metric="mean_per_class_recall"))
    ref = clip_benchmark_run(root, ckpt, "fashion", "zeroshot_classification")
    assert stats["samples"] == 200 and stats["skipped"] == 0
    for k in ("acc1", "acc5", "mean_per_class_recall"):
        assert abs(mine[k] - ref[k]) <= 1e-6, (k, mine[k], ref[k])
    assert mine["main_metric"] == mine["mean_per_class_recall"]
    # a model whose predictions carry information, not a constant guess
    # an informative model (not one class for every image), so every metric is exercised
    assert 0.2 < mine["acc1"] < 1.0 and mine["acc5"] > mine["acc1"] and mine["mean_per_class_recall"] > 0.2


def test_retrieval_equals_clip_benchmark(evalsets):
    root, ckpt = evalsets
    mine, stats = ours(root, ckpt, Task(key="demo/fashion_captions", name="Fashion captions",
                                        evalset="wds_fashion_captions_test", kind="retrieval",
                                        main_metric="mean_recall@1"))
    ref = clip_benchmark_run(root, ckpt, "fashion_captions", "zeroshot_retrieval")
    assert stats == {"samples": 120, "captions": 240, "skipped": 0}
    for k in (1, 5, 10):
        for side in ("image", "text"):
            key = f"{side}_retrieval_recall@{k}"
            assert abs(mine[key] - ref[key]) <= 1e-6, (key, mine[key], ref[key])
    assert mine["main_metric"] == pytest.approx(
        0.5 * (ref["image_retrieval_recall@1"] + ref["text_retrieval_recall@1"]), abs=1e-6)
    assert 0 < mine["image_retrieval_recall@10"] < 1
