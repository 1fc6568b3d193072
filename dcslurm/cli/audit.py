"""`dcslurm audit filter` and `dcslurm audit bias`: the audits on one machine.

They call the same functions as the `audit` and `audit_bias` stages' tasks
(jobs/audit/filteraudit.py, jobs/audit/bias.py), one task doing every step.
"""

from __future__ import annotations

import tempfile
from typing import Optional

import typer
from rich.console import Console

from dcslurm.core.errors import UserError
from dcslurm.core.storage import s3fs_options

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Audits: who a filter keeps and drops; how distinguishable datasets are.")
console = Console()


@app.command("filter")
def filter_audit(
    pool: str = typer.Option(..., "--pool", help="Folder of metadata parquet files."),
    subset: str = typer.Option(..., "--subset", help="The filter's subset (.npy, DataComp format)."),
    out: str = typer.Option(..., "--out", help="Report folder: report.md, report.csv, report.json, PNG charts."),
    groups: str = typer.Option("", "--groups", help="Groups file (TOML); default jobs/audit/groups.toml."),
    column: list[str] = typer.Option([], "--column", help="Also group by this metadata column (repeatable)."),
    alpha: float = typer.Option(0.05, help="Family-wise significance of the lower-keep-rate test."),
    rare_share: float = typer.Option(0.05, help="A group under this share of the raw pool is rare."),
    work: Optional[str] = typer.Option(None, help="Folder for the per-file counts (default: a temp folder)."),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for s3:// folders."),
) -> None:
    """Raw and kept rows per group, keep ratios with SE, and exclusion-amplification flags."""
    from dcslurm.core.storage import DataFolder
    from jobs.audit import bias, filteraudit
    from jobs.audit.groups import load_groups
    from jobs.filter.engine import list_inputs

    options = s3fs_options(endpoint_url=endpoint_url)
    scratch = tempfile.mkdtemp(prefix="dcslurm-audit-")
    report = filteraudit.run_local(list_inputs(pool, options), bias.open_subset(subset, scratch, options),
                                   load_groups(groups, column), DataFolder(work or scratch, options),
                                   DataFolder(out, options), alpha=alpha, rare_share=rare_share,
                                   storage_options=options)
    flagged = [f"{r['dimension']}/{r['group']}" for r in report["groups"] if r["exclusion_amplification"]]
    console.print(f"{report['rows_kept']:,} of {report['rows_raw']:,} rows kept; flagged: "
                  f"{', '.join(flagged) or 'none'} -> {out}/report.md")


def _source(name: str, value: str, pool: Optional[str], shards: Optional[str]) -> dict:
    if value.endswith(".npy"):
        if not pool:
            raise UserError(f"--{name} {value}: a subset file needs --pool (the metadata folder it selects from)")
        source = {"name": name, "metadata": pool, "subset": value}
    else:
        source = {"name": name, "metadata": value}
    if shards:
        source["shards"] = shards
    return source


@app.command("bias")
def bias_probe(
    a: str = typer.Option(..., "--a", help="Source a: a metadata folder (parquet + npz), or a subset .npy of --pool."),
    b: str = typer.Option(..., "--b", help="Source b (as --a)."),
    c: Optional[str] = typer.Option(None, "--c", help="Source c (optional)."),
    d: Optional[str] = typer.Option(None, "--d", help="Source d (optional)."),
    out: str = typer.Option(..., "--out", help="Report folder: bias.md, bias.csv, bias.json, bias_accuracy.png."),
    pool: Optional[str] = typer.Option(None, "--pool", help="Metadata folder of sources given as subset files."),
    a_shards: Optional[str] = typer.Option(None, "--a-shards", help="Tar folder of source a (image transforms)."),
    b_shards: Optional[str] = typer.Option(None, "--b-shards"),
    c_shards: Optional[str] = typer.Option(None, "--c-shards"),
    d_shards: Optional[str] = typer.Option(None, "--d-shards"),
    shards: Optional[str] = typer.Option(None, "--shards", help="Tar folder for every source without its own."),
    samples: int = typer.Option(1000, help="Items sampled per source."),
    feature: list[str] = typer.Option(["img"], "--feature",
                                      help="img, txt, grayscale, mean_colour, lowpass, highpass, pixel_shuffle, "
                                           "patch_shuffle, edges (repeatable)."),
    model: str = typer.Option("", help="Embedding key prefix in the npz (<model>_img); default the first one."),
    test_fraction: float = typer.Option(0.3, help="Held-out fraction."),
    seed: int = typer.Option(0, help="Seed of the sampling and the split."),
    work: Optional[str] = typer.Option(None, help="Folder for intermediate files (default: a temp folder)."),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for s3:// folders."),
) -> None:
    """Dataset classification: held-out accuracy vs chance (95% CI) and confusion matrix, per feature set."""
    from dcslurm.core.storage import DataFolder
    from jobs.audit import bias
    from jobs.audit.spec import BiasParams

    given = [("a", a, a_shards), ("b", b, b_shards), ("c", c, c_shards), ("d", d, d_shards)]
    sources = [_source(n, v, pool, s or shards) for n, v, s in given if v]
    params = BiasParams(sources=sources, samples=samples, model=model, features=list(feature),
                        test_fraction=test_fraction)
    try:
        params.validate()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    options = s3fs_options(endpoint_url=endpoint_url)
    scratch = tempfile.mkdtemp(prefix="dcslurm-bias-")
    report = bias.run_local(bias.sources_from(sources), samples, list(feature), DataFolder(work or scratch, options),
                            DataFolder(out, options), seed=seed, model=model, test_fraction=test_fraction,
                            scratch=scratch, options=options)
    for f, r in report["features"].items():
        if "error" in r:
            console.print(f"{f}: {r['error']}")
        else:
            console.print(f"{f}: accuracy {r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
                          f"vs chance {r['chance']:.3f}")
    console.print(f"-> {out}/bias.md")
