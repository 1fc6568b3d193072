"""`dcslurm render`: the run's sbatch scripts, for people who submit by hand.

The scripts are exactly what `dcslurm submit` would queue (the SLURM
executor's dry run over the same plan), plus a `submit.sh` that queues them
in order with `afterok` dependencies.
"""

from __future__ import annotations

import os
from typing import Optional

import typer
from rich.console import Console

console = Console()


def render_run(config_path: str, out: str, scale: Optional[str] = None,
               stages: Optional[list[str]] = None, checks: bool = True) -> list[str]:
    """Write the sbatch scripts of every unfinished task of the run into `out`;
    returns their file names in submission order (submit.sh last). `checks=False`
    skips the input checks: scripts for a cluster whose inputs this machine cannot reach."""
    from dcslurm.core.config import load_config
    from dcslurm.core.runs import submit_run

    cfg = load_config(config_path, scale=scale, stages=stages, executor="slurm")
    cfg.container.check_host = False  # the scripts may be for another host: its apptainer, its images
    out = os.path.abspath(out)
    result = submit_run(cfg, dry_run=True, script_dir=out, checks=checks)
    names = [os.path.basename(c.script) for s in result.submission.steps.values() for c in s.chunks]
    return names + ["submit.sh"]


def register(app: typer.Typer) -> None:
    @app.command()
    def render(
        config: str = typer.Option(..., "--config", "-c", help="The run's TOML file."),
        out: str = typer.Option(..., "--out", "-o", help="Folder for the scripts."),
        scale: Optional[str] = typer.Option(None, help="Override \\[run] scale."),
        stages: Optional[str] = typer.Option(None, help="Comma-separated stages (default: \\[run] stages)."),
        no_checks: bool = typer.Option(False, "--no-checks", help="Skip the input checks (scripts for a "
                                       "cluster whose storage this machine cannot reach)."),
    ) -> None:
        """Write plain sbatch scripts (and submit.sh) for the run's unfinished tasks; submit nothing."""
        chosen = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
        names = render_run(config, out, scale, chosen, checks=not no_checks)
        for name in names:
            console.print(os.path.join(out, name))
        console.print(f"submit them in order with: bash {os.path.join(out, 'submit.sh')}")
