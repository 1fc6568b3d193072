"""The download stage: img2dataset per array task against a real HTTP server on
127.0.0.1 (good images, 404s, HTML, truncated JPEGs, a decompression bomb, slow
and refused URLs), the demo pool on the local executor, on S3 and on the real
SLURM cluster with identical shard contents, and kill-and-resubmit resume."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from dcslurm.core.config import load_config
from dcslurm.core.markers import read_marker
from dcslurm.core.runs import submit_run
from dcslurm.core.storage import DataFolder
from dcslurm.core.tomlfile import write_toml
from dcslurm.demo.pool import DemoPoolServer, generate_demo_pool
from tests.core_helpers import wait_run_done
from tests.imageserver import ImageServer

FAST = {"processes": 1, "threads": 8}
ONE_CPU = {"resources": {"cpus_per_task": 1}}  # a SLURM task of one emulated CPU
TEN_MINUTES = {"slurm": {"time": "00:10:00"}}


def write_pool(folder: str, files: list[list[tuple[str, str]]]) -> dict[str, str]:
    """Parquet files of (url, text) rows with DataComp's uid column; returns url -> uid."""
    os.makedirs(folder, exist_ok=True)
    uids = {}
    for f, rows in enumerate(files):
        table = {"uid": [], "url": [], "text": []}
        for url, text in rows:
            uid = hashlib.md5(url.encode()).hexdigest()
            uids[url] = uid
            table["uid"].append(uid)
            table["url"].append(url)
            table["text"].append(text)
        pq.write_table(pa.table(table), os.path.join(folder, f"part-{f:03d}.parquet"))
    return uids


def write_config(path, run: str, pool: str, params: dict = FAST, executor: str = "local",
                 extra: dict | None = None, log_dir: str = "") -> str:
    """A download-only run.toml: `params` is [stages.download], `extra` more top-level tables."""
    doc = {
        "run": {"folder": run, "scale": "tiny", "stages": ["download"]},
        "pool": {"metadata": pool},
        "executor": {"kind": executor, "max_parallel": 2, **({"log_dir": log_dir} if log_dir else {})},
        "stages": {"download": dict(params)},
        **(extra or {}),
    }
    return write_toml(path, doc)


def tar_contents(folder: DataFolder, name: str) -> dict[str, str]:
    """member name -> sha256 of its bytes (member order and mtimes ignored)."""
    with tarfile.open(fileobj=io.BytesIO(folder.read_bytes(name))) as tar:
        return {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar.getmembers() if m.isfile()}


def shard_contents(run: DataFolder) -> dict[str, dict[str, str]]:
    folder = run.child("download")
    return {n: tar_contents(folder, n) for n in folder.list(suffix=".tar")}


# -- failures by reason, against the real test server ---------------------------------

CASES = {  # kind -> (rows in file 0, rows in file 1)
    "good": (8, 9), "missing": (2, 2), "html": (1, 1), "truncated": (1, 1), "bomb": (1, 0),
    "slow_ok": (1, 1), "slow_timeout": (1, 1), "refused": (1, 1),
}
EXPECTED_REASONS = {"http 404": 4, "undecodable image": 4, "image too large": 1, "timeout": 2,
                    "connection refused": 2}


def _case_url(server: ImageServer, kind: str, i: int) -> str:
    if kind == "refused":
        return server.refused_url(i)
    if kind == "slow_ok":
        return server.url("slow", i, delay=0.3)
    if kind == "slow_timeout":
        return server.url("slow", 100 + i, delay=3)
    return server.url(kind, i)


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    """One download run (2 tasks) over a pool of every case; the server stays up for inspection."""
    tmp = tmp_path_factory.mktemp("served")
    rng = random.Random(0)
    with ImageServer() as server:
        files, kinds = [], {}
        counter = 0
        for f in range(2):
            rows = []
            for kind, per_file in CASES.items():
                for _ in range(per_file[f]):
                    url = _case_url(server, kind, counter)
                    counter += 1
                    kinds[url] = kind
                    rows.append((url, f"caption {counter} of a {kind} case"))
            rng.shuffle(rows)
            files.append(rows)
        uids = write_pool(str(tmp / "pool"), files)
        cfg = write_config(tmp / "run.toml", str(tmp / "run"), str(tmp / "pool"),
                           params={**FAST, "samples_per_shard": 7, "timeout": 1})
        started = time.time()
        result = submit_run(load_config(cfg))
        seconds = time.time() - started
        assert not result.failed, open(tmp / "run" / "logs" / "download" / "local-000000.log").read()[-3000:]
        yield {"run": DataFolder(str(tmp / "run")), "server": server, "kinds": kinds, "uids": uids,
               "files": files, "cfg": cfg, "seconds": seconds}


def test_shard_ids_follow_files_and_markers_list_tars(served_run):
    run = served_run["run"]
    rows0, rows1 = (len(f) for f in served_run["files"])  # 16 and 16 rows: 3 shards of 7 each
    n0, n1 = -(-rows0 // 7), -(-rows1 // 7)
    m0, m1 = read_marker(run, "download", 0), read_marker(run, "download", 1)
    assert m0["outputs"] == [f"download/{i:08d}.tar" for i in range(n0)]
    assert m1["outputs"] == [f"download/{i:08d}.tar" for i in range(n0, n0 + n1)]
    names = set(run.child("download").list())
    for i in range(n0 + n1):
        assert {f"{i:08d}.tar", f"{i:08d}.parquet", f"{i:08d}_stats.json"} <= names
    assert not any(n.startswith("_tmp") for n in names)  # feather files live in the task's scratch


def test_failures_by_reason_match_what_the_server_served(served_run):
    run, server, kinds = served_run["run"], served_run["server"], served_run["kinds"]
    stats = [read_marker(run, "download", i)["stats"] for i in (0, 1)]
    reasons: dict[str, int] = {}
    for s in stats:
        for k, v in s["failures"].items():
            reasons[k] = reasons.get(k, 0) + v
    assert reasons == EXPECTED_REASONS
    n_good = sum(1 for k in kinds.values() if k in ("good", "slow_ok"))
    assert sum(s["successes"] for s in stats) == n_good
    assert sum(s["samples"] for s in stats) == len(kinds)
    # retries = 2 (DataComp): a failing URL is asked 3 times, a good one once.
    expected = {url.split(str(server.port), 1)[1].split("?")[0]:
                (kind, 1 if kind in ("good", "slow_ok", "truncated", "html", "bomb") else 3)
                for url, kind in kinds.items() if kind != "refused"}
    # A request the client gave up on (a timeout) can still sit in the server's listen queue
    # when the task ends, and is counted once a server thread reads it: wait for those.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(server.hits[p] < n for p, (_, n) in expected.items()):
        time.sleep(0.1)
    for path, (kind, n) in expected.items():
        assert server.hits[path] == n, (kind, path, server.hits[path])


def test_every_good_sample_is_in_a_shard_with_its_uid_and_caption(served_run):
    run, kinds, uids = served_run["run"], served_run["kinds"], served_run["uids"]
    captions = {url: text for rows in served_run["files"] for url, text in rows}
    folder = run.child("download")
    seen = {}
    for name in folder.list(suffix=".tar"):
        with tarfile.open(fileobj=io.BytesIO(folder.read_bytes(name))) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        keys = {n.rsplit(".", 1)[0] for n in members}
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            assert meta["status"] == "success" and meta["uid"] == uids[meta["url"]]
            assert members[f"{key}.txt"].decode() == captions[meta["url"]]
            assert members[f"{key}.jpg"][:3] == b"\xff\xd8\xff"
            assert max(meta["width"], meta["height"]) <= 512  # keep_ratio_largest at 512
            seen[meta["url"]] = meta
    assert set(seen) == {u for u, k in kinds.items() if k in ("good", "slow_ok")}
    # The per-shard parquet has every sample, failures with their error message.
    table = pa.concat_tables([pq.read_table(folder.open(n)) for n in folder.list(suffix=".parquet")])
    assert table.num_rows == len(kinds)
    failed = [r for r in table.to_pylist() if r["status"] != "success"]
    assert all(r["error_message"] for r in failed)


def test_report_prints_success_rate_and_reasons(served_run):
    from dcslurm.cli.report import app

    res = CliRunner().invoke(app, ["download", served_run["run"].url, "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    n = len(served_run["kinds"])
    assert report["samples"] == n and report["tasks_done"] == report["tasks"] == 2
    assert report["success_rate"] == pytest.approx(report["successes"] / n, abs=1e-4)
    assert report["failures"] == EXPECTED_REASONS
    assert report["bytes"] > 0 and report["samples_per_second"] > 0
    text = CliRunner().invoke(app, ["download", served_run["run"].url]).output
    assert "success rate" in text and "http 404" in text and "image too large" in text


def test_status_shows_the_download_section(served_run):
    from dcslurm.cli import app as cli_app

    res = CliRunner().invoke(cli_app, ["status", served_run["run"].url])
    assert res.exit_code == 0, res.output
    n = len(served_run["kinds"])
    good = sum(1 for k in served_run["kinds"].values() if k in ("good", "slow_ok"))
    assert f"samples tried {n:,}, succeeded {good:,}" in " ".join(res.output.split())
    assert "connection refused" in res.output


# -- resume -------------------------------------------------------------------------

def test_killed_task_resubmit_redoes_only_unfinished_shards(tmp_path):
    with ImageServer() as server:
        # Shards 0-1 are fast; shards 2-3 take seconds, so the kill lands in them.
        rows = [(server.url("good", i), f"good {i}") for i in range(20)]
        rows += [(server.url("slow", 100 + i, delay=1.0), f"slow {i}") for i in range(20)]
        write_pool(str(tmp_path / "pool"), [rows])
        cfg = write_config(tmp_path / "run.toml", str(tmp_path / "run"), str(tmp_path / "pool"),
                           params={"processes": 1, "threads": 2, "samples_per_shard": 10})
        out = tmp_path / "run" / "download"
        proc = subprocess.Popen([sys.executable, "-m", "dcslurm.cli", "submit", "-c", cfg],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 180
            while not (out / "00000001_stats.json").exists():
                assert proc.poll() is None and time.time() < deadline, "shard 1 never finished"
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        time.sleep(3)  # a worker that outlived the kill would finish shard 2 now
        assert not (out / "00000002_stats.json").exists()
        assert not (tmp_path / "run" / "_markers" / "download" / "000000.json").exists()
        kept = {n: (out / n).stat().st_mtime_ns for n in ("00000000.tar", "00000000_stats.json",
                                                          "00000001.tar", "00000001_stats.json")}
        hits_before = dict(server.hits)

        result = submit_run(load_config(cfg))
        assert not result.failed
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # finished shards untouched
    stats = read_marker(DataFolder(str(tmp_path / "run")), "download", 0)["stats"]
    assert stats["shards"] == 4 and stats["shards_resumed"] == 2 and stats["shards_downloaded"] == 2
    assert stats["successes"] == 40
    # The good images of shards 0-1 were not fetched again.
    assert all(server.hits[f"/good/{i}.jpg"] == hits_before[f"/good/{i}.jpg"] == 1 for i in range(20))


def test_rerun_of_a_committed_run_downloads_nothing(served_run):
    hits = sum(served_run["server"].hits.values())
    assert not submit_run(load_config(served_run["cfg"])).failed
    assert sum(served_run["server"].hits.values()) == hits


# -- the demo pool: local, S3, SLURM (slow: a few minutes on 2 busy cores) ----------------

DEMO = dict(samples=240, seed=3, files=4, heldout=0)
DEMO_PARAMS = {"processes": 1, "threads": 8, "samples_per_shard": 25}


@pytest.fixture(scope="module")
def demo_reference(tmp_path_factory):
    """The demo pool downloaded on the local executor to local disk, through its proxy server
    (up for the module's runs): what every other run must equal."""
    tmp = tmp_path_factory.mktemp("demo")
    pool = str(tmp / "pool")
    generate_demo_pool(pool, **DEMO)
    with DemoPoolServer(DataFolder(pool)) as server:
        params = {**DEMO_PARAMS, "http_proxy": server.proxy_url}
        # 2 files a task here, 1 on SLURM, 4 on S3: shard ids do not depend on the split.
        cfg = write_config(tmp / "run.toml", str(tmp / "run"), pool, params={**params, "units_per_task": 2})
        assert not submit_run(load_config(cfg)).failed
        run = DataFolder(str(tmp / "run"))
        yield {"pool": pool, "run": run, "contents": shard_contents(run), "tmp": tmp, "params": params}


@pytest.mark.slow
def test_demo_pool_downloads_locally_with_its_noise_counted(demo_reference):
    run = demo_reference["run"]
    manifest = json.load(open(os.path.join(demo_reference["pool"], "manifest.json")))
    from dcslurm.cli.report import download_report

    report = download_report(run).to_dict()
    assert report["tasks_done"] == 2 and report["samples"] == DEMO["samples"]
    # Broken URLs are 404s, HTML pages are undecodable: exactly the pool's noise counts.
    assert report["failures"] == {k: v for k, v in {"http 404": manifest["noise"]["broken_url"],
                                                    "undecodable image": manifest["noise"]["non_image"]}.items() if v}
    assert report["successes"] == DEMO["samples"] - manifest["noise"]["broken_url"] - manifest["noise"]["non_image"]
    assert len(demo_reference["contents"]) == 4 * -(-DEMO["samples"] // 4 // 25)


@pytest.mark.s3
@pytest.mark.slow
def test_demo_pool_on_s3_downloads_to_s3_identically(demo_reference, s3_server, s3_bucket, tmp_path):
    opts = s3_server.storage_options()
    generate_demo_pool(f"{s3_bucket}/pool", storage_options=opts, **DEMO)  # the pool itself on S3 too
    with DemoPoolServer(DataFolder(f"{s3_bucket}/pool", opts)) as server:  # served from S3
        cfg = write_config(tmp_path / "run.toml", f"{s3_bucket}/run", f"{s3_bucket}/pool",
                           params={**DEMO_PARAMS, "units_per_task": 4, "http_proxy": server.proxy_url},
                           extra={"storage": {"endpoint_url": s3_server.endpoint_url}}, log_dir=f"{tmp_path}/logs")
        assert not submit_run(load_config(cfg)).failed
    run = DataFolder(f"{s3_bucket}/run", load_config(cfg).storage_options)
    assert shard_contents(run) == demo_reference["contents"]
    assert not any(n.startswith("_tmp") for n in run.child("download").list())


@pytest.mark.slurm
@pytest.mark.slow
def test_demo_pool_on_slurm_four_tasks_identical(demo_reference, slurm_cluster, tmp_path):
    cfg = write_config(tmp_path / "run.toml", str(tmp_path / "run"), demo_reference["pool"],
                       params={**demo_reference["params"], **ONE_CPU},
                       executor="slurm", extra=TEN_MINUTES)
    result = submit_run(load_config(cfg))
    assert len(result.pending["download"]) == 4
    wait_run_done(cfg, timeout=300)
    run = DataFolder(str(tmp_path / "run"))
    assert shard_contents(run) == demo_reference["contents"]
    per_task = {read_marker(run, "download", i)["stats"]["shards"] for i in range(4)}
    assert per_task == {-(-DEMO["samples"] // 4 // 25)}


@pytest.mark.slurm
@pytest.mark.s3
@pytest.mark.slow
def test_demo_pool_on_slurm_to_s3_identical(demo_reference, slurm_cluster, s3_server, s3_bucket, tmp_path):
    cfg = write_config(tmp_path / "run.toml", f"{s3_bucket}/run", demo_reference["pool"],
                       params={**demo_reference["params"], **ONE_CPU},
                       executor="slurm",
                       extra={**TEN_MINUTES, "storage": {"endpoint_url": s3_server.endpoint_url}},
                       log_dir=f"{tmp_path}/logs")
    submit_run(load_config(cfg))
    wait_run_done(cfg, timeout=300)
    run = DataFolder(f"{s3_bucket}/run", load_config(cfg).storage_options)
    assert shard_contents(run) == demo_reference["contents"]


@pytest.mark.slow
def test_downloaded_shards_can_start_another_run_without_download(demo_reference, tmp_path):
    """Bring your own data: a run whose [pool] shards is a download folder skips download."""
    from dcslurm.core.runs import plan_run

    shards = demo_reference["run"].url_of("download")
    cfg = tmp_path / "byo.toml"
    write_toml(cfg, {"run": {"folder": str(tmp_path / "byo"), "stages": ["embed"]}, "pool": {"shards": shards}})
    step = plan_run(load_config(str(cfg))).step("embed")
    assert [u.rsplit("/", 1)[1] for u in step.units.names] == sorted(demo_reference["contents"])
    # With download in the run, embed reads what the download tasks committed instead.
    write_toml(cfg, {"run": {"folder": str(tmp_path / "byo2"), "stages": ["download", "embed"]},
                     "pool": {"metadata": demo_reference["pool"]}})
    assert plan_run(load_config(str(cfg))).step("embed").units.upstream == "download"


def test_first_shard_ids_number_files_one_after_another_like_img2dataset():
    from jobs.download.stage import first_shard_ids, shards_of

    # img2dataset's Reader: a file of R rows gives ceil(R / n) shards, files numbered in order.
    assert [shards_of(r, 10) for r in (0, 1, 10, 11, 25)] == [0, 1, 1, 2, 3]
    assert first_shard_ids([25, 10, 0, 11, 3], 10) == [0, 3, 4, 4, 6]


@pytest.mark.parametrize("message, reason", [
    ("HTTP Error 404: Not Found", "http 404"),
    ("<urlopen error [Errno 111] Connection refused>", "connection refused"),
    ("The read operation timed out", "timeout"),
    ("Image decoding error", "undecodable image"),
    ("OpenCV(4.14.0) loadsave.cpp:79: error: (-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS",
     "image too large"),
    ("<urlopen error [Errno -2] Name or service not known>", "dns failure"),
])
def test_failure_reasons(message, reason):
    from jobs.download.stats import failure_reason

    assert failure_reason(message) == reason


@pytest.mark.slurm
@pytest.mark.slow
def test_cancelled_slurm_task_resubmit_redoes_only_unfinished_shards(slurm_cluster, tmp_path):
    from dcslurm.core.runs import cancel_run

    with ImageServer() as server:
        rows = [(server.url("good", i), f"good {i}") for i in range(20)]
        rows += [(server.url("slow", 100 + i, delay=1.0), f"slow {i}") for i in range(20)]
        write_pool(str(tmp_path / "pool"), [rows])
        cfg = write_config(tmp_path / "run.toml", str(tmp_path / "run"), str(tmp_path / "pool"),
                           params={"processes": 1, "threads": 2, "samples_per_shard": 10, **ONE_CPU},
                           executor="slurm", extra=TEN_MINUTES)
        out = tmp_path / "run" / "download"
        submit_run(load_config(cfg))
        deadline = time.time() + 240
        while not (out / "00000001_stats.json").exists():
            assert time.time() < deadline, "shard 1 never finished"
            time.sleep(0.2)
        assert cancel_run(str(tmp_path / "run"))  # scancel: SIGTERM to the task and its workers
        slurm_cluster.wait_jobs_done(120)
        time.sleep(3)
        assert not (out / "00000002_stats.json").exists()
        kept = {n: (out / n).stat().st_mtime_ns for n in ("00000000.tar", "00000000_stats.json",
                                                          "00000001.tar", "00000001_stats.json")}
        submit_run(load_config(cfg))
        wait_run_done(cfg, timeout=300)
        assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept
        stats = read_marker(DataFolder(str(tmp_path / "run")), "download", 0)["stats"]
        assert stats["shards_resumed"] == 2 and stats["shards_downloaded"] == 2 and stats["successes"] == 40
        assert all(server.hits[f"/good/{i}.jpg"] == 1 for i in range(20))


# -- [stages.download] http_proxy -------------------------------------------------------

def test_http_proxy_fetches_through_the_given_proxy_and_a_new_port_resumes(tmp_path):
    """img2dataset fetches http:// URLs through `http_proxy` (here the demo pool's server, which
    answers for the pool's unresolvable host). The proxy is not part of the run's identity: a
    resubmit through another proxy (another port) is the same run and downloads nothing again."""
    pool = str(tmp_path / "pool")
    generate_demo_pool(pool, samples=24, seed=5, files=1, heldout=0)
    noise = json.load(open(os.path.join(pool, "manifest.json")))["noise"]
    params = {**FAST, "samples_per_shard": 100}
    with DemoPoolServer(DataFolder(pool)) as server:
        cfg = write_config(tmp_path / "run.toml", str(tmp_path / "run"), pool,
                           params={**params, "http_proxy": server.proxy_url})
        assert not submit_run(load_config(cfg)).failed
    stats = read_marker(DataFolder(str(tmp_path / "run")), "download", 0)["stats"]
    assert stats["successes"] == 24 - noise["broken_url"] - noise["non_image"]
    assert server.requests >= 24
    with DemoPoolServer(DataFolder(pool)) as again:
        assert again.proxy_url != server.proxy_url
        cfg = write_config(tmp_path / "run.toml", str(tmp_path / "run"), pool,
                           params={**params, "http_proxy": again.proxy_url})
        assert not submit_run(load_config(cfg)).failed
    assert again.requests == 0


@pytest.mark.parametrize("proxy", ["https://proxy:3128", "http://proxy", "socks5://proxy:1080", "http://proxy:99999",
                                   "http://proxy:3128/path", "proxy:3128"])
def test_a_bad_http_proxy_is_a_one_line_error(tmp_path, proxy):
    from dcslurm.core.errors import ConfigError

    cfg = write_config(tmp_path / "run.toml", str(tmp_path / "run"), str(tmp_path / "pool"),
                       params={**FAST, "http_proxy": proxy})
    with pytest.raises(ConfigError, match=r"http_proxy: expected http://host:port$") as exc:
        load_config(cfg)
    assert proxy not in str(exc.value)
