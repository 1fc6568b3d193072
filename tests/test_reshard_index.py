"""Embed's member index of each tar (jobs/wds.py) and reshard's count step reading it.

The index is what reshard's own reader (jobs/reshard/tario.py) would find in the tar, noted
while embed's tarfile walk reads it: checked here to be exactly that on the shards every
dialect writes and on fuzzed ones. A tar with an index whose identity no longer matches
(replaced after embed) is read again, counted, and resharded as before.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcslurm.core import tomlfile
from dcslurm.core.config import load_config
from dcslurm.core.markers import read_marker
from dcslurm.core.runs import submit_run
from jobs.embed.tar_samples import CorruptShard, IndexRecorder, iter_samples
from jobs.reshard.subset import uids_to_array
from jobs.reshard.tario import TarSampleReader, _MappedSource, indexed_table
from jobs.wds import TarIndex
from tests.core_helpers import merge_tables
from tests.test_embed import save_tiny_checkpoint
from tests.test_reshard import expected_multiset, read_output, shard_digests, write_toml
from tests.test_reshard_s3 import make_pool
from tests.test_tario_fuzz import _MUTATION, _SEEDS, _end, _member, _mutate, _pax, _sample

IDENTITY = {"size": 0, "etag": "x"}


def _tario_view(path) -> tuple[list, dict]:
    """What the count step reads from the tar itself: per sample (key, members, uid), counters."""
    with TarSampleReader(None, source=_MappedSource(str(path))) as reader:
        table = reader.table()
        view = _columns(table, table.uid_results())
        return view, dict(vars(reader.counters))


def _columns(table, uids) -> list:
    return [(k, [(table.exts[j], int(table.offsets[j]), int(table.sizes[j]))
                 for j in range(table.starts[i], table.starts[i + 1])], uids[i])
            for i, k in enumerate(table.keys)]


def _index_view(data: bytes) -> tuple[list, dict] | None:
    """The same from the index embed's walk notes; None when embed drops the tar or indexes none."""
    recorder = IndexRecorder()
    try:
        for _ in iter_samples(io.BytesIO(data), "t.tar", recorder):
            pass
    except CorruptShard:
        return None
    encoded = recorder.index(IDENTITY)
    if encoded is None:
        return None
    index = TarIndex(encoded)
    assert index.describes(IDENTITY)
    table, counters = indexed_table(index)
    # the index keeps a uid only when it can match (32 hex): compare by that
    return _columns(table, table.uids), dict(vars(counters))


def _matchable(view: list) -> list:
    out = []
    for key, members, (uid, problem) in view:
        valid = isinstance(uid, str) and len(uid) == 32 and all(c in "0123456789abcdefABCDEF" for c in uid)
        out.append((key, members, (uid if valid or uid is None else "", problem)))
    return out


def _check(data: bytes, tmp_path) -> bool:
    """The index (where embed writes one) equals tario's reading; whether there was one."""
    got = _index_view(data)
    if got is None:
        return False
    path = tmp_path / "t.tar"
    path.write_bytes(data)
    view, counters = _tario_view(path)
    assert got == (_matchable(view), counters)
    return True


def test_index_is_what_tario_reads_on_every_dialect(tmp_path):
    """ustar (ours), GNU, PAX and ustar-with-prefix tarfile shards (long names, a directory,
    links), a webdataset-like shard, and one with odd members: each indexed, each equal."""
    odd = _end(_sample("a", 1) + _member("noext", b"x") + _member("__key__.txt", b"k") + _sample("b", 2)
               + _member("c.JSON", b'{"uid": "%032x"}' % 3) + _member("c.jpg", b"jpg")
               + _member("d.json", b'{"uid": 5}') + _member("e.json", b"not json") + _member("f.json", b"{}"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:  # as webdataset's TarWriter
        for i in range(4):
            for ext, body in (("jpg", b"j" * (100 + i)), ("json", json.dumps({"uid": f"{i:032x}"}).encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size, info.mtime = len(body), 1.7e9 + 0.25  # a float mtime: a PAX record per member
                tar.addfile(info, io.BytesIO(body))
    for data in [*_SEEDS, odd, buf.getvalue()]:
        assert _check(data, tmp_path)


@pytest.mark.parametrize("records", [b"0 path=b.jpg\n", b"9 sizeabc\n", b"5 a=b\n"])
def test_no_index_where_tarfile_and_tario_read_otherwise(records, tmp_path):
    """A malformed PAX record: tario counts damage, the tarfile here may skip it: no index."""
    data = _end(_sample("a") + _pax(records, _member("x.jpg", b"xx")) + _sample("c", 2))
    assert _index_view(data) is None
    nested = _end(_pax(b"%d path=p.jpg\n" % 15, _pax(b"%d path=q.jpg\n" % 15, _member("x.jpg", b"xx"))))
    assert _index_view(nested) is None  # two extended headers: tario takes the first path, tarfile the last


@settings(max_examples=int(os.environ.get("DCSLURM_FUZZ_EXAMPLES", 400)), deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, len(_SEEDS) - 1), mutations=st.lists(_MUTATION, min_size=1, max_size=3))
def test_fuzz_index_is_what_tario_reads(seed, mutations, tmp_path):
    _check(_mutate(seed, mutations), tmp_path)


# -- the stages: embed writes the index, reshard's count reads it -----------------------------

def embed_reshard_toml(path, run: str, pool: str, subset: str, ckpt: str, tail: str = "", log_dir: str = "",
                       tasks: int = 1) -> str:
    doc = {
        "run": {"folder": run, "scale": "tiny", "stages": ["embed", "reshard"]},
        "pool": {"shards": pool},
        "stages": {
            "embed": {"models": [{"name": "b32", "model": "dcslurm-tiny-vit", "pretrained": ckpt}],
                      "batch_size": 32, "workers": 0, "device": "cpu", "units_per_task": 3,
                      "resources": {"gpus_per_node": 0, "cpus_per_task": 1}},
            "reshard": {"subset": subset, "samples_per_shard": 40, "tasks": tasks},
        },
        "executor": {"kind": "local", "max_parallel": 2, **({"log_dir": log_dir} if log_dir else {})},
    }
    return tomlfile.write_toml(path, merge_tables(doc, tail))


def test_count_reads_the_index_and_a_replaced_tar_again(tmp_path):
    """Embed then reshard on local shards: every tar counted from its index, the output the same
    as reading the tars; a tar replaced after embed (other samples) is read again, counted as
    a stale index, and its new samples are the ones written."""
    pool = tmp_path / "pool"
    samples = make_pool(str(pool), n_shards=3, per_shard=20, seed=3)
    replaced = make_pool(str(tmp_path / "other"), n_shards=2, per_shard=20, seed=9)[20:]  # other/00000001.tar's
    rng = np.random.default_rng(4)
    keep = sorted(s["uid"] for s in samples + replaced if rng.random() < 0.4)
    np.save(tmp_path / "subset.npy", uids_to_array(keep))
    ckpt = save_tiny_checkpoint(str(tmp_path / "tiny.pt"), 1)
    cfg = embed_reshard_toml(tmp_path / "run.toml", str(tmp_path / "run"), str(pool), str(tmp_path / "subset.npy"),
                             ckpt)
    assert not submit_run(load_config(cfg, stages=["embed"])).failed
    assert sorted(n for n in os.listdir(tmp_path / "run" / "embed") if n.endswith(".tarindex")) == \
        [f"{i:08d}.tarindex" for i in range(3)]
    shutil.copy(tmp_path / "other" / "00000001.tar", pool / "00000001.tar.new")
    os.replace(pool / "00000001.tar.new", pool / "00000001.tar")  # replaced after embed

    assert not submit_run(load_config(cfg)).failed
    stats = read_marker(load_config(cfg).folder(), "reshard.index", 0)["stats"]
    assert (stats["tars_indexed"], stats["tar_indexes_stale"]) == (2, 1)
    log = "".join(open(os.path.join(d, n)).read() for d, _, ns in os.walk(tmp_path / "run" / "logs") for n in ns)
    assert "00000001.tar: its member index" in log and "describes another version of it" in log

    # the same reshard without embed (every tar read): byte-identical shards
    plain = write_toml(tmp_path / "plain.toml", str(tmp_path / "plain"), str(pool), str(tmp_path / "subset.npy"),
                       tasks=1, samples_per_shard=40)
    assert not submit_run(load_config(plain)).failed
    assert shard_digests(str(tmp_path / "run" / "reshard")) == shard_digests(str(tmp_path / "plain" / "reshard"))
    now = samples[:20] + replaced + samples[40:]
    assert read_output(str(tmp_path / "run" / "reshard"))[0] == expected_multiset(now, sorted(keep))
    plain_stats = read_marker(load_config(plain).folder(), "reshard.index", 0)["stats"]
    assert plain_stats["tars_indexed"] == 0
    same = [k for k in stats if not k.startswith("tar") and k != "seconds"]
    assert {k: plain_stats[k] for k in same} == {k: stats[k] for k in same}
