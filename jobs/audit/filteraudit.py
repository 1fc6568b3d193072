"""Filter audit ("Who's in and who's out?", SPEC section 4) as map-reduce.

map    (per metadata parquet): per dimension and group, raw rows and rows the
       subset keeps -> _counts/PID.json
reduce (one task): sum the counts, keep ratios with standard errors, the
       exclusion-amplification test, and the report (Markdown, CSV, JSON, PNG).

The test. For group g with n_g raw rows, k_g kept: p_g = k_g / n_g, SE =
sqrt(p_g (1 - p_g) / n_g). "Kept at a significantly lower rate" is a one-sided
two-proportion z-test of g against the rows not in g (pooled variance),
significant when its p-value < alpha / m (Bonferroni over the m groups
tested). "Exclusion amplification" = significantly lower AND g's share of the
raw pool < `rare_share`. The reduce sums integer counts in input order, so the
report does not depend on how the files were split into tasks.
"""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np

from dcslurm.core.errors import UserError
from dcslurm.core.storage import DataFolder
from jobs.audit.charts import png_bytes, pyplot
from jobs.audit.groups import OTHER, GroupConfig, columns_needed, count_groups, row_groups
from jobs.filter.engine import InputFile
from jobs.reshard.subset import SubsetFile

COUNTS_DIR = "_counts"
REPORT_FILES = ("report.md", "report.csv", "report.json")


# -- map ------------------------------------------------------------------------

def read_columns(f: InputFile, names: set[str], storage_options: dict | None = None) -> tuple[dict, int]:
    """uid and `names` of one parquet as Python lists (uid as pyarrow); one-line errors naming the file."""
    import pyarrow.parquet as pq

    from jobs.audit.bias import _split

    parent, name = _split(f.url)
    try:
        with DataFolder(parent, storage_options).open(name) as fh:
            pf = pq.ParquetFile(fh)
            if pf.metadata.num_rows == 0:  # an empty shard (e.g. every download failed) may lack columns
                return {**{c: [] for c in names}, "uid": []}, 0
            have = set(pf.schema_arrow.names)
            for c in sorted(names | {"uid"}):
                if c not in have:
                    raise UserError(f"{f.url}: missing column {c!r} (the groups file asks for it)")
            table = pf.read(columns=sorted(names | {"uid"}))
    except FileNotFoundError:
        raise UserError(f"{f.url}: metadata file not found") from None
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt parquet is bad input
        raise UserError(f"{f.url}: cannot read parquet ({type(exc).__name__}: {exc})") from None
    cols = {c: table.column(c).to_pylist() for c in names}
    cols["uid"] = table.column("uid")
    return cols, table.num_rows


def count_file(f: InputFile, subset: SubsetFile, cfg: GroupConfig, storage_options: dict | None = None) -> dict:
    """One file's counts: {"rows", "kept", "dims": {dimension: {group: [raw, kept]}}}."""
    from dcslurm.datacomp.pool import parse_uids

    cols, n = read_columns(f, columns_needed(cfg), storage_options)
    hi, lo = parse_uids(cols.pop("uid"), f.url)
    _, mult = subset.lookup_many(hi, lo)
    kept = mult > 0  # a uid the subset repeats is one kept row: the audit counts who is in, not how often
    return {"rows": int(n), "kept": int(kept.sum()), "dims": count_groups(row_groups(cfg, cols, n, f.url), kept)}


def map_file(f: InputFile, subset: SubsetFile, cfg: GroupConfig, work: DataFolder,
             storage_options: dict | None = None) -> dict:
    """count_file, committed as work/_counts/PID.json; returns the counts."""
    counts = count_file(f, subset, cfg, storage_options)
    work.write_json(f"{COUNTS_DIR}/{f.pid}.json", counts)
    return counts


# -- reduce ---------------------------------------------------------------------

def merge_counts(parts: list[dict], cfg: GroupConfig) -> dict:
    """Sum per-file counts; categorical dimensions keep their `top` largest groups, the rest in "(other)"."""
    total = {"rows": 0, "kept": 0, "dims": {d: {} for d in cfg.dimensions()}}
    for part in parts:
        total["rows"] += part["rows"]
        total["kept"] += part["kept"]
        for dim, groups in part["dims"].items():
            acc = total["dims"].setdefault(dim, {})
            for g, (raw, kept) in groups.items():
                a = acc.setdefault(g, [0, 0])
                a[0] += raw
                a[1] += kept
    for dim in cfg.categorical:
        groups = total["dims"].get(dim, {})
        ranked = sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0]))
        if len(ranked) > cfg.top:
            rest = ranked[cfg.top:]
            top = dict(ranked[:cfg.top])
            top[OTHER] = [sum(v[0] for _, v in rest), sum(v[1] for _, v in rest)]
            total["dims"][dim] = top
    return total


def _normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def group_statistics(totals: dict, alpha: float, rare_share: float) -> dict:
    """The report's content: overall keep rate, the test, and one row per (dimension, group)."""
    N, K = totals["rows"], totals["kept"]
    if N == 0:
        raise UserError("audit: the pool has no rows")
    p_all = K / N
    rows = []
    for dim, groups in totals["dims"].items():
        for g, (n, k) in groups.items():
            p = k / n if n else float("nan")
            se = math.sqrt(p * (1 - p) / n) if n else float("nan")
            n_rest, k_rest = N - n, K - k
            z = pval = None
            if n and n_rest:
                denom = math.sqrt(p_all * (1 - p_all) * (1 / n + 1 / n_rest))  # pooled = overall rate
                if denom > 0:
                    z = (p - k_rest / n_rest) / denom
                    pval = _normal_cdf(z)  # one-sided: kept at a LOWER rate than the rest
            rows.append({"dimension": dim, "group": g, "raw": n, "kept": k, "keep_ratio": p, "se": se,
                         "ratio_to_overall": p / p_all if p_all > 0 and n else float("nan"),
                         "raw_share": n / N, "z": z, "p_value": pval})
    m = sum(1 for r in rows if r["p_value"] is not None)
    threshold = alpha / max(m, 1)
    for r in rows:
        r["significantly_lower"] = r["p_value"] is not None and r["p_value"] < threshold
        r["exclusion_amplification"] = r["significantly_lower"] and r["raw_share"] < rare_share
    test = {"name": "one-sided two-proportion z-test, group vs rest of the pool (pooled variance), Bonferroni",
            "alpha": alpha, "groups_tested": m, "per_group_threshold": threshold, "rare_share": rare_share,
            "flag": "exclusion_amplification = raw_share < rare_share and p_value < alpha / groups_tested"}
    return {"rows_raw": N, "rows_kept": K, "keep_rate": p_all, "test": test, "groups": rows}


def reduce_counts(inputs: list[InputFile], work: DataFolder, cfg: GroupConfig, alpha: float,
                  rare_share: float) -> dict:
    """Read every _counts/PID.json (in input order) and compute the statistics."""
    parts = [work.read_json(f"{COUNTS_DIR}/{f.pid}.json") for f in inputs]
    report = group_statistics(merge_counts(parts, cfg), alpha, rare_share)
    report["groups_file"] = cfg.source
    report["files"] = len(inputs)
    return report


# -- report ---------------------------------------------------------------------

CSV_FIELDS = ("dimension", "group", "raw", "kept", "keep_ratio", "se", "ratio_to_overall", "raw_share", "z",
              "p_value", "significantly_lower", "exclusion_amplification")


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}g}"
    return str(x)


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def _by_dimension(report: dict) -> dict[str, list[dict]]:
    dims: dict[str, list[dict]] = {}
    for r in report["groups"]:
        dims.setdefault(r["dimension"], []).append(r)
    for rows in dims.values():
        rows.sort(key=lambda r: (-1 if math.isnan(r["keep_ratio"]) else r["keep_ratio"], r["group"]))
    return dims


def chart_name(dim: str) -> str:
    return f"keep_ratio_{dim}.png"


def markdown(report: dict, title: str = "Filter audit") -> str:
    t = report["test"]
    lines = [f"# {title}", "",
             f"{report['rows_kept']:,} of {report['rows_raw']:,} rows kept: overall keep rate "
             f"{report['keep_rate']:.4f} ({report['files']} metadata files; "
             f"groups from `{report['groups_file']}`).", "",
             f"Test: {t['name']}; alpha = {t['alpha']}, {t['groups_tested']} groups tested, so a group is "
             f"*significantly lower* when p < {t['per_group_threshold']:.3g}. **Exclusion amplification** = "
             f"significantly lower and under {t['rare_share']:.0%} of the raw pool. Keep ratio SE = "
             "sqrt(p(1-p)/n). A keyword caption can be in several groups; (none) = no term of that dimension.", ""]
    flagged = [r for r in report["groups"] if r["exclusion_amplification"]]
    lines.append("Flagged: " + (", ".join(f"{r['dimension']}/{r['group']}" for r in flagged) if flagged else "none"))
    lines.append("")
    for dim, rows in _by_dimension(report).items():
        lines += [f"## {dim}", "", f"![keep ratio by {dim}]({chart_name(dim)})", "",
                  "| group | raw | kept | keep ratio | SE | ratio to overall | share of pool | z | p (one-sided) "
                  "| lower | amplified |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|"]
        for r in rows:
            lines.append(f"| {r['group'].replace('|', '/')} | {r['raw']} | {r['kept']} | {_fmt(r['keep_ratio'])} | "
                         f"{_fmt(r['se'])} | {_fmt(r['ratio_to_overall'])} | {_fmt(r['raw_share'])} | "
                         f"{_fmt(r['z'], 3)} | {_fmt(r['p_value'], 3)} | {'yes' if r['significantly_lower'] else ''} | "
                         f"{'**FLAG**' if r['exclusion_amplification'] else ''} |")
        lines.append("")
    return "\n".join(lines)


def chart_png(rows: list[dict], dim: str, keep_rate: float) -> bytes:
    """Keep ratio per group with SE error bars, sorted; flagged groups red; the overall rate as a line."""
    plt = pyplot()
    rows = [r for r in rows if r["raw"]]
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.28 * max(len(rows), 1)))
    y = np.arange(len(rows))
    colours = ["tab:red" if r["exclusion_amplification"] else "tab:blue" for r in rows]
    ax.barh(y, [r["keep_ratio"] for r in rows], xerr=[r["se"] for r in rows], color=colours, capsize=3)
    ax.scatter([r["keep_ratio"] for r in rows], y, color=colours, zorder=3, s=14)  # visible even at ratio 0
    ax.axvline(keep_rate, color="black", linestyle="--", linewidth=1, label=f"overall {keep_rate:.3f}")
    ax.set_yticks(y, [f"{r['group']} (n={r['raw']})" for r in rows], fontsize=8)
    for label, colour in zip(ax.get_yticklabels(), colours):
        label.set_color("tab:red" if colour == "tab:red" else "black")
    ax.set_xlim(0, 1)
    ax.set_xlabel("keep ratio (± SE); red = exclusion amplification")
    ax.set_title(f"keep ratio by {dim}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def write_report(report: dict, out: DataFolder) -> list[str]:
    """report.md, report.csv, report.json and one PNG per dimension into `out`; returns the names written."""
    names = []
    for dim, rows in _by_dimension(report).items():
        out.write_bytes(chart_name(dim), chart_png(rows, dim, report["keep_rate"]))
        names.append(chart_name(dim))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in report["groups"]:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in CSV_FIELDS})
    out.write_text("report.csv", buf.getvalue())
    out.write_text("report.json", json.dumps(_json_safe(report), indent=1, sort_keys=True) + "\n")
    out.write_text("report.md", markdown(report))
    return [*REPORT_FILES, *names]


# -- one machine ----------------------------------------------------------------

def run_local(inputs: list[InputFile], subset: SubsetFile, cfg: GroupConfig, work: DataFolder, out: DataFolder,
              alpha: float = 0.05, rare_share: float = 0.05, storage_options: dict | None = None) -> dict:
    """The whole audit on this machine (what `dcslurm audit filter` does): map every file, reduce, report."""
    for f in inputs:
        map_file(f, subset, cfg, work, storage_options)
    report = reduce_counts(inputs, work, cfg, alpha, rare_share)
    write_report(report, out)
    return report
