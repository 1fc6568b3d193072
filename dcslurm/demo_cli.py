"""`dcslurm demo`: the whole workflow on the offline demo pool, from one command."""

from __future__ import annotations

import os
import time
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def register(app: typer.Typer) -> None:
    """Add the top-level `demo` command to the main CLI."""

    @app.command()
    def demo(
        out: str = typer.Option("dcslurm-demo", "--out", help="Local folder for the pool, configs and runs."),
        samples: int = typer.Option(2000, help="Demo pool size."),
        seeds: int = typer.Option(3, help="Training seeds per filter (seed 0 is the full pipeline)."),
        executor: str = typer.Option("local", help="local (this machine) or slurm (the cluster)."),
        train_samples: Optional[int] = typer.Option(
            None, "--train-samples", help="Samples seen per training run (default 10,240; 0 = the tiny "
                                          "scale's 40,960)."),
        config_only: bool = typer.Option(False, "--config-only", help="Write the run configs and stop."),
    ) -> None:
        """Run the DataComp workflow on the demo pool: no filter vs CLIP-score top 30%,
        each trained with SEEDS seeds, then print the results table (docs/DEMO.md)."""
        from dcslurm import demo as d

        settings = d.DemoSettings(out=out, samples=samples, seeds=seeds, executor=executor,
                                  train_samples=d.DEFAULT_TRAIN_SAMPLES if train_samples is None else train_samples)
        settings.validate()
        runs = d.write_configs(settings)
        layout = d.DemoLayout(settings.out)
        console.print(f"demo: {len(runs)} runs; configs in {layout.configs}")
        if config_only:
            for r in runs:
                console.print(f"  dcslurm submit -c {r.config_path}")
            return
        started = time.time()
        d.ensure_pool(settings, log=console.print)
        for r in runs:
            console.print(f"[bold]{r.name}[/bold] (filter {r.filter}, seed {r.seed}): dcslurm submit -c {r.config_path}")
            d.run_one(r, log=console.print)
        print_results(layout.runs, settings.seeds, settings.heldout)
        console.print(f"demo finished in {time.time() - started:.0f} s; results: dcslurm results {layout.runs}")


def print_results(runs_dir: str, seeds: int, heldout: int = 300) -> None:
    """Each run's demo-task scores (`dcslurm results` shows the same runs with DataComp's
    columns), then the mean ± std across seeds per filter."""
    from dcslurm import demo as d

    per_run = Table(title=f"Evaluation results of the demo runs ({runs_dir})")
    header, rows = d.run_rows(runs_dir, seeds)
    for i, col in enumerate(header):
        per_run.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        per_run.add_row(*row)
    console.print(per_run)
    summaries = d.summarize(runs_dir, seeds)
    n = max((len(s.seeds) for s in summaries), default=0)
    summary = Table(title=f"Per filter: mean±std over {n} seeds (sample std)")
    header, rows = d.summary_rows(summaries)
    for i, col in enumerate(header):
        summary.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        summary.add_row(*row)
    summary.add_row("chance", "", *(f"{v:.3f}" if v is not None else "-" for v in d.chance_row(heldout).values()))
    console.print(summary)
    out = os.path.dirname(os.path.abspath(runs_dir))
    composition = d.noise_composition(out)
    if composition:
        noise = Table(title="What each filter trained on, by the pool's noise kind (ground truth no filter reads)")
        header, rows = d.noise_rows(composition)
        for i, col in enumerate(header):
            noise.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
        for row in rows:
            noise.add_row(*row)
        console.print(noise)
    for name, spec in d.FILTER_SPECS.items():
        console.print(f"  {name}: {spec}")
    console.print(f"DataComp's 38 tasks are not evaluated in the demo; `dcslurm results {runs_dir}` "
                  "lists the same runs with DataComp's columns.")
