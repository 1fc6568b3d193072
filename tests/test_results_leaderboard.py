"""The leaderboard: mean ± std over seeds per filter, unfinished runs, chance, the plot's
numbers, and tables that read at 80 columns (issue 20)."""

from __future__ import annotations

import json
import math
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from dcslurm.core.tomlfile import write_toml
from tests.test_results import distinct_scores, results_lines

# The demo's own tasks (dcslurm/demo/workflow.py DEMO_TASKS): a user's extra_tasks as plan.json keeps them.
EXTRA = [
    {"key": "demo/shapes", "name": "Demo shapes", "evalset": "shapes", "num_classes": 6, "random_score": 1 / 6},
    {"key": "demo/colours", "name": "Demo colours", "evalset": "colours", "num_classes": 8},
    {"key": "demo/retrieval", "name": "Demo retrieval", "evalset": "retrieval", "kind": "retrieval",
     "main_metric": "mean_recall@1"},
]
CLIP = "clip_score(score=clip_tiny_similarity_score, fraction=0.3)"


def write_run(root, name: str, *, seed: int, spec: str | None, scores: dict[str, float] | None,
              tasks=None, extra=EXTRA, scale: str = "tiny", sizes: dict | None = None, data: str = "",
              plan_filter: bool = True, tasks_done: int = 0):
    """A run folder as dcslurm writes it: plan.json (seed, stage params, the eval step's
    task keys), reshard/sizes.json, and eval/results.jsonl when `scores` is given."""
    tasks = [t["key"] for t in extra] if tasks is None else tasks
    run = root / name
    run.mkdir(parents=True)
    params = {"eval": {"tasks": tasks, "extra_tasks": extra, "evalsets": "/sets"},
              "train": {"data": data}}
    if spec is not None and plan_filter:
        params["filter"] = {"spec": spec}
    plan = {"run_url": str(run), "run_name": name, "scale": scale, "seed": seed, "fingerprint": "x",
            "stage_params": params,
            "steps": [{"name": "eval.run", "stage": "eval", "units": {"count": len(tasks), "names": tasks}},
                      {"name": "eval.gather", "stage": "eval", "units": {"count": 1}}]}
    (run / "plan.json").write_text(json.dumps(plan))
    if sizes is not None:
        (run / "reshard").mkdir()
        (run / "reshard" / "sizes.json").write_text(json.dumps(sizes))
    (run / "eval" / "tasks").mkdir(parents=True)
    for i in range(tasks_done):
        (run / "eval" / "tasks" / f"t{i}.json").write_text("{}")
    if scores is not None:
        lines = []
        for t in extra:
            if t["name"] in scores:
                lines.append(json.dumps({"key": t["key"], "dataset": t["name"],
                                         "metrics": {"main_metric": scores[t["name"]]}}))
        text = "\n".join(lines) + "\n" if lines else ""
        datacomp = {k: v for k, v in scores.items() if not k.startswith("Demo")}
        if datacomp:
            text += results_lines(datacomp, unscored=False)
        (run / "eval" / "results.jsonl").write_text(text)
    return run


def sample_std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


NOF = [0.20, 0.30, 0.10]  # Demo shapes per seed, no filter
CL = [0.50, 0.70]         # Demo shapes per seed, clip30 (its seed 2 is not finished)


@pytest.fixture
def sweep(tmp_path):
    """A sweep-like folder: SWEEP/runs/<name>[-seedS]/, seeds > 0 train on seed 0's reshard
    folder (their plan names no filter stage, as a seed of a sweep may not)."""
    runs = tmp_path / "sweep" / "runs"
    write_run(runs, "nofilter", seed=0, spec="no_filter", sizes={"0.tar": 1000, "1.tar": 888},
              scores={"Demo shapes": NOF[0], "Demo colours": 0.5, "Demo retrieval": 0.02})
    for s in (1, 2):
        write_run(runs, f"nofilter-seed{s}", seed=s, spec="no_filter", plan_filter=False,
                  data=str(runs / "nofilter" / "reshard"),
                  scores={"Demo shapes": NOF[s], "Demo colours": 0.5, "Demo retrieval": 0.02})
    write_run(runs, "clip30", seed=0, spec=CLIP, sizes={"0.tar": 567},
              scores={"Demo shapes": CL[0], "Demo colours": 0.75, "Demo retrieval": 0.03})
    write_run(runs, "clip30-seed1", seed=1, spec=CLIP, data=str(runs / "clip30" / "reshard"),
              scores={"Demo shapes": CL[1], "Demo colours": 0.75, "Demo retrieval": 0.03})
    write_run(runs, "clip30-seed2", seed=2, spec=CLIP, data=str(runs / "clip30" / "reshard"), scores=None,
              tasks_done=1)
    # the sweep's shared upstream: a run without an eval stage is no leaderboard entry
    up = tmp_path / "sweep" / "upstream"
    up.mkdir(parents=True)
    (up / "plan.json").write_text(json.dumps({"run_url": str(up), "run_name": "upstream", "scale": "tiny",
                                              "seed": 0, "stage_params": {}, "fingerprint": "x",
                                              "steps": [{"name": "download", "stage": "download"}]}))
    return tmp_path / "sweep"


def test_leaderboard_groups_runs_by_filter_and_takes_seeds_as_replicates(sweep):
    from dcslurm.datacomp.results import leaderboard

    board = leaderboard(str(sweep))
    rows = {r.filter: r for r in board.rows}
    assert set(rows) == {"no_filter", CLIP}
    nof, clip = rows["no_filter"], rows[CLIP]
    assert (nof.label, clip.label) == ("nofilter", "clip30")
    assert nof.seeds == [0, 1, 2] and clip.seeds == [0, 1]
    assert nof.mean("Demo shapes") == pytest.approx(sum(NOF) / 3)
    assert nof.std("Demo shapes") == pytest.approx(sample_std(NOF))
    assert clip.mean("Demo shapes") == pytest.approx(0.6) and clip.std("Demo shapes") == pytest.approx(sample_std(CL))
    # samples trained on: the reshard folder each seed trained on
    assert (nof.train_samples, clip.train_samples) == (1888, 567)
    # the unfinished seed is named as such, never a row of missing numbers
    assert [u.name for u in clip.unfinished] == ["clip30-seed2"]
    assert "1 of 3 eval tasks" in clip.unfinished[0].status
    assert board.tasks == ["Demo shapes", "Demo colours", "Demo retrieval"] and board.groups == []
    # chance: random_score, else 1/num_classes of a classification task, else unknown
    assert board.chance["Demo shapes"] == pytest.approx(1 / 6)
    assert board.chance["Demo colours"] == pytest.approx(1 / 8)
    assert board.chance["Demo retrieval"] is None


def test_leaderboard_from_a_list_of_run_folders(sweep):
    from dcslurm.datacomp.results import leaderboard

    board = leaderboard([str(sweep / "runs" / "nofilter"), str(sweep / "runs" / "nofilter-seed1")])
    assert [(r.filter, r.seeds) for r in board.rows] == [("no_filter", [0, 1])]
    assert board.rows[0].mean("Demo shapes") == pytest.approx((NOF[0] + NOF[1]) / 2)


def test_run_that_selected_no_datacomp_task_is_not_38_of_38_missing(sweep):
    from dcslurm.datacomp.results import gather, missing_text, to_markdown

    runs = gather([str(sweep / "runs")])
    nof = next(r for r in runs if r.name == "nofilter")
    assert nof.aggregate.missing == [] and missing_text(nof.aggregate) == ""
    assert "38 of 38" not in to_markdown(runs)


def test_missing_is_counted_among_the_tasks_the_run_selected(tmp_path):
    from dcslurm.datacomp.results import gather, missing_text
    from dcslurm.datacomp.tasks import scored_tasks

    s = distinct_scores()
    keys = [t.key for t in scored_tasks()]
    del s["SVHN"]
    write_run(tmp_path, "r", seed=0, spec="basic", scores=s, tasks=keys, extra=[])
    (run,) = gather([str(tmp_path)])
    assert run.aggregate.missing == ["SVHN"] and missing_text(run.aggregate).startswith("1 of 38 missing")


def test_leaderboard_datacomp_groups_mean_and_std(tmp_path):
    from dcslurm.datacomp.results import leaderboard
    from dcslurm.datacomp.tasks import scored_tasks

    keys = [t.key for t in scored_tasks()]
    avgs = []
    for seed, shift in ((0, 0.0), (1, 0.01)):
        s = {k: v + shift for k, v in distinct_scores().items()}
        avgs.append(sum(s.values()) / 38)
        write_run(tmp_path, f"basic-seed{seed}", seed=seed, spec="basic", scores=s, tasks=keys, extra=[],
                  scale="small")
    board = leaderboard(str(tmp_path))
    (row,) = board.rows
    assert board.groups == ["ImageNet", "ImageNet dist. shifts", "VTAB", "Retrieval", "Average"]
    assert row.mean("Average") == pytest.approx(sum(avgs) / 2)
    assert row.std("Average") == pytest.approx(0.01 / math.sqrt(2))
    assert row.label == "basic"
    assert board.chance["ImageNet"] == pytest.approx(0.001)
    assert board.chance["Retrieval"] is None  # Flickr and MSCOCO have no random_score


def test_plot_data_are_the_leaderboards_means_and_stds(sweep, tmp_path):
    from dcslurm.datacomp.results import leaderboard, plot_data, plot_leaderboard

    board = leaderboard(str(sweep))
    panels = {p["column"]: p for p in plot_data(board)}
    assert list(panels) == ["Demo shapes", "Demo colours", "Demo retrieval"]
    shapes = panels["Demo shapes"]
    assert shapes["chance"] == pytest.approx(1 / 6)
    bars = {b["label"]: b for b in shapes["bars"]}
    assert bars["nofilter"]["mean"] == pytest.approx(0.2) and bars["nofilter"]["std"] == pytest.approx(sample_std(NOF))
    assert bars["nofilter"]["n"] == 3 and bars["clip30"]["n"] == 2
    assert bars["clip30"]["mean"] == pytest.approx(0.6) and bars["clip30"]["std"] == pytest.approx(sample_std(CL))
    assert bars["nofilter"]["color"] != bars["clip30"]["color"]  # one colour per filter, the same in every panel
    colors = {b["color"] for p in panels.values() for b in p["bars"] if b["label"] == "clip30"}
    assert colors == {bars["clip30"]["color"]}
    png = tmp_path / "board.png"
    plot_leaderboard(board, str(png))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        im.verify()


# -- 80 columns ----------------------------------------------------------------

def assert_reads_at(text: str, width: int, whole: list[str]) -> None:
    """No line wider than the terminal, and every name/number in `whole` on one line
    (a cell folded to a character per line would split them)."""
    for line in text.splitlines():
        assert len(line) <= width, line
    for s in whole:
        assert s in text, (s, text)


def test_results_table_reads_at_80_columns(sweep):
    from dcslurm.cli import app

    out = CliRunner().invoke(app, ["results", str(sweep)], env={"COLUMNS": "80"})
    assert out.exit_code == 0, out.output
    nof = f"{sum(NOF) / 3:.3f}±{sample_std(NOF):.3f}"
    assert_reads_at(out.output, 80, ["nofilter", "clip30", "Demo shapes", "Demo colours", "Demo retrieval",
                                     nof, "0.600±", "0.167", "1,888", CLIP, "clip30-seed2"])
    assert "not finished" in out.output and "38 of 38" not in out.output


def test_results_per_run_table_reads_at_80_columns(sweep):
    from dcslurm.cli import app

    out = CliRunner().invoke(app, ["results", str(sweep), "--runs"], env={"COLUMNS": "80"})
    assert out.exit_code == 0, out.output
    assert_reads_at(out.output, 80, ["nofilter-seed1", "clip30-seed1", "clip30-seed2", "Demo shapes", "0.700",
                                     "not finished"])


def test_leaderboard_tables_never_fold_a_cell_to_one_character(tmp_path):
    """Eight filters with long names and all 38 tasks: split over several tables, each
    cell on one line, at 80 columns."""
    from dcslurm.cli.results import print_leaderboard
    from dcslurm.datacomp.results import leaderboard
    from dcslurm.datacomp.tasks import scored_tasks

    keys = [t.key for t in scored_tasks()]
    for i in range(8):
        write_run(tmp_path, f"filter-number-{i}-with-a-long-name", seed=0, spec=f"basic(min_words={i})",
                  scores=distinct_scores(), tasks=keys, extra=[], scale="small")
    console = Console(width=80, record=True)
    print_leaderboard(leaderboard(str(tmp_path)), console, per_task=True)
    text = console.export_text()
    assert_reads_at(text, 80, ["KITTI Vehicle Distance", "ImageNet dist. shifts", "Describable Textures",
                               "filter-number-7…", "basic(min_words=7)"])
    cells = re.findall(r"\b0\.\d{3}\b", text)
    assert len(cells) >= 8 * 43  # every filter's 38 tasks + 5 groups, each whole on its line


def test_scales_table_reads_at_80_columns():
    from dcslurm.cli import app

    out = CliRunner().invoke(app, ["scales"], env={"COLUMNS": "80"})
    assert out.exit_code == 0, out.output
    assert_reads_at(out.output, 80, ["12,800,000,000", "dcslurm-tiny-vit", "ViT-L-14", "xlarge", "medium",
                                     "90,112", "142,046", "41,472.0", "1.1e+21"])


def test_end_of_run_table_reads_at_80_columns(sweep):
    from dcslurm.cli.results import run_tables
    from dcslurm.core.storage import DataFolder
    from dcslurm.datacomp.results import read_run

    console = Console(width=80, record=True)
    for t in run_tables(read_run(DataFolder(str(sweep / "runs" / "nofilter"))), 80):
        console.print(t)
    text = console.export_text()
    assert_reads_at(text, 80, ["Demo shapes", "Demo retrieval", "0.200", "0.167"])
    assert "38 of 38" not in text and "missing" not in text


def test_plan_table_printed_by_plan_and_submit_reads_at_80_columns(monkeypatch):
    """The table `plan` prints, and `submit` prints at the end of a run: xlarge, every stage."""
    from dcslurm import cli
    from dcslurm.core.config import parse_config
    from dcslurm.core.plan import make_plan
    from dcslurm.core.plantypes import PlanInputs

    raw = {"run": {"folder": "/runs/xl", "scale": "xlarge"}, "pool": {"metadata": "/pool"},
           "stages": {"filter": {"spec": CLIP}, "eval": {"evalsets": "/sets"}}}
    files = tuple(f"/pool/{i:08d}.parquet" for i in range(128_000))
    plan = make_plan(parse_config(raw, "run.toml"), PlanInputs(metadata_files=files))
    console = Console(width=80, record=True)
    monkeypatch.setattr(cli, "console", console)
    cli._print_plan(plan)
    text = console.export_text()
    assert_reads_at(text, 80, [*(f" {s.name} " for s in plan.steps), "distributed", "41,472.0", "12,818.2", "128,000"])


def test_seed_and_filter_from_the_run_toml_in_the_folder(tmp_path):
    """A run folder that has its run.toml but no plan.json yet (e.g. written by a sweep)."""
    from dcslurm.datacomp.results import leaderboard

    for seed in (0, 1):
        run = tmp_path / f"b-seed{seed}"
        (run / "eval").mkdir(parents=True)
        write_toml(run / "run.toml", {"run": {"folder": str(run), "scale": "tiny", "seed": seed},
                                      "stages": {"filter": {"spec": "basic"}}})
        (run / "eval" / "results.jsonl").write_text(json.dumps(
            {"key": "demo/shapes", "dataset": "Demo shapes", "metrics": {"main_metric": 0.1 * (seed + 1)}}) + "\n")
    queued = tmp_path / "b-seed2"  # not submitted yet: its run.toml alone
    queued.mkdir()
    write_toml(queued / "run.toml", {"run": {"scale": "tiny", "seed": 2, "stages": ["train", "eval"]},
                                     "stages": {"filter": {"spec": "basic"}}})
    (row,) = leaderboard(str(tmp_path)).rows
    assert (row.filter, row.label, row.scale, row.seeds) == ("basic", "b", "tiny", [0, 1])
    assert row.mean("Demo shapes") == pytest.approx(0.15)
    assert [(u.name, u.seed) for u in row.unfinished] == [("b-seed2", 2)]
