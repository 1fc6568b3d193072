"""The tar reader (jobs/reshard/tario.py) on hostile tars: it must end, never raise, count
what it drops, and on every tar that Python's tarfile reads cleanly read the same members;
its lean walk must read what its careful walk reads. Embed's streaming reader
(jobs/embed/tar_samples.py) must end and raise nothing but CorruptShard, and that on damage.

Every walk here runs under a hard deadline (SIGALRM): a reader that loops fails the test
instead of blocking the suite.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import tarfile
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jobs.embed.tar_samples import CorruptShard, iter_samples
from jobs.reshard.tario import BLOCK, RECORD, TarSampleReader, TarShardWriter, _MappedSource, _ustar_header
from jobs.wds import KEY_EXT as _KEY_EXT

# -- building tars byte by byte ---------------------------------------------------------


def _member(name: str | bytes, data: bytes, typeflag: bytes = b"0") -> bytes:
    raw = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
    return _ustar_header(raw, len(data), typeflag) + data + bytes(-len(data) % BLOCK)


def _pax(records: bytes, then: bytes) -> bytes:
    """A PAX extended header holding `records` verbatim, then the member `then` it describes."""
    return _ustar_header(b"././@PaxHeader", len(records), b"x") + records + bytes(-len(records) % BLOCK) + then


def _end(body: bytes) -> bytes:
    out = body + bytes(2 * BLOCK)
    return out + bytes(-len(out) % RECORD)


def _sample(key: str, uid: int = 0) -> bytes:
    return (_member(f"{key}.jpg", b"\xff\xd8jpeg" * 40) + _member(f"{key}.txt", b"a caption")
            + _member(f"{key}.json", b'{"uid": "%032x"}' % uid))


class _Hang(BaseException):
    """Raised by the deadline (a BaseException: no `except Exception` in the reader hides it)."""


@contextlib.contextmanager
def _deadline(seconds: float):
    """Fail with _Hang when the block runs longer than `seconds` (pytest-timeout's own alarm,
    if set, is put back afterwards)."""
    def fire(signum, frame):
        raise _Hang(f"still running after {seconds} s")

    before = signal.signal(signal.SIGALRM, fire)
    pending, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
        if pending:
            signal.setitimer(signal.ITIMER_REAL, max(pending - (time.monotonic() - start), 0.001))


def _careful(data: bytes, seconds: float = 2.0) -> tuple[list, dict]:
    """(samples as (key, [(name, size, bytes)]), counters) by the careful walk (a plain file object)."""
    reader = TarSampleReader(io.BytesIO(data), len(data))
    with _deadline(seconds):
        samples = [(s.key, [(m.name, m.size, bytes(m.data)) for m in s.load()]) for s in reader]
    return samples, dict(vars(reader.counters))


def _mapped(path, seconds: float = 2.0) -> tuple[list, dict, list]:
    """What `_careful` returns, by the mapped reader (the lean walk where it applies), and its
    table's members (the columns count and write work from)."""
    with _deadline(seconds):
        with TarSampleReader(None, source=_MappedSource(str(path))) as reader:
            samples = [(s.key, [(m.name, m.size, bytes(m.data)) for m in s.load()]) for s in reader]
            counters = dict(vars(reader.counters))
        with TarSampleReader(None, source=_MappedSource(str(path))) as reader:
            table = reader.table()
            view = reader.source.view()
            columns = [(k, [(f"{k}.{table.exts[j]}", int(table.sizes[j]),
                             bytes(view[int(table.offsets[j]):int(table.offsets[j] + table.sizes[j])]))
                            for j in range(table.starts[i], table.starts[i + 1])])
                       for i, k in enumerate(table.keys)]
            del view
    return samples, counters, columns


def _lean(path) -> bool:
    """Whether the mapped reader takes the lean walk for the tar at `path`."""
    with TarSampleReader(None, source=_MappedSource(str(path))) as reader:
        return reader._lean_table() is not None


def _both(data: bytes, tmp_path) -> tuple[list, dict]:
    """The careful and the mapped walk of `data`, checked to agree; what they read and counted."""
    careful = _careful(data)
    path = tmp_path / "t.tar"
    path.write_bytes(data)
    samples, counters, columns = _mapped(path)
    assert (samples, counters) == careful
    assert columns == careful[0]
    return careful


# -- one test per bug found in review (issue 17 item 3) ----------------------------------------

def test_pax_record_of_length_zero_ends_and_is_counted(tmp_path):
    """'0 path=x' made the PAX parser add 0 to its position forever (CPython's CVE-2019-20907)."""
    data = _end(_sample("a") + _pax(b"0 path=b.jpg\n", _member("x.jpg", b"xx")) + _sample("c", 2) + _sample("d"))
    samples, counters = _both(data, tmp_path)
    # damage drops the sample open at it (a) and the first after the resync (x): they may be incomplete
    assert [k for k, _ in samples] == ["c", "d"]
    assert counters["corrupt_headers"] == 1 and counters["damaged_samples"] == 2


@pytest.mark.parametrize("size_field", [b"-0001750\0\0\0\0", b"\xff" * 11 + b"\x00"])
def test_negative_member_size_ends_and_is_counted(tmp_path, size_field):
    """A size of -1000 (octal text or GNU base-256) moved the walk back onto the same header."""
    bad = bytearray(_member("b.jpg", b"x" * 1000))
    assert len(size_field) == 12
    bad[124:136] = size_field
    bad[148:156] = b" " * 8
    bad[148:156] = b"%06o\0 " % sum(bad[:BLOCK])
    data = _end(_sample("a") + bytes(bad) + _sample("c", 2) + _sample("d"))
    samples, counters = _both(data, tmp_path)
    assert [k for k, _ in samples] == ["d"]  # a (open at the damage) and c (after the resync) dropped
    assert counters["corrupt_headers"] == 1 and counters["damaged_samples"] == 2


@pytest.mark.parametrize("record", [b"12 size=abc\n", b"11 size=-5\n", b"99 size=5\n"])
def test_malformed_pax_record_is_counted_not_raised(tmp_path, record):
    """`size=abc` raised ValueError out of the walk; every malformed record is counted damage."""
    data = _end(_sample("a") + _pax(record, _member("b.jpg", b"yy")) + _sample("c", 2) + _sample("d"))
    samples, counters = _both(data, tmp_path)
    assert [k for k, _ in samples] == ["c", "d"]
    assert counters["corrupt_headers"] == 1 and counters["damaged_samples"] == 2


def test_member_name_with_a_newline_is_dropped_and_counted(tmp_path):
    """A webdataset key with a newline cannot be written to the line-based lists downstream
    (and other tools split keys on lines): such a member is left out and counted."""
    body = _sample("a") + _member("b\nc.jpg", b"zz") + _sample("d", 2)
    long = _pax(b"%d path=e\nf.jpg\n" % (len(" path=e\nf.jpg\n") + 2), _member("e.jpg", b"ww"))
    for data, lean in ((_end(body), True), (_end(body + long), False)):  # a ustar name; a PAX path
        samples, counters = _both(data, tmp_path)
        assert _lean(tmp_path / "t.tar") == lean
        assert [k for k, _ in samples] == ["a", "d"]
        assert counters["newline_names"] == (1 if lean else 2)


def test_directory_with_a_negative_size_is_read_as_tarfile_reads_it(tmp_path):
    """Found by the fuzzer below: no data follows a directory, so tarfile never uses its size;
    the first fix counted a negative one as damage (and the old walk looped on it)."""
    folder = bytearray(_ustar_header(b"sub/", 0, b"5"))
    folder[124:136] = b"-0001750\0\0\0\0"
    _fix_checksum(folder, 0)
    data = _end(_sample("a") + bytes(folder) + _sample("c", 2))
    samples, counters = _both(data, tmp_path)
    assert [k for k, _ in samples] == ["a", "c"]
    assert counters["corrupt_headers"] == counters["damaged_samples"] == 0
    assert _tarfile_reads(data) == (True, [m for _, ms in samples for m in ms], 0)
    assert [s.key for s in iter_samples(io.BytesIO(data), "s.tar")] == ["a", "c"]


def test_links_are_dropped_and_counted(tmp_path):
    body = (_sample("a") + _ustar_header(b"b.jpg", 0, b"2") + _ustar_header(b"c.jpg", 0, b"1")
            + _sample("d", 2))
    samples, counters = _both(_end(body), tmp_path)
    assert _lean(tmp_path / "t.tar")
    assert [k for k, _ in samples] == ["a", "d"]
    assert counters["links"] == 2


# -- fuzzing: mutated shards against Python's tarfile ---------------------------------------

_DAMAGE = ("corrupt_headers", "truncated_tars", "damaged_samples")


def _seeds() -> list[bytes]:
    """Small shards in each dialect the reader meets: our writer's ustar (the lean walk),
    tarfile's GNU and PAX (long names in records: the careful walk) and ustar (a long name
    in the prefix field: the lean walk), the last three with a directory and links."""
    def samples(n, long=False):
        for i in range(n):
            key = ("d/" * 60 + f"l{i}") if long and i == 2 else ("sub/ünï" if long and i == 3 else f"k{i:03d}")
            yield key, [("jpg", bytes([i]) * (300 + 97 * i)), ("txt", f"caption {i}".encode()),
                        ("json", b'{"uid": "%032x"}' % i)]

    buf = io.BytesIO()
    writer = TarShardWriter(buf)
    for key, members in samples(5):
        for ext, data in members:
            writer.add(f"{key}.{ext}", data)
    writer.close()
    out = [buf.getvalue()]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for key, members in samples(5, long=True):
                for ext, data in members:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                if key == "k001":
                    for name, kind in (("sub", tarfile.DIRTYPE), ("ln.jpg", tarfile.SYMTYPE),
                                       ("hl.jpg", tarfile.LNKTYPE)):
                        info = tarfile.TarInfo(name)
                        info.type, info.linkname = kind, "k000.jpg" if kind != tarfile.DIRTYPE else ""
                        tar.addfile(info)
        out.append(buf.getvalue())
    return out


_SEEDS = _seeds()


def _headers(data: bytes) -> list[int]:
    """Where the seed's header blocks are (records and members), to aim mutations at."""
    at = set()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            at.update((info.offset, info.offset_data - BLOCK))
    return sorted(at)


_SEED_HEADERS = [_headers(s) for s in _SEEDS]
_FIELDS = {"name": (0, 100), "size": (124, 136), "checksum": (148, 156), "typeflag": (156, 157),
           "magic": (257, 265), "prefix": (345, 500), "mtime": (136, 148)}
_NAMES = [b"k.jpg", b"a\nb.jpg", b"noext", b"dir/", b"k000.json", b"\xff\xfe.txt", b"k001.txt", b"x.jpg/", b""]
_VALUES = {
    "size": st.one_of(st.sampled_from([b"-0001750", b"\xff" * 11 + b"\0", b"\x80" + bytes(10) + b"\x05",
                                       b"77777777777", b"", b"abc", b"0o17", b" 17 ", b"\x1c17"]),
                      st.integers(0, 5000).map(lambda n: b"%011o" % n)),
    "typeflag": st.sampled_from([bytes([c]) for c in b"0\x00712345679LKxXgSVMDAZ"]),
    "name": st.one_of(st.sampled_from(_NAMES), st.binary(max_size=100)),
    "prefix": st.sampled_from([b"", b"sub", b"a\nb", b"\xff"]),
    "checksum": st.binary(min_size=8, max_size=8),
    "magic": st.sampled_from([b"ustar\x0000", b"ustar  \x00", bytes(8), b"garbage!"]),
    "mtime": st.binary(min_size=12, max_size=12),
}


def _record(key: bytes, value: bytes, off: int = 0) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(max(length + off, 0)).encode() + body


_RECORDS = st.one_of(
    st.sampled_from([b"0 path=b.jpg\n", b"12 size=abc\n", b"11 size=-5\n", b"99 size=5\n", b"x2 size=5\n",
                     b"9 sizeabc\n", b"10 size=5", b"5 a=b\n"]),
    st.builds(_record, st.sampled_from([b"path", b"size", b"linkpath", b"comment", b"mtime", b"hdrcharset"]),
              st.one_of(st.sampled_from(_NAMES + [b"7", b"100000", b"-1", b"BINARY", b"k003.jpg/"]),
                        st.integers(0, 3000).map(lambda n: str(n).encode())),
              st.sampled_from([0, 0, 0, -1, 1, 20])))

_MUTATION = st.one_of(
    st.tuples(st.just("byte"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("field"), st.integers(0, 10 ** 6), st.sampled_from(sorted(_FIELDS)), st.data(), st.booleans()),
    # a field changed behind a valid checksum reaches past the header check (and keeps the lean walk)
    st.tuples(st.just("field"), st.integers(0, 10 ** 6), st.sampled_from(sorted(_FIELDS)), st.data(), st.just(True)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("splice"), st.floats(0, 1), st.floats(0, 1), st.integers(1, 3 * BLOCK)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 2 * BLOCK)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=BLOCK)),
    st.tuples(st.just("record"), st.integers(0, 10 ** 6), st.sampled_from(b"xxxgXLK"),
              st.lists(_RECORDS, min_size=1, max_size=3)),
)


def _fix_checksum(data: bytearray, at: int) -> None:
    data[at + 148:at + 156] = b" " * 8
    data[at + 148:at + 156] = b"%06o\0 " % (sum(data[at:at + BLOCK]) & 0o777777)


def _mutate(seed: int, mutations: list) -> bytes:
    data = bytearray(_SEEDS[seed])
    headers = _SEED_HEADERS[seed]
    for op, *args in mutations:
        n = len(data)
        if not n:
            break
        if op == "byte":
            data[min(int(args[0] * n), n - 1)] = args[1]
        elif op == "field":
            at = headers[args[0] % len(headers)]
            lo, hi = _FIELDS[args[1]]
            value = args[2].draw(_VALUES[args[1]])
            if at + BLOCK <= n:
                data[at + lo:at + hi] = value[:hi - lo].ljust(hi - lo, b"\0")
                if args[3] and args[1] != "checksum":
                    _fix_checksum(data, at)
        elif op == "truncate":
            del data[int(args[0] * n):]
        elif op == "splice":
            src, dst = int(args[0] * n), int(args[1] * n)
            chunk = data[src:src + args[2]]
            data[dst:dst + len(chunk)] = chunk
        elif op == "delete":
            del data[int(args[0] * n):int(args[0] * n) + args[1]]
        elif op == "insert":
            data[int(args[0] * n):int(args[0] * n)] = args[1]
        elif op == "record":  # turn a header into a record (PAX, GNU long name) with this content
            at = headers[args[0] % len(headers)]
            body = b"".join(args[2])
            padded = -(-len(body) // BLOCK) * BLOCK
            if at + BLOCK + padded <= n and padded:
                data[at + 156] = args[1]
                data[at + 124:at + 136] = b"%011o\0" % len(body)
                data[at + BLOCK:at + BLOCK + padded] = body.ljust(padded, b"\0")
                _fix_checksum(data, at)
    return bytes(data)


def _pax_well_formed(buf: bytes) -> bool:
    """Whether a PAX header's data passes CPython's own check since 3.11.10 (the fix for
    CVE-2024-6232); the 3.11.7 tarfile here skips what it cannot parse instead."""
    pos = 0
    while pos < len(buf) and buf[pos] != 0:
        match = re.compile(rb"([0-9]{1,20}) ").match(buf, pos)
        if not match or int(match.group(1)) < 5 or pos + int(match.group(1)) > len(buf):
            return False
        end = match.start(1) + int(match.group(1)) - 1
        keyword, equals, _ = buf[match.end(1) + 1:end].partition(b"=")
        if not keyword or equals != b"=" or buf[end] != 0x0A:
            return False
        pos += int(match.group(1))
    return True


def _records_well_formed(data: bytes, start: int, stop: int) -> bool:
    """Whether the PAX headers among the record headers in data[start:stop] are well-formed."""
    while start < stop:
        header = data[start:start + BLOCK]
        size = tarfile.nti(header[124:136])
        padded = -(-size // BLOCK) * BLOCK
        if padded < 0:
            return False
        if header[156:157] in (b"x", b"X", b"g") and not _pax_well_formed(data[start + BLOCK:start + BLOCK + padded]):
            return False
        start += BLOCK + padded
    return True


def _tarfile_reads(data: bytes) -> tuple[bool, list, int]:
    """(whether tarfile reads `data` cleanly, its sample members as (name, size, bytes), its
    links). Clean: no error, every member's data there, the walk ends on an end-of-archive
    block, and nothing the reader deliberately treats otherwise (see the module docstring of
    tario): sparse files, global PAX records naming a path or size, a PAX size tarfile turns
    into 0."""
    try:
        with tarfile.TarFile(fileobj=io.BytesIO(data), mode="r") as tar:
            members, links, last, end = [], 0, -1, 0
            for info in tar:
                if info.offset <= last:  # tarfile walked backwards (a negative size): it would loop
                    return False, [], 0
                if not _records_well_formed(data, end, info.offset_data - BLOCK):
                    return False, [], 0
                last, end = info.offset, tar.offset
                if info.type == tarfile.GNUTYPE_SPARSE or any(k.startswith("GNU.sparse") for k in info.pax_headers):
                    return False, [], 0
                if "size" in info.pax_headers and not re.fullmatch(r"\s*[+]?[0-9_]+\s*", info.pax_headers["size"]):
                    return False, [], 0
                links += info.type in (tarfile.LNKTYPE, tarfile.SYMTYPE)
                if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE):
                    body = tar.extractfile(info).read()
                    if len(body) != info.size:
                        return False, [], 0
                    if "\n" not in info.name and _KEY_EXT.match(info.name):
                        members.append((info.name, info.size, body))
            if {"path", "size"} & set(tar.pax_headers):
                return False, [], 0
            return data[tar.offset:tar.offset + BLOCK] == bytes(BLOCK), members, links
    except Exception:  # noqa: BLE001 - any error tarfile raises means "not clean"
        return False, [], 0


def _hypothesis_settings():
    # database=None: nothing written into the shared tree. An example takes milliseconds: the
    # deadline flags one that is slow yet ends (generous: a loaded CI machine must not flake), the
    # alarm in `_deadline` turns a hang into a failure. About 30 s on a busy 2-core machine;
    # DCSLURM_FUZZ_EXAMPLES=100000 for a longer hunt.
    from datetime import timedelta
    return settings(max_examples=int(os.environ.get("DCSLURM_FUZZ_EXAMPLES", 3000)),
                    deadline=timedelta(seconds=10), database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_hypothesis_settings()
@given(seed=st.integers(0, len(_SEEDS) - 1), mutations=st.lists(_MUTATION, min_size=1, max_size=4))
def test_fuzz_reader_ends_counts_and_agrees_with_tarfile(seed, mutations, fuzz_dir):
    data = _mutate(seed, mutations)
    careful = _careful(data, seconds=5)  # never hangs, never raises
    path = fuzz_dir / "t.tar"
    path.write_bytes(data)
    samples, counters, columns = _mapped(path, seconds=5)
    assert (samples, counters) == careful  # the lean walk (where it applies) == the careful walk
    assert columns == careful[0]
    with _deadline(5):
        clean, expected, links = _tarfile_reads(data)
    event(f"lean walk: {_lean(path)}")
    event(f"tarfile reads it cleanly: {clean}")
    event(f"damage counted: {any(careful[1][k] for k in _DAMAGE)}")
    if clean:
        got = [m for _, members in careful[0] for m in members]
        assert got == expected
        assert {k: careful[1][k] for k in _DAMAGE} == dict.fromkeys(_DAMAGE, 0)
        assert careful[1]["links"] == links
    # embed's streaming reader: ends, raises nothing but CorruptShard, and only on damage
    try:
        with _deadline(5):
            list(iter_samples(io.BytesIO(data), "s.tar"))
    except CorruptShard:
        assert not clean


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def test_fuzz_seeds_are_read_like_tarfile():
    """The unmutated seeds: clean, and read member for member as tarfile reads them."""
    for data in _SEEDS:
        clean, expected, links = _tarfile_reads(data)
        assert clean and len(expected) == 15
        assert [m for _, ms in _careful(data)[0] for m in ms] == expected



# -- embed's streaming reader (jobs/embed/tar_samples.py) on the same tars ---------------------

def _corrupt_ustar(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at + 10] ^= 0xFF
    return bytes(out)


@pytest.mark.parametrize("label", ["pax length 0", "pax size=abc", "corrupt header", "negative size",
                                   "no end-of-archive block"])
def test_embed_reader_raises_corrupt_shard_instead_of_stopping_early(label):
    """tarfile ends a walk quietly at a bad header after the first one (and reads a PAX size
    of "abc" as 0): embed took the samples before it for the whole shard. The damage must
    raise CorruptShard (the shard is then reported, nothing in it committed)."""
    negative = bytearray(_member("b.jpg", b"x" * 1000))
    negative[124:136] = b"-0001750\0\0\0\0"
    _fix_checksum(negative, 0)
    body = {
        "pax length 0": _pax(b"0 path=b.jpg\n", _member("x.jpg", b"xx")),
        "pax size=abc": _pax(b"12 size=abc\n", _member("b.jpg", b"yy")),
        "corrupt header": _corrupt_ustar(_member("b.jpg", b"yy"), 0),
        "negative size": bytes(negative),
        "no end-of-archive block": b"",
    }[label]
    data = _sample("a") + body + _sample("c", 2) + _sample("d")
    data = data if label == "no end-of-archive block" else _end(data)
    with _deadline(5), pytest.raises(CorruptShard, match="s.tar: damaged tar"):
        list(iter_samples(io.BytesIO(data), "s.tar"))
    good = [s.key for s in iter_samples(io.BytesIO(_end(_sample("a") + _sample("c", 2))), "s.tar")]
    assert good == ["a", "c"]
