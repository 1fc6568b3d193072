"""The bad-input suite: one test per class of bad input, across the CLI and the stages.

Each class must give either a clear one-line error (CLI: exit code 2 and a single
stderr line starting `dcslurm: error:`) with nothing queued or committed, or a
counted skip inside a task, with only good samples in the committed outputs.

Classes already shown per stage elsewhere (see each test's docstring for the map):
corrupt tar (tests/test_reshard.py, tests/test_embed.py), subset files of the wrong
dtype/order (tests/test_reshard.py). This file adds the CLI-level view and the
sample classes no stage test planted: non-UTF-8 caption, zero-byte image,
decompression bomb, tar member path traversal, shell metacharacters.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcslurm.core.config import load_config
from dcslurm.core.markers import read_marker
from dcslurm.core.runs import submit_run
from dcslurm.core.tomlfile import write_toml
from tests.core_helpers import tree_digest, write_run_toml

# -- the CLI: one line on stderr, exit code 2, nothing planned --------------------------


def _uid(i: int) -> str:
    return f"{i:032x}"


def _pool_file(path, n: int, start: int = 0, url: bool = True, uids=None) -> None:
    cols = {"uid": uids or [_uid(start + i) for i in range(n)], "text": [f"caption {i}" for i in range(n)]}
    if url:
        cols["url"] = [f"http://127.0.0.1:9/{i}.jpg" for i in range(n)]
    pq.write_table(pa.table(cols), str(path))


def _good_pool(folder) -> str:
    os.makedirs(folder, exist_ok=True)
    _pool_file(folder / "a.parquet", 8)
    _pool_file(folder / "b.parquet", 8, start=8)
    return str(folder)


def _config(tmp_path, pool: str, stages=("download",), run: str | None = None, scale: str = "tiny",
            tables: dict | None = None, **more) -> str:
    """A run of `stages` over `pool`: [stages.NAME] from `tables`, `more` further top-level tables."""
    return write_toml(tmp_path / "run.toml", {
        "run": {"folder": run or str(tmp_path / "run"), "scale": scale, "stages": list(stages)},
        "pool": {"metadata": pool}, **({"stages": tables} if tables else {}), **more})


def _cli(monkeypatch, capsys, *argv: str) -> tuple[int, list[str]]:
    """Run `dcslurm ARGV` in this process through the real entry point; (exit code, stderr lines)."""
    from dcslurm.cli import main

    monkeypatch.setattr(sys, "argv", ["dcslurm", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def _assert_one_line_error(code, lines, *fragments) -> str:
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("dcslurm: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _nothing_planned(tmp_path) -> None:
    run = tmp_path / "run"
    assert not run.exists() or not any(run.iterdir()), sorted(os.listdir(run))


def test_truncated_parquet_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    pool = _good_pool(tmp_path / "pool")
    data = (tmp_path / "pool" / "b.parquet").read_bytes()
    (tmp_path / "pool" / "b.parquet").write_bytes(data[: len(data) // 2])  # cut mid-file: no footer
    code, lines = _cli(monkeypatch, capsys, "submit", "-c", _config(tmp_path, pool))
    _assert_one_line_error(code, lines, "b.parquet: ")
    _nothing_planned(tmp_path)


def test_missing_column_is_one_line_naming_file_and_column(tmp_path, monkeypatch, capsys):
    pool = _good_pool(tmp_path / "pool")
    _pool_file(tmp_path / "pool" / "b.parquet", 8, start=8, url=False)
    code, lines = _cli(monkeypatch, capsys, "submit", "-c", _config(tmp_path, pool))
    _assert_one_line_error(code, lines, "b.parquet: ", "'url'")
    _nothing_planned(tmp_path)


def test_malformed_uid_is_one_line_naming_file_and_row(tmp_path, monkeypatch, capsys):
    pool = _good_pool(tmp_path / "pool")
    _pool_file(tmp_path / "pool" / "b.parquet", 3, uids=[_uid(20), "../../etc/passwd", _uid(21)])
    code, lines = _cli(monkeypatch, capsys, "submit", "-c", _config(tmp_path, pool))
    _assert_one_line_error(code, lines, "b.parquet: ", "malformed uid", "row 1")
    _nothing_planned(tmp_path)


def test_empty_pool_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "pool").mkdir()
    code, lines = _cli(monkeypatch, capsys, "submit", "-c", _config(tmp_path, str(tmp_path / "pool")))
    _assert_one_line_error(code, lines, str(tmp_path / "pool"))
    _nothing_planned(tmp_path)


def test_unknown_scale_is_one_line(tmp_path, monkeypatch, capsys):
    pool = _good_pool(tmp_path / "pool")
    code, lines = _cli(monkeypatch, capsys, "submit", "-c", _config(tmp_path, pool, scale="gigantic"))
    _assert_one_line_error(code, lines, "gigantic")
    _nothing_planned(tmp_path)


def test_unknown_filter_is_one_line(tmp_path, monkeypatch, capsys):
    pool = _good_pool(tmp_path / "pool")
    cfg = _config(tmp_path, pool, stages=("filter",), tables={"filter": {"spec": "sharpest_cats(k=3)"}})
    code, lines = _cli(monkeypatch, capsys, "submit", "-c", cfg)
    _assert_one_line_error(code, lines, "sharpest_cats")
    _nothing_planned(tmp_path)
    # The standalone filter command says the same.
    code, lines = _cli(monkeypatch, capsys, "filter", "run", "--spec", "sharpest_cats(k=3)", "--pool", pool,
                       "--out", str(tmp_path / "subset.npy"))
    assert code == 2 and len(lines) == 1 and "sharpest_cats" in lines[0], lines
    assert not (tmp_path / "subset.npy").exists()


def test_unreachable_storage_is_one_line(tmp_path, monkeypatch, capsys):
    pool = _good_pool(tmp_path / "pool")
    cfg = _config(tmp_path, pool, run="s3://no-such-bucket/run",
                  storage={"endpoint_url": "http://127.0.0.1:9"})  # port 9 (discard): nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    code, lines = _cli(monkeypatch, capsys, "submit", "-c", cfg)
    _assert_one_line_error(code, lines, "s3://no-such-bucket/run")


def test_credentials_in_a_config_file_are_refused_without_echoing_them(tmp_path, monkeypatch, capsys):
    pool = _good_pool(tmp_path / "pool")
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    cfg = _config(tmp_path, pool, storage={"aws_secret_access_key": secret})
    code, lines = _cli(monkeypatch, capsys, "submit", "-c", cfg)
    line = _assert_one_line_error(code, lines, "aws_secret_access_key", "credentials")
    assert secret not in line
    _nothing_planned(tmp_path)


def test_shell_metacharacters_in_the_run_folder_are_inert(tmp_path, monkeypatch):
    """A folder name full of shell syntax runs like any other, and none of it executes."""
    monkeypatch.chdir(tmp_path)
    evil = "run $(touch PWNED1); `touch PWNED2` & 'q' \"dq\" |x> *"
    cfg = write_run_toml(tmp_path / "run.toml", str(tmp_path / evil), units=3)
    assert not submit_run(load_config(cfg)).failed
    reference = write_run_toml(tmp_path / "ref.toml", str(tmp_path / "plain"), units=3)
    assert not submit_run(load_config(reference)).failed
    outputs = [{k: v for k, v in tree_digest(str(tmp_path / name)).items() if k.startswith(("synth/", "digest/",
                                                                                            "summary/"))}
               for name in (evil, "plain")]
    assert outputs[0] == outputs[1] and len(outputs[0]) > 3
    found = [os.path.join(d, n) for d, _, names in os.walk(tmp_path) for n in names if n.startswith("PWNED")]
    assert not found and not os.path.exists(os.path.expanduser("~/PWNED1"))


# -- stages: bad samples inside a shard are skipped and counted -------------------------

GOOD = 4


def _png_bomb(side: int = 20_000) -> bytes:
    """A 1-bit PNG of side x side pixels (400 megapixels) in ~50 KB: decoding it would take GBs."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    row = b"\0" * (1 + side // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row * 1000) for _ in range(side // 1000)) + comp.flush()
    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _jpeg(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (40 * i % 255, 90, 200)).save(buf, format="JPEG")
    return buf.getvalue()


# key -> (what makes it bad, members): one bad sample of each class, plus GOOD good ones.
BAD_SAMPLES = {
    "non_utf8_caption": ("00000010", {"jpg": _jpeg(1), "txt": b"caf\xe9 \xff\xfe au lait"}),
    "zero_byte_image": ("00000011", {"jpg": b"", "txt": b"an empty file"}),
    "decompression_bomb": ("00000012", {"png": None, "txt": b"a very large white square"}),
    "path_traversal": ("../../escaped", {"jpg": _jpeg(2), "txt": b"a sample named to escape"}),
}


def _write_bad_shard(path: str) -> dict[str, str]:
    """One webdataset shard: GOOD good samples, then one of each bad class. Returns key -> uid."""
    uids = {}
    with tarfile.open(path, "w") as tar:
        samples = [(f"{i:08d}", {"jpg": _jpeg(i), "txt": f"good sample {i}".encode()}) for i in range(GOOD)]
        samples += list(BAD_SAMPLES.values())
        for n, (key, members) in enumerate(samples):
            uid = _uid(1000 + n)
            uids[key] = uid
            members = dict(members, json=json.dumps({"uid": uid, "key": key}).encode())
            for ext, data in members.items():
                data = _png_bomb() if data is None else data
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return uids


@pytest.fixture(scope="module")
def bad_shard(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "a" / "b"  # ../../ of the run's folders stays inside `root/..`
    (root / "shards").mkdir(parents=True)
    uids = _write_bad_shard(str(root / "shards" / "00000000.tar"))
    return {"root": root, "shards": str(root / "shards"), "uids": uids}


def _escaped_files(top) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(top) for n in names if n.startswith("escaped")]


@pytest.fixture(scope="module")
def embed_run(bad_shard):
    from tests.test_embed import save_tiny_checkpoint, write_config

    root = bad_shard["root"]
    ckpt = save_tiny_checkpoint(str(root / "tiny.pt"), 0)
    cfg = write_config(root / "embed.toml", str(root / "embed-run"), bad_shard["shards"], {"tiny": ckpt},
                       per_task=1, workers=0)
    assert not submit_run(load_config(cfg)).failed
    run = str(root / "embed-run")
    stats = read_marker(load_config(cfg).folder(), "embed", 0)["stats"]
    table = pq.read_table(os.path.join(run, "embed", "00000000.parquet")).to_pydict()
    return {"stats": stats, "uids": set(table["uid"]), "run": run}


@pytest.fixture(scope="module")
def reshard_run(bad_shard):
    from jobs.reshard.subset import uids_to_array
    from tests.test_reshard import write_toml

    root = bad_shard["root"]
    np.save(str(root / "subset.npy"), uids_to_array(sorted(bad_shard["uids"].values())))
    cfg = write_toml(root / "reshard.toml", str(root / "reshard-run"), bad_shard["shards"],
                     str(root / "subset.npy"), tasks=1)
    assert not submit_run(load_config(cfg)).failed
    out = os.path.join(str(root / "reshard-run"), "reshard")
    names = []
    for n in sorted(os.listdir(out)):
        if n.endswith(".tar"):
            with tarfile.open(os.path.join(out, n)) as tar:
                names += tar.getnames()
    return {"stats": json.load(open(os.path.join(out, "stats.json"))), "names": names, "out": out}


def _good_uids(bad_shard) -> set[str]:
    return {bad_shard["uids"][f"{i:08d}"] for i in range(GOOD)}


def test_non_utf8_caption_is_skipped_and_counted(bad_shard, embed_run):
    """embed: skipped_caption_not_utf8 (train decodes captions with replacement: tests/test_train.py)."""
    assert embed_run["stats"]["skipped_caption_not_utf8"] == 1
    assert bad_shard["uids"]["00000010"] not in embed_run["uids"]


def test_zero_byte_image_is_skipped_and_counted(bad_shard, embed_run):
    """embed counts it undecodable; download counts empty bodies (tests/test_download.py)."""
    assert bad_shard["uids"]["00000011"] not in embed_run["uids"]
    assert embed_run["stats"]["skipped_undecodable_image"] >= 1


def test_decompression_bomb_is_skipped_without_decoding(bad_shard, embed_run):
    """PIL refuses > 2 x MAX_IMAGE_PIXELS before decoding: counted as undecodable, the task lives."""
    assert bad_shard["uids"]["00000012"] not in embed_run["uids"]
    assert embed_run["stats"]["skipped_undecodable_image"] == 2  # the zero-byte image and the bomb
    assert embed_run["uids"] >= _good_uids(bad_shard)


def test_tar_member_path_traversal_writes_nothing_outside_the_output(bad_shard, embed_run, reshard_run):
    """A member named ../../escaped.jpg: no stage writes a file from it, and reshard's output
    names never climb out of the folder a user would extract them in."""
    top = bad_shard["root"].parent.parent.parent
    assert _escaped_files(top) == []
    assert not any(n.startswith(("/", "../")) or "/../" in n for n in reshard_run["names"]), reshard_run["names"]
    assert reshard_run["stats"]["samples_unsafe_key"] == 1
    assert reshard_run["stats"]["samples_written"] == len(bad_shard["uids"]) - 1


def test_train_skips_and_counts_bad_images(bad_shard, tmp_path):
    """train: the zero-byte image and the bomb are counted skips; the model is exported."""
    from tests.train_helpers import write_train_toml

    folder = str(tmp_path / "train-run")
    cfg = write_train_toml(tmp_path / "train.toml", folder, bad_shard["shards"], samples=8, batch_size=4,
                           data_streams=1, shuffle_buffer=1, checkpoint_every=100)
    assert not submit_run(load_config(cfg)).failed
    stats = read_marker(load_config(cfg).folder(), "train", 0)["stats"]
    assert stats["bad_samples"] >= 2, stats
    assert os.path.exists(os.path.join(folder, "train", "model.pt"))
