"""Filter audit: a planted exclusion is found and flagged, nothing else is; reports render;
the stage (local and SLURM arrays) and the CLI give the same report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dcslurm.core.config import load_config
from dcslurm.core.errors import UserError
from dcslurm.core.runs import submit_run
from dcslurm.core.storage import DataFolder
from dcslurm.core.tomlfile import write_toml
from jobs.audit import filteraudit, synthetic
from jobs.audit.groups import KeywordMatcher, load_groups
from jobs.filter.engine import list_inputs
from jobs.reshard.subset import load_subset

PLANTED, BASE = 0.30, 0.70


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    truth = synthetic.write_caption_pool(str(root / "pool"), n_files=6, rows_per_file=400, seed=1)
    synthetic.planted_subset(str(root / "subset.npy"), truth, "lgbtq", PLANTED, BASE, seed=2)
    report = filteraudit.run_local(list_inputs(str(root / "pool")), load_subset(str(root / "subset.npy")),
                                   load_groups("", ["demo_kind"]), DataFolder(str(root / "work")),
                                   DataFolder(str(root / "report")))
    return root, truth, report


def _row(report, dim, group):
    return next(r for r in report["groups"] if r["dimension"] == dim and r["group"] == group)


def test_planted_exclusion_is_found_within_its_se_and_flagged(planted):
    _, truth, report = planted
    r = _row(report, "sexual_orientation", "lgbtq")
    assert r["raw"] == len(truth["lgbtq"])  # every planted caption is matched by the keyword lists, nothing else
    assert abs(r["keep_ratio"] - PLANTED) <= r["se"]
    assert r["se"] == pytest.approx(np.sqrt(r["keep_ratio"] * (1 - r["keep_ratio"]) / r["raw"]))
    assert r["ratio_to_overall"] == pytest.approx(r["keep_ratio"] / report["keep_rate"])
    assert r["significantly_lower"] and r["exclusion_amplification"]
    # groups without a planted effect: not flagged at the stated (Bonferroni-corrected) significance
    others = [x for x in report["groups"] if (x["dimension"], x["group"]) != ("sexual_orientation", "lgbtq")]
    assert not any(x["significantly_lower"] for x in others), [x for x in others if x["significantly_lower"]]
    assert report["test"]["per_group_threshold"] == pytest.approx(0.05 / report["test"]["groups_tested"])
    for g in ("women", "men"):
        assert abs(_row(report, "gender", g)["keep_ratio"] - BASE) < 3 * _row(report, "gender", g)["se"]


def test_every_dimension_is_counted_and_sums_to_the_pool(planted):
    _, _, report = planted
    dims = {r["dimension"] for r in report["groups"]}
    assert dims == {"gender", "sexual_orientation", "race", "religion", "caption_words", "image_min_side",
                    "aspect_ratio", "domain", "country_tld", "language", "demo_kind"}
    for dim in ("domain", "country_tld", "language", "demo_kind", "caption_words", "image_min_side"):
        rows = [r for r in report["groups"] if r["dimension"] == dim]
        assert sum(r["raw"] for r in rows) == report["rows_raw"] == 2400
        assert sum(r["kept"] for r in rows) == report["rows_kept"]
    assert {r["group"] for r in report["groups"] if r["dimension"] == "country_tld"} == {
        ".de", ".uk", ".fr", ".jp", "(generic)"}
    assert _row(report, "language", "en")["raw"] > 0.95 * 2400  # English captions (lid.176 misreads a few short ones)
    assert _row(report, "domain", "photos.example.org")["raw"] > 0


def test_reports_render(planted):
    root, _, report = planted
    out = root / "report"
    dims = sorted({r["dimension"] for r in report["groups"]})
    for dim in dims:
        with Image.open(out / filteraudit.chart_name(dim)) as im:
            im.verify()
        with Image.open(out / filteraudit.chart_name(dim)) as im:
            arr = np.asarray(im.convert("L"))
            assert im.size[0] > 100 and im.size[1] > 50 and arr.std() > 5  # drawn on, not blank
    md = (out / "report.md").read_text()
    table_rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| group")]
    assert len(table_rows) == len(report["groups"])
    for r in report["groups"]:
        assert any(line.startswith(f"| {r['group']} | {r['raw']} | {r['kept']} |") for line in table_rows)
    assert "| lgbtq |" in md and "**FLAG**" in md and md.count("**FLAG**") == 1
    csv_lines = (out / "report.csv").read_text().splitlines()
    assert len(csv_lines) == len(report["groups"]) + 1
    assert json.loads((out / "report.json").read_text())["rows_kept"] == report["rows_kept"]


def test_keyword_matching_is_whole_words():
    m = KeywordMatcher({"gender": {"women": ["woman", "she"], "men": ["man", "he"]},
                        "so": {"lgbtq": ["same sex", "lgbtq+"]}})
    assert m.groups("A Woman, and HER dog") == {"gender": {"women"}}
    assert m.groups("the shepherd's hut") == {}
    assert m.groups("man and woman") == {"gender": {"men", "women"}}
    assert m.groups("Same-sex? no: same sex!") == {"so": {"lgbtq"}}
    assert m.groups("LGBTQ+ pride") == {"so": {"lgbtq"}}


def test_bad_groups_file_is_one_line_error(tmp_path):
    for text, fragment in [("[keywords.gender]\nwomen = []\n", "keywords.gender.women"),
                           ("[buckets.caption_words]\nedges = [3, 1]\n", "increasing"),
                           ("[buckets.colour]\nedges = [1]\n", "buckets.colour"), ("x = [", "not valid TOML")]:
        with pytest.raises(UserError) as e:
            load_groups(str(tmp_path / "g.toml"), text=text)
        assert fragment in str(e.value) and "\n" not in str(e.value)


def _toml(path, run, pool, subset, executor="local", per_task=2):
    """An audit-only run; `subset` None leaves [stages.audit] subset out."""
    audit = {"subset": str(subset)} if subset is not None else {}
    return write_toml(path, {
        "run": {"folder": str(run), "stages": ["audit"]},
        "pool": {"metadata": str(pool)},
        "executor": {"kind": executor},
        "stages": {"audit": {**audit, "columns": ["demo_kind"], "units_per_task": per_task}},
        **({"slurm": {"time": "00:10:00"}} if executor == "slurm" else {}),
    })


REPORTS = ("report.json", "report.md", "report.csv")


@pytest.fixture(scope="module")
def local_stage_run(planted, tmp_path_factory):
    root = planted[0]
    tmp = tmp_path_factory.mktemp("stage")
    cfg = load_config(_toml(tmp / "run.toml", tmp / "run", root / "pool", root / "subset.npy"))
    assert not submit_run(cfg).failed
    return tmp / "run"


def test_stage_and_cli_give_the_same_report(planted, local_stage_run, tmp_path):
    root = planted[0]
    from dcslurm.cli.audit import app

    res = CliRunner().invoke(app, ["filter", "--pool", str(root / "pool"), "--subset", str(root / "subset.npy"),
                                   "--column", "demo_kind", "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "sexual_orientation/lgbtq" in res.output
    for name in REPORTS:
        assert (tmp_path / "cli" / name).read_text() == (local_stage_run / "audit" / name).read_text() \
            == (root / "report" / name).read_text()
    from dcslurm.core.markers import done_indexes

    assert len(done_indexes(DataFolder(str(local_stage_run)), "audit.count")) == 3  # 6 files, 2 per task


@pytest.mark.slurm
def test_slurm_array_gives_the_local_report(slurm_cluster, planted, local_stage_run, tmp_path):
    from tests.core_helpers import wait_run_done

    root = planted[0]
    cfg_path = _toml(tmp_path / "run.toml", tmp_path / "run", root / "pool", root / "subset.npy", executor="slurm",
                     per_task=1)
    submit_run(load_config(cfg_path))
    wait_run_done(cfg_path, timeout=400)
    slurm_cluster.wait_jobs_done(60)
    for name in REPORTS:
        assert (tmp_path / "run/audit" / name).read_text() == (local_stage_run / "audit" / name).read_text()


def test_in_a_run_after_the_filter_stage_both_audits_use_its_subset(tmp_path):
    """stages = filter, audit, audit_bias with no subset and no sources: the run's own subset, and the
    bias probe compares the pool with what the filter kept."""
    from jobs.filter.synthetic import write_pool

    write_pool(str(tmp_path / "pool"), n_files=3, rows_per_file=60, seed=4, dims=(8, 12))
    write_toml(tmp_path / "run.toml", {
        "run": {"folder": str(tmp_path / "run"), "stages": ["filter", "audit", "audit_bias"]},
        "pool": {"metadata": str(tmp_path / "pool")},
        "executor": {"kind": "local"},
        "stages": {"filter": {"spec": "clip_score(l14, fraction=0.5)"}, "audit_bias": {"samples": 40}},
    })
    assert not submit_run(load_config(str(tmp_path / "run.toml"))).failed
    stats = json.loads((tmp_path / "run/filter/stats.json").read_text())
    report = json.loads((tmp_path / "run/audit/report.json").read_text())
    assert (report["rows_raw"], report["rows_kept"]) == (stats["input_rows"], stats["kept_rows"])
    assert report["rows_raw"] == 180 and 80 < report["rows_kept"] < 100  # fraction 0.5, ties kept
    probe = json.loads((tmp_path / "run/audit_bias/bias.json").read_text())
    assert [s["name"] for s in probe["sources"]] == ["pool", "kept"]
    pool_c, kept_c = (s["eligible_candidates"] for s in probe["sources"])
    assert pool_c == 120 and 40 <= kept_c <= report["rows_kept"]  # <= 40 candidates per file; kept rows only
    assert probe["samples_per_source"] == 40 and probe["features"]["img"]["test"] == 24


def test_audit_without_a_subset_is_a_config_error(planted, tmp_path):
    from dcslurm.core.runs import plan_run

    root = planted[0]
    path = _toml(tmp_path / "run.toml", tmp_path / "run", root / "pool", subset=None)
    with pytest.raises(UserError) as e:
        plan_run(load_config(path))
    assert "[stages.audit] subset" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.s3
def test_pool_subset_and_report_on_s3(s3_server, s3_bucket, planted, tmp_path):
    from dcslurm.cli.audit import app

    root = planted[0]
    fs = s3_server.fs()
    bucket = s3_bucket.removeprefix("s3://")
    for p in sorted((root / "pool").iterdir()):
        fs.put_file(str(p), f"{bucket}/pool/{p.name}")
    fs.put_file(str(root / "subset.npy"), f"{bucket}/subset.npy")
    res = CliRunner().invoke(app, ["filter", "--pool", f"{s3_bucket}/pool", "--subset", f"{s3_bucket}/subset.npy",
                                   "--column", "demo_kind", "--out", f"{s3_bucket}/report",
                                   "--endpoint-url", s3_server.endpoint_url])
    assert res.exit_code == 0, res.output
    for name in REPORTS:
        assert fs.cat_file(f"{bucket}/report/{name}").decode() == (root / "report" / name).read_text()
    assert fs.cat_file(f"{bucket}/report/keep_ratio_gender.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_row_groups_handle_missing_values_and_empty_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.audit.groups import row_groups
    from jobs.filter.engine import InputFile

    cfg = load_groups("")
    cols = {"text": [None, "a woman and a man", "x"], "url": [None, "not a url", "http://1.2.3.4/a.jpg"],
            "original_width": [None, 300.0, float("nan")], "original_height": [100.0, 100.0, 50.0]}
    g = row_groups(cfg, cols, 3)
    assert g["gender"] == [{"(none)"}, {"women", "men"}, {"(none)"}]
    assert g["caption_words"] == ["(missing)", "[3, 6)", "[0, 3)"]
    assert g["aspect_ratio"] == ["(missing)", ">= 3", "(missing)"]
    assert g["domain"] == ["(missing)", "(missing)", "1.2.3.4"] and g["country_tld"][2] == "(missing)"
    assert g["language"][0] == "(missing)"
    pq.write_table(pa.table({"uid": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    np.save(tmp_path / "s.npy", np.zeros(0, np.dtype("u8,u8")))
    counts = filteraudit.count_file(InputFile("0", str(tmp_path / "empty.parquet")),
                                    load_subset(str(tmp_path / "s.npy")), cfg)
    assert counts["rows"] == 0 and counts["kept"] == 0


def test_demo_pool_basic_filter_audit_recovers_the_noise_kinds(tmp_path):
    """The demo pool's ground truth (demo_kind): the basic filter drops tiny images, extreme aspect ratios
    and non-English captions; the audit shows exactly those kinds at keep ratio 0, clean rows above average."""
    from dcslurm.demo.pool import generate_demo_pool
    from jobs.filter import engine

    generate_demo_pool(str(tmp_path / "pool"), samples=600, seed=0, heldout=0)
    engine.run_local("basic", engine.list_inputs(str(tmp_path / "pool")), DataFolder(str(tmp_path / "fw")),
                     str(tmp_path / "subset.npy"))
    report = filteraudit.run_local(list_inputs(str(tmp_path / "pool")), load_subset(str(tmp_path / "subset.npy")),
                                   load_groups("", ["demo_kind"]), DataFolder(str(tmp_path / "w")),
                                   DataFolder(str(tmp_path / "r")))
    kinds = {r["group"]: r for r in report["groups"] if r["dimension"] == "demo_kind"}
    for kind in ("tiny_image", "extreme_aspect", "non_english_caption"):
        assert kinds[kind]["raw"] > 0 and kinds[kind]["kept"] == 0 and kinds[kind]["significantly_lower"], kind
    assert kinds["clean"]["keep_ratio"] > report["keep_rate"] and not kinds["clean"]["significantly_lower"]
