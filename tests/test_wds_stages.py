"""Embed, train and the eval sets group tar members through the one layer (jobs.wds): on odd
names they now agree with each other and with reshard, and what they leave out is counted.

Before, each grouped in its own way: embed and the eval sets made a sample of key "" from
".jpg", all three kept the last of a repeated extension, none counted a member without a key
or a link, and train and the eval sets took a tar that tarfile stopped reading at a bad header
for a complete one."""

from __future__ import annotations

import io
import json
import os
from collections import Counter

import numpy as np
import pytest

from dcslurm.core.errors import UserError
from dcslurm.core.storage import DataFolder
from jobs.wds import SKIP_REASONS
from tests.test_wds import end, member

ODD = [("a.jpg", b"A"), ("a.txt", b"cap a"), (".jpg", b"no key"), ("README", b"no extension"),
       ("b.jpg", b"B first"), ("b.JPG", b"B again"), ("b.txt", b"cap b")]
ODD_SAMPLES = [("a", {"jpg": b"A", "txt": b"cap a"}), ("b", {"jpg": b"B first", "txt": b"cap b"})]
ODD_SKIPPED = Counter(members_without_key=2, duplicate_fields=1)


def odd_tar(extra: list[tuple[str, bytes]] = ()) -> bytes:
    return end(b"".join(member(n, d) for n, d in ODD + list(extra)))


def damaged_tar() -> bytes:
    """a, b whole; c open at a corrupt header (the one after c.txt: tarfile ends there quietly),
    so it may miss members and is not a sample either."""
    body = b"".join(member(f"{k}.{e}", b"x") for k in "abcd" for e in ("jpg", "txt"))
    data = bytearray(end(body))
    data[6 * 1024 + 10] ^= 0xFF  # d.jpg's header
    return bytes(data)


# -- embed --------------------------------------------------------------------------------------------

def test_embed_groups_by_the_layer_and_counts_what_it_leaves_out():
    from jobs.embed.tar_samples import iter_samples

    samples = list(iter_samples(io.BytesIO(odd_tar()), "t.tar"))
    assert [(s.key, s.members) for s in samples] == ODD_SAMPLES
    skipped: Counter = Counter()
    list(iter_samples(io.BytesIO(odd_tar()), "t.tar", None, skipped))
    assert skipped == ODD_SKIPPED


def test_embed_stats_count_skipped_members_once_per_shard(tmp_path):
    """The member counts reach the stage's stats (skipped_<reason>), from the one stripe that
    indexes the tar: with two stripes reading the same tar they are not counted twice."""
    from jobs.embed.loader import ShardBatches, ShardInput

    (tmp_path / "00000000.tar").write_bytes(odd_tar())
    dataset = ShardBatches([ShardInput(0, str(tmp_path / "00000000.tar"))], {}, batch_size=1,
                           image_recipes=[], text_recipes=[], workers=2)
    dataset._resizers, dataset._tokenizers = {}, {}  # no models: only the grouping and counting matter
    assert dataset.stripes == 2
    ends = [item for stripe in (0, 1) for item in dataset._read_stripe(dataset.shards[0], stripe)
            if item["kind"] == "end"]
    assert [e["error"] for e in ends] == [None, None] and ends[0]["index"] is not None
    members = [{k: v for k, v in e["skipped"].items() if k in SKIP_REASONS} for e in ends]
    assert members == [dict(ODD_SKIPPED), {}]


# -- train --------------------------------------------------------------------------------------------

def test_train_groups_by_the_layer_and_counts_what_it_leaves_out():
    from jobs.train.data import tar_samples  # what the trainer reads its shards with

    skipped: Counter = Counter()
    samples = [(s.pop("__key__"), s) for s in tar_samples(io.BytesIO(odd_tar()), "t.tar", skipped)]
    assert samples == ODD_SAMPLES and skipped == ODD_SKIPPED


def test_train_damaged_shard_is_bad_input_when_counted_and_skipped_samples_when_read(tmp_path):
    from jobs.train import data

    (tmp_path / "00000000.tar").write_bytes(damaged_tar())
    url = str(tmp_path / "00000000.tar")
    # no size table: counting it is the first read, and a damaged tar there is bad input
    with pytest.raises(UserError, match=r"00000000.tar: damaged tar"):
        data.sized_shards([data.Shard(url, None)], {})
    # a size table of 4 (the tar was whole when resharded): the samples after the damage are
    # skipped ones, counted, and the positions stay where the size table puts them
    stream = data.SampleStream([data.Shard(url, 4)], seed=0, stream=0, shuffle_buffer=1, storage_options={})
    got = [sample and sample["__key__"] for _, (_, sample) in zip(range(4), stream.samples())]
    assert sorted(got, key=str) == [None, None, "a", "b"]
    assert stream.skipped == Counter(damaged_tars=1)


def test_train_batches_carry_the_member_counts(tmp_path):
    import torch

    from jobs.train import data
    from tests.test_eval_fixtures import png_bytes

    png = png_bytes(np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "00000000.tar").write_bytes(end(member("README", b"x") + member("a.png", png)
                                                + member("a.txt", b"cap") + member("a.TXT", b"again")))
    layout = data.make_layout(global_batch=1, n_streams=1, rank=0, world_size=1)
    dataset = data.StepBatches([data.Shard(str(tmp_path / "00000000.tar"), 1)], layout, {}, seed=0,
                               shuffle_buffer=1, transform=lambda img: torch.zeros(3, 2, 2),
                               tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long),
                               storage_options={})
    batches = data.RankBatches(dataset, workers=0)
    it = iter(batches)
    next(it)
    next(it)
    # every read of the tar counts (like bad_samples): two steps, two reads of the one-sample shard
    assert batches.skipped_members == Counter(members_without_key=2, duplicate_fields=2)


# -- eval sets ------------------------------------------------------------------------------------------

def _evalset(tmp_path, tar: bytes):
    from jobs.evaluate.evalset import EvalSet

    os.makedirs(tmp_path / "set" / "test")
    (tmp_path / "set" / "test" / "nshards.txt").write_text("1")
    (tmp_path / "set" / "dataset_type.txt").write_text("retrieval")
    (tmp_path / "set" / "test" / "0.tar").write_bytes(tar)
    return EvalSet.open(DataFolder(str(tmp_path / "set")), need_classes=False)


def test_evalset_groups_by_the_layer_and_counts_what_it_leaves_out(tmp_path):
    evalset = _evalset(tmp_path, odd_tar())
    samples = [(s.pop("__key__"), s) for s in evalset.samples()]
    assert samples == [(k, {**f, "__shard__": "test/0.tar"}) for k, f in ODD_SAMPLES]
    assert evalset.skipped == ODD_SKIPPED
    json.dumps(evalset.skipped)  # goes into the task's stats as is


def test_damaged_evalset_is_one_line_bad_input(tmp_path):
    evalset = _evalset(tmp_path, damaged_tar())
    with pytest.raises(UserError, match=r"test/0.tar: damaged tar \(ReadError") as exc:
        list(evalset.samples())
    assert "\n" not in str(exc.value)


# -- headers tarfile reads past quietly, losing a member: damage for every stage ------------------------

def _damage_tarfile_misses(kind: str) -> bytes:
    from jobs.reshard.tario import _ustar_header
    from tests.test_tario_fuzz import _end, _member, _pax, _sample

    if kind == "malformed PAX record":  # tarfile < 3.11.10 skips it: "x.jpg" keeps its ustar name
        return _end(_sample("a") + _pax(b"x2 size=5\n", _member("x.jpg", b"xx")) + _sample("c", 2))
    if kind == "global PAX path":  # tarfile renames every later member "k.jpg"; tario renames none
        records = b"14 path=k.jpg\n"
        glob = _ustar_header(b"././@PaxHeader", len(records), b"g") + records + bytes(512 - len(records))
        return _end(glob + _sample("a") + _sample("c", 2))
    # a PAX header of size -1000: tarfile walks on over the next members unseen
    pax = bytearray(_pax(b"%d path=long.jpg\n" % 18, _member("x.jpg", b"xx")))
    pax[124:136] = b"-0001750\0\0\0\0"
    pax[148:156] = b" " * 8
    pax[148:156] = b"%06o\0 " % sum(pax[:512])
    return _end(_sample("a") + bytes(pax) + _sample("c", 2) + _sample("d", 3))


@pytest.mark.parametrize("kind", ["malformed PAX record", "global PAX path", "negative extended header size"])
def test_headers_tarfile_reads_past_are_damage(kind, tmp_path):
    """The stages took each of these tars for whole, a member lost or renamed. Reshard's reader
    counts damage at the first and the last; a global PAX path it ignores, where tarfile cannot
    be told to: the stream walk takes it for damage (the one case where the two differ)."""
    from jobs.embed.tar_samples import CorruptShard, iter_samples
    from jobs.train.data import tar_samples as train_tar_samples

    data = _damage_tarfile_misses(kind)
    with pytest.raises(CorruptShard):
        list(iter_samples(io.BytesIO(data), "t.tar"))
    with pytest.raises(Exception, match="damaged tar"):
        list(train_tar_samples(io.BytesIO(data)))
    with pytest.raises(UserError, match="damaged tar"):
        list(_evalset(tmp_path, data).samples())
