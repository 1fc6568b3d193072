"""The harness itself: real SLURM and S3 daemons behave as the suite expects."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.infra.ports import port_is_free, release_ports, reserve_ports
from tests.infra.procs import require_binary
from tests.infra.s3_server import S3Server
from tests.infra.slurm_cluster import SlurmCluster, SlurmError

# ----------------------------------------------------------------- helpers


def test_reserved_ports_are_free_distinct_and_locked() -> None:
    bases = reserve_ports(3, offsets=(0, 10000))
    try:
        every = [b + off for b in bases for off in (0, 10000)]
        assert len(set(every)) == 6
        assert all(port_is_free(p) for p in every)
        assert max(every) < 32768  # below the ephemeral range
        # Reserved ports are never handed out twice in this process.
        again = reserve_ports(20)
        assert not set(again) & set(every)
        release_ports(again)
    finally:
        release_ports(b + off for b in bases for off in (0, 10000))


def test_missing_binary_is_an_error_naming_the_setup_script() -> None:
    with pytest.raises(RuntimeError, match="scripts/test.sh"):
        require_binary("dcslurm-no-such-daemon")


# ------------------------------------------------------------------- SLURM


def _wait_file(path: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.2)
    raise AssertionError(f"{path} never appeared")


@pytest.mark.slurm
def test_cluster_has_four_idle_nodes(slurm_cluster: SlurmCluster) -> None:
    assert slurm_cluster.nodes == ["n1", "n2", "n3", "n4"]
    assert slurm_cluster.node_states() == {n: "idle" for n in slurm_cluster.nodes}
    assert os.environ["SLURM_CONF"] == str(slurm_cluster.conf) == slurm_cluster.env["SLURM_CONF"]
    assert slurm_cluster.conf.is_file()
    assert slurm_cluster.max_array_size == 40
    assert f"MaxArraySize={slurm_cluster.max_array_size}" in slurm_cluster.conf.read_text()
    for n in slurm_cluster.nodes:  # node names resolve (MASTER_ADDR=n1 works)
        assert socket.gethostbyname(n) == "127.0.0.1"
    info = slurm_cluster.run("scontrol", "show", "node", "n1").stdout
    assert "CPUTot=2" in info and "RealMemory=2000" in info


@pytest.mark.slurm
def test_array_job_spreads_over_nodes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = f"""#!/bin/bash
echo "$SLURMD_NODENAME $SLURM_ARRAY_JOB_ID" > {tmp_path}/task-$SLURM_ARRAY_TASK_ID.txt
sleep 3
"""
    job = slurm_cluster.sbatch(script, "--array=0-7", "-c", "1", "-o", "/dev/null")
    slurm_cluster.wait_jobs_done(120)
    outputs = [(tmp_path / f"task-{i}.txt").read_text().split() for i in range(8)]
    assert {o[1] for o in outputs} == {job}
    nodes = {o[0] for o in outputs}
    assert len(nodes) >= 2, nodes  # 8 one-CPU tasks cannot fit on one 2-CPU node at once
    assert nodes <= set(slurm_cluster.nodes)
    assert slurm_cluster.job_state(f"{job}_7") == "COMPLETED"


@pytest.mark.slurm
def test_array_larger_than_max_array_size_is_refused(slurm_cluster: SlurmCluster) -> None:
    n = slurm_cluster.max_array_size
    with pytest.raises(SlurmError, match="(?i)array"):
        slurm_cluster.sbatch("#!/bin/bash\ntrue\n", f"--array=0-{n}", "-o", "/dev/null")
    job = slurm_cluster.sbatch("#!/bin/bash\ntrue\n", f"--array=0-{n - 1}", "-o", "/dev/null")
    slurm_cluster.wait_jobs_done(120)
    assert slurm_cluster.job_state(f"{job}_{n - 1}") == "COMPLETED"


@pytest.mark.slurm
def test_multi_node_job_gets_distinct_ranks(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = f"""#!/bin/bash
srun bash -c 'echo "$SLURM_PROCID $SLURM_NODEID $SLURMD_NODENAME" > {tmp_path}/rank-$SLURM_PROCID.txt'
"""
    slurm_cluster.sbatch(script, "-N", "2", "--ntasks-per-node=1", "-o", str(tmp_path / "out.txt"))
    slurm_cluster.wait_jobs_done(120)
    ranks = sorted((tmp_path / f"rank-{i}.txt").read_text().split() for i in range(2))
    assert [r[0] for r in ranks] == ["0", "1"]
    assert {r[1] for r in ranks} == {"0", "1"}
    assert len({r[2] for r in ranks}) == 2


@pytest.mark.slurm
def test_scancel_stops_a_running_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    started = tmp_path / "started"
    job = slurm_cluster.sbatch(f"#!/bin/bash\necho $$ > {started}\nsleep 300\n", "-o", "/dev/null")
    pid = int(_wait_file(started))
    assert (job, "RUNNING") in slurm_cluster.jobs()
    slurm_cluster.run("scancel", job)
    slurm_cluster.wait_jobs_done(60)
    assert slurm_cluster.job_state(job) == "CANCELLED"
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists(), "the job's processes survived scancel"


@pytest.mark.slurm
def test_cancel_all_empties_the_queue(slurm_cluster: SlurmCluster) -> None:
    slurm_cluster.sbatch("#!/bin/bash\nsleep 300\n", "--array=0-5", "-o", "/dev/null")
    slurm_cluster.sbatch("#!/bin/bash\nsleep 300\n", "-N", "4", "-o", "/dev/null")  # pending
    assert len(slurm_cluster.jobs()) == 7
    slurm_cluster.cancel_all(timeout=60)
    assert slurm_cluster.jobs() == []
    slurm_cluster.wait_idle(60)


@pytest.mark.slurm
def test_stop_and_restart_one_slurmd(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    old_pid = slurm_cluster.slurmd_pid("n4")
    slurm_cluster.stop_node("n4", sig=signal.SIGKILL)
    assert slurm_cluster.slurmd_pid("n4") is None
    # slurmctld finds out by pinging: not responding first, DOWN after SlurmdTimeout.
    state = slurm_cluster.wait_node_state("n4", {"idle*", "down*"}, timeout=60)
    assert state.endswith("*")
    # The other nodes still run work meanwhile.
    slurm_cluster.sbatch("#!/bin/bash\ntrue\n", "-w", "n3", "-o", "/dev/null")
    slurm_cluster.wait_jobs_done(60)
    slurm_cluster.start_node("n4", timeout=60)
    assert slurm_cluster.slurmd_pid("n4") not in (None, old_pid)
    out = tmp_path / "n4.txt"
    slurm_cluster.sbatch("#!/bin/bash\necho $SLURMD_NODENAME\n", "-w", "n4", "-o", str(out))
    slurm_cluster.wait_jobs_done(60)
    assert _wait_file(out).strip() == "n4"
    slurm_cluster.wait_idle(60)


@pytest.mark.slurm
def test_accounting_cluster_runs_sacct(slurm_cluster_acct: SlurmCluster) -> None:
    c = slurm_cluster_acct
    assert os.environ["SLURM_CONF"] == str(c.conf)  # this test asked for the acct cluster
    job = c.sbatch("#!/bin/bash\nexit 3\n", "-o", "/dev/null")
    c.wait_jobs_done(60)
    deadline = time.monotonic() + 60
    while True:
        out = c.run("sacct", "-n", "-P", "-X", "-j", job, "-o", "JobID,State,ExitCode").stdout
        if "FAILED" in out or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert out.strip() == f"{job}|FAILED|3:0"


# ---------------------------------------------------------------------- S3


@pytest.mark.s3
def test_s3_put_get_with_environment_credentials(s3_server: S3Server, s3_bucket: str) -> None:
    import fsspec
    import s3fs

    assert s3_bucket.startswith("s3://t-")
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    assert os.environ["AWS_ACCESS_KEY_ID"] == s3_server.access_key
    # How the code under test connects: credentials only from the environment.
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server.storage_options())
    fs.pipe(f"{s3_bucket}/a/b.txt", b"hello")
    assert fs.cat(f"{s3_bucket}/a/b.txt") == b"hello"
    assert s3_server.fs().cat(f"{s3_bucket}/a/b.txt") == b"hello"
    # fsspec.open with nothing but FSSPEC_S3_* configuration.
    with fsspec.open(f"{s3_bucket}/c.bin", "wb", skip_instance_cache=True) as f:
        f.write(os.urandom(6 * 2**20))  # > 5 MiB: a multipart upload
    assert s3_server.fs().size(f"{s3_bucket}/c.bin") == 6 * 2**20


@pytest.mark.s3
def test_s3_refuses_wrong_or_missing_credentials(s3_server: S3Server, s3_bucket: str) -> None:
    s3_server.fs().pipe(f"{s3_bucket}/secret.txt", b"x")
    fast = {"config_kwargs": {"retries": {"max_attempts": 1}}}
    wrong = s3_server.fs(key=s3_server.access_key, secret="not-the-secret", **fast)
    with pytest.raises(PermissionError):
        wrong.cat(f"{s3_bucket}/secret.txt")
    unknown = s3_server.fs(key="AKNOBODY", secret="nothing", **fast)
    with pytest.raises(PermissionError):
        unknown.pipe(f"{s3_bucket}/evil.txt", b"y")
    anon = s3_server.fs(key=None, secret=None, anon=True, **fast)
    with pytest.raises(PermissionError):
        anon.cat(f"{s3_bucket}/secret.txt")
    assert s3_server.fs().ls(s3_bucket) == [f"{s3_bucket[5:]}/secret.txt"]


@pytest.mark.s3
def test_s3_restart_keeps_data() -> None:
    # A private server: restarting the session one would disturb other tests.
    with S3Server() as server:
        url = server.make_bucket("keep")
        payload = os.urandom(300_000)
        server.fs().pipe(f"{url}/obj", payload)
        port = server.ports["s3"]

        server.stop()
        assert not server.running()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        server.start()
        assert server.ports["s3"] == port
        assert server.fs().cat(f"{url}/obj") == payload

        server.kill()  # a crash: SIGKILL
        server.start()
        assert server.fs().cat(f"{url}/obj") == payload
        server.fs().pipe(f"{url}/after", b"ok")  # writable again
        assert server.fs().cat(f"{url}/after") == b"ok"
    assert not server.tmpdir.exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_signal_then_requeue_restarts_the_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """--signal reaches the batch shell before the time limit; scontrol requeue reruns it."""
    log = tmp_path / "log.txt"
    script = f"""#!/bin/bash
n=${{SLURM_RESTART_COUNT:-0}}
echo "start $n" >> {log}
if [ "$n" -ge 1 ]; then echo done >> {log}; exit 0; fi
trap 'echo usr1 >> {log}; scontrol requeue $SLURM_JOB_ID; exit 0' USR1
sleep 300 &
wait
"""
    t0 = time.monotonic()
    job = slurm_cluster.sbatch(script, "--time=2", "--signal=B:USR1@100", "--requeue", "-o", "/dev/null")
    deadline = time.monotonic() + 240
    while "done" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.5)
    slurm_cluster.wait_jobs_done(60)
    assert log.read_text().split("\n")[:4] == ["start 0", "usr1", "start 1", "done"], log.read_text()
    assert slurm_cluster.job_state(job) == "COMPLETED"
    print(f"signal + requeue + rerun took {time.monotonic() - t0:.0f} s")
