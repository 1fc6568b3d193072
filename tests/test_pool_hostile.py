"""Hostile pools (issue 17 item 2): required columns of the wrong type, and uids that repeat.

A `text` column stored as binary with non-UTF-8 bytes made download shards that claim
successes and hold no samples; duplicate uids passed filter-only runs and `filter run`
and the subset repeated those samples. Each must end in one line naming the file and
row, before anything is queued (`pool inspect`, `submit`) or in the filter task that
meets it (a filter-only run has no download preflight).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcslurm.core.config import load_config
from dcslurm.core.runs import run_status, submit_run
from dcslurm.core.storage import DataFolder
from dcslurm.core.tomlfile import write_toml
from dcslurm.datacomp import pool as poolmod


def _uid(i: int) -> str:
    return f"{i * 0x9E3779B97F4A7C15 % (1 << 128):032x}"  # spread over the uid range, as hashes are


def _file(path, uids, text=None, url=None, score=None) -> None:
    n = len(uids)
    pq.write_table(pa.table({
        "uid": pa.array(uids, pa.string()),
        "url": url if url is not None else pa.array([f"http://127.0.0.1:9/{i}.jpg" for i in range(n)], pa.string()),
        "text": text if text is not None else pa.array([f"a photo of thing {i}" for i in range(n)], pa.string()),
        "clip_l14_similarity_score": pa.array(score if score is not None else np.linspace(0.1, 0.4, n), pa.float64()),
    }), str(path))


def _pool(folder, b_uids=None, b_text=None, b_url=None) -> str:
    os.makedirs(folder, exist_ok=True)
    _file(folder / "a.parquet", [_uid(i) for i in range(8)])
    _file(folder / "b.parquet", b_uids or [_uid(i) for i in range(8, 16)], text=b_text, url=b_url)
    return str(folder)


def _cli(monkeypatch, capsys, *argv: str) -> tuple[int, list[str]]:
    """`dcslurm ARGV` in this process through the real entry point: (exit code, stderr lines)."""
    from dcslurm.cli import main

    monkeypatch.setattr(sys, "argv", ["dcslurm", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def _one_line(code, lines, *fragments) -> str:
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("dcslurm: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _download_toml(tmp_path, pool: str) -> str:
    return write_toml(tmp_path / "run.toml", {"run": {"folder": str(tmp_path / "run"), "scale": "tiny",
                                                      "stages": ["download"]}, "pool": {"metadata": pool}})


# -- column types -------------------------------------------------------------------

NON_UTF8 = pa.array([f"caption {i}".encode() for i in range(5)] + [b"caf\xe9 \xff\xfe au lait"]
                    + [b"fine"] * 2, pa.binary())


@pytest.mark.parametrize("command", ["inspect", "submit"])
def test_binary_text_with_non_utf8_is_one_line_naming_file_column_and_row(tmp_path, monkeypatch, capsys, command):
    pool = _pool(tmp_path / "pool", b_text=NON_UTF8)
    argv = ("pool", "inspect", pool) if command == "inspect" else ("submit", "-c", _download_toml(tmp_path, pool))
    code, lines = _cli(monkeypatch, capsys, *argv)
    _one_line(code, lines, str(tmp_path / "pool" / "b.parquet") + ": ", "column 'text' row 5: not UTF-8")
    assert not (tmp_path / "run" / "plan.json").exists()  # nothing planned, nothing queued


def test_wrong_types_are_named_from_the_schema(tmp_path, monkeypatch, capsys):
    # valid UTF-8 stored as bytes: img2dataset would write "b'...'" captions
    pool = _pool(tmp_path / "p1", b_text=pa.array([b"ok"] * 8, pa.binary()))
    code, lines = _cli(monkeypatch, capsys, "pool", "inspect", pool)
    _one_line(code, lines, "b.parquet: column 'text' has type binary", "store it as strings")
    pool = _pool(tmp_path / "p2", b_url=pa.array(list(range(8)), pa.int64()))
    code, lines = _cli(monkeypatch, capsys, "pool", "inspect", "--no-uids", pool)
    _one_line(code, lines, "b.parquet: column 'url' has type int64, expected UTF-8 strings")


def test_filter_run_refuses_binary_text_rather_than_judging_it_empty(tmp_path, monkeypatch, capsys):
    pool = _pool(tmp_path / "pool", b_text=NON_UTF8)
    (tmp_path / "entries.txt").write_text("photo\nthing\n")
    spec = f"metaclip(entries={tmp_path / 'entries.txt'}, t=4)"
    code, lines = _cli(monkeypatch, capsys, "filter", "run", "--pool", pool, "--spec", spec,
                       "--out", str(tmp_path / "s.npy"))
    _one_line(code, lines, "b.parquet: column 'text' row 5: not UTF-8")


# -- uid uniqueness: pool inspect / submit -------------------------------------------

def test_duplicate_uid_across_files_names_both_files_and_rows(tmp_path, monkeypatch, capsys):
    pool = _pool(tmp_path / "pool", b_uids=[_uid(i) for i in range(8, 14)] + [_uid(3), _uid(15)])
    code, lines = _cli(monkeypatch, capsys, "pool", "inspect", pool)
    _one_line(code, lines,
              f"b.parquet: duplicate uid {_uid(3)} in row 6 (also in {tmp_path / 'pool' / 'a.parquet'} row 3)")


# -- uid uniqueness: the filter stage and `filter run` --------------------------------

CROSS = ("b.parquet: duplicate uid", "in row 6 (also in", "a.parquet row 3)")
WITHIN = ("b.parquet: duplicate uid", "in rows 2 and 6")


def _dup_pool(folder, where: str) -> str:
    if where == "across":
        return _pool(folder, b_uids=[_uid(i) for i in range(8, 14)] + [_uid(3), _uid(15)])
    return _pool(folder, b_uids=[_uid(i) for i in range(8, 14)] + [_uid(10), _uid(15)])


@pytest.mark.parametrize("where", ["across", "within"])
def test_filter_run_refuses_duplicate_uids(tmp_path, monkeypatch, capsys, where):
    pool = _dup_pool(tmp_path / "pool", where)
    workers = "2" if where == "across" else "1"  # map files in worker processes, too
    code, lines = _cli(monkeypatch, capsys, "filter", "run", "--pool", pool, "--filter", "clip_score",
                       "--fraction", "0.5", "--workers", workers, "--out", str(tmp_path / "s.npy"))
    line = _one_line(code, lines, *(CROSS if where == "across" else WITHIN))
    assert _uid(3 if where == "across" else 10) in line
    assert not (tmp_path / "s.npy").exists()


@pytest.mark.parametrize("where", ["across", "within"])
def test_filter_only_run_fails_its_task_with_the_line_and_status_shows_it(tmp_path, where):
    pool = _dup_pool(tmp_path / "pool", where)
    path = write_toml(tmp_path / "run.toml", {
        "run": {"folder": str(tmp_path / "run"), "stages": ["filter"]}, "pool": {"metadata": pool},
        "executor": {"kind": "local"},
        "stages": {"filter": {"spec": "clip_score(l14, fraction=0.5)", "units_per_task": 1}},
    })
    result = submit_run(load_config(path))
    assert result.failed
    assert not (tmp_path / "run" / "filter" / "subset.npy").exists()
    _, steps = run_status(str(tmp_path / "run"))
    errors = [t.error for s in steps for t in s.failed]
    assert len(errors) == 1, errors
    for fragment in (CROSS if where == "across" else WITHIN):
        assert fragment in errors[0], errors[0]
    assert "\n" not in errors[0]


def test_filter_stage_keeps_a_pool_of_unique_uids_whole(tmp_path, monkeypatch, capsys):
    pool = _pool(tmp_path / "pool")
    code, lines = _cli(monkeypatch, capsys, "filter", "run", "--pool", pool, "--filter", "no_filter",
                       "--out", str(tmp_path / "s.npy"))
    assert code in (0, None), lines
    assert len(np.load(tmp_path / "s.npy")) == 16


# -- bounded memory -----------------------------------------------------------------

def test_merge_reads_each_uid_once_in_passes_of_bounded_size(tmp_path):
    """400 small files merged with a 600-row budget: every pass holds at most 600 rows (plus
    one bucket), each run is read in slices, never whole, only the two files holding the
    duplicate planted between file 37 and file 311 are read again, and it is named."""
    spill = DataFolder(str(tmp_path))
    rng = np.random.default_rng(5)
    all_uids = rng.integers(0, 1 << 63, size=(400 * 30, 2), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    runs, held, pass_rows, reread = [], [], [], []
    for k in range(400):
        hi, lo = all_uids[k * 30:(k + 1) * 30, 0].copy(), all_uids[k * 30:(k + 1) * 30, 1].copy()
        if k == 311:
            hi[4], lo[4] = all_uids[37 * 30 + 9]
        run, offsets = poolmod.sorted_uid_run(hi, lo, f"file{k}")
        poolmod.save_uid_run(spill, f"{k}.npy", run)
        read = poolmod.uid_run_reader(spill, f"{k}.npy")

        def logged(a, b, read=read):
            held.append(b - a)
            return read(a, b)

        def halves(k=k, hi=hi, lo=lo):
            reread.append(k)
            return hi, lo

        runs.append(poolmod.UidRun(offsets, logged, halves))
    bucket_max = int(max(np.bincount((all_uids[:, 0] >> np.uint64(64 - poolmod.UID_BUCKET_BITS)).astype(np.int64))))
    orig = poolmod._passes

    def spy(counts, max_rows):
        out = orig(counts, max_rows)
        pass_rows.extend(int(counts[a:b].sum()) for a, b in out)
        return out

    poolmod._passes = spy
    try:
        dup = poolmod.find_duplicate(runs, max_rows=600)
    finally:
        poolmod._passes = orig
    assert dup == (poolmod.uid_hex(*all_uids[37 * 30 + 9]), 37, 9, 311, 4)
    assert sorted(reread) == [37, 311]
    assert len(pass_rows) >= 12000 // 600 and max(pass_rows) <= 600 + bucket_max
    assert max(held) < 30  # slices of runs, never a whole file
    unique = runs[:311] + runs[312:]
    held.clear()
    assert poolmod.find_duplicate(unique, max_rows=600) is None
    assert sum(held) == 399 * 30  # every uid read exactly once


def test_shared_upper_halves_are_not_duplicates(tmp_path):
    """Distinct uids with one upper half, in one file and across two: no error; the same uid: one."""
    hi, lo = np.array([7, 7, 9], np.uint64), np.array([1, 2, 3], np.uint64)
    run, offsets = poolmod.sorted_uid_run(hi, lo, "f")
    spill = DataFolder(str(tmp_path))
    poolmod.save_uid_run(spill, "0.npy", run)
    other = (np.array([9, 7], np.uint64), np.array([4, 2], np.uint64))
    run1, offsets1 = poolmod.sorted_uid_run(*other, "g")
    poolmod.save_uid_run(spill, "1.npy", run1)
    runs = [poolmod.UidRun(offsets, poolmod.uid_run_reader(spill, "0.npy"), lambda: (hi, lo)),
            poolmod.UidRun(offsets1, poolmod.uid_run_reader(spill, "1.npy"), lambda: other)]
    assert poolmod.find_duplicate(runs) == (poolmod.uid_hex(7, 2), 0, 1, 1, 1)
    other = (np.array([9, 7], np.uint64), np.array([4, 5], np.uint64))
    assert poolmod.find_duplicate(runs[:1] + [poolmod.UidRun(offsets1, runs[1].read, lambda: other)]) is None
    with pytest.raises(Exception, match=r"f: duplicate uid 0000000000000007000000000000000[12] in rows 0 and 2"):
        poolmod.sorted_uid_run(np.array([7, 8, 7], np.uint64), np.array([1, 1, 1], np.uint64), "f")


def test_on_s3_the_merge_reads_ranges_and_names_s3_urls(s3_server, s3_bucket, tmp_path, monkeypatch, capsys):
    """Pool and work folder on S3: `filter run` names both s3:// files; the map's runs, merged again
    from S3 in passes of 4 rows (ranged reads of each run), give the same answer."""
    from dcslurm.core.storage import s3fs_options

    local = _dup_pool(tmp_path / "pool", "across")
    fs = s3_server.fs()
    bucket = s3_bucket.removeprefix("s3://")
    for name in ("a.parquet", "b.parquet"):
        fs.put_file(os.path.join(local, name), f"{bucket}/pool/{name}")
    code, lines = _cli(monkeypatch, capsys, "filter", "run", "--pool", f"{s3_bucket}/pool", "--filter", "no_filter",
                       "--work", f"{s3_bucket}/work", "--endpoint-url", s3_server.endpoint_url,
                       "--out", str(tmp_path / "s.npy"))
    _one_line(code, lines, f"{s3_bucket}/pool/b.parquet: duplicate uid {_uid(3)} in row 6 "
                           f"(also in {s3_bucket}/pool/a.parquet row 3)")
    work = DataFolder(f"{s3_bucket}/work", s3fs_options(endpoint_url=s3_server.endpoint_url))
    from jobs.filter import engine

    runs = [poolmod.UidRun(engine.load_parts(work, pid)["uo"], poolmod.uid_run_reader(work, f"_uids/{pid}.npy"),
                           lambda pid=pid: engine._halves(work, pid))
            for pid in ("00000000", "00000001")]
    assert poolmod.find_duplicate(runs, max_rows=4) == (_uid(3), 0, 3, 1, 6)
