"""Reshard stage: the subset's multiset in new shards, deterministic whatever the task count."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tomllib

import numpy as np
import pytest
from PIL import Image

from dcslurm.core import tomlfile
from dcslurm.core.config import load_config
from dcslurm.core.errors import UserError
from dcslurm.core.markers import done_indexes
from dcslurm.core.runs import submit_run
from jobs.reshard.subset import SUBSET_DTYPE, load_subset, pair_to_uid, uid_to_pair, uids_to_array
from jobs.reshard.tario import TarSampleReader, TarShardWriter
from tests.core_helpers import merge_tables, wait_run_done

SAMPLES_PER_SHARD = 16


# -- fixtures: a small img2dataset-like pool ----------------------------------------

def _jpeg(rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _uid(rng: np.random.Generator) -> str:
    return "".join(f"{x:02x}" for x in rng.integers(0, 256, size=16))


def write_shard(path: str, samples: list[dict]) -> None:
    """A webdataset tar as img2dataset writes one (tarfile, members jpg, txt, json)."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext in ("jpg", "txt", "json"):
                if ext not in s:
                    continue
                data = s[ext] if isinstance(s[ext], bytes) else s[ext].encode()
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                info.mtime = 1_700_000_000
                tar.addfile(info, io.BytesIO(data))


def make_pool(folder, n_shards: int = 6, per_shard: int = 25, seed: int = 0) -> list[dict]:
    """Shards {:08d}.tar with jpg/txt/json; a few samples without json or uid. Returns all samples."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    every = []
    for shard in range(n_shards):
        samples = []
        for i in range(per_shard):
            key = f"{shard:04d}{i:05d}"
            uid = _uid(rng)
            s = {"key": key, "uid": uid, "jpg": _jpeg(rng), "txt": f"caption {shard}/{i} {uid[:6]}",
                 "json": json.dumps({"uid": uid, "key": key, "status": "success"})}
            if shard == 1 and i == 3:
                del s["json"]  # no json: cannot be matched
            if shard == 2 and i == 4:
                s["json"] = json.dumps({"key": key})  # json without uid
            if shard == 2 and i == 5:
                s["json"] = json.dumps({"uid": "not-a-uid"})
            samples.append(s)
        write_shard(os.path.join(folder, f"{shard:08d}.tar"), samples)
        every.extend(samples)
    return every


def make_subset(path: str, samples: list[dict], seed: int = 1, missing: int = 7) -> list[str]:
    """About 60% of the pool's uids (some 2-3 times) plus `missing` uids not in the pool."""
    rng = np.random.default_rng(seed)
    uids = []
    for s in samples:
        r = rng.random()
        if r < 0.6:
            uids.extend([s["uid"]] * (1 + (r < 0.1) + (r < 0.05)))
    uids.extend(_uid(rng) for _ in range(missing))
    np.save(path, uids_to_array(uids))
    return uids


def expected_multiset(samples: list[dict], subset_uids: list[str]) -> collections.Counter:
    times = collections.Counter(subset_uids)
    out = collections.Counter()
    for s in samples:
        if "json" in s and json.loads(s["json"]).get("uid") == s["uid"]:
            for _ in range(times[s["uid"]]):
                out[(s["uid"], s["txt"], hashlib.sha256(s["jpg"]).hexdigest())] += 1
    return out


def read_output(folder: str) -> tuple[collections.Counter, list[str], dict[str, int]]:
    """(multiset of (uid, caption, sha256 of jpg), all keys, samples per shard) read with tarfile."""
    multiset, keys, per_shard = collections.Counter(), [], {}
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".tar")):
        samples = collections.defaultdict(dict)
        with tarfile.open(os.path.join(folder, name)) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples[key][ext] = tar.extractfile(m).read()
        for key, s in samples.items():
            multiset[(json.loads(s["json"])["uid"], s["txt"].decode(), hashlib.sha256(s["jpg"]).hexdigest())] += 1
            keys.append(key)
        per_shard[name] = len(samples)
    return multiset, keys, per_shard


def write_toml(path, run_folder: str, pool: str, subset: str, tasks: int, extra: str = "",
               executor: str = "local", tail: str = "", log_dir: str = "",
               samples_per_shard: int = SAMPLES_PER_SHARD) -> str:
    """A reshard run.toml; `extra`: more [stages.reshard] keys, `tail`: more tables (TOML text)."""
    doc = {
        "run": {"folder": run_folder, "scale": "tiny", "stages": ["reshard"]},
        "pool": {"shards": pool},
        "executor": {"kind": executor, "max_parallel": 2, **({"log_dir": log_dir} if log_dir else {})},
        "stages": {"reshard": {"subset": subset, "samples_per_shard": samples_per_shard, "tasks": tasks}},
    }
    doc = merge_tables(doc, {"stages": {"reshard": tomllib.loads(extra)}})
    return tomlfile.write_toml(path, merge_tables(doc, tail))


def shard_digests(folder: str) -> dict[str, str]:
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(folder)) if n.endswith(".tar") or n == "sizes.json"}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    samples = make_pool(str(root / "shards"))
    uids = make_subset(str(root / "subset.npy"), samples)
    return {"root": root, "shards": str(root / "shards"), "subset": str(root / "subset.npy"),
            "samples": samples, "uids": uids}


@pytest.fixture(scope="module")
def one_task_run(pool, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    cfg = write_toml(tmp / "run.toml", str(tmp / "run"), pool["shards"], pool["subset"], tasks=1)
    assert not submit_run(load_config(cfg)).failed
    return str(tmp / "run")


# -- subset files -------------------------------------------------------------------

def test_uid_pairs_roundtrip():
    uid = "0123456789abcdeffedcba9876543210"
    assert uid_to_pair(uid) == (0x0123456789ABCDEF, 0xFEDCBA9876543210)
    assert pair_to_uid(*uid_to_pair(uid)) == uid
    with pytest.raises(ValueError):
        uid_to_pair("abc")


def test_datacomp_format_subset_is_accepted_as_is(tmp_path):
    # What DataComp's baselines write: np.array of (int(uid[:16],16), int(uid[16:],16)) pairs,
    # dtype np.dtype("u8,u8"), sorted, np.save.
    uids = ["ff" * 16, "00" * 15 + "01", "0123456789abcdef" * 2, "0123456789abcdef" * 2]
    arr = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in uids], np.dtype("u8,u8"))
    arr.sort()
    np.save(tmp_path / "s.npy", arr)
    sub = load_subset(str(tmp_path / "s.npy"))
    assert len(sub) == 4 and sub.rows.dtype == SUBSET_DTYPE
    assert sub.count_uid("0123456789abcdef" * 2) == 2
    assert sub.count_uid("ff" * 16) == 1 and sub.count_uid("ee" * 16) == 0
    assert len(sub.unique_starts()) == 3
    # the same data big-endian (numpy writes '>u8' fields on such machines) is accepted too
    np.save(tmp_path / "be.npy", arr.astype(np.dtype(">u8,>u8")))
    assert load_subset(str(tmp_path / "be.npy")).count_uid("0123456789abcdef" * 2) == 2


@pytest.mark.parametrize("make, fragment", [
    (lambda: np.arange(4, dtype=np.uint64), "subset dtype is <u8"),
    (lambda: np.zeros(3, np.dtype("i8,i8")), "expected numpy's np.dtype('u8,u8')"),
    (lambda: np.zeros(3, np.dtype([("hi", "<u8"), ("lo", "<u8")])), "('hi', '<u8')"),
    (lambda: np.array(["ab" * 16], dtype="<U32"), "subset dtype is <U32"),
    (lambda: np.zeros((2, 2), np.uint64), "subset dtype is <u8"),
    (lambda: np.array([(2, 0), (1, 5)], np.dtype("u8,u8")), "not sorted: row 1"),
    (lambda: np.array([(1, 5), (1, 4)], np.dtype("u8,u8")), "not sorted: row 1"),
])
def test_bad_subset_files_give_one_line_errors_naming_the_file(tmp_path, make, fragment):
    path = str(tmp_path / "bad.npy")
    np.save(path, make())
    with pytest.raises(UserError) as err:
        load_subset(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(path) and fragment in msg, msg


def test_not_an_npy_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "subset.npy"
    path.write_bytes(b"uid\n0123\n")
    with pytest.raises(UserError, match=r"subset.npy: not a readable .npy"):
        load_subset(str(path))


# -- tar reading and writing ----------------------------------------------------------

def _tar_bytes(samples: list[dict]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for s in samples:
            for ext in ("jpg", "txt", "json"):
                data = s[ext].encode() if isinstance(s[ext], str) else s[ext]
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _simple_samples(n: int) -> list[dict]:
    rng = np.random.default_rng(5)
    return [{"key": f"k{i:03d}", "jpg": rng.bytes(700 + 37 * i), "txt": f"t{i}",
             "json": json.dumps({"uid": f"{i:032x}"})} for i in range(n)]


def _read_keys(data: bytes) -> tuple[list[str], TarSampleReader]:
    reader = TarSampleReader(io.BytesIO(data), len(data))
    keys = []
    for sample in reader:
        members = sample.load()
        assert [m.ext for m in members] == ["jpg", "txt", "json"]
        keys.append(sample.key)
    return keys, reader


def test_reader_reads_what_tarfile_wrote_including_long_names():
    samples = _simple_samples(5)
    samples[2]["key"] = "d/" * 70 + "long"  # > 100 characters: GNU/PAX long names
    data = _tar_bytes(samples)
    keys, reader = _read_keys(data)
    assert keys == [s["key"] for s in samples]
    assert reader.counters.truncated_tars == 0 and reader.counters.corrupt_headers == 0


def test_writer_output_is_readable_by_tarfile_and_deterministic():
    def build() -> bytes:
        buf = io.BytesIO()
        w = TarShardWriter(buf)
        w.add("a.jpg", b"x" * 1000)
        w.add("b" * 120 + ".txt", "é".encode())
        w.add("dir/" + "c" * 150 + ".json", b"{}")  # needs PAX
        w.add("ünï.txt", b"u")
        w.close()
        assert w.bytes == len(buf.getvalue()) and w.bytes % 10240 == 0
        return buf.getvalue()

    data = build()
    assert data == build()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = [(m.name, m.size, m.mtime, m.uid) for m in tar]
    assert names == [("a.jpg", 1000, 0, 0), ("b" * 120 + ".txt", 2, 0, 0),
                     ("dir/" + "c" * 150 + ".json", 2, 0, 0), ("ünï.txt", 1, 0, 0)]
    assert _read_keys_any(data) == ["a", "b" * 120, "dir/" + "c" * 150, "ünï"]


def test_writer_headers_made_together_equal_one_header_per_member():
    """The writer makes a flush's headers in one numpy pass; each must be the header
    `member_header` gives that member alone (names of every length, sizes up to 8 GiB)."""
    from jobs.reshard.tario import BLOCK, RECORD, member_header

    members = [("a.jpg", b"x" * 1000), ("k" * 100 + ".txt", b""), ("b" * 99 + ".j", b"y" * 512),
               ("d/" * 60 + "e.json", b"{}"), ("ünï.txt", b"u"), ("0" * 9 + ".cls", b"7" * 513)]
    buf = io.BytesIO()
    writer = TarShardWriter(buf)
    for name, data in members:
        writer.add(name, data)
    writer.close()
    expected = b"".join(member_header(n, len(d)) + d + bytes(-len(d) % BLOCK) for n, d in members)
    expected += bytes(2 * BLOCK + -(len(expected) + 2 * BLOCK) % RECORD)
    assert buf.getvalue() == expected
    from jobs.reshard.tario import _simple_headers
    big = _simple_headers([b"big.bin"], np.array([8 ** 11 - 1], np.int64)).tobytes()
    assert big == member_header("big.bin", 8 ** 11 - 1)


@pytest.mark.parametrize("data, expected", [
    (b'{"uid": "ab", "x": [1, {"uid": "no"}]}', ("ab", "")),
    (b' \n{"uid": "ab"}\n ', ("ab", "")),  # whitespace around the value
    ('\ufeff{"uid": "ab"}'.encode(), ("ab", "")),  # a UTF-8 byte order mark
    ('{"uid": "ab"}'.encode("utf-16"), ("ab", "")),  # json.loads detects UTF-16/32
    (b'{"uid": "ab"} x', (None, "bad_json")),  # trailing data
    (b'{"uid": "ab"}{"uid": "cd"}', (None, "bad_json")),
    (b'{"uid": "a\xff"}', (None, "bad_json")),  # not UTF-8
    (b'', (None, "bad_json")),
    (b'[1, 2]', (None, "no_uid")),
    (b'{"uid": null}', (None, "no_uid")),
    (b'{"uid": 12}', (12, "")),  # returned as found: the caller refuses non-hex uids
    (None, (None, "no_json")),
])
def test_json_uid_reads_what_json_loads_reads(data, expected):
    from jobs.reshard.tario import json_uid

    assert json_uid(data) == expected
    if data is not None:
        assert json_uid(memoryview(data)) == expected


def _read_keys_any(data: bytes) -> list[str]:
    return [s.key for s in TarSampleReader(io.BytesIO(data), len(data))]


def test_truncated_tar_keeps_the_samples_before_the_cut():
    data = _tar_bytes(_simple_samples(6))
    offsets = [m.offset_data for m in tarfile.open(fileobj=io.BytesIO(data))]
    cut = offsets[3 * 4] + 100  # inside sample 4's jpg
    keys, reader = _read_keys(data[:cut])
    assert keys == ["k000", "k001", "k002", "k003"]
    assert reader.counters.truncated_tars == 1 and reader.counters.damaged_samples == 1


def test_corrupt_header_is_skipped_and_the_rest_of_the_shard_kept():
    data = bytearray(_tar_bytes(_simple_samples(6)))
    headers = [m.offset for m in tarfile.open(fileobj=io.BytesIO(bytes(data)))]
    data[headers[3 * 2 + 1] + 10] ^= 0xFF  # sample 2's txt header
    keys, reader = _read_keys(bytes(data))
    # sample 2 lost a member; its json (after the resync) starts a damaged sample: both dropped
    assert keys == ["k000", "k001", "k003", "k004", "k005"]
    assert reader.counters.corrupt_headers == 1 and reader.counters.damaged_samples == 1
    assert reader.counters.truncated_tars == 0


# -- the stage, end to end on the local executor ---------------------------------------

def _walk(reader: TarSampleReader) -> tuple[list, dict]:
    """What a reader yields (keys, members, json bytes) and what it counted."""
    with reader:
        samples = [(s.key, [(m.name, m.ext, m.offset, m.size, bytes(m.data) if m.data is not None else None)
                            for m in s.members]) for s in reader]
        return samples, dict(vars(reader.counters))


def _tar_variants() -> dict[str, bytes]:
    """Valid tars in every header dialect tarfile writes, our writer's, and damaged ones."""
    samples = _simple_samples(7)
    samples[2]["key"] = "d/" * 70 + "long"  # GNU long name / PAX path
    samples[4]["key"] = "sub/ünïcode"
    out = {}
    for label, fmt in (("ustar", tarfile.USTAR_FORMAT), ("gnu", tarfile.GNU_FORMAT), ("pax", tarfile.PAX_FORMAT)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            d = tarfile.TarInfo("sub")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            for s in samples if fmt != tarfile.USTAR_FORMAT else [x for x in samples if x["key"].isascii()]:
                for ext in ("jpg", "txt", "json"):
                    data = s[ext].encode() if isinstance(s[ext], str) else s[ext]
                    info = tarfile.TarInfo(f"{s['key']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo("README")  # no extension: not a sample field
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
        out[label] = buf.getvalue()
    buf = io.BytesIO()
    writer = TarShardWriter(buf)
    for s in _simple_samples(4):
        for ext in ("jpg", "txt", "json"):
            writer.add(f"{s['key']}.{ext}", s[ext].encode() if isinstance(s[ext], str) else s[ext])
    writer.close()
    out["ours"] = buf.getvalue()
    plain = _tar_bytes(_simple_samples(6))
    headers = [m.offset for m in tarfile.open(fileobj=io.BytesIO(plain))]
    out["truncated"] = plain[:headers[9] + 700]
    corrupt = bytearray(plain)
    corrupt[headers[7] + 10] ^= 0xFF
    out["corrupt"] = bytes(corrupt)
    return out


def test_member_names_split_into_samples_as_webdataset_does():
    from jobs.reshard.tario import _split_names

    raw = [b"k1.jpg", b"k1.txt", b"k1.json", b"k1.json", b"noext", b"k2.seg.json", b"k2.json", b".hidden",
           b"k2.", b"k1.jpg", "\u00fc\u00df.txt".encode(), b"\xff\xfe.cls", b"d/k3.json", b"x" * 95 + b".json"]
    names = np.zeros((len(raw), 100), np.uint8)
    for i, r in enumerate(raw):
        names[i, :len(r)] = np.frombuffer(r, np.uint8)
    keyed, keys, starts, exts, json_at, newlines = _split_names(names, {})
    assert newlines == 0
    assert keyed.tolist() == [0, 1, 2, 3, 5, 6, 8, 9, 10, 11, 12, 13]  # "noext" and ".hidden" have no key
    assert keys == ["k1", "k2", "k1", "\u00fc\u00df", "\udcff\udcfe", "d/k3", "x" * 95]
    assert starts.tolist() == [0, 4, 7, 8, 9, 10, 11, 12]
    assert exts == ["jpg", "txt", "json", "json", "seg.json", "json", "", "jpg", "txt", "cls", "json", "json"]
    assert json_at.tolist() == [2, 5, -1, -1, -1, 10, 11]  # the first .json of each sample


def test_tars_opened_ahead_come_in_order_and_an_early_stop_closes_the_next(tmp_path, monkeypatch):
    """Count and write open each input tar in a thread while the one before is processed."""
    from dcslurm.core.storage import DataFolder
    from jobs.reshard import tario

    for i, name in enumerate(("a.tar", "c.tar", "d.tar")):
        (tmp_path / name).write_bytes(_tar_bytes(_simple_samples(i + 1)))
    folder = DataFolder(str(tmp_path))
    sources = [(folder, n, str(tmp_path), n) for n in ("a.tar", "b.tar", "c.tar", "d.tar")]
    readers = list(tario.open_tars_ahead(sources))
    assert [None if r is None else r.name for r in readers] == ["a.tar", None, "c.tar", "d.tar"]  # b is missing
    assert [len(list(r)) for r in readers if r is not None] == [1, 2, 3]
    for r in readers:
        if r is not None:
            r.close()
    closed = []
    close = tario.TarSampleReader.close
    monkeypatch.setattr(tario.TarSampleReader, "close", lambda self: (closed.append(self.name), close(self)))
    ahead = tario.open_tars_ahead([sources[0], sources[2], sources[3]])
    first = next(ahead)  # c.tar is being opened meanwhile
    ahead.close()  # the caller stops early: c.tar is closed for it, a.tar stays the caller's
    assert closed == ["c.tar"] and first.name == "a.tar"
    first.close()


def test_mapped_fast_walk_reads_exactly_what_the_careful_walk_reads(tmp_path):
    """Local shards are mapped and walked by the lean pass (bulk checksums); any tar it cannot
    vouch for goes to the careful walk. Both must yield the same samples and counters."""
    from jobs.reshard.tario import _MappedSource

    for label, data in _tar_variants().items():
        path = tmp_path / f"{label}.tar"
        path.write_bytes(data)
        careful = _walk(TarSampleReader(io.BytesIO(data), len(data)))
        mapped = _walk(TarSampleReader(None, source=_MappedSource(str(path))))
        assert mapped == careful, label
        # the columns count and write work from hold the same samples, members and json
        table = TarSampleReader(None, source=_MappedSource(str(path))).table()
        assert [(k, [(f"{k}.{table.exts[j]}", table.exts[j], int(table.offsets[j]), int(table.sizes[j]))
                     for j in range(table.starts[i], table.starts[i + 1])])
                for i, k in enumerate(table.keys)] == [(k, [m[:4] for m in ms]) for k, ms in careful[0]], label
        assert [None if j is None else bytes(j) for j in table.jsons] == [
            next((m[4] for m in ms if m[1] == "json"), None) for _, ms in careful[0]], label
        lean = TarSampleReader(None, source=_MappedSource(str(path)))
        taken = lean._lean_table() is not None
        lean.close()
        # ustar/ours: the lean pass; long-name records, truncation and corruption: the careful walk
        assert taken == (label in ("ustar", "ours")), label


def test_spans_of_a_remote_tar_are_read_merged_and_sliced_by_tar_offset(monkeypatch):
    """The write step's reader of a remote tar fetches only the members it copies: members of one
    sample, and samples in a row, in one ranged read (only headers and padding between them);
    a skipped sample's image never. Slices by tar offset give the members' bytes."""
    from dcslurm.core.storage import DataFolder
    from jobs.reshard import tario

    samples = _simple_samples(6)
    for s in samples:
        s["jpg"] = s["jpg"] * 8  # 5.6-7.3 KB: longer than the gap merged over
    data = _tar_bytes(samples)
    folder = DataFolder("memory://reshard-spans-test")
    folder.write_bytes("a.tar", data)
    table = TarSampleReader(io.BytesIO(data), len(data)).table()
    taken = [0, 1, 4]  # 0 and 1 in a row; 2 and 3 skipped
    rows = [j for i in taken for j in range(table.starts[i], table.starts[i + 1])]
    starts = [int(table.offsets[j]) for j in rows]
    ends = [int(table.offsets[j] + table.sizes[j]) for j in rows]
    reads = []
    read_ranges = DataFolder.read_ranges

    def counted(self, rel, s, e):
        reads.append(list(zip(s, e)))
        return read_ranges(self, rel, s, e)

    monkeypatch.setattr(DataFolder, "read_ranges", counted)
    reader = tario.open_tar_spans(folder, "a.tar", starts, ends)
    assert reads == [[(starts[0], ends[5]), (starts[6], ends[8])]]  # samples 0-1 merged, then sample 4
    with reader:
        view = reader.source.view()
        assert reader.source.size == len(data)
        assert [bytes(view[a:b]) for a, b in zip(starts, ends)] == [data[a:b] for a, b in zip(starts, ends)]
        with pytest.raises(IndexError):
            view[int(table.offsets[table.starts[2]]):int(table.offsets[table.starts[2]]) + 10]  # not fetched


def test_one_task_output_is_the_subset_multiset(pool, one_task_run):
    out = os.path.join(one_task_run, "reshard")
    multiset, keys, per_shard = read_output(out)
    expected = expected_multiset(pool["samples"], pool["uids"])
    assert multiset == expected
    assert len(keys) == len(set(keys))  # repeats got their own keys
    assert any(k.endswith("_r1") for k in keys) and any(k.endswith("_r2") for k in keys)
    total = sum(expected.values())
    sizes = json.load(open(os.path.join(out, "sizes.json")))
    assert sizes == per_shard and sum(sizes.values()) == total
    names = sorted(sizes)
    assert names == [f"{i:08d}.tar" for i in range(-(-total // SAMPLES_PER_SHARD))]
    assert all(sizes[n] == SAMPLES_PER_SHARD for n in names[:-1])
    stats = json.load(open(os.path.join(out, "stats.json")))
    subset_unique = set(pool["uids"])
    present = {s["uid"] for s in pool["samples"] if "json" in s and json.loads(s["json"]).get("uid") == s["uid"]}
    assert stats["input_samples_scanned"] == len(pool["samples"])
    assert stats["subset_rows"] == len(pool["uids"]) and stats["subset_uids"] == len(subset_unique)
    assert stats["uids_found"] == len(subset_unique & present)
    assert stats["uids_missing"] == len(subset_unique - present)
    assert stats["samples_written"] == total and stats["output_shards"] == len(names)
    assert (stats["samples_without_json"], stats["samples_without_uid"], stats["samples_bad_uid"]) == (1, 1, 1)
    import webdataset as wds  # what training reads with: the same samples, keys and fields

    wds_samples = list(wds.WebDataset(os.path.join(out, names[0]), shardshuffle=False))
    assert len(wds_samples) == sizes[names[0]] and all({"jpg", "txt", "json"} <= set(s) for s in wds_samples)
    for n in names:  # per-shard stats beside every shard
        st = json.load(open(os.path.join(out, n.replace(".tar", "_stats.json"))))
        assert st["samples"] == sizes[n] and st["bytes"] == os.path.getsize(os.path.join(out, n))


def test_eight_tasks_give_identical_shards(pool, one_task_run, tmp_path):
    cfg = write_toml(tmp_path / "run.toml", str(tmp_path / "run"), pool["shards"], pool["subset"], tasks=8)
    assert not submit_run(load_config(cfg)).failed
    assert len(done_indexes(load_config(cfg).folder(), "reshard.write")) == 8
    assert shard_digests(str(tmp_path / "run" / "reshard")) == shard_digests(os.path.join(one_task_run, "reshard"))


def test_shuffle_is_seeded_and_independent_of_task_count(pool, one_task_run, tmp_path):
    digests = []
    for tasks in (1, 8):
        cfg = write_toml(tmp_path / f"run{tasks}.toml", str(tmp_path / f"run{tasks}"), pool["shards"],
                         pool["subset"], tasks=tasks, extra="shuffle = true\nshuffle_seed = 3")
        assert not submit_run(load_config(cfg)).failed
        out = str(tmp_path / f"run{tasks}" / "reshard")
        assert read_output(out)[0] == expected_multiset(pool["samples"], pool["uids"])
        digests.append(shard_digests(out))
    assert digests[0] == digests[1]
    assert digests[0] != shard_digests(os.path.join(one_task_run, "reshard"))


def test_killed_write_task_resubmits_to_identical_shards(pool, tmp_path):
    # small output shards (4 samples): many commits, so the kill lands between two of them
    cfg_path = write_toml(tmp_path / "run.toml", str(tmp_path / "run"), pool["shards"], pool["subset"], tasks=1,
                          samples_per_shard=4)
    cfg = load_config(cfg_path)
    run = str(tmp_path / "run")
    out = os.path.join(run, "reshard")
    assert not submit_run(cfg).failed
    reference = shard_digests(out)
    # Undo the write and finalize steps (markers and shards), then run the write task by hand and kill it.
    for step in ("reshard.write", "reshard.finalize"):
        os.remove(os.path.join(run, "_markers", step, "000000.json"))
    for n in os.listdir(out):
        if n.endswith((".tar", "_stats.json")) or n in ("sizes.json", "stats.json"):
            os.remove(os.path.join(out, n))
    proc = subprocess.Popen([sys.executable, "-m", "dcslurm.core.runner", run, "reshard.write", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60

    def committed() -> list[str]:
        return [n for n in os.listdir(out) if n.endswith("_stats.json") and not n.startswith(".tmp-")]

    while time.time() < deadline and not committed():
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = committed()
    n_shards = len(reference) - 1  # without sizes.json
    assert 1 <= len(written) < n_shards, "the write task was not killed mid-way"
    assert done_indexes(cfg.folder(), "reshard.write") == set()
    result = submit_run(cfg)
    assert not result.failed and result.pending["reshard.write"] == [0]
    marker = json.load(open(os.path.join(run, "_markers", "reshard.write", "000000.json")))
    assert marker["stats"]["shards_resumed"] >= 1
    assert shard_digests(out) == reference
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def test_count_tasks_read_four_shards_each_unless_configured(pool, one_task_run, tmp_path):
    """A shard's count is a fraction of a task's start: four shards a count task by default
    (the pool's six in two tasks); [stages.reshard] units_per_task still sets it."""
    from dcslurm.core.plan import read_plan
    from dcslurm.core.runs import plan_run
    from dcslurm.core.storage import DataFolder

    run = DataFolder(one_task_run, {})
    count = read_plan(run).step("reshard.count")
    assert [(r.start, r.stop) for r in map(count.shards, range(count.n_tasks))] == [(0, 4), (4, 6)]
    assert done_indexes(run, "reshard.count") == {0, 1}
    cfg = write_toml(tmp_path / "per1.toml", str(tmp_path / "run"), pool["shards"], pool["subset"], tasks=1,
                     tail={"stages": {"reshard": {"units_per_task": 1}}})
    assert plan_run(load_config(cfg)).step("reshard.count").n_tasks == 6


def test_a_write_task_writes_its_shards_at_once_and_the_same_bytes(pool, tmp_path, monkeypatch):
    """A write task with several output shards writes cpus_per_task (here 2) of them at once:
    one shard's system calls (writev, fsync, mapping the next input) overlap another's
    Python. The shards are the bytes one at a time gives."""
    import threading

    import jobs.reshard.stage as stage
    from dcslurm.core.taskrun import run_task

    cfg = load_config(write_toml(tmp_path / "run.toml", str(tmp_path / "run"), pool["shards"], pool["subset"],
                                 tasks=1, samples_per_shard=8))
    run = str(tmp_path / "run")
    out = os.path.join(run, "reshard")
    assert not submit_run(cfg).failed
    reference = shard_digests(out)
    os.remove(os.path.join(run, "_markers", "reshard.write", "000000.json"))
    for n in os.listdir(out):
        if n.endswith((".tar", "_stats.json")):
            os.remove(os.path.join(out, n))
    # the first two shards must be under way together: one at a time, the barrier breaks
    barrier, calls, lock = threading.Barrier(2, timeout=20), [], threading.Lock()
    original = stage._write_shard

    def meeting(*args, **kwargs):
        with lock:
            calls.append(threading.get_ident())
            first_two = len(calls) <= 2
        if first_two:
            barrier.wait()
        return original(*args, **kwargs)

    monkeypatch.setattr(stage, "_write_shard", meeting)
    assert run_task(run, "reshard.write", 0) == 0
    assert len(set(calls[:2])) == 2 and len(calls) == len(reference) - 1  # every shard, sizes.json aside
    assert shard_digests(out) == reference


def _mapped_rss(path: str) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    total, ours = 0, False
    for line in open("/proc/self/smaps"):
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line: address range ... path
            ours = line.rstrip("\n").endswith(" " + path)
        elif ours and first == "Rss:":
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_READ and /proc/self/smaps are Linux's")
def test_write_maps_a_local_tar_with_only_the_copied_spans_filled(tmp_path):
    """The write step copies the kept members only: their pages are filled in advance,
    not the whole tar's (that cost a 30% subset's write most of its mapping time)."""
    from dcslurm.core.storage import DataFolder
    from jobs.reshard.tario import open_tar, open_tar_spans

    path = str(tmp_path / "a.tar")
    data = np.random.default_rng(0).integers(0, 256, 32 << 20, dtype=np.uint8).tobytes()
    size = len(data)
    open(path, "wb").write(data)
    folder = DataFolder(str(tmp_path), {})
    with open_tar(folder, "a.tar", str(tmp_path)):  # the count step's reader walks every header
        assert _mapped_rss(path) == size  # the measure works: every page filled
    starts, ends = [1000, 21 << 20], [3000, (21 << 20) + 10_000]
    with open_tar_spans(folder, "a.tar", starts, ends) as reader:
        # the kernel maps a span's whole folio (up to 2 MB of page cache): far from 32 MB still
        assert 0 < _mapped_rss(path) <= size // 4
        view = reader.source.view()
        assert all(bytes(view[a:b]) == data[a:b] for a, b in zip(starts, ends))


def test_shard_writer_starts_the_disk_writing_before_the_commit(tmp_path):
    """After each flush the writer asks Linux to start writing back what it wrote
    (sync_file_range), so the commit's fsync has little left to wait for."""
    from jobs.reshard import tario

    with open(tmp_path / "a.tar", "wb") as f:
        assert tario._start_writeback(f.fileno()) is (sys.platform == "linux")
        w = TarShardWriter(f)
        w.add("a.jpg", b"x" * (TarShardWriter.FLUSH + 1))  # one flush before close
        w.close()
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert [(m.name, m.size) for m in tar] == [("a.jpg", TarShardWriter.FLUSH + 1)]


@pytest.mark.parametrize("change", ["uid rewritten in place", "shard grown"])
def test_input_changed_after_count_fails_the_write_with_one_line(pool, tmp_path, change):
    """Write copies the spans count recorded; an input that changed since is refused, never copied."""
    shards = tmp_path / "shards"
    shutil.copytree(pool["shards"], shards)
    cfg = load_config(write_toml(tmp_path / "run.toml", str(tmp_path / "run"), str(shards), pool["subset"], tasks=1))
    assert not submit_run(cfg).failed
    run = str(tmp_path / "run")
    os.remove(os.path.join(run, "_markers", "reshard.write", "000000.json"))
    out = os.path.join(run, "reshard")
    for n in os.listdir(out):
        if n.endswith((".tar", "_stats.json")):
            os.remove(os.path.join(out, n))
    first = sorted(n for n in os.listdir(shards) if n.endswith(".tar"))[0]
    path = shards / first
    data = bytearray(path.read_bytes())
    if change == "shard grown":
        data += bytes(10240)
        expected = "bytes now"
    else:
        kept = set(pool["uids"])
        uid = next(u for u in (json.loads(m)["uid"] for m in _json_members(bytes(data))) if u in kept)
        at = data.find(uid.encode())
        data[at:at + 32] = ("f" * 32 if uid != "f" * 32 else "e" * 32).encode()  # same length, other uid
        expected = "no longer holds the uid it was counted with"
    path.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "dcslurm.core.runner", run, "reshard.write", "0"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"{first}" in proc.stderr and expected in proc.stderr and "the input changed during the run" in proc.stderr
    assert "Traceback" not in proc.stderr  # a one-line error, not a crash
    assert not [n for n in os.listdir(out) if n.endswith(".tar")]  # nothing committed from the changed input


def _json_members(data: bytes) -> list[bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [tar.extractfile(m).read() for m in tar if m.name.endswith(".json")]


def test_count_records_missing_at_index_is_a_one_line_error(pool, tmp_path):
    cfg = load_config(write_toml(tmp_path / "run.toml", str(tmp_path / "run"), pool["shards"], pool["subset"], tasks=1))
    assert not submit_run(cfg).failed
    run = str(tmp_path / "run")
    os.remove(os.path.join(run, "reshard", "_counts", "000000.npz"))
    os.remove(os.path.join(run, "_markers", "reshard.index", "000000.json"))
    proc = subprocess.run([sys.executable, "-m", "dcslurm.core.runner", run, "reshard.index", "0"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "_counts/000000.npz: missing: count task 0 left no record of its kept samples" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_damaged_input_shards_are_counted_and_the_rest_kept(pool, tmp_path):
    shards = tmp_path / "shards"
    os.makedirs(shards)
    lost = set()
    for n in sorted(os.listdir(pool["shards"])):
        data = open(os.path.join(pool["shards"], n), "rb").read()
        members = list(tarfile.open(fileobj=io.BytesIO(data)))
        if n == "00000001.tar":  # truncated inside the jpg of sample 10: samples 10.. are lost
            cut = next(m for m in members if m.name.startswith("000100010.jpg")).offset_data + 50
            data = data[:cut]
            lost |= {m.name.split(".")[0] for m in members if m.offset_data + m.size > cut}
        if n == "00000003.tar":  # a corrupt header (sample 7's txt): that sample is lost, the rest kept
            txt = next(m for m in members if m.name == "000300007.txt")
            data = bytearray(data)
            data[txt.offset + 5] ^= 0xFF
            data = bytes(data)
            lost.add("000300007")
        if n == "00000000.tar":  # a symlink and a name with a newline: left out, counted
            buf = io.BytesIO(data)
            with tarfile.open(fileobj=buf, mode="a") as tar:
                link = tarfile.TarInfo("000000000.png")
                link.type, link.linkname = tarfile.SYMTYPE, "000000000.jpg"
                tar.addfile(link)
                odd = tarfile.TarInfo("bad\nkey.txt")
                odd.size = 1
                tar.addfile(odd, io.BytesIO(b"x"))
            data = buf.getvalue()
        (shards / n).write_bytes(data)
    cfg = write_toml(tmp_path / "run.toml", str(tmp_path / "run"), str(shards), pool["subset"], tasks=3)
    assert not submit_run(load_config(cfg)).failed
    out = str(tmp_path / "run" / "reshard")
    surviving = [s for s in pool["samples"] if s["key"] not in lost]
    assert len(lost) == 25 - 10 + 1
    assert read_output(out)[0] == expected_multiset(surviving, pool["uids"])
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["truncated_tars"] == 1 and stats["corrupt_headers"] == 1
    assert stats["links"] == 1 and stats["newline_names"] == 1
    assert stats["damaged_samples"] == 2  # the sample cut short and the one with the corrupt header
    assert stats["input_samples_scanned"] == len(pool["samples"]) - len(lost)


def test_unsorted_subset_is_refused_at_submit_with_one_line(pool, tmp_path):
    bad = np.load(pool["subset"])[::-1].copy()
    np.save(tmp_path / "unsorted.npy", bad)
    cfg = write_toml(tmp_path / "run.toml", str(tmp_path / "run"), pool["shards"],
                     str(tmp_path / "unsorted.npy"), tasks=2)
    # The preflight reads the subset's first rows: refused before any count task is queued.
    with pytest.raises(UserError) as exc:
        submit_run(load_config(cfg))
    assert str(exc.value).startswith(str(tmp_path / "unsorted.npy")) and "not sorted" in str(exc.value)
    assert not os.path.exists(tmp_path / "run" / "_markers")


def test_missing_subset_setting_is_a_config_error(pool, tmp_path):
    cfg = write_toml(tmp_path / "run.toml", str(tmp_path / "run"), pool["shards"], "", tasks=1)
    with pytest.raises(UserError, match=r"\[stages.reshard\] subset: no subset"):
        submit_run(load_config(cfg))


# -- S3 and SLURM ------------------------------------------------------------------------

@pytest.mark.s3
def test_s3_input_and_output_give_the_same_shards(pool, one_task_run, s3_server, s3_bucket, tmp_path):
    fs = s3_server.fs()
    bucket = s3_bucket.removeprefix("s3://")
    for n in os.listdir(pool["shards"]):
        fs.put_file(os.path.join(pool["shards"], n), f"{bucket}/pool/{n}")
    fs.put_file(pool["subset"], f"{bucket}/subset.npy")
    cfg = write_toml(tmp_path / "run.toml", f"{s3_bucket}/run", f"{s3_bucket}/pool", f"{s3_bucket}/subset.npy",
                     tasks=3, log_dir=str(tmp_path / "logs"),
                     tail=f'[storage]\nendpoint_url = "{s3_server.endpoint_url}"\n')
    assert not submit_run(load_config(cfg)).failed
    local = shard_digests(os.path.join(one_task_run, "reshard"))
    remote = {n: hashlib.sha256(fs.cat_file(f"{bucket}/run/reshard/{n}")).hexdigest() for n in local}
    assert remote == local
    assert not [p for p in fs.find(bucket) if "/.tmp-" in p]


@pytest.mark.slurm
@pytest.mark.parametrize("tasks", [1, 8])
def test_slurm_run_gives_the_subset_multiset_and_local_shards(pool, one_task_run, slurm_cluster, tmp_path, tasks):
    cfg = write_toml(tmp_path / "run.toml", str(tmp_path / "run"), pool["shards"], pool["subset"], tasks=tasks,
                     executor="slurm", tail='[stages.reshard.resources]\ncpus_per_task = 1\ntime = "00:10:00"\n')
    submit_run(load_config(cfg))
    wait_run_done(cfg, timeout=400)
    slurm_cluster.wait_jobs_done(60)
    out = str(tmp_path / "run" / "reshard")
    assert len(done_indexes(load_config(cfg).folder(), "reshard.write")) == tasks
    assert read_output(out)[0] == expected_multiset(pool["samples"], pool["uids"])
    assert shard_digests(out) == shard_digests(os.path.join(one_task_run, "reshard"))


@pytest.mark.slow
def test_pipeline_download_filter_reshard_on_the_demo_pool(tmp_path):
    """The inputs as a real run gives them: download's tars (upstream units) and the filter's subset.npy."""
    from dcslurm.core.storage import DataFolder
    from dcslurm.core.tomlfile import write_toml
    from dcslurm.demo.pool import DemoPoolServer, generate_demo_pool

    generate_demo_pool(str(tmp_path / "pool"), samples=120, seed=3, files=2, heldout=0)
    with DemoPoolServer(DataFolder(str(tmp_path / "pool"))) as server:  # the download's http_proxy
        cfg = write_toml(tmp_path / "run.toml", {
            "run": {"folder": f"{tmp_path}/run", "scale": "tiny", "stages": ["download", "filter", "reshard"]},
            "pool": {"metadata": f"{tmp_path}/pool"},
            "executor": {"kind": "local", "max_parallel": 2},
            "stages": {"download": {"processes": 1, "threads": 8, "samples_per_shard": 25,
                                    "http_proxy": server.proxy_url},
                       "filter": {"spec": "basic"}, "reshard": {"samples_per_shard": 20, "tasks": 2}},
        })
        assert not submit_run(load_config(cfg)).failed
    run = tmp_path / "run"
    subset = np.load(run / "filter" / "subset.npy")
    subset_uids = [pair_to_uid(*row) for row in subset]
    downloaded = []
    for name in sorted(os.listdir(run / "download")):
        if name.endswith(".tar"):
            samples = collections.defaultdict(dict)
            with tarfile.open(run / "download" / name) as tar:
                for m in tar:
                    key, ext = m.name.split(".", 1)
                    samples[key][ext] = tar.extractfile(m).read()
            for key, s in samples.items():
                downloaded.append({"key": key, "uid": json.loads(s["json"])["uid"], "jpg": s["jpg"],
                                   "txt": s["txt"].decode(), "json": s["json"].decode()})
    expected = expected_multiset(downloaded, subset_uids)
    assert 0 < sum(expected.values()) < len(downloaded)
    assert read_output(str(run / "reshard"))[0] == expected
    stats = json.load(open(run / "reshard" / "stats.json"))
    present = {s["uid"] for s in downloaded}
    assert stats["subset"] == str(run / "filter" / "subset.npy")
    assert stats["uids_missing"] == len(set(subset_uids) - present)  # the failed downloads


def test_subset_setting_beside_the_filter_stage_is_a_config_error(pool, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dcslurm.core.runs import plan_run

    os.makedirs(tmp_path / "meta")
    pq.write_table(pa.table({"uid": [pool["samples"][0]["uid"]], "text": ["a caption"]}),
                   tmp_path / "meta" / "00000000.parquet")
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"""
[run]
folder = "{tmp_path}/run"
stages = ["filter", "reshard"]
[pool]
metadata = "{tmp_path}/meta"
shards = "{pool['shards']}"
[stages.reshard]
subset = "{pool['subset']}"
""")
    with pytest.raises(UserError, match=r"the filter stage is in this run and writes the subset") as err:
        plan_run(load_config(str(cfg)))
    assert "\n" not in str(err.value)
    cfg.write_text(cfg.read_text().replace(f'subset = "{pool["subset"]}"', ""))
    plan = plan_run(load_config(str(cfg)))  # the filter's subset.npy is the input: plans fine
    assert [s.name for s in plan.steps if s.stage == "reshard"] == [
        "reshard.count", "reshard.index", "reshard.write", "reshard.finalize"]
