"""The `dcslurm` command line. Every user error is one line on stderr, exit 2."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import sys
import time
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from dcslurm.core.errors import UserError
from dcslurm.core.humanize import human_bytes
from dcslurm.core.scales import SCALES, estimate_train_gpu_hours

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run the DataComp workflow as SLURM array jobs (or on this machine).")
console = Console()
err = Console(stderr=True)

# Sub-command groups live beside the code they drive; each module defines `app`
# (a typer.Typer) and is registered under its name.
SUBCOMMANDS = {
    "pool": "dcslurm.cli.pool",
    "report": "dcslurm.cli.report",
    "filter": "dcslurm.cli.filter",
    "assets": "dcslurm.cli.assets",
    "evalsets": "dcslurm.cli.evalsets",
    "containers": "dcslurm.cli.containers",
    "audit": "dcslurm.cli.audit",
    "sweep": "dcslurm.cli.sweep",
}


def _stages_option(stages: Optional[str]) -> Optional[list[str]]:
    return [s.strip() for s in stages.split(",") if s.strip()] if stages else None


@app.command()
def scales(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """The compute scales: DataComp's Table 2, plus `debug` and `tiny`."""
    if as_json:
        print(json.dumps({name: s.to_dict() for name, s in SCALES.items()}, indent=1))
        return
    cells = {
        "scale": [s.name for s in SCALES.values()],
        "pool = samples seen": [f"{s.samples_seen:,}" for s in SCALES.values()],
        "model": [s.model for s in SCALES.values()],
        "batch": [f"{s.batch_size:,}" for s in SCALES.values()],
        "steps": [f"{s.steps:,}" for s in SCALES.values()],
        "lr": [f"{s.lr:g}" for s in SCALES.values()],
        "warmup": [f"{s.warmup:,}" for s in SCALES.values()],
        "beta2": [f"{s.beta2:g}" for s in SCALES.values()],
        "train MACs": [f"{s.train_macs:.2g}" for s in SCALES.values()],
        "train A100-h": [f"{estimate_train_gpu_hours(s):,.1f}" for s in SCALES.values()],
    }

    def scale_table(title: str, cols: list[str]) -> Table:
        # no_wrap: a number folded over lines is unreadable; a narrow terminal gets two tables
        table = Table(title=title)
        for col in cols:
            table.add_column(col, justify="left" if col in ("scale", "model") else "right", no_wrap=True)
        for i in range(len(SCALES)):
            table.add_row(*(cells[c][i] for c in cols))
        return table

    from rich.measure import Measurement

    whole = scale_table("Compute scales", list(cells))
    if Measurement.get(console, console.options.update_width(10_000), whole).maximum <= console.width:
        console.print(whole)
    else:
        console.print(scale_table("Compute scales: data and model", list(cells)[:5]))
        console.print(scale_table("Compute scales: optimizer and cost", ["scale", *list(cells)[5:]]))
    console.print("AdamW beta1 0.9, eps 1e-6, weight decay 0.2, cosine schedule after linear warmup.")


def _load(config: str, scale: Optional[str], stages: Optional[str], executor: Optional[str] = None):
    from dcslurm.core.config import load_config

    return load_config(config, scale=scale, stages=_stages_option(stages), executor=executor)


def _plan_dict(plan) -> dict:
    return {
        "run": plan.run_url, "scale": plan.scale,
        "steps": [
            {"name": s.name, "layout": s.layout, "units": s.units.count, "unit": s.units.label,
             "units_per_task": s.units_per_task, "tasks": s.n_tasks, "depends_on": s.depends_on,
             "gpu_hours": s.estimate.gpu_hours, "bytes_written": s.estimate.bytes_written,
             "estimate_basis": s.estimate.basis, "warning": s.estimate.warning,
             "resources": dataclasses.asdict(s.resources)}
            for s in plan.steps
        ],
        "total": {"gpu_hours": plan.total_estimate.gpu_hours, "bytes_written": plan.total_estimate.bytes_written},
    }


def _print_plan(plan) -> None:
    from rich import box

    # Readable at 80 columns: names and numbers never wrap (a folded cell reads one
    # character per line); "after" is left out when every step follows the one above.
    chained = all(s.depends_on == ([plan.steps[i - 1].name] if i else []) for i, s in enumerate(plan.steps))
    table = Table(title=f"Plan of {plan.run_url} (scale {plan.scale})", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    cols = ("step", "layout", "units", "per task", "tasks", *(() if chained else ("after",)), "GPU-h", "writes")
    for col in cols:
        table.add_column(col, justify="left" if col in ("step", "layout", "after", "units") else "right",
                         no_wrap=col != "units", min_width=10 if col == "units" else None)
    for s in plan.steps:
        table.add_row(s.name, s.layout, f"{s.units.count:,} {s.units.label}", f"{s.units_per_task:,}",
                      f"{s.n_tasks:,}", *(() if chained else (",".join(s.depends_on) or "-",)),
                      f"{s.estimate.gpu_hours:,.1f}", human_bytes(s.estimate.bytes_written))
    total = plan.total_estimate
    table.add_row("total", "", "", "", f"{sum(s.n_tasks for s in plan.steps):,}", *(() if chained else ("",)),
                  f"{total.gpu_hours:,.1f}", human_bytes(total.bytes_written))
    console.print(table)
    if chained:
        console.print("Each step starts when the one above it has succeeded (afterok).")
    bases = [f"{s.name}: {s.estimate.basis}" for s in plan.steps if s.estimate.basis]
    if bases:
        console.print("Estimate basis: " + "; ".join(bases))
    for s in plan.steps:
        if s.estimate.warning:
            console.print(f"warning: {s.estimate.warning}", markup=False)


@app.command()
def plan(
    config: str = typer.Option(..., "--config", "-c", help="The run's TOML file."),
    scale: Optional[str] = typer.Option(None, help="Override \\[run] scale."),
    stages: Optional[str] = typer.Option(None, help="Comma-separated stages (default: \\[run] stages)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    no_checks: bool = typer.Option(False, "--no-checks", help="Skip the input checks (to cost a run whose "
                                   "inputs do not exist yet)."),
) -> None:
    """Stages, array tasks per stage, and a GPU-hours / bytes estimate. Submits nothing."""
    from dcslurm.core.runs import plan_run, preflight_run

    cfg = _load(config, scale, stages)
    p = plan_run(cfg)
    if not no_checks:
        preflight_run(cfg, p)  # the same input checks as submit: a plan that passes can be submitted
    if as_json:
        print(json.dumps(_plan_dict(p), indent=1))
    else:
        _print_plan(p)


@app.command()
def submit(
    config: str = typer.Option(..., "--config", "-c", help="The run's TOML file."),
    scale: Optional[str] = typer.Option(None, help="Override \\[run] scale."),
    stages: Optional[str] = typer.Option(None, help="Comma-separated stages, e.g. embed,filter."),
    executor: Optional[str] = typer.Option(None, help="slurm, local or submitit (default: \\[executor] kind)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Write the sbatch scripts; submit nothing."),
    out: Optional[str] = typer.Option(None, help="Folder for the sbatch scripts (default: beside the logs)."),
    no_checks: bool = typer.Option(False, "--no-checks", help="With --dry-run only: skip the input checks."),
) -> None:
    """Submit every unfinished task of the run (tasks with a committed marker are skipped)."""
    if no_checks and not dry_run:
        raise typer.BadParameter("only with --dry-run: a real submission always checks its inputs first",
                                 param_hint="--no-checks")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dcslurm.core.runs import submit_run

    cfg = _load(config, scale, stages, executor)
    started = time.time()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=err, transient=False)
    bars: dict[str, int] = {}

    def on_progress(step: str, done: int, total: int) -> None:
        if not bars:
            progress.start()  # only once there is something to show: an early error stays one line
        if step not in bars:
            bars[step] = progress.add_task(step, total=total)
        progress.update(bars[step], completed=done, total=total)

    try:
        result = submit_run(cfg, dry_run=dry_run, script_dir=out, progress=on_progress, checks=not no_checks)
    finally:
        if bars:
            progress.stop()
    _print_plan(result.plan)
    n_pending = sum(len(v) for v in result.pending.values())
    if dry_run:
        console.print(f"dry run: {n_pending:,} tasks would be submitted; scripts in {result.script_dir}")
        return
    from dcslurm.core.executors import queues_jobs

    if queues_jobs(cfg):
        ids = result.submission.job_ids()
        console.print(f"submitted {n_pending:,} tasks as {len(ids)} jobs ({', '.join(ids[:8])}"
                      f"{' ...' if len(ids) > 8 else ''}); follow with: dcslurm status {cfg.run_url}")
        return
    if result.failed:
        for step, idx in result.failed.items():
            err.print(f"[red]{step}: {len(idx)} tasks failed[/red] (dcslurm status {cfg.run_url})")
        raise typer.Exit(1)
    console.print(f"ran {n_pending:,} tasks in {time.time() - started:.1f} s; outputs in {cfg.run_url}")
    for hook in _after_run_hooks():
        hook(cfg, result)


def _after_run_hooks():
    """Things to show after a local run (e.g. the results table), by stage."""
    hooks = []
    try:
        from dcslurm.cli.results import after_run
    except ModuleNotFoundError:
        return hooks
    hooks.append(after_run)
    return hooks


@app.command()
def status(
    run: str = typer.Argument(..., help="The run folder URL (local path or s3://...)."),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for s3:// run folders."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """Per step: tasks done / running / pending / failed, with the failed tasks' logs."""
    from dcslurm.core.runs import run_status
    from dcslurm.core.storage import s3fs_options

    plan_, steps = run_status(run, s3fs_options(endpoint_url=endpoint_url))
    from dcslurm.core.stages import later_problems
    from dcslurm.core.storage import DataFolder

    # Problems only a finished step could know (e.g. subset uids no shard holds) come first.
    problems = later_problems(DataFolder(run, s3fs_options(endpoint_url=endpoint_url)), [s.stage for s in plan_.steps])
    if as_json:
        print(json.dumps({"run": plan_.run_url, "problems": problems, "steps": [
            {"name": s.name, "tasks": s.n_tasks, **s.counts, "unknown_reason": s.unknown_reason,
             "failed_tasks": [{"index": f.index, "log": f.log, "error": f.error} for f in s.failed]}
            for s in steps]}, indent=1))
        return
    if problems:
        console.print("problems: " + "; ".join(problems), markup=False, soft_wrap=True)
    table = Table(title=f"Status of {plan_.run_url}")
    states = ["done", "running", "pending", "failed", "not started"]
    if any(s.counts.get("unknown") for s in steps):
        states.append("unknown")
    for col in ("step", "tasks", *states):
        table.add_column(col, justify="left" if col == "step" else "right")
    for s in steps:
        table.add_row(s.name, f"{s.n_tasks:,}", *(f"{s.counts[k]:,}" for k in states))
    console.print(table)
    for reason in dict.fromkeys(s.unknown_reason for s in steps if s.unknown_reason):
        console.print(reason, markup=False, soft_wrap=True)
    for s in steps:
        for f in s.failed[:20]:
            console.print(f"[red]{s.name}[{f.index}] failed[/red]: {f.error}\n    log: {f.log}")
        if len(s.failed) > 20:
            console.print(f"... and {len(s.failed) - 20} more failed tasks of {s.name} (--json lists all)")
    for show in _status_hooks():
        show(plan_, run, console)


def _status_hooks():
    """What `status` prints after the steps: the download report and the training metrics."""
    return [importlib.import_module(mod).status_section
            for mod in ("dcslurm.cli.report", "dcslurm.datacomp.train_status")]


@app.command()
def cancel(
    run: str = typer.Argument(..., help="The run folder URL."),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for s3:// run folders."),
) -> None:
    """Cancel the run's queued and running jobs (committed outputs stay)."""
    from dcslurm.core.runs import cancel_run
    from dcslurm.core.storage import s3fs_options

    cancelled = cancel_run(run, s3fs_options(endpoint_url=endpoint_url))
    console.print(f"cancelled: {', '.join(cancelled)}" if cancelled else "nothing queued or running")


def _register_subcommands() -> None:
    # Every module is part of the package: one that fails to import is a broken install, and
    # says so, rather than a command quietly missing from --help.
    for name, module in SUBCOMMANDS.items():
        app.add_typer(importlib.import_module(module).app, name=name)
    for module in ("dcslurm.cli.results", "dcslurm.cli.render", "dcslurm.cli.demo"):
        importlib.import_module(module).register(app)


_register_subcommands()


class _Once(logging.Filter):
    """Passes each message once: a sweep runs the same input checks for every branch."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        line = record.getMessage()
        if line in self.seen:
            return False
        self.seen.add(line)
        return True


def _show_warnings() -> None:
    """What the checks before queueing warn of (loggers under `dcslurm`): a stderr line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("dcslurm: %(levelname)s: %(message)s"))
    handler.addFilter(_Once())
    log = logging.getLogger("dcslurm")
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    log.propagate = False


def main() -> None:
    """Exit codes: 0 all done, 1 some task failed, 2 bad input (usage, config, storage)."""
    # typer >= 0.17 raises the exception classes of its own copy of click
    # (typer._click), not the `click` package's: match those.
    from typer import _click
    from typer.exceptions import Abort  # typer._click has no Abort of its own

    _show_warnings()
    try:
        # Not standalone: a UserError must reach the handler below, not click's; the
        # price is that click returns the exit code of `typer.Exit(n)` instead of exiting.
        code = app(standalone_mode=False)
    except UserError as exc:
        print(f"dcslurm: error: {exc}", file=sys.stderr)  # one line, never wrapped
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("dcslurm: interrupted")
        sys.exit(130)
    except _click.exceptions.ClickException as exc:  # usage errors: click's own message, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except Abort:
        sys.exit(1)
    except OSError as exc:  # e.g. a full disk or a read-only folder met where no one expected it
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"dcslurm: error: {where}{exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
