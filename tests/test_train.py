"""Training stage: export to open_clip, scale configs, bad input.

Runs the real trainer through the local executor on real images (scikit-learn's
digits). Multi-process runs: test_train_distributed.py (local) and
test_train_slurm.py (the real cluster), both marked slow.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from dcslurm.core.config import ConfigError, load_config
from dcslurm.core.errors import UserError
from dcslurm.core.runs import submit_run
from dcslurm.core.storage import DataFolder
from tests.train_helpers import write_plan_toml, write_shards, write_train_toml


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("shards"))
    write_shards(folder, n_shards=4, per_shard=24)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards) -> str:
    """One short 1-rank run (2 workers), shared by the export, status and refusal tests."""
    tmp = tmp_path_factory.mktemp("trained")
    folder, failed = run_train(tmp, "run", shards, samples=16 * 3, workers=2, checkpoint_every=2)
    assert not failed
    return folder


def run_train(tmp_path, name: str, data: str, **kw) -> tuple[str, dict]:
    folder = str(tmp_path / name)
    cfg = load_config(write_train_toml(tmp_path / f"{name}.toml", folder, data, **kw))
    result = submit_run(cfg)
    return folder, result.failed


def final_weights(folder: str) -> dict:
    return torch.load(os.path.join(folder, "train", "model.pt"), weights_only=True)


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_exported_model_loads_in_stock_open_clip(trained):
    import open_clip

    from jobs.models import register_configs

    folder = trained
    register_configs()
    path = os.path.join(folder, "train", "model.pt")
    model, _, _ = open_clip.create_model_and_transforms("dcslurm-tiny-vit", pretrained=path)
    saved = torch.load(path, weights_only=True)
    assert saved["logit_scale"].shape == torch.Size([])  # stock shape, not FSDP's
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    # Trained, not the initial weights.
    fresh, _, _ = open_clip.create_model_and_transforms("dcslurm-tiny-vit")
    assert not torch.equal(fresh.state_dict()["visual.conv1.weight"], saved["visual.conv1.weight"])
    with open(os.path.join(folder, "train", "metrics.jsonl")) as f:
        line = json.loads(f.readline())
    assert {"loss", "lr", "samples_per_s", "samples_per_s_per_device", "mfu", "memory_gb"} <= line.keys()


def test_status_section_prints_the_last_metrics_line(trained):
    from rich.console import Console

    from dcslurm.core.plan import read_plan
    from dcslurm.datacomp.train_status import status_section

    folder = trained
    console = Console(record=True, width=300)
    status_section(read_plan(DataFolder(folder)), folder, console)
    text = console.export_text()
    assert "train: step 3, 48 samples, loss" in text and "checkpoint: step-00000003" in text


# -- bad input -------------------------------------------------------------------

def test_missing_and_empty_shards_are_one_line_errors(tmp_path, shards):
    import tarfile

    from jobs.train import data

    def error(source: str) -> str:
        with pytest.raises(UserError) as exc:
            data.check_shards(data.list_shards(source, {}), source, {})
        assert "\n" not in str(exc.value)
        return str(exc.value)

    assert error(str(tmp_path / "nowhere")).endswith("nowhere: training data folder does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert error(str(empty)).endswith("empty: no .tar training shards")
    with tarfile.open(empty / "00000000.tar", "w"):
        pass
    assert error(str(empty)).endswith("00000000.tar: training shard is empty")
    pattern = os.path.join(shards, "{00000000..00000009}.tar")
    assert error(pattern).endswith("00000004.tar: training shard does not exist")
    # At submit (the stage's preflight), before anything is queued or run.
    cfg = load_config(write_train_toml(tmp_path / "e.toml", str(tmp_path / "e"), str(empty), executor="slurm"))
    with pytest.raises(UserError, match=r"00000000.tar: training shard is empty$"):
        submit_run(cfg)
    assert not os.path.exists(tmp_path / "e")


def test_resume_from_another_models_checkpoint_is_refused(tmp_path, shards, trained):
    ckpt = os.path.join(trained, "train", "checkpoints", "step-00000002")
    assert os.path.exists(ckpt + ".json")
    # Refused at submit by the stage's preflight, before a job is queued.
    with pytest.raises(UserError) as exc:
        run_train(tmp_path, "other", shards, samples=16 * 2, model="RN50", resume=ckpt)
    assert str(exc.value) == f"{ckpt}: checkpoint of model 'dcslurm-tiny-vit', but this run trains 'RN50'"
    assert not os.path.exists(tmp_path / "other")
    # An incomplete checkpoint (no marker) is refused too.
    with pytest.raises(UserError) as exc:
        run_train(tmp_path, "incomplete", shards, samples=16 * 2, resume=str(tmp_path / "step-1"))
    assert str(exc.value).endswith("step-1: not a complete checkpoint (no step-1.json marker beside it)")


def test_unknown_scale_is_a_one_line_error(tmp_path, shards):
    toml = write_train_toml(tmp_path / "bad.toml", str(tmp_path / "r"), shards, scale="huge")
    with pytest.raises(ConfigError, match=r"scale: unknown scale 'huge'; choose one of tiny, debug, small"):
        load_config(toml)


@pytest.mark.parametrize("key, value", [("stop_after", 3), ("step_sleep", 0.5)])
def test_test_knobs_are_unknown_keys_in_a_run_toml(tmp_path, shards, key, value):
    """The trainer's test knobs are not config: a run.toml that sets one is refused (exit 2,
    one line naming the file and the key) before anything runs. Tests slow or stop a
    checkpointable step through dcslurm.core.task's test-only environment variables instead."""
    import subprocess
    import sys

    toml = write_train_toml(tmp_path / "knob.toml", str(tmp_path / "r"), shards, **{key: value})
    proc = subprocess.run([sys.executable, "-m", "dcslurm", "plan", "-c", toml], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"dcslurm: error: knob.toml: [stages.train]: unknown key '{key}' "), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert not os.path.exists(tmp_path / "r")


# -- scales and the plan ---------------------------------------------------------

def test_small_scale_dry_run_shows_hyperparameters_and_job_shape(tmp_path, shards):
    from typer.testing import CliRunner

    from dcslurm.cli import app

    toml = write_plan_toml(tmp_path / "small.toml", str(tmp_path / "run"), shards,  # plan checks the data
                           {"nodes": 2, "tasks_per_node": 4, "gpus_per_node": 4})  # like submit: real shards
    result = CliRunner().invoke(app, ["plan", "-c", str(toml), "--scale", "small", "--json"])
    assert result.exit_code == 0, result.output
    step = json.loads(result.output)["steps"][0]
    basis = step["estimate_basis"]
    for fact in ("ViT-B-32", "12,800,000 samples", "global batch 4,096 = 2 nodes x 4 tasks x 512 per rank",
                 "3,125 steps", "lr 0.0005", "warmup 500", "b2 0.98", "eps 1e-06", "wd 0.2"):
        assert fact in basis, (fact, basis)
    assert step["layout"] == "distributed" and step["tasks"] == 1
    assert step["gpu_hours"] == pytest.approx(4.0)
    assert step["resources"]["nodes"] == 2 and step["resources"]["tasks_per_node"] == 4
    result = CliRunner().invoke(app, ["plan", "-c", str(toml), "--scale", "small"])
    assert "global batch 4,096" in result.output.replace("\n", " ") or "4,096" in result.output


def test_scale_hyperparameters_are_the_papers():
    from dcslurm.core.scales import SCALES
    from jobs.train.spec import TrainParams, resolve_hyper

    small = resolve_hyper(SCALES["small"], TrainParams())
    assert (small.model, small.batch_size, small.lr, small.warmup, small.samples) == \
        ("ViT-B-32", 4096, 5e-4, 500, 12_800_000)
    assert (small.beta1, small.beta2, small.eps, small.weight_decay) == (0.9, 0.98, 1e-6, 0.2)
    xl = resolve_hyper(SCALES["xlarge"], TrainParams())
    assert (xl.model, xl.batch_size, xl.lr, xl.warmup, xl.beta2) == ("ViT-L-14", 90112, 1e-3, 10_000, 0.95)
    tiny = resolve_hyper(SCALES["tiny"], TrainParams(batch_size=16, warmup=0))
    assert (tiny.batch_size, tiny.warmup, tiny.lr) == (16, 0, SCALES["tiny"].lr)  # 0 is a warmup, not "unset"


# -- units ----------------------------------------------------------------------

def test_cosine_schedule_is_open_clips():
    from open_clip_train.scheduler import cosine_lr as reference

    from jobs.train.train import cosine_lr

    class Opt:
        param_groups = [{"lr": 0.0}]

    opt = Opt()
    ref = reference(opt, 5e-4, 500, 3125)
    for step in (0, 1, 250, 499, 500, 501, 2000, 3124):
        assert cosine_lr(step, 5e-4, 500, 3125) == pytest.approx(ref(step), rel=1e-12, abs=1e-15)


def test_batch_shape_preserves_the_global_batch():
    from jobs.train.train import batch_shape

    assert batch_shape(4096, 8, None, None) == batch_shape(4096, 8, 1, None)
    s = batch_shape(4096, 1, None, 512)
    assert (s.accum, s.micro_batch) == (8, 512)
    s = batch_shape(90112, 512, None, None)
    assert (s.accum, s.micro_batch, s.per_rank) == (1, 176, 176)
    with pytest.raises(UserError, match="not divisible by the world size 3"):
        batch_shape(4096, 3, None, None)


def test_global_batch_is_the_same_set_whatever_the_world_and_workers(shards):
    """The data of a step does not depend on world size or workers; positions resume exactly."""
    import open_clip

    from jobs.models import register_configs
    from jobs.train import data

    register_configs()
    _, transform, _ = open_clip.create_model_and_transforms("dcslurm-tiny-vit")
    tokenizer = open_clip.get_tokenizer("dcslurm-tiny-vit")
    found = data.list_shards(shards, {})

    def steps(world: int, workers: int, n: int, positions=None):
        out = [[] for _ in range(n)]
        final = {}
        for rank in range(world):
            layout = data.make_layout(16, 4, rank, world)
            ds = data.StepBatches(found, layout, positions or {}, 0, 8, transform, tokenizer, {})
            rb = data.RankBatches(ds, workers)
            it = iter(rb)
            for i in range(n):
                images, texts = next(it)
                out[i] += [(images[j].sum().item(), tuple(texts[j].tolist())) for j in range(len(images))]
            final.update(rb.positions)
        return [sorted(x) for x in out], final

    one, pos = steps(1, 0, 3)
    two, _ = steps(2, 2, 3)
    assert one == two
    assert pos == {0: 12, 1: 12, 2: 12, 3: 12}
    assert len(set(one[0]) & set(one[1])) < 16  # consecutive steps are different samples
    whole, _ = steps(1, 0, 5)
    resumed, _ = steps(1, 1, 2, positions=pos)
    assert whole[3:] == resumed


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    import open_clip

    from jobs.models import register_configs
    from jobs.train import data

    register_configs()
    folder = str(tmp_path / "bad")
    write_shards(folder, n_shards=1, per_shard=12, corrupt=3)
    _, transform, _ = open_clip.create_model_and_transforms("dcslurm-tiny-vit")
    tokenizer = open_clip.get_tokenizer("dcslurm-tiny-vit")
    ds = data.StepBatches(data.list_shards(folder, {}), data.make_layout(8, 1, 0, 1), {}, 0, 1,
                          transform, tokenizer, {})
    rb = data.RankBatches(ds, 0)
    images, _ = next(iter(rb))
    assert images.shape[0] == 8
    assert rb.bad_samples == 3 and rb.positions == {0: 11}
    assert not math.isnan(images.sum().item())


def test_stream_resumes_mid_stream_with_and_without_a_size_table(shards):
    """A stream started at position p yields what the whole stream yields from p on; with a
    size table, whole shards before p are skipped unread."""
    import itertools

    from jobs.train import data

    plain = data.list_shards(shards, {})
    sized = [data.Shard(s.url, 24) for s in plain]
    whole = [(p, s["__key__"]) for p, s in itertools.islice(data.SampleStream(plain, 3, 1, 8, {}).samples(0), 100)]
    for shard_list in (plain, sized):
        stream = data.SampleStream(shard_list, 3, 1, 8, {})
        resumed = [(p, s["__key__"]) for p, s in itertools.islice(stream.samples(61), 39)]
        assert resumed == whole[61:]
    assert len({k for _, k in whole}) > 48  # draws with replacement across several shards
