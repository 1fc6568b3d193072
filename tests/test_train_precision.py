"""The compiled and bf16 training paths, executed on the CPU (issue: GPU proof).

On a GPU node the trainer runs bf16 autocast with bf16 FSDP2 parameters and may compile
each transformer block with inductor; users must not be the first to execute those paths.
Here they run on the CPU (inductor emits C++ for the CPU; bf16 autocast exists on the CPU
too) through the real stage, and their loss curves must follow the eager fp32 run.

Tolerances, stated: compile changes only the kernels (fusion reorders float sums), so
its losses equal eager fp32 to 1e-4 relative; bf16 rounds activations and parameters
to 8 bits of mantissa, so its losses follow fp32 to 2e-2 relative over 10 steps.
"""

from __future__ import annotations

import glob
import os
import shutil

import pytest

from tests.test_train import run_train
from tests.train_helpers import read_metrics, write_shards

STEPS = 10


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("precision-shards"))
    write_shards(folder, n_shards=2, per_shard=80)
    return folder


def _losses(tmp_path, name: str, shards: str, expect_in_log: str = "", **kw) -> list[float]:
    folder, failed = run_train(tmp_path, name, shards, samples=16 * STEPS, workers=0,
                               checkpoint_every=100, **kw)
    assert not failed, name
    if expect_in_log:  # the path under test was the one taken
        logs = "".join(open(p).read() for p in glob.glob(os.path.join(folder, "logs", "**", "*.log"),
                                                         recursive=True))
        assert expect_in_log in logs
    losses = [m["loss"] for m in read_metrics(folder) if "loss" in m]
    assert len(losses) == STEPS, losses
    return losses


@pytest.fixture(scope="module")
def eager_fp32(tmp_path_factory, shards) -> list[float]:
    return _losses(tmp_path_factory.mktemp("fp32"), "fp32", shards, precision="fp32")


def _relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on the CPU needs a C++ compiler")
def test_compiled_blocks_follow_eager_fp32(tmp_path, shards, eager_fp32):
    compiled = _losses(tmp_path, "compiled", shards, "fp32, compiled blocks", precision="fp32", compile=True)
    assert _relative(compiled, eager_fp32) < 1e-4, (compiled, eager_fp32)


def test_bf16_follows_eager_fp32(tmp_path, shards, eager_fp32):
    bf16 = _losses(tmp_path, "bf16", shards, ", bf16", precision="bf16")
    assert bf16 != eager_fp32  # bf16 really ran: rounding moves every loss a little
    assert _relative(bf16, eager_fp32) < 2e-2, (bf16, eager_fp32)
