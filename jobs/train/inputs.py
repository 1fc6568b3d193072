"""Where the training shards are, and one-line errors for bad ones (light: no torch,
so the stage's preflight can check them on the login node at submit)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from dcslurm.core.errors import UserError
from dcslurm.core.shards import parse_brace_pattern
from dcslurm.core.storage import DataFolder


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None = None  # from the reshard size table, when known


def list_shards(folder_or_pattern: str, storage_options: dict) -> list[Shard]:
    """The .tar shards of a folder or a {a..b} pattern, with sizes from sizes.json if present."""
    if "{" in folder_or_pattern:
        units = parse_brace_pattern(folder_or_pattern)
        return [Shard(units.name(i)) for i in range(units.count)]
    folder = DataFolder(folder_or_pattern, storage_options)
    if not folder.exists():
        raise UserError(f"{folder.url}: training data folder does not exist")
    names = folder.list(suffix=".tar")
    sizes = read_size_table(folder)
    return [Shard(folder.url_of(n), sizes.get(n)) for n in names]


def read_size_table(folder: DataFolder) -> dict[str, int]:
    """{shard name: samples} from the reshard stage's sizes.json ({} if absent or unreadable)."""
    if not folder.exists("sizes.json"):
        return {}
    table = folder.read_json("sizes.json")
    if isinstance(table, dict):
        for key in ("shards", "sizes"):
            if isinstance(table.get(key), (dict, list)):
                table = table[key]
                break
    out: dict[str, int] = {}
    if isinstance(table, dict):
        items = table.items()
    elif isinstance(table, list):
        items = ((e.get("shard") or e.get("name") or e.get("url"), e.get("samples") or e.get("count"))
                 for e in table if isinstance(e, dict))
    else:
        items = ()
    for name, count in items:
        if isinstance(name, str) and isinstance(count, int):
            out[os.path.basename(name)] = count
    return out


def check_shards(shards: list[Shard], where: str, storage_options: dict, what: str = "training shard") -> None:
    """One-line errors for no shards, a missing shard, or an empty one (one listing per folder)."""
    if not shards:
        raise UserError(f"{where}: no .tar {what}s")
    sizes: dict[str, dict[str, int]] = {}
    for shard in shards:
        parent, name = shard.url.rsplit("/", 1)
        if parent not in sizes:
            folder = DataFolder(parent, storage_options)
            sizes[parent] = folder.list_sizes(suffix=".tar")
        size = sizes[parent].get(name)
        if size is None:
            raise UserError(f"{shard.url}: {what} does not exist")
        if shard.samples == 0 or size == 0 or (size <= 20480 and _no_members(shard.url, storage_options)):
            raise UserError(f"{shard.url}: {what} is empty")


def _no_members(url: str, storage_options: dict) -> bool:
    """True for a tar with no members (its first header block is zeros); read only for small files."""
    parent, name = url.rsplit("/", 1)
    with DataFolder(parent, storage_options).open(name) as f:
        return not any(f.read(512))


# -- checkpoints (light: the preflight reads the markers on the login node) ---------

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
