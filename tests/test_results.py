"""Results: DataComp's aggregation, missing tasks, the `dcslurm results` command."""

from __future__ import annotations

import csv
import io
import json
import os

import pytest
from typer.testing import CliRunner

from dcslurm.core.errors import UserError
from dcslurm.datacomp.results import aggregate, gather, parse_results
from dcslurm.datacomp.tasks import Task, datacomp_tasks, get_task, register_task, scored_tasks, unregister_task

SHIFTS = ["ImageNet Sketch", "ImageNet v2", "ImageNet-A", "ImageNet-O", "ImageNet-R", "ObjectNet"]
VTAB = ["Caltech-101", "CIFAR-100", "CLEVR Counts", "CLEVR Distance", "Describable Textures", "EuroSAT",
        "KITTI Vehicle Distance", "Oxford Flowers-102", "Oxford-IIIT Pet", "PatchCamelyon", "RESISC45",
        "SVHN", "SUN397"]
RETRIEVAL = ["Flickr", "MSCOCO", "WinoGAViL"]


def results_lines(scores: dict[str, float], unscored: bool = True) -> str:
    """A results.jsonl in DataComp's format; FairFace/UTKFace without a main metric."""
    lines = []
    for task in datacomp_tasks().values():
        if task.name in scores:
            metrics = {task.main_metric: scores[task.name], "main_metric": scores[task.name]}
        elif not task.scored and unscored:
            metrics = {"acc_race_avg": 0.5, "main_metric": None}
        else:
            continue
        lines.append(json.dumps({"key": task.key, "dataset": task.name, "metrics": metrics}))
    return "\n".join(lines) + "\n"


def distinct_scores() -> dict[str, float]:
    # i/100 + 0.003 per task: every group mean differs from a mean over the wrong tasks
    return {t.name: round(0.003 + i / 100, 6) for i, t in enumerate(scored_tasks())}


def test_registry_has_datacomp_38_plus_two_fairness():
    tasks = datacomp_tasks()
    assert len(tasks) == 40 and len(scored_tasks()) == 38
    assert {t.name for t in tasks.values() if not t.scored} == {"FairFace", "UTKFace"}
    assert get_task("wilds/iwildcam").main_metric == "F1-macro_all"
    assert get_task("fairness/dollar_street").main_metric == "acc_top5_wg"
    assert get_task("Flickr").main_metric == "mean_recall@1"
    assert get_task("vtab/pets").main_metric == "mean_per_class_recall"
    assert get_task("fairness/geode").evalset_dir == "wds_geode_test"
    assert get_task("vtab/cifar100").evalset_dir == "wds_vtab-cifar100_test"
    assert get_task("imagenet1k").random_score == pytest.approx(0.001)


def test_unknown_task_is_one_line_error():
    with pytest.raises(UserError) as exc:
        get_task("imagenet22k")
    assert "unknown eval task 'imagenet22k'" in str(exc.value) and "\n" not in str(exc.value)


def test_aggregate_of_38_tasks_equals_hand_computed_group_means():
    s = distinct_scores()
    agg = aggregate(parse_results(results_lines(s)))
    assert agg.missing == [] and agg.n_scored == 38
    assert agg.scores["ImageNet"] == s["ImageNet 1k"]
    assert agg.scores["ImageNet dist. shifts"] == pytest.approx(sum(s[n] for n in SHIFTS) / 6, abs=1e-12)
    assert agg.scores["VTAB"] == pytest.approx(sum(s[n] for n in VTAB) / 13, abs=1e-12)
    assert agg.scores["Retrieval"] == pytest.approx(sum(s[n] for n in RETRIEVAL) / 3, abs=1e-12)
    # 0.003 + (0 + 1 + ... + 37) / 100 / 38: FairFace/UTKFace (main_metric null) are not averaged in
    assert agg.scores["Average"] == pytest.approx(0.003 + sum(range(38)) / 100 / 38, abs=1e-12)


def test_37_tasks_say_which_is_missing_and_never_average_it_as_zero():
    s = distinct_scores()
    del s["SVHN"]
    agg = aggregate(parse_results(results_lines(s)))
    assert agg.missing == ["SVHN"] and agg.n_scored == 37
    assert agg.scores["VTAB"] is None and agg.scores["Average"] is None
    assert agg.scores["ImageNet dist. shifts"] == pytest.approx(sum(s[n] for n in SHIFTS) / 6, abs=1e-12)


def test_later_line_replaces_earlier_one_of_same_dataset():
    s = distinct_scores()
    text = results_lines(s) + json.dumps({"key": "imagenet1k", "dataset": "ImageNet 1k",
                                          "metrics": {"acc1": 0.9, "main_metric": 0.9}}) + "\n"
    assert aggregate(parse_results(text)).scores["ImageNet"] == 0.9


def test_bad_results_line_is_one_line_error():
    with pytest.raises(UserError, match="line 2 is not JSON"):
        parse_results('{"dataset": "x", "metrics": {}}\n{oops\n', "r.jsonl")


def write_run(root, name: str, scale: str, filter_name: str, scores: dict[str, float], subset: int):
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "results.jsonl").write_text(results_lines(scores))
    (run / "plan.json").write_text(json.dumps({"run_name": name, "scale": scale,
                                               "stage_params": {"filter": {"name": filter_name}}}))
    (run / "filter").mkdir()
    (run / "filter" / "stats.json").write_text(json.dumps({"kept_rows": subset, "input_rows": subset}))
    return run


def test_results_command_table_exports_and_plot(tmp_path):
    from dcslurm.cli import app

    s = distinct_scores()
    write_run(tmp_path, "small-clip", "small", "clip_score", s, 3_840_000)
    partial = dict(s)
    del partial["MSCOCO"]
    write_run(tmp_path, "small-basic", "small", "basic", partial, 4_000_000)
    runner = CliRunner()
    out = runner.invoke(app, ["results", str(tmp_path), "--plot", str(tmp_path / "results.png")],
                        env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    assert "small-clip" in out.output and "clip_score" in out.output and "3,840,000" in out.output
    assert "missing" in out.output and "MSCOCO" in out.output
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    out = runner.invoke(app, ["results", str(tmp_path), "--csv"])  # the leaderboard: a row per filter
    rows = {r["filter"]: r for r in csv.DictReader(io.StringIO(out.output))}
    assert float(rows["clip_score"]["Average mean"]) == pytest.approx(0.003 + sum(range(38)) / 100 / 38)
    assert rows["basic"]["Average mean"] == "" and rows["basic"]["Average n"] == "0"
    assert float(rows["chance"]["ImageNet mean"]) == pytest.approx(0.001)

    out = runner.invoke(app, ["results", str(tmp_path), "--csv", "--runs"])
    rows = list(csv.DictReader(io.StringIO(out.output)))
    by_run = {r["run"]: r for r in rows}
    assert float(by_run["small-clip"]["Average"]) == pytest.approx(0.003 + sum(range(38)) / 100 / 38)
    assert by_run["small-basic"]["Average"] == "" and by_run["small-basic"]["Retrieval"] == ""
    assert "MSCOCO" in by_run["small-basic"]["missing"]

    out = runner.invoke(app, ["results", str(tmp_path), "--json", "--runs"])
    data = {r["run"]: r for r in json.loads(out.output)}
    assert data["small-basic"]["missing"] == ["MSCOCO"] and data["small-clip"]["subset_size"] == 3_840_000

    out = runner.invoke(app, ["results", str(tmp_path), "--markdown", "--runs"])
    assert out.output.startswith("| run | scale | filter |") and "| missing |" in out.output
    out = runner.invoke(app, ["results", str(tmp_path), "--markdown"])
    assert out.output.startswith("| filter | scale | training samples | seeds | ImageNet |")


def test_extra_tasks_are_reported_but_not_aggregated(tmp_path):
    register_task(Task(key="demo/shapes", name="Demo shapes", evalset="demo_shapes"))
    try:
        line = json.dumps({"key": "demo/shapes", "dataset": "Demo shapes",
                           "metrics": {"acc1": 0.75, "main_metric": 0.75}})
        agg = aggregate(parse_results(line + "\n"))
        assert agg.extras == {"Demo shapes": 0.75} and agg.scores["Average"] is None and len(agg.missing) == 38
        assert get_task("demo/shapes").group == "extra"
    finally:
        unregister_task("demo/shapes")
    # a later process (dcslurm results) has not registered it, and still reports it
    assert aggregate(parse_results(line + "\n")).extras == {"Demo shapes": 0.75}


def test_gather_without_results_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match="no eval/results.jsonl"):
        gather([str(tmp_path)])


@pytest.mark.s3
def test_results_over_runs_in_s3(s3_bucket, s3_server, tmp_path):
    from dcslurm.cli import app
    from dcslurm.core.storage import DataFolder

    s = distinct_scores()
    local = tmp_path / "runs"
    write_run(local, "tiny-a", "tiny", "basic", s, 1000)
    write_run(local, "small-b", "small", "clip_score", s, 2000)
    dest = DataFolder(f"{s3_bucket}/runs", s3_server.storage_options())
    for dirpath, _, files in os.walk(local):
        for f in files:
            path = os.path.join(dirpath, f)
            dest.put_file(path, os.path.relpath(path, local))
    png = tmp_path / "s3.png"
    out = CliRunner().invoke(app, ["results", f"{s3_bucket}/runs", "--endpoint-url", s3_server.endpoint_url,
                                   "--plot", str(png)], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    assert "tiny-a" in out.output and "small-b" in out.output
    assert f"{0.003 + sum(range(38)) / 100 / 38:.3f}" in out.output
    assert png.read_bytes()[:4] == b"\x89PNG"
