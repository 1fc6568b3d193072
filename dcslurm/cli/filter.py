"""`dcslurm filter list` and `dcslurm filter run` (the whole filter on one machine)."""

from __future__ import annotations

import json
import tempfile
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from dcslurm.core.errors import UserError
from dcslurm.core.storage import s3fs_options

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Filters: list them, or run one on this machine (the `filter` stage does it as SLURM arrays).")
console = Console()


@app.command("list")
def list_filters(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """The filters and their parameters (write them in \\[stages.filter] spec)."""
    from jobs.filter.filterspec import FILTERS

    if as_json:
        print(json.dumps({f.name: {"doc": f.doc, "params": {p.name: {"kind": p.kind, "default": p.default,
                                                                     "doc": p.doc, "required": p.required}
                                                            for p in f.params}}
                          for f in FILTERS.values()}, indent=1))
        return
    table = Table(title="Filters (combine with '&' and 'then')")
    for col in ("filter", "rule", "parameters"):
        table.add_column(col)
    for f in FILTERS.values():
        params = "\n".join(f"{p.name}={'REQUIRED' if p.required else p.default!r}  {p.doc}" for p in f.params)
        table.add_row(f.name, f.doc, params or "-")
    console.print(table)
    console.print('e.g. spec = "clip_score(l14, fraction=0.45) then vas(target=pool, fraction=0.30)"')


def build_spec(spec: Optional[str], name: Optional[str], arch: Optional[str], fraction: Optional[float],
               threshold: Optional[float], params: list[str]) -> str:
    """A spec from --spec, or from --filter NAME plus its options."""
    if spec:
        if name or arch or fraction is not None or threshold is not None or params:
            raise UserError("--spec: give either --spec or --filter with its options, not both")
        return spec
    if not name:
        raise UserError("--filter: give a filter name (see `dcslurm filter list`) or --spec")
    args = []
    if arch:
        args.append(f"arch={arch}")
    if fraction is not None:
        args.append(f"fraction={fraction!r}")
    if threshold is not None:
        args.append(f"threshold={threshold!r}")
    for p in params:
        if "=" not in p:
            raise UserError(f"--param {p!r}: expected KEY=VALUE")
        key, value = p.split("=", 1)
        args.append(f"{key}={json.dumps(value)}")
    return f"{name}({', '.join(args)})" if args else name


@app.command()
def run(
    pool: str = typer.Option(..., "--pool", help="Folder of metadata parquet files (npz beside each)."),
    out: str = typer.Option(..., "--out", help="Subset file to write (.npy); stats go beside it (_stats.json)."),
    name: Optional[str] = typer.Option(None, "--filter", help="Filter name (see `dcslurm filter list`)."),
    arch: Optional[str] = typer.Option(None, help="clip_score: b32 or l14."),
    fraction: Optional[float] = typer.Option(None, help="Fraction of the pool in (0, 1]."),
    threshold: Optional[float] = typer.Option(None, help="clip_score: fixed threshold."),
    param: list[str] = typer.Option([], "--param", help="Other parameters, KEY=VALUE (repeatable)."),
    spec: Optional[str] = typer.Option(None, "--spec", help="A whole filter spec instead of --filter."),
    seed: int = typer.Option(0, help="Seed of the random draws (MetaCLIP, k-means)."),
    work: Optional[str] = typer.Option(None, help="Folder for intermediate files (default: a temp folder)."),
    workers: int = typer.Option(1, help="Processes for the per-file map and apply work."),
    derived_cache: str = typer.Option("", "--derived-cache",
                                      help="Folder of the pool's derived columns (language ID, ...) to reuse across "
                                           "filters (default: WORK/_derived; 'off': none)."),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for s3:// folders."),
) -> None:
    """Run a filter over a pool on this machine: the same map/reduce/apply code as the stage, one task."""
    from dcslurm.core.storage import DataFolder
    from jobs.filter import engine
    from jobs.filter.filterspec import parse_spec

    text = build_spec(spec, name, arch, fraction, threshold, param)
    try:
        parse_spec(text)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    options = s3fs_options(endpoint_url=endpoint_url)
    work_url = work or tempfile.mkdtemp(prefix="dcslurm-filter-")
    stats = engine.run_local(text, engine.list_inputs(pool, options), DataFolder(work_url, options), out,
                             seed=seed, storage_options=options, workers=workers, derived_cache=derived_cache)
    console.print(f"{stats['kept_rows']:,} of {stats['input_rows']:,} rows kept -> {out}")
    for key, value in stats["parameters"].items():
        if "threshold" in value:
            console.print(f"  {value['filter']}: threshold {value['threshold']}")
