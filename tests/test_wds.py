"""The one webdataset grouping layer (jobs/wds.py `tar_samples`) against reshard's reader
(jobs/reshard/tario.py) on the same hostile tars: the same samples and the same counts of
what is left out, but where they legitimately differ (named at each assert)."""

from __future__ import annotations

import io
import os
import tarfile
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobs.reshard.tario import TarSampleReader, _MappedSource
from jobs.wds import SKIP_REASONS, CorruptShard, tar_samples
from tests.test_tario_fuzz import _MUTATION, _SEEDS, _deadline, _mutate, _tarfile_reads

# -- building tars member by member (mixed formats in one tar, as real pools have them) ------------


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, fmt: int = tarfile.USTAR_FORMAT,
           link: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data) if kind in tarfile.REGULAR_TYPES else 0, link
    return info.tobuf(fmt, "utf-8", "surrogateescape") + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def end(body: bytes) -> bytes:
    out = body + bytes(2 * tarfile.BLOCKSIZE)
    return out + bytes(-len(out) % tarfile.RECORDSIZE)


UID = b'{"uid": "%032x"}'


def hostile(long_names: bool = True) -> bytes:
    """Every odd name and member type the stages used to treat differently."""
    parts = [
        member("a.jpg", b"A"), member("a.txt", b"cap a"), member("a.json", UID % 1),
        member(".jpg", b"no key"), member("dir/.jpg", b"no key in a folder"),  # no key: nothing before the dot
        member("README", b"no extension"), member("a.b/c", b"a dot in the folder only"),
        member("b.jpg", b"B first"), member("b.jpg", b"B again"), member("b.JPG", b"B upper"),  # repeated
        member("b.txt", b"cap b"),
        member("c", kind=tarfile.DIRTYPE), member("c/d.seg.png", b"P"), member("c/d.txt", b"cap d"),
        member("e.jpg", kind=tarfile.SYMTYPE, link="a.jpg"), member("e.txt", kind=tarfile.LNKTYPE, link="a.txt"),
        member("e.json", UID % 5),
        member("f\n.jpg", b"newline"), member("f.txt", b"cap f"),
        member("__meta__.json", b"{}"),  # webdataset's own tar_file_iterator skips this name uncounted
        member("j.jpg", b"J"), member("k.jpg", b"K"), member("j.txt", b"cap j again"),  # a key seen twice
        member("i.jpg", b""), member("i.TXT", b"cap i"),  # an empty member; an upper-case extension
    ]
    if long_names:
        parts += [
            member("g" * 150 + ".jpg", b"G", fmt=tarfile.GNU_FORMAT),  # GNU long name record
            member("g" * 150 + ".txt", b"cap g", fmt=tarfile.GNU_FORMAT),
            member("h" * 120 + "/\u00e9t\u00e9.jpg", b"H", fmt=tarfile.PAX_FORMAT),  # PAX path record
            member("h" * 120 + "/\u00e9t\u00e9.txt", b"cap h", fmt=tarfile.PAX_FORMAT),
            member("l" * 120 + "/x", b"no extension, long", fmt=tarfile.PAX_FORMAT),
        ]
    return end(b"".join(parts))


def layer(data: bytes) -> tuple[list[tuple[str, dict]], Counter]:
    skipped: Counter = Counter()
    samples = [(s.pop("__key__"), s) for s in tar_samples(io.BytesIO(data), "t.tar", skipped)]
    return samples, skipped


def tario(data: bytes, path=None) -> tuple[list[tuple[str, dict]], dict]:
    """tario's samples as the layer gives them: per lower-cased extension the first member
    (the layer keeps the first of a repeated one; reshard copies every member)."""
    with (TarSampleReader(io.BytesIO(data), len(data)) if path is None
          else TarSampleReader(None, source=_MappedSource(str(path)))) as reader:
        samples = []
        for s in reader:
            fields: dict = {}
            for m in s.load():
                fields.setdefault(m.ext.lower(), bytes(m.data))
            samples.append((s.key, fields))
        return samples, dict(vars(reader.counters))


# -- the agreement ----------------------------------------------------------------------------------

@pytest.mark.parametrize("long_names", [True, False], ids=["gnu-pax-careful-walk", "ustar-lean-walk"])
def test_layer_and_tario_agree_on_a_hostile_tar(tmp_path, long_names):
    data = hostile(long_names)
    path = tmp_path / "t.tar"
    path.write_bytes(data)
    samples, skipped = layer(data)
    for theirs, counters in (tario(data), tario(data, path)):  # tario's careful walk, and its mapped (lean) one
        assert samples == theirs
        # what tario counts, the layer counts alike
        for reason in ("members_without_key", "newline_names", "links"):
            assert skipped[reason] == counters[reason], reason
        assert not any(counters[k] for k in ("corrupt_headers", "truncated_tars", "damaged_samples"))
    # Where tario legitimately differs: it keeps a repeated extension (reshard copies members
    # verbatim, nothing is lost there); a stage's sample is one value per field, so the layer keeps
    # the first ("b.jpg") and counts the others ("b.jpg" again, "b.JPG").
    assert skipped["duplicate_fields"] == 2
    keys = [k for k, _ in samples]
    assert keys == ["a", "b", "c/d", "e", "f", "__meta__", "j", "k", "j", "i"] + \
        (["g" * 150, "h" * 120 + "/\u00e9t\u00e9"] if long_names else [])
    fields = dict(samples[:3])
    assert fields["b"] == {"jpg": b"B first", "txt": b"cap b"}
    assert fields["c/d"] == {"seg.png": b"P", "txt": b"cap d"}
    assert samples[3] == ("e", {"json": UID % 5})  # links are no fields
    assert samples[9] == ("i", {"jpg": b"", "txt": b"cap i"})  # extensions lower-cased
    assert skipped == Counter(members_without_key=4 + long_names, newline_names=1, links=2, duplicate_fields=2)
    assert set(skipped) <= set(SKIP_REASONS)


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_SPARSE, b"V", b"Z"], ids=["sparse", "volume", "unknown"])
def test_members_of_other_types_are_counted_not_silently_dropped(kind):
    """tario takes no GNU sparse member or member of an unknown type as a field (and counts
    none); the layer leaves them out too, so both give the same samples, but counts them."""
    other = bytearray(member("s.jpg", b"S" * 10))
    other[156:157] = kind
    other[148:156] = b" " * 8
    other[148:156] = b"%06o\0 " % sum(other[:512])
    data = end(member("a.jpg", b"A") + bytes(other) + member("s.txt", b"cap s"))
    samples, skipped = layer(data)
    assert samples == tario(data)[0] == [("a", {"jpg": b"A"}), ("s", {"txt": b"cap s"})]
    assert skipped == Counter(other_members=1)


@pytest.mark.parametrize("damage", ["truncated", "corrupt header"])
def test_damage_raises_after_whole_samples_only(damage):
    """The layer reads a stream (tarfile's walk), so it cannot resync past damage as tario does:
    it raises CorruptShard (each stage then drops the shard, counts the rest as skipped, or
    stops with a one-line error). What it yielded before is whole, and tario read the same."""
    body = b"".join(member(f"{k}.{e}", f"{k}{e}".encode()) for k in "abcd" for e in ("jpg", "txt"))
    if damage == "truncated":
        data = body[: len(body) * 5 // 8 + 100]  # inside c.txt's data
    else:
        data = bytearray(end(body))
        data[5 * 1024 + 10] ^= 0xFF  # c.txt's header
        data = bytes(data)
    got = []
    with pytest.raises(CorruptShard, match="t.tar: damaged tar"):
        for s in tar_samples(io.BytesIO(data), "t.tar"):
            got.append(s["__key__"])
    assert got == ["a", "b"]  # c is open at the damage: not yielded
    theirs = [k for k, _ in tario(data)[0]]
    assert theirs[:2] == got and "c" not in theirs  # tario too drops c, and resyncs to d on a bad header


def test_compressed_tar_and_what_observe_sees():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("a.jpg", b"A"), ("a.txt", b"t"), ("noext", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    seen = []
    skipped: Counter = Counter()
    out = list(tar_samples(io.BytesIO(buf.getvalue()), "t.tar.gz", skipped,
                           observe=lambda info, tar: seen.append(info and info.name)))
    assert out == [{"__key__": "a", "jpg": b"A", "txt": b"t"}]
    assert seen == ["a.jpg", "a.txt", "noext", None] and skipped == Counter(members_without_key=1)


# -- the same on mutated tars (tests/test_tario_fuzz.py's seeds and mutations) ------------------------

def _fuzz_settings():
    from datetime import timedelta

    from hypothesis import HealthCheck, settings

    # database=None: nothing written into the shared tree. 300 examples, about 3 s; a third of
    # DCSLURM_FUZZ_EXAMPLES when set (a longer hunt: 30000 passed when this was written)
    return settings(max_examples=int(os.environ.get("DCSLURM_FUZZ_EXAMPLES", 900)) // 3,
                    deadline=timedelta(seconds=10), database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_fuzz_settings()
@given(seed=st.integers(0, len(_SEEDS) - 1), mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_fuzz_layer_agrees_with_tario(seed, mutations):
    """On a tar tarfile reads cleanly, the layer's samples and counts are tario's; on damage
    the layer raises CorruptShard, having yielded only samples tario read the same."""
    data = _mutate(seed, mutations)
    with _deadline(5):
        theirs, counters = tario(data)
        clean = _tarfile_reads(data)[0]
        got, skipped = [], Counter()
        try:
            for s in tar_samples(io.BytesIO(data), "t.tar", skipped):
                got.append((s.pop("__key__"), s))
            raised = False
        except CorruptShard:
            raised = True
    if clean:
        assert not raised and got == theirs
        assert {k: skipped[k] for k in ("members_without_key", "newline_names", "links")} == \
            {k: counters[k] for k in ("members_without_key", "newline_names", "links")}
    else:
        assert got == theirs[:len(got)]
