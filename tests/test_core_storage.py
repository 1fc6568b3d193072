"""DataFolder commits: atomic, hidden temporaries, one-line errors."""

from __future__ import annotations

import os

import pytest

from dcslurm.core.errors import StorageError
from dcslurm.core.storage import DataFolder, is_transient, join_url, normalize_url, s3fs_options


def test_writer_commits_only_on_success(tmp_path):
    folder = DataFolder(str(tmp_path / "out dir"))
    with folder.writer("a/b.bin") as f:
        f.write(b"hello")
    assert folder.read_bytes("a/b.bin") == b"hello"
    with pytest.raises(RuntimeError):
        with folder.writer("a/c.bin") as f:
            f.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert not folder.exists("a/c.bin")
    assert os.listdir(tmp_path / "out dir" / "a") == ["b.bin"]  # no temporary left behind


def test_list_hides_temporaries_and_sorts(tmp_path):
    folder = DataFolder(str(tmp_path))
    for name in ("b.json", "a.json", "c.txt"):
        folder.write_text(name, "x")
    (tmp_path / ".tmp-123-d.json").write_text("partial")
    assert folder.list() == ["a.json", "b.json", "c.txt"]
    assert folder.list(suffix=".json") == ["a.json", "b.json"]
    assert folder.list("missing") == []


def test_json_errors_name_the_file(tmp_path):
    folder = DataFolder(str(tmp_path))
    folder.write_text("bad.json", "{nope")
    with pytest.raises(StorageError, match=r"bad.json: not valid JSON"):
        folder.read_json("bad.json")


def test_urls():
    assert normalize_url("file:///tmp/x/") == "/tmp/x"
    assert normalize_url("s3://b/p/") == "s3://b/p"
    assert join_url("s3://b/p", "a", "b.tar") == "s3://b/p/a/b.tar"
    assert join_url("/", "x") == "/x"
    assert set(s3fs_options()) == {"config_kwargs"}  # the request bounds, nothing else


def test_unreachable_object_store_is_one_line():
    folder = DataFolder("s3://bucket/run", s3fs_options(endpoint_url="http://127.0.0.1:9", max_attempts=1,
                                                         connect_timeout=1))
    with pytest.raises(StorageError) as info:
        folder.check_reachable()
    assert str(info.value).startswith("s3://bucket/run:") and "\n" not in str(info.value)


def test_transient_classification():
    class EndpointConnectionError(Exception):
        pass

    assert is_transient(ConnectionResetError())
    assert is_transient(EndpointConnectionError("x"))
    assert not is_transient(ValueError("x"))
