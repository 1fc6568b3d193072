"""`dcslurm containers ...`: build, push, pull and list the stages' Apptainer images."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from dcslurm.core.containers import (
    KINDS,
    build_image,
    default_image_dir,
    kind_for_stage,
    list_images,
    pull_images,
    push_image,
    write_lock,
)
from dcslurm.core.storage import s3fs_options

app = typer.Typer(no_args_is_help=True, help="Apptainer images for the stages (build, push, pull, list).")
console = Console()


def _kinds(stage: Optional[str], kind: Optional[str]) -> list[str]:
    if stage:
        return [kind_for_stage(s.strip()) for s in stage.split(",") if s.strip()]
    return [kind] if kind else list(KINDS)


@app.command()
def build(
    stage: Optional[str] = typer.Option(None, help="Build only the image these stages run in (comma-separated)."),
    kind: Optional[str] = typer.Option(None, help="cpu or gpu (default: both, or what --stage needs)."),
    push: Optional[str] = typer.Option(None, help="Then upload to this folder URL (s3://bucket/images/ or a path)."),
    image_dir: Optional[str] = typer.Option(None, help="Local image folder (default $DCSLURM_IMAGE_DIR or "
                                                       "~/.cache/dcslurm/images)."),
    header: Optional[str] = typer.Option(None, help="Replace the definition's Bootstrap/From header: "
                                                    "'debootstrap' (Debian 12 from a mirror, no Docker Hub) "
                                                    "or the header text itself."),
    apptainer: str = typer.Option("apptainer", help="The apptainer command."),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for --push."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if an image with this tag exists."),
    source: Optional[Path] = typer.Option(None, help="The checkout to build (default: this package's)."),
) -> None:
    """Build the images (content-addressed: an existing tag is not rebuilt)."""
    for k in dict.fromkeys(_kinds(stage, kind)):
        result = build_image(k, image_dir, apptainer=apptainer, header=header, force=force, log=console.print,
                             root=source)
        if result.built:
            console.print(f"built {result.path} in {result.seconds:.0f} s")
        else:
            console.print(f"up to date: {result.path}")
        if push:
            pushed = push_image(result.path, push, s3fs_options(endpoint_url=endpoint_url))
            console.print(f"{'pushed to' if pushed else 'already in'} {push}")


@app.command()
def pull(
    url: str = typer.Argument(..., help="Folder URL the images were pushed to."),
    stage: Optional[str] = typer.Option(None, help="Only the image these stages need."),
    image_dir: Optional[str] = typer.Option(None, help="Local image folder."),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for s3:// URLs."),
) -> None:
    """Download the pushed images this host does not have (checked against their sha256)."""
    got = pull_images(url, image_dir, s3fs_options(endpoint_url=endpoint_url), kinds=_kinds(stage, None))
    if not got:
        console.print(f"no dcslurm images under {url}")
    for path, downloaded in got:
        console.print(f"{'pulled' if downloaded else 'already here'}: {path}")


@app.command("list")
def list_(image_dir: Optional[str] = typer.Option(None, help="Local image folder."),
          source: Optional[Path] = typer.Option(None, help="The checkout `current` refers to.")) -> None:
    """Images in the local image folder; `current` = built from this checkout."""
    images = list_images(image_dir, root=source)
    if not images:
        console.print(f"no images in {image_dir or default_image_dir()}")
        return
    table = Table(title=f"Images in {image_dir or default_image_dir()}")
    for col in ("kind", "tag", "MB", "current", "path"):
        table.add_column(col)
    for im in images:
        table.add_row(im.kind, im.tag, f"{im.bytes / 1e6:.0f}", "yes" if im.current else "", im.path)
    console.print(table)


@app.command()
def lock() -> None:
    """Rewrite containers/{cpu,gpu}.lock from the versions installed in this environment."""
    for k in KINDS:
        console.print(f"wrote {write_lock(k)}")
