"""`dcslurm results`: the leaderboard of every run's eval results under some URLs."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from dcslurm.results import (COLUMNS, RESULTS_FILE, RunResults, format_score, gather, plot, read_run,
                             table_rows, to_csv, to_json, to_markdown)

console = Console()


def results_table(runs: list[RunResults], title: str = "Evaluation results") -> Table:
    """A rich table: run, scale, filter, subset size, DataComp's five numbers,
    extra tasks, and which of the 38 tasks are missing."""
    header, rows = table_rows(runs)
    table = Table(title=title)
    numeric_from, numeric_to = 3, len(header) - 1
    for i, col in enumerate(header):
        table.add_column(col.replace("_", " "), justify="right" if numeric_from <= i < numeric_to else "left",
                         overflow="fold")
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            if i == 3:
                cells.append("-" if v is None else f"{v:,}")
            elif 4 <= i < numeric_to:
                cells.append("[dim]missing[/dim]" if v is None else format_score(v))
            else:
                cells.append("-" if v in (None, "") else str(v))
        table.add_row(*cells)
    return table


def register(app: typer.Typer) -> None:
    """Add the top-level `results` command to the main CLI."""

    @app.command()
    def results(
        urls: list[str] = typer.Argument(..., help="Run folders, folders of runs, or results .jsonl files "
                                                  "(local paths or s3://...)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
        as_csv: bool = typer.Option(False, "--csv", help="Print CSV."),
        as_markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table."),
        plot_path: Optional[str] = typer.Option(None, "--plot", help="Write a PNG: average vs scale per "
                                                                      "filter, and per-group bars."),
        endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for s3:// URLs."),
    ) -> None:
        """Gather every run's eval results and aggregate them as DataComp does
        (ImageNet, ImageNet dist. shifts, VTAB, retrieval, 38-task average).
        Missing tasks are shown as missing, never averaged as zero."""
        from dcslurm.storage import s3fs_options

        runs = gather(list(urls), s3fs_options(endpoint_url=endpoint_url))
        if as_json:
            print(to_json(runs))
        elif as_csv:
            print(to_csv(runs), end="")
        elif as_markdown:
            print(to_markdown(runs), end="")
        else:
            console.print(results_table(runs))
            _print_notes(runs)
        if plot_path:
            plot(runs, plot_path)
            if not (as_json or as_csv or as_markdown):
                console.print(f"plot written to {plot_path}")


def _print_notes(runs: list[RunResults]) -> None:
    for r in runs:
        if r.aggregate.missing and r.aggregate.n_scored:
            console.print(f"{r.name}: {len(r.aggregate.missing)} of 38 tasks missing: "
                          f"{', '.join(r.aggregate.missing)} ({', '.join(c for c in COLUMNS if r.aggregate.scores[c] is None)} "
                          f"not computed)")


def after_run(cfg, result) -> None:
    """After a local run: show the run's results table if the run has an eval step."""
    if "eval" not in cfg.selected_stages():
        return
    run = cfg.folder()
    if not run.exists(RESULTS_FILE):
        return
    runs = [read_run(run)]
    console.print(results_table(runs, title=f"Evaluation results of {cfg.run_url}"))
    per_task = Table(title="Per task (main metric)")
    per_task.add_column("task")
    per_task.add_column("main metric", justify="right")
    for name, rec in runs[0].records.items():
        per_task.add_row(name, format_score(rec["metrics"].get("main_metric")))
    console.print(per_task)
