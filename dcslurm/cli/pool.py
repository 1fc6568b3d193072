"""`dcslurm pool demo` and `dcslurm pool inspect`."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from dcslurm.core.humanize import human_bytes
from dcslurm.core.storage import s3fs_options
from dcslurm.demo.pool import DEFAULT_SERVE_PORT

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Pools: inspect one, or generate the demo pool.")
console = Console()




@app.command()
def demo(
    out: str = typer.Option(..., "--out", help="Folder to write the pool to (local path or s3://...)."),
    samples: int = typer.Option(2000, help="Samples in the pool."),
    seed: int = typer.Option(0, help="Everything is a function of the seed."),
    files: int = typer.Option(4, help="Parquet files (one download task each by default)."),
    heldout: int = typer.Option(300, help="Labelled images kept out of the pool for evaluation."),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for s3:// folders."),
) -> None:
    """Generate the offline demo pool (rendered shapes with captions, plus realistic noise)."""
    from dcslurm.demo.pool import generate_demo_pool

    summary = generate_demo_pool(out, samples=samples, seed=seed, files=files, heldout=heldout,
                                 storage_options=s3fs_options(endpoint_url=endpoint_url))
    console.print(f"demo pool: {summary.samples:,} samples in {summary.files} parquet files, "
                  f"{summary.heldout} held-out images, {human_bytes(summary.bytes_served)} served; in {summary.url}")
    console.print("noise: " + ", ".join(f"{k} {v}" for k, v in summary.noise.items()))
    console.print(f"use it with:  \\[pool] metadata = \"{summary.url}\"   (docs/DEMO_POOL.md)")


@app.command()
def serve(
    pool: str = typer.Argument(..., help="The demo pool's folder (local path or s3://...)."),
    port: int = typer.Option(DEFAULT_SERVE_PORT, help="Port to listen on (0 = a free one; the sweep files of "
                                                      "`dcslurm demo --config-only` name the default)."),
    bind: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: reachable from compute nodes)."),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for s3:// folders."),
) -> None:
    """Serve a demo pool's URLs until interrupted: the proxy a run's [stages.download] http_proxy names."""
    import threading

    from dcslurm.core.storage import DataFolder
    from dcslurm.demo.pool import DemoPoolServer

    server = DemoPoolServer.for_pool(DataFolder(pool, s3fs_options(endpoint_url=endpoint_url)), port=port, bind=bind)
    with server:
        # Plain print, flushed: scripts read the address from a pipe (rich would wrap the line).
        print(f'serving {pool}: [stages.download] http_proxy = "{server.proxy_url}"  (Ctrl-C stops)', flush=True)
        try:
            threading.Event().wait()  # the server's thread answers; this one waits for Ctrl-C or SIGTERM
        except KeyboardInterrupt:
            pass


@app.command()
def inspect(
    url: str = typer.Argument(..., help="The pool's metadata folder (local path or s3://...)."),
    uids: bool = typer.Option(True, "--uids/--no-uids", help="Also read every uid (format, duplicates)."),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for s3:// folders."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Rows, parquet files, columns and a size estimate; exits 2 with a one-line error on a bad pool."""
    from dcslurm.datacomp.pool import inspect_pool

    report = inspect_pool(url, s3fs_options(endpoint_url=endpoint_url), uids=uids)
    if as_json:
        print(json.dumps({
            "url": report.url, "files": len(report.files), "rows": report.rows, "columns": list(report.columns),
            "metadata_bytes": report.metadata_bytes, "estimated_shard_bytes": report.estimated_shard_bytes,
            "npz_files": sum(f.has_npz for f in report.files), "uids_checked": report.uids_checked,
            "problems": report.problems,
            "per_file": [{"name": f.name, "rows": f.rows, "bytes": f.bytes, "npz": f.has_npz,
                          "problems": f.problems} for f in report.files],
        }, indent=1))
    else:
        table = Table(title=f"Pool {report.url}")
        for col in ("file", "rows", "size", "npz", "problem"):
            table.add_column(col, justify="right" if col in ("rows", "size") else "left")
        shown = report.files if len(report.files) <= 30 else [f for f in report.files if f.problems][:30]
        for f in shown:
            table.add_row(f.name, f"{f.rows:,}", human_bytes(f.bytes), "yes" if f.has_npz else "-",
                          f.problems[0].split(": ", 1)[-1] if f.problems else "")
        console.print(table)
        if len(shown) < len(report.files):
            console.print(f"({len(report.files) - len(shown)} more files without problems not listed)")
        console.print(f"{len(report.files):,} parquet files, {report.rows:,} rows, "
                      f"{human_bytes(report.metadata_bytes)} of metadata; "
                      f"{sum(f.has_npz for f in report.files):,} with .npz embeddings beside them")
        console.print(f"columns: {', '.join(report.columns)}")
        console.print(f"estimated image shards: {human_bytes(report.estimated_shard_bytes)} (35 KB a sample)")
        console.print("uids: " + ("checked (32 hex characters, no duplicates)" if report.uids_checked and report.ok
                                  else "checked" if report.uids_checked else "not checked (--no-uids)"))
    report.raise_first()
