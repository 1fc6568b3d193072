"""Embed stage: DataComp layout, scores equal to open_clip's, determinism, bad input,
resume; on S3 and SLURM when those fixtures run.

The models are the tiny open_clip config `dcslurm-tiny-vit` with random-init
checkpoints saved to files here, named `b32` and `l14` so the outputs carry
DataComp's key names.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dcslurm.core.config import load_config
from dcslurm.core.errors import UserError
from dcslurm.core.markers import read_marker
from dcslurm.core.runs import submit_run
from dcslurm.core.tomlfile import write_toml
from jobs.embed.spec import EmbedParams
from jobs.embed.tar_samples import CorruptShard, iter_samples
from jobs.wds import split_key
from tests.core_helpers import merge_tables

LONG_CAPTION = " ".join(["a very long caption about a cat sitting on a mat"] * 12)  # > 77 tokens


# -- test data ------------------------------------------------------------------

def _real_images() -> list[np.ndarray]:
    import skimage.data as data

    return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.camera()]


def _jpeg(arr: np.ndarray, size: tuple[int, int], fmt: str = "JPEG", mode: str | None = None) -> bytes:
    img = Image.fromarray(arr).resize(size)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: str, shard: int, n_good: int, bad: bool = False) -> list[dict]:
    """An img2dataset-style shard; returns the good samples (key, uid, caption, image bytes) in order."""
    images = _real_images()
    good = []
    with tarfile.open(path, "w") as tar:
        for i in range(n_good + (3 if bad else 0)):
            key = f"{shard:04d}{i:04d}"
            uid = f"{shard:016x}{i:016x}"
            arr = images[i % len(images)]
            kind = "good"
            if i == 1:
                image, ext = _jpeg(arr, (180, 260), "PNG", "RGBA"), "png"
            elif i == 2:
                image, ext = _jpeg(arr, (300, 200), "JPEG", "L"), "jpg"
            else:
                image, ext = _jpeg(arr, (240 + 13 * i, 200 + 7 * i)), "jpg"
            subject = ["an astronaut", "a cat", "coffee", "a rocket", "a camera man"][i % 5]
            caption = LONG_CAPTION if i == 3 else f"photo {i} of {subject}"
            meta = {"uid": uid, "key": key, "url": f"http://example.com/{key}.jpg", "original_width": 640,
                    "original_height": 480, "sha256": f"{i:064x}", "status": "success", "error_message": None}
            if bad and i >= n_good:
                kind = ["undecodable", "no_caption", "no_uid"][i - n_good]
            if kind == "undecodable":
                image = b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10
            if kind == "no_uid":
                meta.pop("uid")
            _add(tar, f"{key}.{ext}", image)
            if kind != "no_caption":
                _add(tar, f"{key}.txt", caption.encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            if kind == "good":
                good.append({"key": key, "uid": uid, "caption": caption, "image": image})
    return good


def write_truncated_shard(path: str, source: str) -> None:
    data = open(source, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2 + 100])


def save_tiny_checkpoint(path: str, seed: int) -> str:
    from jobs.models import create_model

    model, _, _, _ = create_model("dcslurm-tiny-vit", "", "cpu", seed)
    torch.save(model.state_dict(), path)
    return path


def write_config(path, run_folder, shards, ckpts, per_task=3, workers=2, batch=4, extra_params: dict | None = None,
                 executor="local", extra: dict | None = None) -> str:
    """An embed-only run.toml; `extra_params`: more [stages.embed] keys, `extra`: more tables, merged in."""
    doc = {
        "run": {"folder": run_folder, "scale": "tiny", "stages": ["embed"]},
        "pool": {"shards": shards},
        "stages": {"embed": {
            "models": [{"name": n, "model": "dcslurm-tiny-vit", "pretrained": p} for n, p in ckpts.items()],
            "batch_size": batch, "workers": workers, "device": "cpu", "units_per_task": per_task,
            **(extra_params or {}),
            "resources": {"gpus_per_node": 0, "cpus_per_task": 1, "mem": "1000M", "time": "00:10:00"},
        }},
        "executor": {"kind": executor},
    }
    return write_toml(path, merge_tables(doc, extra or {}))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed-data")
    shards = root / "shards"
    shards.mkdir()
    good = {
        "00000000": write_shard(str(shards / "00000000.tar"), 0, 9),
        "00000001": write_shard(str(shards / "00000001.tar"), 1, 7, bad=True),
    }
    write_truncated_shard(str(shards / "00000002.tar"), str(shards / "00000000.tar"))
    ckpts = {"b32": save_tiny_checkpoint(str(root / "tiny-a.pt"), 1),
             "l14": save_tiny_checkpoint(str(root / "tiny-b.pt"), 2)}
    return {"root": root, "shards": str(shards), "good": good, "ckpts": ckpts}


@pytest.fixture(scope="module")
def ref_run(data):
    """All three shards in one task, two decode workers, batches of 4."""
    run = data["root"] / "ref"
    cfg = write_config(data["root"] / "ref.toml", str(run), data["shards"], data["ckpts"])
    result = submit_run(load_config(cfg))
    assert not result.failed, open(next((run / "logs" / "embed").iterdir())).read()[-3000:]
    return run


def _arrays(run, stem):
    with np.load(os.path.join(run, "embed", f"{stem}.npz")) as z:
        return {k: z[k] for k in z.files}


# -- units ----------------------------------------------------------------------

def test_tar_reader_groups_members_and_flags_damage(data, tmp_path):
    with open(os.path.join(data["shards"], "00000000.tar"), "rb") as f:
        samples = list(iter_samples(f))
    assert [s.key for s in samples] == [g["key"] for g in data["good"]["00000000"]]
    assert set(samples[1].members) == {"png", "txt", "json"}
    assert split_key("dir/0001.seg.png") == ("dir/0001", "seg.png")  # the key rule the grouping uses
    with open(os.path.join(data["shards"], "00000002.tar"), "rb") as f, pytest.raises(CorruptShard, match="x.tar"):
        list(iter_samples(f, "x.tar"))


@pytest.mark.parametrize("params, message", [
    ({"models": []}, "models: needs at least one model"),
    ({"models": [{"name": "B32", "model": "ViT-B-32"}]}, "models[0] name"),
    ({"models": [{"name": "a", "model": "m"}, {"name": "a", "model": "m"}]}, "used twice"),
    ({"models": [{"name": "a", "model": "m", "weights": "x"}]}, "unknown key 'weights'"),
    ({"batch_size": 0}, "batch_size"),
    ({"device": "tpu"}, "device"),
])
def test_params_one_line_errors(params, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        EmbedParams(**params).validate()


def test_defaults_are_datacomps_two_models():
    assert [(m["name"], m["model"], m["pretrained"]) for m in EmbedParams().models] == [
        ("b32", "ViT-B-32", "openai"), ("l14", "ViT-L-14", "openai")]


def test_plan_books_gpu_hours_from_the_models():
    """1,282 DataComp-small shards with the two default models: clip-retrieval's A100 rates."""
    from dcslurm.core.config import parse_config
    from dcslurm.core.plan import make_plan
    from dcslurm.core.plantypes import PlanInputs
    from dcslurm.core.shards import UnitSet

    raw = {"run": {"folder": "/tmp/x", "scale": "small", "stages": ["embed"]},
           "stages": {"embed": {"units_per_task": 10}}}
    plan = make_plan(parse_config(raw), PlanInputs(shards=UnitSet(count=1282, pattern="s3://b/{:08d}.tar")))
    step = plan.step("embed")
    assert step.gpu and step.n_tasks == 129 and step.resources.gpus_per_node == 1
    assert step.estimate.gpu_hours == pytest.approx(1282 * 10_000 * (1 / 2500 + 1 / 312) / 3600)


# -- a whole run ----------------------------------------------------------------

def test_outputs_load_like_datacomps_files(ref_run, data):
    for stem, good in data["good"].items():
        arrays = _arrays(ref_run, stem)
        assert sorted(arrays) == ["b32_img", "b32_txt", "l14_img", "l14_txt"]
        for arr in arrays.values():
            assert arr.dtype == np.float16 and arr.shape == (len(good), 64)
            np.testing.assert_allclose(np.linalg.norm(arr.astype(np.float32), axis=1), 1.0, atol=2e-3)
        table = pq.read_table(os.path.join(ref_run, "embed", f"{stem}.parquet"))
        assert table.column_names[:4] == ["uid", "key", "url", "text"]
        assert {"original_width", "original_height", "sha256", "clip_b32_similarity_score",
                "clip_l14_similarity_score"} <= set(table.column_names)
        assert "status" not in table.column_names  # download bookkeeping stays out
        df = table.to_pandas()
        assert list(df["uid"]) == [g["uid"] for g in good]  # tar order, same rows as the npz
        assert list(df["text"]) == [g["caption"] for g in good]
        # The score column is the cosine of the stored embeddings (fp16 storage).
        cos = (arrays["b32_img"].astype(np.float32) * arrays["b32_txt"].astype(np.float32)).sum(1)
        np.testing.assert_allclose(df["clip_b32_similarity_score"], cos, atol=2e-3)
    marker = read_marker(load_config(str(data["root"] / "ref.toml")).folder(), "embed", 0)
    assert marker["outputs"] == ["embed/00000000.parquet", "embed/00000001.parquet"]


def test_scores_equal_open_clip_encode(ref_run, data):
    from jobs.models import create_model

    for name, ckpt in data["ckpts"].items():
        model, _, preprocess, tokenizer = create_model("dcslurm-tiny-vit", ckpt, "cpu", 0)
        model.eval()
        for stem, good in data["good"].items():
            with torch.no_grad():
                images = torch.stack([preprocess(Image.open(io.BytesIO(g["image"])).convert("RGB")) for g in good])
                img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
                txt = torch.nn.functional.normalize(model.encode_text(tokenizer([g["caption"] for g in good])), dim=-1)
            expected = (img * txt).sum(-1).numpy()
            got = pq.read_table(os.path.join(ref_run, "embed", f"{stem}.parquet")).column(
                f"clip_{name}_similarity_score").to_numpy()
            np.testing.assert_allclose(got, expected, atol=1e-3)
            arrays = _arrays(ref_run, stem)
            np.testing.assert_allclose(arrays[f"{name}_img"].astype(np.float32), img.numpy(), atol=2e-3)
            np.testing.assert_allclose(arrays[f"{name}_txt"].astype(np.float32), txt.numpy(), atol=2e-3)


def test_bad_samples_and_damaged_shard_are_counted_not_committed(ref_run, data):
    stats = read_marker(load_config(str(data["root"] / "ref.toml")).folder(), "embed", 0)["stats"]
    assert stats["samples"] == 9 + 7
    assert stats["skipped_undecodable_image"] == 1
    assert stats["skipped_missing_caption"] == 1
    assert stats["skipped_missing_uid"] == 1
    assert stats["captions_truncated"] == 2  # one long caption per good shard, kept (cut as open_clip cuts)
    assert stats["shards_committed"] == 2 and stats["shards_corrupt"] == 1
    assert "00000002.tar" in stats["corrupt_shards"][0] and "\n" not in stats["corrupt_shards"][0]
    assert stats["samples_per_s"] > 0
    assert not [n for n in os.listdir(ref_run / "embed") if n.startswith("00000002") or ".tmp-" in n]


def test_identical_whatever_the_grouping_and_workers_then_resume(ref_run, data):
    """Two shards a task and decoding in the main process give bit-identical files; a
    rerun recomputes only shards whose parquet (the commit) is missing."""
    run = data["root"] / "pertask"
    cfg_path = write_config(data["root"] / "pertask.toml", str(run), data["shards"], data["ckpts"],
                            per_task=2, workers=0)
    cfg = load_config(cfg_path)
    assert not submit_run(cfg).failed
    for stem in data["good"]:
        ref, got = _arrays(ref_run, stem), _arrays(run, stem)
        assert all(np.array_equal(ref[k], got[k]) for k in ref)
        assert pq.read_table(run / "embed" / f"{stem}.parquet").equals(
            pq.read_table(ref_run / "embed" / f"{stem}.parquet"))
    marker = read_marker(cfg.folder(), "embed", 1)  # the damaged shard alone: committed task, no output
    assert marker["outputs"] == [] and marker["stats"]["shards_corrupt"] == 1

    # A killed attempt of task 0: shard 0 committed, shard 1's npz half written, no parquet, no marker.
    npz_before = (run / "embed" / "00000001.npz").read_bytes()
    (run / "embed" / "00000001.npz").write_bytes(b"partial")
    (run / "embed" / "00000001.parquet").unlink()
    os.unlink(run / "_markers" / "embed" / "000000.json")
    mtime0 = os.stat(run / "embed" / "00000000.parquet").st_mtime_ns
    assert not submit_run(cfg).failed
    marker = read_marker(cfg.folder(), "embed", 0)
    assert marker["stats"]["shards_already_done"] == 1 and marker["stats"]["samples"] == 7
    assert marker["outputs"] == ["embed/00000000.parquet", "embed/00000001.parquet"]
    assert os.stat(run / "embed" / "00000000.parquet").st_mtime_ns == mtime0
    assert (run / "embed" / "00000001.npz").read_bytes() == npz_before


def test_missing_model_file_is_one_line_error_without_outputs(data):
    run = data["root"] / "missing"
    missing = str(data["root"] / "no-such-checkpoint.pt")
    cfg_path = write_config(data["root"] / "missing.toml", str(run), data["shards"],
                            {"b32": data["ckpts"]["b32"], "l14": missing})
    cfg = load_config(cfg_path)
    # Refused by the stage's preflight, before any task is queued (no task tries for weights).
    with pytest.raises(UserError, match=f"^{re.escape(missing)}: model checkpoint file does not exist$"):
        submit_run(cfg)
    assert not os.path.exists(run)


def test_gpu_decode_path_agrees_with_pil_path(ref_run, data):
    """gpu_decode's code path (torchvision.io.decode_jpeg + torch resize), here on the CPU."""
    run = data["root"] / "devdecode"
    cfg_path = write_config(data["root"] / "devdecode.toml", str(run), data["shards"], data["ckpts"],
                            extra_params={"gpu_decode": True})
    assert not submit_run(load_config(cfg_path)).failed
    stats = read_marker(load_config(cfg_path).folder(), "embed", 0)["stats"]
    assert stats["samples"] == 16 and stats["skipped_undecodable_image"] == 1
    for stem in data["good"]:
        ref = pq.read_table(ref_run / "embed" / f"{stem}.parquet").to_pandas()
        got = pq.read_table(run / "embed" / f"{stem}.parquet").to_pandas()
        assert list(got["uid"]) == list(ref["uid"])
        # Resampling differs from PIL's in the last bits of each pixel, not in what the image shows.
        np.testing.assert_allclose(got["clip_b32_similarity_score"], ref["clip_b32_similarity_score"], atol=1e-2)
        a, b = _arrays(ref_run, stem)["l14_img"].astype(np.float32), _arrays(run, stem)["l14_img"].astype(np.float32)
        assert ((a * b).sum(1) > 0.99).all()


# -- the same shards on the SLURM cluster and on S3 --------------------------------

def _assert_same_outputs(ref_run, read_npz, read_parquet, stems):
    for stem in stems:
        ref = _arrays(ref_run, stem)
        got = read_npz(stem)
        assert sorted(got) == sorted(ref) and all(np.array_equal(ref[k], got[k]) for k in ref), stem
        assert read_parquet(stem).equals(pq.read_table(ref_run / "embed" / f"{stem}.parquet")), stem


@pytest.mark.slurm
def test_slurm_run_gives_identical_embeddings(slurm_cluster, ref_run, data, tmp_path):
    """The reference run's config on the SLURM cluster (one shard a task): bit-identical files."""
    from tests.core_helpers import wait_run_done

    run = tmp_path / "slurm-run"
    cfg_path = write_config(tmp_path / "slurm.toml", str(run), data["shards"], data["ckpts"], per_task=1,
                            executor="slurm")
    submit_run(load_config(cfg_path))
    wait_run_done(cfg_path, timeout=600)
    _assert_same_outputs(ref_run, lambda s: _arrays(run, s),
                         lambda s: pq.read_table(run / "embed" / f"{s}.parquet"), data["good"])
    assert read_marker(load_config(cfg_path).folder(), "embed", 2)["stats"]["shards_corrupt"] == 1


@pytest.mark.s3
def test_shards_and_run_folder_on_s3(s3_server, s3_bucket, ref_run, data, tmp_path):
    """Shards read from s3:// through fsspec, outputs committed to s3://: the same files."""
    fs = s3_server.fs()
    bucket = s3_bucket.removeprefix("s3://")
    for name in sorted(os.listdir(data["shards"])):
        fs.put_file(os.path.join(data["shards"], name), f"{bucket}/pool/{name}")
    cfg_path = write_config(tmp_path / "s3.toml", f"{s3_bucket}/run", f"{s3_bucket}/pool", data["ckpts"],
                            extra={"executor": {"log_dir": f"{tmp_path}/logs"},
                                   "storage": {"endpoint_url": s3_server.endpoint_url}})
    cfg = load_config(cfg_path)
    assert not submit_run(cfg).failed
    folder = cfg.folder()

    def read_npz(stem):
        with np.load(io.BytesIO(folder.read_bytes(f"embed/{stem}.npz"))) as z:
            return {k: z[k] for k in z.files}

    _assert_same_outputs(ref_run, read_npz,
                         lambda s: pq.read_table(io.BytesIO(folder.read_bytes(f"embed/{s}.parquet"))),
                         data["good"])
    assert not [p for p in fs.find(f"{bucket}/run/embed") if "00000002" in p or ".tmp-" in p]
