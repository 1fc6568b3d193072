"""Checks before anything is queued (issue 17 item 4): `dcslurm plan` and `dcslurm submit`
fail in one line naming the file for every input they can reach (model weights, eval
sets, checkpoints, subset files, pool columns), with nothing written to the run folder;
what only a finished step knows is the first line of `dcslurm status`.

No test downloads anything: HF_HUB_OFFLINE=1 and an empty HOME / HF_HOME.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcslurm.core.tomlfile import write_toml
from tests.test_eval_fixtures import make_classification_set


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return home


def _uid(i: int) -> str:
    return f"{i:032x}"


def _pool(folder, n: int = 8, start: int = 0, scores: bool = True, npz: bool = False) -> str:
    os.makedirs(folder, exist_ok=True)
    cols = {"uid": [_uid(start + i) for i in range(n)], "url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(n)],
            "text": [f"caption {i}" for i in range(n)]}
    if scores:
        cols["clip_b32_similarity_score"] = [0.1 * i for i in range(n)]
        cols["clip_l14_similarity_score"] = [0.1 * i for i in range(n)]
    pq.write_table(pa.table(cols), str(folder / "a.parquet"))
    if npz:
        np.savez(folder / "a.npz", l14_img=np.ones((n, 4), np.float16))
    return str(folder)


def _shards(folder, n: int = 2) -> str:
    os.makedirs(folder, exist_ok=True)
    for s in range(n):
        with tarfile.open(folder / f"{s:08d}.tar", "w") as tar:
            for name, data in ((f"{s:04d}.txt", b"a caption"), (f"{s:04d}.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(folder)


def _toml(tmp_path, stages, tables: dict | None = None, pool: dict | None = None, **more) -> str:
    """A local run of `stages`: [stages.NAME] from `tables`, [pool] from `pool`, `more` top-level tables."""
    return write_toml(tmp_path / "run.toml", {
        "run": {"folder": str(tmp_path / "run"), "scale": "tiny", "stages": list(stages)},
        "executor": {"kind": "local"}, **({"pool": pool} if pool else {}), "stages": tables or {}, **more})


def _cli(monkeypatch, capsys, *argv: str, stream: str = "err") -> tuple[int, list[str]]:
    """Run `dcslurm ARGV` in this process through the real entry point; (exit code, lines of `stream`)."""
    from dcslurm.cli import main

    monkeypatch.setattr(sys, "argv", ["dcslurm", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, getattr(capsys.readouterr(), stream).strip().splitlines()


def _refused(tmp_path, monkeypatch, capsys, config: str, *fragments: str) -> str:
    """`plan` and `submit` both exit 2 with the same one line holding `fragments`; nothing queued."""
    lines_seen = []
    for command in ("plan", "submit"):
        code, lines = _cli(monkeypatch, capsys, command, "-c", config)
        assert code == 2, (command, lines)
        assert len(lines) == 1 and lines[0].startswith("dcslurm: error: "), (command, lines)
        for fragment in fragments:
            assert fragment in lines[0], (command, lines[0])
        lines_seen.append(lines[0])
        run = tmp_path / "run"
        assert not (run / "_submissions").exists() and not (run / "_markers").exists(), command
        assert not (run / "plan.json").exists(), command
    assert lines_seen[0] == lines_seen[1]
    return lines_seen[0]


def _plans(monkeypatch, capsys, config: str) -> None:
    code, lines = _cli(monkeypatch, capsys, "plan", "-c", config)
    assert code == 0, lines


# -- weights --------------------------------------------------------------------------

def _embed_toml(tmp_path, model: str, pretrained: str, extra: dict | None = None, **more) -> str:
    embed = {"models": [{"name": "m", "model": model, "pretrained": pretrained}], **(extra or {})}
    return _toml(tmp_path, ["embed"], pool={"shards": _shards(tmp_path / "shards")}, tables={"embed": embed}, **more)


def test_embed_weights_file_missing(tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "weights" / "model.pt")
    _refused(tmp_path, monkeypatch, capsys, _embed_toml(tmp_path, "dcslurm-tiny-vit", missing),
             f"{missing}: model checkpoint file does not exist")


def test_embed_unknown_model_or_tag_lists_close_matches(tmp_path, monkeypatch, capsys):
    pytest.importorskip("open_clip")
    _refused(tmp_path, monkeypatch, capsys, _embed_toml(tmp_path, "dcslurm-tiny-vt", ""),
             "unknown open_clip model 'dcslurm-tiny-vt'", "close matches: dcslurm-tiny-vit")
    _refused(tmp_path, monkeypatch, capsys, _embed_toml(tmp_path, "ViT-B-32", "opnai"),
             "ViT-B-32: no pretrained weights called 'opnai'", "openai")


def test_embed_named_tag_must_be_cached_when_offline(tmp_path, monkeypatch, capsys, _offline):
    pytest.importorskip("open_clip")
    line = _refused(tmp_path, monkeypatch, capsys, _embed_toml(tmp_path, "ViT-B-32", "openai"),
                    "ViT-B-32 / openai: weights not in the local cache",
                    str(_offline / "hf" / "hub"))
    assert "offline = false" in line
    # Once the cache holds the file open_clip would load, the plan passes (nothing is loaded).
    repo = _offline / "hf" / "hub" / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "open_clip_pytorch_model.bin").write_bytes(b"x")
    _plans(monkeypatch, capsys, _embed_toml(tmp_path, "ViT-B-32", "openai"))


def test_embed_named_tag_passes_when_the_nodes_are_online(tmp_path, monkeypatch, capsys):
    pytest.importorskip("open_clip")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    _plans(monkeypatch, capsys, _embed_toml(tmp_path, "ViT-B-32", "openai", {"offline": False}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set here, it reaches the nodes: they will not download
    _refused(tmp_path, monkeypatch, capsys, _embed_toml(tmp_path, "ViT-B-32", "openai", {"offline": False}),
             "weights not in the local cache")


@pytest.mark.s3
def test_embed_weights_on_s3_are_checked_then_loaded(tmp_path, monkeypatch, capsys, s3_server, s3_bucket):
    torch = pytest.importorskip("torch")
    from dcslurm.core.storage import DataFolder
    from jobs.models import create_model

    opts = s3_server.storage_options()
    url = f"{s3_bucket}/weights/model.pt"
    config = _embed_toml(tmp_path, "dcslurm-tiny-vit", url, storage={"endpoint_url": s3_server.endpoint_url})
    _refused(tmp_path, monkeypatch, capsys, config, f"{url}: model checkpoint file does not exist")
    model = create_model("dcslurm-tiny-vit", seed=3)[0]
    torch.save(model.state_dict(), tmp_path / "model.pt")
    DataFolder(f"{s3_bucket}/weights", opts).put_file(str(tmp_path / "model.pt"), "model.pt")
    _plans(monkeypatch, capsys, config)
    # The node's side of the same URL: copied from S3 to a temporary file, then loaded.
    loaded = create_model("dcslurm-tiny-vit", url, storage_options=opts)[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


# -- eval sets and checkpoints --------------------------------------------------------

def _eval_toml(tmp_path, evalsets: str, checkpoint: str) -> str:
    return _toml(tmp_path, ["eval"], tables={"eval": {
        "tasks": ["demo/fashion"], "evalsets": evalsets, "checkpoint": checkpoint,
        "extra_tasks": [{"key": "demo/fashion", "name": "Demo fashion", "evalset": "wds_fashion_test"}]}})


def test_eval_sets_and_checkpoint_are_checked(tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"weights")
    root = tmp_path / "evalsets"
    _refused(tmp_path, monkeypatch, capsys, _eval_toml(tmp_path, str(root), str(ckpt)),
             f"{root}: eval sets folder does not exist")
    root.mkdir()
    _refused(tmp_path, monkeypatch, capsys, _eval_toml(tmp_path, str(root), str(ckpt)),
             f"{root}/wds_fashion_test: eval set folder does not exist")
    make_classification_set(str(root / "wds_fashion_test"), n=20, per_shard=10)
    os.remove(root / "wds_fashion_test" / "test" / "1.tar")
    _refused(tmp_path, monkeypatch, capsys, _eval_toml(tmp_path, str(root), str(ckpt)),
             f"{root}/wds_fashion_test/test/1.tar: missing shard (nshards.txt says 2)")
    make_classification_set(str(root / "wds_fashion_test"), n=20, per_shard=10)
    missing = tmp_path / "nowhere" / "model.pt"
    _refused(tmp_path, monkeypatch, capsys, _eval_toml(tmp_path, str(root), str(missing)),
             f"{missing}: eval checkpoint does not exist")
    # Default checkpoint: RUN/train/model.pt, which no train stage in this run writes.
    _refused(tmp_path, monkeypatch, capsys, _eval_toml(tmp_path, str(root), ""),
             f"{tmp_path / 'run' / 'train' / 'model.pt'}: eval checkpoint does not exist")
    _plans(monkeypatch, capsys, _eval_toml(tmp_path, str(root), str(ckpt)))


def test_train_resume_checkpoint_is_checked(tmp_path, monkeypatch, capsys):
    shards = _shards(tmp_path / "shards")

    def toml(resume: str) -> str:
        return _toml(tmp_path, ["train"], tables={"train": {"data": shards, "resume": resume}})

    step = tmp_path / "ckpts" / "step-00000002"
    _refused(tmp_path, monkeypatch, capsys, toml(str(step)),
             f"{step}: not a complete checkpoint (no step-00000002.json marker beside it)")
    step.mkdir(parents=True)
    (tmp_path / "ckpts" / "step-00000002.json").write_text(json.dumps({"model": "RN50", "step": 2}))
    _refused(tmp_path, monkeypatch, capsys, toml(str(step)),
             f"{step}: checkpoint of model 'RN50', but this run trains 'dcslurm-tiny-vit'")
    (tmp_path / "ckpts" / "step-00000002.json").write_text(json.dumps({"model": "dcslurm-tiny-vit", "step": 2}))
    _plans(monkeypatch, capsys, toml(str(step)))


# -- subsets --------------------------------------------------------------------------

def _reshard_toml(tmp_path, subset: str) -> str:
    pool = {"metadata": _pool(tmp_path / "pool"), "shards": _shards(tmp_path / "shards")}
    return _toml(tmp_path, ["reshard"], pool=pool, tables={"reshard": {"subset": subset}})


def test_subset_dtype_shape_and_order_are_read_from_the_header(tmp_path, monkeypatch, capsys):
    subset = str(tmp_path / "subset.npy")
    np.save(subset, np.arange(8, dtype="<u8"))
    _refused(tmp_path, monkeypatch, capsys, _reshard_toml(tmp_path, subset),
             f"{subset}: subset dtype is <u8, expected numpy's np.dtype('u8,u8')")
    np.save(subset, np.zeros((2, 2), np.dtype("u8,u8")))
    _refused(tmp_path, monkeypatch, capsys, _reshard_toml(tmp_path, subset),
             f"{subset}: subset array has shape (2, 2), expected one dimension")
    np.save(subset, np.array([(0, 5), (0, 1)], np.dtype("u8,u8")))
    _refused(tmp_path, monkeypatch, capsys, _reshard_toml(tmp_path, subset), f"{subset}: subset is not sorted: row 1")
    _refused(tmp_path, monkeypatch, capsys, _reshard_toml(tmp_path, str(tmp_path / "none.npy")),
             f"{tmp_path / 'none.npy'}: subset file does not exist")
    np.save(subset, np.array([(0, 1), (0, 5)], np.dtype("u8,u8")))
    _plans(monkeypatch, capsys, _reshard_toml(tmp_path, subset))


def test_subset_of_another_pool_is_refused(tmp_path, monkeypatch, capsys):
    subset = str(tmp_path / "subset.npy")
    np.save(subset, np.array([(7, 1), (7, 2)], np.dtype("u8,u8")))  # uids the pool (0..7) does not hold
    _refused(tmp_path, monkeypatch, capsys, _reshard_toml(tmp_path, subset),
             f"{subset}: none of its first 2 uids is in the pool {tmp_path / 'pool'} (8 uids read)")


# -- pool columns ---------------------------------------------------------------------

def _filter_toml(tmp_path, spec: str, pool: str, stages=("filter",)) -> str:
    return _toml(tmp_path, stages, pool={"metadata": pool}, tables={"filter": {"spec": spec}})


def test_filter_columns_and_embeddings_the_pool_lacks(tmp_path, monkeypatch, capsys):
    pool = _pool(tmp_path / "pool", scores=False)
    _refused(tmp_path, monkeypatch, capsys, _filter_toml(tmp_path, "clip_score(l14, fraction=0.5)", pool),
             f"{pool}/a.parquet: missing column 'clip_l14_similarity_score'")
    _refused(tmp_path, monkeypatch, capsys, _filter_toml(tmp_path, "vas(fraction=0.5)", pool),
             f"{pool}/a.npz: embeddings file not found")
    np.savez(tmp_path / "pool" / "a.npz", b32_img=np.ones((8, 4), np.float16))
    _refused(tmp_path, monkeypatch, capsys, _filter_toml(tmp_path, "vas(fraction=0.5)", pool),
             f"{pool}/a.npz: missing key 'l14_img' (has b32_img)")
    targets = tmp_path / "in1k.npy"
    _refused(tmp_path, monkeypatch, capsys,
             _filter_toml(tmp_path, f"image_based(targets={targets}, key=b32_img)", pool),
             f"{targets}: file of filter image_based targets= does not exist")
    _plans(monkeypatch, capsys, _filter_toml(tmp_path, "vas(fraction=0.5, key=b32_img)", pool))


def test_filter_embeddings_the_embed_stage_does_not_write(tmp_path, monkeypatch, capsys):
    pool = _pool(tmp_path / "pool")
    toml = _toml(tmp_path, ["embed", "filter"], pool={"metadata": pool, "shards": _shards(tmp_path / "shards")},
                 tables={"filter": {"spec": "vas(fraction=0.5)"},
                         "embed": {"models": [{"name": "tiny", "model": "dcslurm-tiny-vit", "pretrained": ""}]}})
    _refused(tmp_path, monkeypatch, capsys, toml,
             "[stages.filter] spec: the filter reads embeddings 'l14_img', which the embed stage does not write "
             "(it writes tiny_img, tiny_txt)")


# -- what only a finished step knows: status, first line --------------------------------

def test_status_shows_uids_missing_from_the_shards_first(tmp_path, monkeypatch, capsys):
    from dcslurm.core.config import load_config
    from dcslurm.core.markers import commit_marker
    from dcslurm.core.plan import PLAN_FILE
    from dcslurm.core.runs import plan_run

    subset = str(tmp_path / "subset.npy")
    np.save(subset, np.array([(0, 1), (0, 5), (0, 99)], np.dtype("u8,u8")))
    cfg = load_config(_reshard_toml(tmp_path, subset))
    run = cfg.folder()
    run.write_text(PLAN_FILE, plan_run(cfg).to_json())
    code, out = _cli(monkeypatch, capsys, "status", cfg.run_url, stream="out")
    assert code == 0 and not any("problems" in line for line in out), out
    commit_marker(run, "reshard.index", 0, [], {"subset_uids": 3, "uids_found": 2, "uids_missing": 1,
                                                 "input_shards_missing": 0}, started=0.0)
    code, out = _cli(monkeypatch, capsys, "status", cfg.run_url, stream="out")
    assert code == 0 and out[0] == ("problems: reshard: 1 of the subset's 3 uids are in no input shard "
                      "(failed downloads, or a subset of another pool)"), out
