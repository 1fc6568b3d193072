"""`dcslurm sweep`: one pool, a shared upstream, N filters x seeds (dcslurm/core/sweep.py)."""

from __future__ import annotations

import json
import time
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, invoke_without_command=True,
                  help="Run a sweep (-c sweep.toml): a shared upstream (download, embed) and branches of "
                       "filter x seeds, each filter -> reshard -> train -> eval; or its status / cancel.")
console = Console()
err = Console(stderr=True)


@app.callback()
def sweep(
    ctx: typer.Context,
    config: Optional[str] = typer.Option(None, "--config", "-c", help="The sweep's TOML file."),
    executor: Optional[str] = typer.Option(None, help="slurm or local (default: the file's executor kind)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check and plan every piece; queue nothing."),
) -> None:
    """Queue (SLURM) or run (local) every piece of the sweep; committed tasks are skipped.

    `dcslurm sweep status SWEEP` and `dcslurm sweep cancel SWEEP` act on every piece."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None:
        raise typer.BadParameter("name the sweep file: dcslurm sweep -c sweep.toml", param_hint="--config")
    from dcslurm.core import sweep as sw

    s = sw.load_sweep(config, executor=executor)
    if dry_run:
        sw.check_sweep(s)
        table = Table(title=f"Plan of sweep {s.folder}")
        for col in ("piece", "stages", "steps", "tasks", "waits for", "folder"):
            table.add_column(col, justify="right" if col == "tasks" else "left", overflow="fold",
                             no_wrap=col in ("piece", "waits for"))
        for pp in sw.plan_sweep(s):
            table.add_row(pp.piece.name, ",".join(pp.piece.config.selected_stages()), str(len(pp.plan.steps)),
                          f"{sum(st.n_tasks for st in pp.plan.steps):,}", pp.waits_for or "-", pp.piece.folder)
        console.print(table)
        console.print(f"dry run: {len(s.pieces)} pieces; nothing written or queued")
        return
    started = time.time()
    results = sw.submit_sweep(s, log=console.print)
    from dcslurm.core.executors import queues_jobs

    slurm = queues_jobs(s.pieces[0].config)
    failed = [r for r in results if r.failed or r.skipped]
    for r in results:
        if r.failed:
            err.print(f"[red]{r.piece}: {', '.join(f'{k} ({len(v)} tasks)' for k, v in r.failed.items())} failed[/red]")
        elif r.skipped:
            err.print(f"[red]{r.piece}: not run: {r.skipped}[/red]")
    if slurm:
        n = sum(len(r.jobs) for r in results)
        console.print(f"queued {n} jobs for {len(results)} pieces; follow with: dcslurm sweep status {s.folder}")
    elif not failed:
        console.print(f"sweep done in {time.time() - started:.0f} s: {len(results)} pieces in {s.folder}; "
                      f"results: dcslurm results {s.folder}/runs")
    if failed:
        raise typer.Exit(1)


@app.command()
def status(
    sweep_dir: str = typer.Argument(..., metavar="SWEEP", help="The sweep folder."),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for s3:// sweep folders."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Per piece: done / running / pending / failed / not submitted (`dcslurm status` of a piece has the rest)."""
    from dcslurm.core.storage import s3fs_options
    from dcslurm.core.sweep import sweep_status

    pieces = sweep_status(sweep_dir, s3fs_options(endpoint_url=endpoint_url))
    if as_json:
        print(json.dumps([p.__dict__ for p in pieces], indent=1))
        return
    table = Table(title=f"Status of sweep {sweep_dir}")
    for col in ("piece", "state", "tasks done", "failed steps", "folder"):
        table.add_column(col, justify="right" if col == "tasks done" else "left", overflow="fold",
                         no_wrap=col == "piece")
    for p in pieces:
        table.add_row(p.piece, p.state, f"{p.done:,}/{p.tasks:,}" if p.tasks else "-",
                      ", ".join(p.failed_steps) or "-", p.folder)
    console.print(table)


@app.command()
def cancel(
    sweep_dir: str = typer.Argument(..., metavar="SWEEP", help="The sweep folder."),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for s3:// sweep folders."),
) -> None:
    """Cancel every piece's queued and running jobs (committed outputs stay)."""
    from dcslurm.core.storage import s3fs_options
    from dcslurm.core.sweep import cancel_sweep

    cancelled = cancel_sweep(sweep_dir, s3fs_options(endpoint_url=endpoint_url))
    for piece, what in cancelled.items():
        console.print(f"{piece}: cancelled {', '.join(what)}")
    if not cancelled:
        console.print("nothing queued or running")
