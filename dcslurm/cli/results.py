"""`dcslurm results`: the leaderboard of every run's eval results under some URLs."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from dcslurm.datacomp.results import (
    COLUMNS,
    RESULTS_FILE,
    Leaderboard,
    LeaderRow,
    RunResults,
    leaderboard,
    leaderboard_csv,
    leaderboard_markdown,
    plot_leaderboard,
    read_run,
    to_csv,
    to_json,
    to_markdown,
)

console = Console()

NAME_WIDTH = 22  # "KITTI Vehicle Distance", "ImageNet dist. shifts": the longest task and group names
LABEL_WIDTH = 16  # a filter's or run's column header; longer ones end in "…" (the legend has them whole)


def leaderboard_tables(board: Leaderboard, width: int, per_task: bool = False) -> list[Table]:
    """The leaderboard as rich tables that fit `width` columns: a table per scale, a
    row per group / task (chance beside it), a column per filter (or run), "mean±std"
    over seeds in each cell. Filters that do not fit go to a next table, so no cell
    is ever folded (a wide table at 80 columns folds cells to a character per line)."""
    tables = []
    columns = board.columns(per_task)
    for scale in board.scales:
        rows = [r for r in board.rows if r.scale == scale]
        chunk: list[LeaderRow] = []
        for r in rows:
            if chunk and _measure(_table(board, scale, chunk + [r], columns), width) > width:
                tables.append(_table(board, scale, chunk, columns))
                chunk = []
            chunk.append(r)
        if chunk:
            tables.append(_table(board, scale, chunk, columns))
    return tables


def _measure(table: Table, width: int) -> int:
    measuring = Console(width=10_000)
    return Measurement.get(measuring, measuring.options, table).maximum


def _table(board: Leaderboard, scale: str | None, rows: list[LeaderRow], columns: list[str]) -> Table:
    what = "mean±std over seeds" if board.by == "filter" else "per run"
    table = Table(title=f"Scale {scale or '?'}: {what}", box=box.SIMPLE_HEAD, title_justify="left")
    names = min(max(len(n) for n in [*columns, "training samples"]), NAME_WIDTH)
    table.add_column("", no_wrap=True, overflow="ellipsis", min_width=names, max_width=names)
    table.add_column("chance", justify="right", no_wrap=True, min_width=6)
    for r in rows:
        # as wide as its widest number, or its label up to LABEL_WIDTH: numbers are never cut
        w = max([len(_cell(r, c, plain=True)) for c in columns] + [min(len(r.label), LABEL_WIDTH), 5])
        table.add_column(r.label, justify="right", no_wrap=True, overflow="ellipsis", min_width=w, max_width=w)
    head: list[list[str]] = []
    if board.by == "filter":
        head.append(["seeds", "", *(f"{len(r.runs)}" + (f" (+{len(r.unfinished)})" if r.unfinished else "")
                                    for r in rows)])
    else:
        seeds = [(r.runs + r.unfinished)[0].seed for r in rows]
        head.append(["seed", "", *("-" if s is None else str(s) for s in seeds)])
    samples = [(r.train_samples, r.subset_size) for r in rows]
    if any(t is not None for t, _ in samples):
        head.append(["training samples", "", *("-" if t is None else f"{t:,}" for t, _ in samples)])
    if any(s is not None for _, s in samples):
        head.append(["subset size", "", *("-" if s is None else f"{s:,}" for _, s in samples)])
    for i, cells in enumerate(head):
        table.add_row(*cells, end_section=i == len(head) - 1)
    for c in columns:
        chance = board.chance.get(c)
        table.add_row(c, "-" if chance is None else f"{chance:.3f}", *(_cell(r, c) for r in rows),
                      end_section=bool(board.groups) and c == board.groups[-1])
    return table


def _cell(r: LeaderRow, column: str, plain: bool = False) -> str:
    if r.runs:
        return r.cell(column)
    if r.unfinished:
        return "not finished" if plain else "[dim]not finished[/dim]"
    return "-"


def print_leaderboard(board: Leaderboard, out: Console, per_task: bool = False) -> None:
    """The tables, then what a label stands for, unfinished runs and missing tasks."""
    for t in leaderboard_tables(board, out.width, per_task):
        out.print(t)
    if board.by == "filter":
        for label, spec in dict.fromkeys((r.label, r.filter) for r in board.rows if r.label != r.filter):
            out.print(f"{label}: {spec}", markup=False, highlight=False)
    else:
        by_filter: dict[str, list[str]] = {}
        for r in board.rows:
            by_filter.setdefault(r.filter, []).append(r.label)
        for spec, labels in by_filter.items():
            out.print(f"filter {spec}: {', '.join(labels)}", markup=False, highlight=False)
    if any(r.unfinished for r in board.rows):
        out.print("Not finished yet (the (+N) of `seeds`; not in any mean):")
        for r in board.rows:
            for u in r.unfinished:
                out.print(f"  {u.name} (seed {u.seed}): {u.status}", markup=False, highlight=False)
    if not per_task and len(board.columns(True)) > len(board.columns()):
        out.print("--tasks shows every task.")
    for r in board.rows:
        for run in r.runs:
            agg = run.aggregate
            if agg.missing and agg.n_scored:
                gaps = ", ".join(c for c in COLUMNS if agg.scores[c] is None)
                out.print(f"{run.name}: {len(agg.missing)} of {agg.n_selected} tasks missing: "
                          f"{', '.join(agg.missing)} ({gaps} not computed)", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add the top-level `results` command to the main CLI."""

    @app.command()
    def results(
        urls: list[str] = typer.Argument(..., help="Run folders, folders of runs (a sweep), or results .jsonl "
                                                  "files (local paths or s3://...)."),
        runs: bool = typer.Option(False, "--runs", help="One entry per run instead of per filter."),
        tasks: bool = typer.Option(False, "--tasks", help="Every task, not only DataComp's groups and the "
                                                          "tasks outside them (table, Markdown, plot)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
        as_csv: bool = typer.Option(False, "--csv", help="Print CSV."),
        as_markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table."),
        plot_path: Optional[str] = typer.Option(None, "--plot", help="Write a PNG: a panel per group / task, a bar "
                                                                      "per filter, std over seeds, chance lines."),
        endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for s3:// URLs."),
    ) -> None:
        """The leaderboard: per filter (runs grouped by their filter spec, each seed a
        replicate), the mean ± sample std over seeds of DataComp's groups (ImageNet,
        ImageNet dist. shifts, VTAB, Retrieval, 38-task average) and of every other
        task, the user's own included, beside each task's chance score. Unfinished
        runs are listed, never averaged; missing tasks are never averaged as zero."""
        from dcslurm.core.storage import s3fs_options

        board = leaderboard(list(urls), s3fs_options(endpoint_url=endpoint_url), by="run" if runs else "filter")
        finished = [run for r in board.rows for run in r.runs]
        if runs and as_json:
            print(to_json(finished))
        elif runs and as_csv:
            print(to_csv(finished), end="")
        elif runs and as_markdown:
            print(to_markdown(finished), end="")
        elif as_json:
            print(json.dumps(board.to_dict(), indent=1))
        elif as_csv:
            print(leaderboard_csv(board), end="")
        elif as_markdown:
            print(leaderboard_markdown(board, per_task=tasks), end="")
        else:
            print_leaderboard(board, console, per_task=tasks)
        if plot_path:
            plot_leaderboard(board, plot_path, board.columns(tasks))
            if not (as_json or as_csv or as_markdown):
                console.print(f"plot written to {plot_path}", markup=False, highlight=False)


def run_tables(run: RunResults, width: int | None = None) -> list[Table]:
    """One run's results at `width` (the console's): its groups and every task, with chance."""
    return leaderboard_tables(leaderboard([run], by="run"), width or console.width, per_task=True)


def after_run(cfg, result) -> None:
    """After a local run: show the run's results table if the run has an eval step."""
    if "eval" not in cfg.selected_stages():
        return
    run = cfg.folder()
    if not run.exists(RESULTS_FILE):
        return
    board = leaderboard([read_run(run)], by="run")
    console.print(f"Evaluation results of {cfg.run_url}", markup=False, highlight=False)
    print_leaderboard(board, console, per_task=True)
