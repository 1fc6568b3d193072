"""Reshard from S3 reads what it copies, not whole input tars (bytes counted by the server).

The bytes are counted where they leave the object store: SeaweedFS's own
per-bucket counter `SeaweedFS_s3_bucket_traffic_sent_bytes_total`, which adds
up every response body it sends for a bucket's objects. It sees every process
of the run (the local executor's task processes included) and every way a
client can read (whole GETs, ranged GETs, fsspec's read-ahead), so neither a
wrapper that misses a code path nor a client that over-reads can flatter the
figure. The pool has its own bucket, so nothing else the run reads (subset,
count records, markers) is in it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import urllib.request

import numpy as np
import pytest
from PIL import Image

from dcslurm.core.config import load_config
from dcslurm.core.runs import submit_run
from jobs.reshard.subset import uids_to_array
from tests.infra.ports import free_port, release_ports
from tests.infra.s3_server import S3Server
from tests.test_reshard import expected_multiset, read_output, shard_digests, write_toml

BLOCK = 512


class MeteredS3Server(S3Server):
    """The test suite's SeaweedFS with its Prometheus metrics served (the session's server runs
    with -metricsPort=0): `sent_bytes(bucket)` is what the server has sent of that bucket's objects."""

    def __init__(self, credentials_of: S3Server | None = None) -> None:
        super().__init__()
        if credentials_of is not None:  # task processes take credentials from the session's environment
            self.access_key, self.secret_key = credentials_of.access_key, credentials_of.secret_key
        self.metrics_port = 0

    def _command(self) -> list[str]:
        if not self.metrics_port:
            self.metrics_port = free_port()
        return [a for a in super()._command() if not a.startswith("-metricsPort=")] + \
            [f"-metricsPort={self.metrics_port}"]

    def sent_bytes(self, bucket: str) -> int:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        pattern = r'^SeaweedFS_s3_bucket_traffic_sent_bytes_total\{bucket="%s"\} (\S+)$' % re.escape(bucket)
        m = re.search(pattern, text, re.M)
        return int(float(m.group(1))) if m else 0

    def close(self, keep_tmpdir: bool | None = None) -> None:
        super().close(keep_tmpdir)
        if self.metrics_port:
            release_ports([self.metrics_port])


def _jpeg(rng: np.random.Generator) -> bytes:
    """A noise JPEG of 10-30 KB: samples the size of real ones next to 512-byte headers."""
    h, w = rng.integers(64, 112), rng.integers(96, 128)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def make_pool(folder: str, n_shards: int = 4, per_shard: int = 60, seed: int = 5) -> list[dict]:
    """img2dataset-like shards (jpg, txt, json with uid); returns every sample with its member sizes."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    samples = []
    for shard in range(n_shards):
        with tarfile.open(os.path.join(folder, f"{shard:08d}.tar"), "w") as tar:
            for i in range(per_shard):
                key, uid = f"{shard:04d}{i:05d}", rng.bytes(16).hex()
                s = {"key": key, "uid": uid, "jpg": _jpeg(rng), "txt": f"a caption {shard}/{i}",
                     "json": json.dumps({"uid": uid, "key": key, "status": "success"})}
                for ext in ("jpg", "txt", "json"):
                    data = s[ext] if isinstance(s[ext], bytes) else s[ext].encode()
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                s["member_bytes"] = [len(s["jpg"]), len(s["txt"].encode()), len(s["json"].encode())]
                samples.append(s)
    return samples


@pytest.fixture(scope="module")
def metered(s3_server):
    server = MeteredS3Server(credentials_of=s3_server).start()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.s3
def test_s3_reshard_of_a_30_percent_subset_reads_the_kept_spans_not_whole_tars(metered, tmp_path):
    """The count step reads each input tar once (it must walk every header and json); the write
    step reads only the kept samples' members: at most 1.1x their bytes plus their headers.
    Before ranged reads the write step downloaded every tar whole again."""
    samples = make_pool(str(tmp_path / "pool"))
    rng = np.random.default_rng(11)
    kept = [s for s in samples if rng.random() < 0.3]
    subset_uids = [s["uid"] for s in kept] + [s["uid"] for s in kept[:5]]  # a few repeats: read once, written twice
    np.save(tmp_path / "subset.npy", uids_to_array(subset_uids))

    fs = metered.fs()
    pool_bucket = metered.make_bucket("pool-reshard-bytes").removeprefix("s3://")
    run_bucket = metered.make_bucket("run-reshard-bytes")
    tars = sorted(os.listdir(tmp_path / "pool"))
    for n in tars:
        fs.put_file(str(tmp_path / "pool" / n), f"{pool_bucket}/{n}")
    fs.put_file(str(tmp_path / "subset.npy"), f"{run_bucket.removeprefix('s3://')}/subset.npy")
    input_bytes = sum(os.path.getsize(tmp_path / "pool" / n) for n in tars)
    kept_bytes = sum(sum(s["member_bytes"]) for s in kept)
    kept_headers = BLOCK * sum(len(s["member_bytes"]) for s in kept)
    assert 0.2 < kept_bytes / input_bytes < 0.4  # the case the goal is about: a 30% subset

    cfg = write_toml(tmp_path / "run.toml", f"{run_bucket}/run", f"s3://{pool_bucket}", f"{run_bucket}/subset.npy",
                     tasks=2, log_dir=str(tmp_path / "logs"), samples_per_shard=40,
                     tail=f'[storage]\nendpoint_url = "{metered.endpoint_url}"\n')
    before = metered.sent_bytes(pool_bucket)
    assert not submit_run(load_config(cfg)).failed
    read = metered.sent_bytes(pool_bucket) - before

    # the same shards as the same reshard of local files (the careful, whole-file path)
    local_cfg = write_toml(tmp_path / "local.toml", str(tmp_path / "local"), str(tmp_path / "pool"),
                           str(tmp_path / "subset.npy"), tasks=1, samples_per_shard=40)
    assert not submit_run(load_config(local_cfg)).failed
    local = shard_digests(str(tmp_path / "local" / "reshard"))
    run_fs = run_bucket.removeprefix("s3://") + "/run/reshard"
    assert {n: hashlib.sha256(fs.cat_file(f"{run_fs}/{n}")).hexdigest() for n in local} == local
    assert read_output(str(tmp_path / "local" / "reshard"))[0] == expected_multiset(samples, subset_uids)

    write_read = read - input_bytes  # the count step reads each tar exactly once, whole
    print(f"S3 bytes read: {read} = count {input_bytes} + write {write_read}; kept {kept_bytes} "
          f"+ headers {kept_headers}: write/(kept+headers) = {write_read / (kept_bytes + kept_headers):.3f}")
    assert input_bytes <= read
    assert write_read <= 1.1 * (kept_bytes + kept_headers)


@pytest.mark.s3
@pytest.mark.parametrize("change", ["uid rewritten in place", "shard shrunk", "shard grown"])
def test_s3_input_changed_after_count_fails_the_ranged_write_with_one_line(metered, tmp_path, change):
    """The write step reads an S3 tar only at the spans count recorded; an input that changed since
    is refused in one line, whether the spans now lie past its end or hold other samples."""
    samples = make_pool(str(tmp_path / "pool"), n_shards=2, per_shard=12, seed=7)
    uids = [s["uid"] for s in samples[::2]]
    np.save(tmp_path / "subset.npy", uids_to_array(uids))
    fs = metered.fs()
    bucket = metered.make_bucket(f"pool-changed-{change.split()[-1]}")
    for n in os.listdir(tmp_path / "pool"):
        fs.put_file(str(tmp_path / "pool" / n), f"{bucket.removeprefix('s3://')}/{n}")
    run = str(tmp_path / "run")
    cfg = write_toml(tmp_path / "run.toml", run, bucket, str(tmp_path / "subset.npy"), tasks=1,
                     log_dir=str(tmp_path / "logs"), tail=f'[storage]\nendpoint_url = "{metered.endpoint_url}"\n')
    assert not submit_run(load_config(cfg)).failed
    os.remove(os.path.join(run, "_markers", "reshard.write", "000000.json"))
    out = os.path.join(run, "reshard")
    for n in os.listdir(out):
        if n.endswith((".tar", "_stats.json")):
            os.remove(os.path.join(out, n))
    first = "00000000.tar"
    key = f"{bucket.removeprefix('s3://')}/{first}"
    data = bytearray(fs.cat_file(key))
    if change == "shard grown":
        data += bytes(10240)
        expected = "bytes now"
    elif change == "shard shrunk":
        data = data[:len(data) // 2]
        expected = "bytes now"
    else:
        uid = samples[0]["uid"]  # kept: the subset takes every other sample from the first
        at = data.find(uid.encode())
        data[at:at + 32] = ("f" * 32).encode()  # same length, other uid
        expected = "no longer holds the uid it was counted with"
    fs.pipe_file(key, bytes(data))
    proc = subprocess.run([sys.executable, "-m", "dcslurm.core.runner", run, "reshard.write", "0"],
                          capture_output=True, text=True, env={**os.environ, **metered.env})
    assert proc.returncode != 0
    assert first in proc.stderr and expected in proc.stderr and "the input changed during the run" in proc.stderr
    assert "Traceback" not in proc.stderr  # a one-line error, not a crash
    assert not [n for n in os.listdir(out) if n.endswith(".tar")]  # nothing committed from the changed input


@pytest.mark.s3
@pytest.mark.slow  # embed and reshard as a user runs them: about 100 s here on a loaded machine
def test_s3_whole_reshard_after_embed_reads_only_the_kept_spans(metered, tmp_path):
    """After embed (which reads every tar whole and notes each one's member index), the whole
    reshard stage, count and write, reads at most 1.1x the kept samples' bytes plus their
    headers from the pool: the count step reads the indexes, not the tars. Before the index,
    the count step read every tar once more (the stage read 1.30x the input)."""
    from tests.test_embed import save_tiny_checkpoint
    from tests.test_reshard_index import embed_reshard_toml

    samples = make_pool(str(tmp_path / "pool"))
    rng = np.random.default_rng(11)
    kept = [s for s in samples if rng.random() < 0.3]
    np.save(tmp_path / "subset.npy", uids_to_array(sorted(s["uid"] for s in kept)))
    fs = metered.fs()
    pool_bucket = metered.make_bucket("pool-stage-bytes").removeprefix("s3://")
    run_bucket = metered.make_bucket("run-stage-bytes")
    for n in sorted(os.listdir(tmp_path / "pool")):
        fs.put_file(str(tmp_path / "pool" / n), f"{pool_bucket}/{n}")
    kept_bytes = sum(sum(s["member_bytes"]) for s in kept)
    kept_headers = BLOCK * sum(len(s["member_bytes"]) for s in kept)
    cfg = embed_reshard_toml(tmp_path / "run.toml", f"{run_bucket}/run", f"s3://{pool_bucket}",
                             str(tmp_path / "subset.npy"), save_tiny_checkpoint(str(tmp_path / "tiny.pt"), 1),
                             log_dir=str(tmp_path / "logs"), tasks=2,
                             tail=f'[storage]\nendpoint_url = "{metered.endpoint_url}"\n')
    assert not submit_run(load_config(cfg, stages=["embed"])).failed
    before = metered.sent_bytes(pool_bucket)
    assert not submit_run(load_config(cfg)).failed
    read = metered.sent_bytes(pool_bucket) - before
    print(f"S3 bytes read by the whole reshard stage: {read}; kept {kept_bytes} + headers {kept_headers}: "
          f"{read / (kept_bytes + kept_headers):.3f}x")
    assert read <= 1.1 * (kept_bytes + kept_headers)

    stats = json.loads(fs.cat_file(f"{run_bucket.removeprefix('s3://')}/run/reshard/stats.json"))
    assert stats["tars_indexed"] == 4 and stats["tar_indexes_stale"] == 0
    local_cfg = write_toml(tmp_path / "local.toml", str(tmp_path / "local"), str(tmp_path / "pool"),
                           str(tmp_path / "subset.npy"), tasks=2, samples_per_shard=40)
    assert not submit_run(load_config(local_cfg)).failed  # every tar read: the same shards
    local = shard_digests(str(tmp_path / "local" / "reshard"))
    run_fs = run_bucket.removeprefix("s3://") + "/run/reshard"
    assert {n: hashlib.sha256(fs.cat_file(f"{run_fs}/{n}")).hexdigest() for n in local} == local
