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

import errno
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from dcslurm.core.errors import UserError
from dcslurm.core.storage import DataFolder
from jobs.train.inputs import check_model  # light: the preflight checks resume checkpoints with it too

_STEP = re.compile(r"^step-(\d{8})\.json$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


class DiskFull(RuntimeError):
    """A save ran out of space; its message is the one line `status` shows."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _says_no_space(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain; DCP re-raises a rank's error as text (CheckpointException)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return True
        if any(os.strerror(e) in str(exc) for e in _NO_SPACE):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _free_bytes(path: str) -> int | None:
    """Bytes free on the local filesystem holding `path` (None for object storage)."""
    if "://" in path:
        return None
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path or ".").free


def _state_bytes(state) -> int:
    """Bytes of the tensors this rank writes (a DTensor's local shard)."""
    from torch.utils._pytree import tree_leaves

    total = 0
    for t in tree_leaves(state):
        if isinstance(t, torch.Tensor):
            t = t.to_local() if hasattr(t, "to_local") else t
            total += t.numel() * t.element_size()
    return total


@contextmanager
def disk_full_is_one_line(path: str, needed: int):
    """Turn a save that ran out of space into DiskFull naming `path`. torch's zip writer
    (torch.save to a path, and DCP's per-rank files) drops the errno and says only
    "unexpected pos 704 vs 598", so a failed save on a filesystem with less room left than
    the save needs counts as disk full too."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        free = _free_bytes(path)
        if _says_no_space(exc) or (free is not None and free < needed):
            room = f" ({free:,} bytes free, about {needed:,} needed)" if free is not None else ""
            raise DiskFull(f"{path}: disk full: no space left on device{room}") from exc
        raise


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
        state = {"model": model_sd, "optim": optim_sd}
        with disk_full_is_one_line(folder.url, _state_bytes(state)):
            dcp.save(state, storage_writer=_writer(folder))
        dist.barrier()
        if rank == 0:
            with disk_full_is_one_line(f"{self.root.url}/{step_name(step)}.json", 0):
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
        weights = {k: v.detach().float().contiguous() for k, v in full.items()}
        needed = _state_bytes(weights)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.pt")
            with disk_full_is_one_line(path, needed):
                torch.save(weights, path)
            with disk_full_is_one_line(f"{output.url}/{rel}", needed):
                output.put_file(path, rel)
    dist.barrier()
