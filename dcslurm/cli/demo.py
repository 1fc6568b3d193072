"""`dcslurm demo`: the whole workflow on the offline demo pool, from one command."""

from __future__ import annotations

import os
import time
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err = Console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add the top-level `demo` command to the main CLI."""

    @app.command()
    def demo(
        out: str = typer.Option("dcslurm-demo", "--out", help="Local folder for the pool, sweep files and sweeps."),
        samples: int = typer.Option(2000, help="Demo pool size."),
        seeds: int = typer.Option(3, help="Training seeds per filter (seed 0 is the full pipeline)."),
        executor: str = typer.Option("local", help="local (this machine) or slurm (the cluster)."),
        train_samples: Optional[int] = typer.Option(
            None, "--train-samples", help="Samples seen per training run (default 10,240; 0 = the tiny "
                                          "scale's 40,960)."),
        config_only: bool = typer.Option(False, "--config-only", help="Write the sweep files and stop."),
    ) -> None:
        """Run the DataComp workflow on the demo pool as two sweeps: no filter vs CLIP-score
        top 30%, each trained with SEEDS seeds, then print the leaderboard (docs/DEMO.md)."""
        from dcslurm.demo import workflow as d

        settings = d.DemoSettings(out=out, samples=samples, seeds=seeds, executor=executor,
                                  train_samples=d.DEFAULT_TRAIN_SAMPLES if train_samples is None else train_samples)
        settings.validate()
        layout = d.DemoLayout(os.path.abspath(settings.out))
        if config_only:
            paths = d.write_sweep_files(settings)
            console.print(f"demo: {len(paths)} sweeps of {settings.seeds} seeds each; sweep files in "
                          f"{layout.configs}")
            console.print("write the pool, serve it (the download's http_proxy) while the sweeps run, and run "
                          "them in this order (the second embeds with a model the first trains):")
            console.print(f"  dcslurm pool demo --out {layout.pool} --samples {settings.samples} "
                          f"--files {settings.files} --heldout {settings.heldout}")
            console.print(f"  dcslurm pool serve {layout.pool} &")
            for p in paths:
                console.print(f"  dcslurm sweep -c {p}")
            return
        started = time.time()
        d.ensure_pool(settings, log=console.print)
        # The pool's server lives as long as the demo's runs: their download fetches through it.
        with d.serve_pool(settings) as server:
            paths = d.write_sweep_files(settings, http_proxy=server.proxy_url)
            console.print(f"demo: {len(paths)} sweeps of {settings.seeds} seeds each; sweep files in "
                          f"{layout.configs}; the pool served on {server.proxy_url}")
            for p in paths:
                console.print(f"[bold]dcslurm sweep -c {p}[/bold]")
                failed = d.run_sweep(p, log=console.print)
                if failed:
                    for line in failed:
                        err.print(f"[red]{line}[/red]")
                    name = os.path.basename(p).removesuffix(".toml")
                    err.print(f"demo stopped: see `dcslurm sweep status {layout.sweep(name)}`")
                    raise typer.Exit(1)
        print_results(settings.out)
        console.print(f"demo finished in {time.time() - started:.0f} s; results: dcslurm results {layout.sweeps}")


def print_results(out: str) -> None:
    """The leaderboard of the demo's runs (per filter: mean ± std over seeds of each demo
    task, chance, samples trained), then what each filter trained on by noise kind."""
    from dcslurm.cli.results import print_leaderboard
    from dcslurm.demo import workflow as d

    board = d.demo_leaderboard(out)
    n = max((len(r.runs) for r in board.rows), default=0)
    console.print(f"Per filter: mean±std over {n} seeds (sample std), chance beside it")
    print_leaderboard(board, console)
    composition = d.noise_composition(out)
    if composition:
        noise = Table(title="What each filter trained on, by the pool's noise kind (ground truth no filter reads)")
        header, rows = d.noise_rows(composition)
        for i, col in enumerate(header):
            noise.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
        for row in rows:
            noise.add_row(*row)
        console.print(noise)
    sweeps = d.DemoLayout(os.path.abspath(out)).sweeps
    console.print(f"DataComp's 38 tasks are not evaluated in the demo; `dcslurm results --runs {sweeps}` "
                  "lists each run.")
