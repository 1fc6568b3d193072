"""Training metrics: loss, lr, throughput, MFU, memory -> RUN/train/metrics.jsonl.

Rank 0 keeps the lines and rewrites the file atomically at every log interval
(object stores cannot append; a resumed run keeps the lines up to its
checkpoint and drops those of steps it will redo).
"""

from __future__ import annotations

import json
import resource
import time

import torch

from dcslurm.core.storage import DataFolder

METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak, for MFU; matched against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                   "V100": 125e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def train_flops_per_sample(model, image_size: int, context_length: int, device: torch.device) -> float:
    """Model FLOPs of one training sample: forward + backward = 3 x forward (no recompute counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    image = torch.zeros(1, 3, image_size, image_size, device=device)
    text = torch.zeros(1, context_length, dtype=torch.long, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image, text)
    return 3.0 * counter.get_total_flops()


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


class MetricsLog:
    """Per-interval metrics of rank 0, kept in RUN/train/metrics.jsonl."""

    def __init__(self, output: DataFolder, resume_step: int, world_size: int, flops_per_sample: float,
                 peak: float | None, device: torch.device, enabled: bool):
        self.output = output
        self.world_size = world_size
        self.flops_per_sample = flops_per_sample
        self.peak = peak
        self.device = device
        self.enabled = enabled
        self.lines: list[dict] = []
        if enabled and output.exists(METRICS_FILE):
            for text in output.read_text(METRICS_FILE).splitlines():
                if text.strip() and json.loads(text)["step"] <= resume_step:
                    self.lines.append(json.loads(text))
        self._mark(resume_step)

    def _mark(self, step: int) -> None:
        self._t0, self._step0 = time.perf_counter(), step

    def log(self, step: int, samples: int, loss: float, lr: float, logit_scale: float, batch_size: int,
            bad_samples: int) -> dict:
        seconds = max(time.perf_counter() - self._t0, 1e-9)
        per_s = (step - self._step0) * batch_size / seconds
        line = {
            "step": step, "samples": samples, "loss": loss, "lr": lr, "logit_scale": logit_scale,
            "samples_per_s": round(per_s, 2), "samples_per_s_per_device": round(per_s / self.world_size, 2),
            "mfu": round(per_s * self.flops_per_sample / (self.world_size * self.peak), 4) if self.peak else None,
            "tflops_per_device": round(per_s * self.flops_per_sample / self.world_size / 1e12, 3),
            "memory_gb": round(memory_gb(self.device), 3), "world_size": self.world_size,
            "bad_samples": bad_samples, "time": time.time(),
        }
        self._mark(step)
        if self.enabled:
            self.lines.append(line)
            self.output.write_text(METRICS_FILE, "".join(json.dumps(x) + "\n" for x in self.lines))
        return line
