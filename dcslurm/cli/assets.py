"""`dcslurm assets`: the published baseline assets, fetched with their sha256, or local copies verified.

URLs and hashes are those DataComp's `baselines/utils.py` publishes. Every filter
takes a local path instead, so a cluster without internet copies files in with
`dcslurm assets fetch NAME --from PATH` (verified the same way).
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from dcslurm.core.errors import UserError
from dcslurm.core.storage import cache_dir, sha256_file

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Baseline assets (ImageNet-21k synsets, ImageNet-1k L/14 embeddings, centroids, lid.176).")
console = Console()

_BASE = "https://github.com/sagadre/datacomp_baseline_assets/releases/download/v0.1.0-alpha/"


@dataclass(frozen=True)
class Asset:
    name: str
    url: str
    sha256: str
    filename: str
    use: str


ASSETS: dict[str, Asset] = {a.name: a for a in [
    Asset("imagenet21k_wordnet_ids", _BASE + "imagenet21k_wordnet_ids.txt",
          "66362bdedf36d933382edca5493fc562dcc17128ce36403c9e730a75f48cb2f2", "imagenet21k_wordnet_ids.txt",
          "text_based(synsets=...)"),
    *[Asset(f"in1k_clip_vit_l14_{i}", _BASE + f"in1k_clip_vit_l14_{i}.pt", h, f"in1k_clip_vit_l14_{i}.pt",
            "image_based(targets=.../in1k_clip_vit_l14_*.pt)")
      for i, h in enumerate([
          "304990fd492f40ba90072b80af78d6e8edcab9d042476ef513e03441cf53743b",
          "72f008e6aa3bfb54174fa322963215337f843fc90fd642a9dccc815dd9e7ee76",
          "83c3cc6503b8a50a22cac7023ca6cd61b130ab9725db2a7519f1bec5cabf5493",
          "83faa289f847799ddcd438e5b74df1cb5973c345674896d10ba31ea48bc63804",
          "067a45f4a140a93371876510a2fd9198a89ac1d194ae4063a51b45a6da69cadf"])],
    *[Asset(f"{scale}_centroids", _BASE + f"{scale}_centroids_l14.pt", h, f"{scale}_centroids_l14.pt",
            "image_based(centroids=...)")
      for scale, h in [
          ("small", "23c66a05e49ad77283c1e2b33355c7eb088ac332a944c97ff85d5dfd48a5b251"),
          ("medium", "028b1721b1d0f139c565b6b0ac99f8a1756f4bae89c36b0ec6d1c6ea9b6f112d"),
          ("large", "04eeab1069d3540c246cf7ce69323147351a474017fc472e4c50a018ca32240b"),
          ("xlarge", "3f62e5f8ae3a715ce84e422846fcfce1536d184455ea234790c4a6465c4c6726")]],
    Asset("fasttext", "https://dl.fbaipublicfiles.com/fasttext/supervised-models/lid.176.bin",
          "7e69ec5451bc261cc7844e49e4792a85d7f09c06789ec800fc4a44aec362764e", "lid.176.bin",
          "basic, text_based, image_based: language ID of every term that names no lid_model="),
]}


def default_dir() -> str:
    return cache_dir("assets")




def get_asset(name: str) -> Asset:
    if name not in ASSETS:
        raise UserError(f"unknown asset {name!r} (known: {', '.join(ASSETS)})")
    return ASSETS[name]


def fetch(name: str, dest_dir: str | None = None, source: str | None = None, expected: str | None = None) -> str:
    """Path of asset `name` in `dest_dir`, verified against its sha256.

    A file already there with the right hash is kept; else it is copied from
    `source` (a local path) or downloaded, hashed while written under a temp
    name, and renamed into place only if the hash matches.
    """
    asset = get_asset(name)
    want = expected or asset.sha256
    dest_dir = dest_dir or default_dir()
    os.makedirs(dest_dir, exist_ok=True)
    target = os.path.join(dest_dir, asset.filename)
    if os.path.exists(target) and not os.path.isfile(target):
        raise UserError(f"{target}: exists and is not a regular file")
    if os.path.isfile(target) and sha256_file(target) == want:
        return target
    tmp = os.path.join(dest_dir, f".tmp-{uuid.uuid4().hex}-{asset.filename}")
    h = hashlib.sha256()
    try:
        if source is not None:
            if not os.path.isfile(source):
                raise UserError(f"{source}: no such file")
            src = open(source, "rb")
        else:
            try:
                src = urllib.request.urlopen(asset.url, timeout=60)
            except OSError as exc:
                raise UserError(f"{asset.url}: download failed ({exc}); copy the file in with --from PATH") from None
        with src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 22):
                h.update(chunk)
                out.write(chunk)
        got = h.hexdigest()
        if got != want:
            raise UserError(f"{source or asset.url}: sha256 {got} does not match the published {want} for {name}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@app.command("list")
def list_assets(
    dest: Optional[str] = typer.Option(None, "--dir", help="Asset folder (default ~/.cache/dcslurm/assets)."),
) -> None:
    """The assets, where each goes, and whether a verified copy is present."""
    folder = dest or default_dir()
    table = Table(title=f"Assets in {folder}")
    for col in ("name", "file", "used by", "present"):
        table.add_column(col)
    for a in ASSETS.values():
        path = os.path.join(folder, a.filename)
        state = ("ok" if sha256_file(path) == a.sha256 else "BAD HASH") if os.path.isfile(path) else "-"
        table.add_row(a.name, a.filename, a.use, state)
    console.print(table)


@app.command("fetch")
def fetch_cmd(
    name: str = typer.Argument(..., help="Asset name (see `dcslurm assets list`)."),
    dest: Optional[str] = typer.Option(None, "--dir", help="Asset folder (default ~/.cache/dcslurm/assets)."),
    source: Optional[str] = typer.Option(None, "--from", help="Copy this local file instead of downloading."),
) -> None:
    """Download (or copy in) an asset and verify its published sha256."""
    path = fetch(name, dest, source)
    console.print(f"{name}: {path} (sha256 ok)")


@app.command("verify")
def verify_cmd(name: str = typer.Argument(...), path: str = typer.Argument(..., help="Local file to check.")) -> None:
    """Check a local file against an asset's published sha256."""
    asset = get_asset(name)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    got = sha256_file(path)
    if got != asset.sha256:
        raise UserError(f"{path}: sha256 {got} does not match the published {asset.sha256} for {name}")
    console.print(f"{path}: sha256 ok for {name}")



