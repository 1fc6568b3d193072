"""Sharded checkpoints (torch.distributed.checkpoint) with a commit marker, and export.

Layout under RUN/train/checkpoints/:
    step-00000500/        DCP files: one per rank + .metadata (written by all ranks)
    step-00000500.json    the commit marker (rank 0, after every rank has written)

A checkpoint folder is complete only when its marker exists: a job killed while
saving leaves a folder without a marker, which resume ignores and a later save
of the same step overwrites. The marker carries what is not a tensor: the step,
the model name, the data streams' positions (all ranks' streams, gathered).
The RNG needs no saving: the trainer reseeds it from (seed, rank, step).
"""

from __future__ import annotations

import os
import re
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from dcslurm.errors import UserError
from dcslurm.storage import DataFolder

_STEP = re.compile(r"^step-(\d{8})\.json$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _writer(folder: DataFolder):
    if folder.is_local:
        return dcp.FileSystemWriter(folder.url)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return FsspecWriter(folder.url, **folder.storage_options)


def _reader(folder: DataFolder):
    if folder.is_local:
        return dcp.FileSystemReader(folder.url)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(folder.url, **folder.storage_options)


class Checkpoints:
    """The run's checkpoints: save, find the latest complete one, load, prune."""

    def __init__(self, root: DataFolder, keep: int = 2):
        self.root = root
        self.keep = keep

    def complete_steps(self) -> list[int]:
        return sorted(int(m.group(1)) for n in self.root.list(suffix=".json") if (m := _STEP.match(n)))

    def latest(self) -> DataFolder | None:
        """The latest complete checkpoint folder, or None."""
        steps = self.complete_steps()
        return self.root.child(step_name(steps[-1])) if steps else None

    def save(self, step: int, model, optimizer, meta: dict, rank: int) -> str:
        """Write checkpoint `step` from every rank, then commit its marker (rank 0)."""
        folder = self.root.child(step_name(step))
        if folder.is_local:
            os.makedirs(folder.url, exist_ok=True)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=_writer(folder))
        dist.barrier()
        if rank == 0:
            self.root.write_json(f"{step_name(step)}.json", {**meta, "step": step, "time": time.time()})
            self._prune()
        dist.barrier()
        return folder.url

    def _prune(self) -> None:
        for old in self.complete_steps()[:-self.keep] if self.keep > 0 else []:
            # Marker first: a checkpoint without its marker is never resumed from.
            self.root.remove(f"{step_name(old)}.json")
            folder = self.root.child(step_name(old))
            folder.fs.rm(folder.url.split("://", 1)[-1] if not folder.is_local else folder.url, recursive=True)


def read_marker(folder: DataFolder) -> dict:
    """The commit marker beside checkpoint `folder`; one-line error if it is not complete."""
    parent_url, name = folder.url.rstrip("/").rsplit("/", 1)
    parent = DataFolder(parent_url, folder.storage_options)
    if not parent.exists(f"{name}.json"):
        raise UserError(f"{folder.url}: not a complete checkpoint (no {name}.json marker beside it)")
    return parent.read_json(f"{name}.json")


def check_model(folder: DataFolder, model_name: str) -> dict:
    """The marker of complete checkpoint `folder`; one-line error if it is of another model."""
    meta = read_marker(folder)
    if meta.get("model") != model_name:
        raise UserError(f"{folder.url}: checkpoint of model {meta.get('model')!r}, "
                        f"but this run trains {model_name!r}")
    return meta


def load(folder: DataFolder, model, optimizer, model_name: str) -> dict:
    """Load checkpoint `folder` into the (already sharded) model and optimizer; returns its marker."""
    meta = check_model(folder, model_name)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, storage_reader=_reader(folder))
    except Exception as exc:  # noqa: BLE001 - shape or key mismatch: a different architecture
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{folder.url}: cannot load checkpoint into {model_name}: {first}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return meta


def export_open_clip(model, output: DataFolder, rel: str, rank: int) -> None:
    """Gather the full weights and write a plain open_clip state_dict (rank 0).

    The file loads with open_clip.create_model_and_transforms(name, pretrained=path).
    """
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.pt")
            torch.save({k: v.detach().float().contiguous() for k, v in full.items()}, path)
            output.put_file(path, rel)
    dist.barrier()
