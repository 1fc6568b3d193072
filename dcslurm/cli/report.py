"""`dcslurm report download RUN`, and the download section of `dcslurm status`.

Numbers come from the per-shard `_stats.json` files img2dataset writes (every
shard that finished, including those of tasks not yet committed), and bytes from
the shards' .tar sizes.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from dcslurm.core.humanize import human_bytes
from dcslurm.core.markers import done_indexes
from dcslurm.core.plan import Plan, read_plan
from dcslurm.core.storage import DataFolder, s3fs_options

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Reports on a run's stages.")
console = Console()

DOWNLOAD_STEP = "download"


@app.callback()
def _group() -> None:
    """Reports on a run's stages."""  # a callback keeps `report` a group even with one command


@dataclass
class DownloadReport:
    run_url: str
    tasks: int
    tasks_done: int
    totals: object  # jobs.download.stats.DownloadTotals
    bytes: int

    def to_dict(self) -> dict:
        t = self.totals
        return {
            "run": self.run_url, "tasks": self.tasks, "tasks_done": self.tasks_done, "shards": t.shards,
            "samples": t.samples, "successes": t.successes, "success_rate": round(t.success_rate, 4),
            "failed_to_download": t.failed_to_download, "failed_to_resize": t.failed_to_resize,
            "failures": dict(t.failures.most_common()), "messages": dict(t.messages.most_common(20)),
            "bytes": self.bytes, "wall_seconds": round(t.wall_seconds, 3),
            "samples_per_second": round(t.samples_per_second, 2),
        }


def download_report(run: DataFolder, plan: Plan | None = None, workers: int = 16) -> DownloadReport:
    """Aggregate every `_stats.json` under RUN/download (read in parallel)."""
    from jobs.download.stats import STATS_SUFFIX, DownloadTotals, read_stats_file

    plan = plan or read_plan(run)
    step = plan.step(DOWNLOAD_STEP)
    folder = run.child(step.stage)
    names = folder.list()
    stats_names = [n for n in names if n.endswith(STATS_SUFFIX)]
    tars = [n for n in names if n.endswith(".tar")]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        stats = list(pool.map(lambda n: read_stats_file(folder, n), stats_names))
        done_tars = [n for n in tars if n[: -len(".tar")] + STATS_SUFFIX in set(stats_names)]
        sizes = list(pool.map(folder.size, done_tars))
    totals = DownloadTotals()
    for s in stats:
        if s is not None:
            totals.add(s)
    return DownloadReport(run_url=run.url, tasks=step.n_tasks, tasks_done=len(done_indexes(run, step.name)),
                          totals=totals, bytes=sum(sizes))


def download_report_from_markers(run: DataFolder, plan: Plan) -> DownloadReport:
    """The same numbers from the committed tasks' markers only: one read per task,
    cheap enough for every `dcslurm status` (shards of running tasks are not counted)."""
    from dcslurm.core.markers import read_marker
    from jobs.download.stats import DownloadTotals

    step = plan.step(DOWNLOAD_STEP)
    totals, written = DownloadTotals(), 0
    for i in sorted(done_indexes(run, step.name)):
        marker = read_marker(run, step.name, i)
        if marker is None:
            continue
        stats = marker.get("stats") or {}
        totals.add_task(stats, float(marker.get("started", 0.0)), float(marker.get("finished", 0.0)))
        written += int(stats.get("bytes", 0))
    return DownloadReport(run_url=run.url, tasks=step.n_tasks, tasks_done=len(done_indexes(run, step.name)),
                          totals=totals, bytes=written)




def print_download_report(report: DownloadReport, out: Console) -> None:
    t = report.totals
    out.print(f"[bold]Download[/bold]: {report.tasks_done:,}/{report.tasks:,} tasks committed, "
              f"{t.shards:,} shards finished")
    out.print(f"samples tried {t.samples:,}, succeeded {t.successes:,}: success rate "
              f"[bold]{100 * t.success_rate:.1f}%[/bold]; failed to download {t.failed_to_download:,}, "
              f"failed to resize {t.failed_to_resize:,}")
    out.print(f"written {human_bytes(report.bytes)} of shards; {t.samples_per_second:,.1f} samples/s "
              f"over {t.wall_seconds:,.1f} s (first start to last end)")
    if t.failures:
        table = Table(title="Failures by reason")
        table.add_column("reason")
        table.add_column("samples", justify="right")
        table.add_column("% of tried", justify="right")
        for reason, n in t.failures.most_common():
            table.add_row(reason, f"{n:,}", f"{100 * n / t.samples:.1f}")
        out.print(table)


@app.command()
def download(
    run: str = typer.Argument(..., help="The run folder URL (local path or s3://...)."),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for s3:// run folders."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Samples tried, succeeded, success rate, failures by reason, bytes written, samples/s."""
    folder = DataFolder(run, s3fs_options(endpoint_url=endpoint_url))
    plan = read_plan(folder)
    folder = DataFolder(plan.run_url, {**plan.storage_options, **folder.storage_options})
    report = download_report(folder, plan)
    if as_json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print_download_report(report, console)


def status_section(plan: Plan, run_url: str, out: Console) -> None:
    """`dcslurm status`: the download report when the run has a download step."""
    if not any(s.name == DOWNLOAD_STEP for s in plan.steps):
        return
    folder = DataFolder(plan.run_url, plan.storage_options)
    print_download_report(download_report_from_markers(folder, plan), out)
    out.print("(committed tasks only; all finished shards: dcslurm report download RUN)")
