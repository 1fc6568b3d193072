"""A real SLURM cluster of emulated nodes on this host, for tests.

One munged, one slurmctld and one slurmd per node (``slurmd -N nK``), all
nodes ``NodeAddr=127.0.0.1`` on their own ports; optionally slurmdbd backed
by a private MariaDB so that ``sacct`` works. Every file (config, state,
spool, pid files, logs, sockets) lives in one fresh folder under
``/tmp/dcslurm-test`` and every port is reserved through ``ports.py``, so
several pytest sessions can each run their own cluster side by side.
Nothing in /etc changes except n1..n4 -> 127.0.0.1 in /etc/hosts, which
code that turns node names into addresses (MASTER_ADDR) needs.

Deliberate choices tests may rely on (see ``write_conf``):

* ``MaxArraySize=40``: arrays take at most 40 tasks, indexes 0..39, so code
  that splits large arrays is exercised with small inputs.
* ``JobRequeue=1``, ``KillWait=5``, ``cred_expire=5``, ``bf_interval=1``:
  requeued jobs restart within about 15 s.
* ``SlurmdTimeout=30``: a stopped slurmd is marked DOWN about 30 s later.
* ``MinJobAge=3600``: finished jobs stay known to ``scontrol show job``.
* ``ReturnToService=2``: a node whose slurmd comes back is usable again.
* No cgroups: ``--mem`` and CPU counts are scheduling hints only.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .ports import release_ports, reserve_ports
from .procs import (
    SETUP_HINT,
    kill_pid,
    logs_tail,
    make_instance_dir,
    pid_alive,
    read_pid,
    require_binary,
    wait_for,
)

_BIN_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
_HOSTS = Path("/etc/hosts")
# States in which a node is up and usable (sinfo %T, no '*' = responding).
_UP_STATES = {"idle", "mixed", "allocated", "completing"}


def ensure_hosts(names: list[str], path: Path = _HOSTS) -> None:
    """Make every emulated node name resolve (to 127.0.0.1) via /etc/hosts."""
    known: set[str] = set()
    for line in path.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        known.update(fields[1:])
    missing = [n for n in names if n not in known]
    if not missing:
        return
    try:
        # One O_APPEND write: atomic enough against a concurrent session.
        with path.open("a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}  # dcslurm test nodes\n")
    except PermissionError as e:
        raise RuntimeError(
            f"node names {missing} do not resolve and {path} is not writable ({e}); "
            "run the tests as root (scripts/test.sh)"
        ) from e


class SlurmError(RuntimeError):
    """A harness operation on the cluster failed; the message has log tails."""


class SlurmCluster:
    """Start/stop a private SLURM cluster; see the module docstring."""

    def __init__(
        self,
        n_nodes: int = 4,
        cpus: int = 2,
        real_memory: int = 2000,
        max_array_size: int = 40,
        accounting: bool = False,
        slurmd_timeout: int = 30,
        extra_conf: str = "",
    ) -> None:
        self.nodes: list[str] = [f"n{i}" for i in range(1, n_nodes + 1)]
        self.cpus = cpus
        self.real_memory = real_memory
        self.max_array_size = max_array_size
        self.accounting = accounting
        self.slurmd_timeout = slurmd_timeout
        self.extra_conf = extra_conf
        self.cluster_name = "dcs" + secrets.token_hex(4)
        self.tmpdir: Path = Path()
        self.conf: Path = Path()
        self.env: dict[str, str] = {}
        self.ctld_port = 0
        self.node_ports: dict[str, int] = {}
        self.dbd_port = 0
        self.db_port = 0
        self.started = False
        self._ports: list[int] = []
        self._mariadb: subprocess.Popen[bytes] | None = None
        self._bins: dict[str, str] = {}
        self._script_no = 0
        self.start_seconds = 0.0
        self._db_password = ""

    # ------------------------------------------------------------------ paths
    def _p(self, *parts: str) -> Path:
        return self.tmpdir.joinpath(*parts)

    @property
    def munge_socket(self) -> Path:
        return self._p("munge", "munge.socket")

    @property
    def log_dir(self) -> Path:
        return self._p("log")

    def _pidfile(self, daemon: str) -> Path:
        return self._p("run", f"{daemon}.pid")

    def _logs(self) -> list[Path]:
        logs = [self.log_dir / "munged.log", self.log_dir / "slurmctld.log"]
        logs += [self.log_dir / f"slurmd-{n}.log" for n in self.nodes]
        logs += sorted(self.log_dir.glob("*.out"))
        if self.accounting:
            logs += [self.log_dir / "slurmdbd.log", self.log_dir / "mariadb.err"]
        return logs

    def log_tail(self, lines: int = 30) -> str:
        """Tails of every daemon log, for error messages."""
        return logs_tail(self._logs(), lines)

    # ------------------------------------------------------------- commands
    def _bin(self, name: str) -> str:
        if name not in self._bins:
            self._bins[name] = require_binary(name, _BIN_DIRS)
        return self._bins[name]

    def run(
        self, *args: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command (sbatch, squeue, ...) against this cluster."""
        cmd = [self._bin(args[0]), *args[1:]]
        env = {**os.environ, **self.env}
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout, input=input
        )
        if check and proc.returncode != 0:
            raise SlurmError(
                f"{' '.join(cmd)} exited {proc.returncode}\nstdout: {proc.stdout}\n"
                f"stderr: {proc.stderr}\n{self.log_tail(15)}"
            )
        return proc

    def _daemon(self, log_name: str, *cmd: str) -> None:
        """Run a self-daemonizing command; its early output goes to log/<name>.out."""
        out = self.log_dir / f"{log_name}.out"
        with out.open("ab") as f:
            proc = subprocess.run(
                list(cmd),
                env={**os.environ, **self.env},
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                timeout=60,
            )
        if proc.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} exited {proc.returncode}")

    def _wait_pidfile(self, daemon: str, timeout: float = 30) -> int:
        pidfile = self._pidfile(daemon)

        def alive() -> int | None:
            pid = read_pid(pidfile)
            return pid if pid and pid_alive(pid) else None

        return wait_for(alive, timeout, f"{daemon} to write {pidfile}")

    # ---------------------------------------------------------------- config
    def write_conf(self) -> None:
        """slurm.conf (+ slurmdbd.conf): the INFRA.md recipe with our paths/ports."""
        d = self.tmpdir
        acct = (
            f"AccountingStorageType=accounting_storage/slurmdbd\n"
            f"AccountingStorageHost=localhost\n"
            f"AccountingStoragePort={self.dbd_port}\n"
            # With a non-default munge socket slurmctld needs it here too,
            # or it dies on connecting to slurmdbd.
            f"AccountingStoragePass={self.munge_socket}\n"
            f"JobAcctGatherType=jobacct_gather/linux\n"
            f"JobAcctGatherFrequency=30\n"
            if self.accounting
            else "AccountingStorageType=accounting_storage/none\n"
            "JobAcctGatherType=jobacct_gather/none\n"
        )
        nodes = "".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={self.node_ports[n]} "
            f"CPUs={self.cpus} RealMemory={self.real_memory} State=UNKNOWN\n"
            for n in self.nodes
        )
        debug = os.environ.get("DCSLURM_SLURM_DEBUG", "info")
        self.conf.write_text(
            f"""# Generated by tests/infra/slurm_cluster.py for one pytest session.
ClusterName={self.cluster_name}
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={self.ctld_port}
# Daemons bind 127.0.0.1 only.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug={debug}
SlurmdDebug={debug}
PlugStackConfig={d}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
# Lets emulated nodes claim more CPUs than the host has.
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout={self.slurmd_timeout}
MinJobAge=3600
KillWait=5
JobRequeue=1
# Small on purpose: tests exercise splitting big arrays.
MaxArraySize={self.max_array_size}
MailProg=/bin/true
JobCompType=jobcomp/none
{acct}{self.extra_conf}
{nodes}PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        )
        self._p("plugstack.conf").write_text("")
        if self.accounting:
            dbd = self._p("slurmdbd.conf")
            dbd.write_text(
                f"""AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={self.dbd_port}
SlurmUser=root
LogFile={d}/log/slurmdbd.log
PidFile={d}/run/slurmdbd.pid
DebugLevel={debug}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.db_port}
StorageUser=slurm
StoragePass={self._db_password}
StorageLoc=slurm_acct_db
"""
            )
            dbd.chmod(0o600)  # slurmdbd refuses a readable file (it holds a password)

    # ----------------------------------------------------------------- start
    def start(self, timeout: float = 120) -> SlurmCluster:
        """Bring every daemon up and wait until all nodes are idle."""
        needed = ["munged", "slurmctld", "slurmd", "sinfo", "squeue", "scontrol", "sbatch", "scancel"]
        if self.accounting:
            needed += ["slurmdbd", "sacctmgr", "sacct", "mariadb-install-db", "mariadbd", "mariadb"]
        for b in needed:
            self._bin(b)  # fail fast, with SETUP_HINT, before creating anything
        t0 = time.monotonic()
        self.tmpdir = make_instance_dir("slurmacct-" if self.accounting else "slurm-")
        for sub in ("munge", "state", "spool", "run", "log", "scripts"):
            self._p(sub).mkdir(mode=0o755)
        self.conf = self._p("slurm.conf")
        self.env = {"SLURM_CONF": str(self.conf)}
        n_ports = 1 + len(self.nodes) + (2 if self.accounting else 0)
        self._ports = reserve_ports(n_ports)
        self.ctld_port = self._ports[0]
        self.node_ports = dict(zip(self.nodes, self._ports[1 : 1 + len(self.nodes)]))
        if self.accounting:
            self.dbd_port, self.db_port = self._ports[-2:]
            self._db_password = secrets.token_hex(12)
        try:
            ensure_hosts(self.nodes)
            self.write_conf()
            self._start_munge()
            if self.accounting:
                self._start_mariadb(timeout)
                self._start_slurmdbd(timeout)
            self._daemon("slurmctld", self._bin("slurmctld"), "-f", str(self.conf))
            self._wait_pidfile("slurmctld")
            wait_for(self._ctld_up, timeout, "slurmctld to answer scontrol ping")
            for n in self.nodes:
                self._start_slurmd(n)
            self.started = True
            self.wait_idle(max(10.0, timeout - (time.monotonic() - t0)))
        except BaseException as e:
            logs = self.log_tail()
            self.stop(keep_tmpdir=True)
            raise SlurmError(
                f"SLURM test cluster failed to start: {e}\n(state in {self.tmpdir})\n{logs}"
            ) from e
        self.start_seconds = time.monotonic() - t0
        return self

    def _start_munge(self) -> None:
        key = self._p("munge", "munge.key")
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._daemon(
            "munged",
            self._bin("munged"),
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--log-file={self.log_dir / 'munged.log'}",
            f"--pid-file={self._pidfile('munged')}",
            f"--seed-file={self._p('munge', 'munged.seed')}",
        )
        self._wait_pidfile("munged")
        wait_for(self.munge_socket.exists, 30, f"munge socket {self.munge_socket}")

    def _ctld_up(self) -> bool:
        try:
            proc = self.run("scontrol", "ping", check=False, timeout=15)
        except subprocess.TimeoutExpired:
            return False
        return "is UP" in proc.stdout

    def _start_slurmd(self, node: str) -> None:
        self._p("spool", node).mkdir(mode=0o755, exist_ok=True)
        self._daemon(f"slurmd-{node}", self._bin("slurmd"), "-f", str(self.conf), "-N", node)
        self._wait_pidfile(f"slurmd-{node}")

    # ---------------------------------------------------- accounting (MariaDB)
    def _mysql(self, sql: str) -> None:
        sock = self._p("db", "mysqld.sock")
        proc = subprocess.run(
            [self._bin("mariadb"), "--no-defaults", f"--socket={sock}", "-u", "root", "-e", sql],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise SlurmError(f"mariadb: {proc.stderr}")

    def _start_mariadb(self, timeout: float) -> None:
        datadir = self._p("db", "data")
        datadir.mkdir(parents=True)
        with (self.log_dir / "mariadb-install.out").open("wb") as f:
            proc = subprocess.run(
                [
                    self._bin("mariadb-install-db"),
                    "--no-defaults",
                    f"--datadir={datadir}",
                    "--user=root",
                    "--auth-root-authentication-method=socket",
                    "--skip-test-db",
                    "--skip-name-resolve",
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=120,
            )
        if proc.returncode != 0:
            raise SlurmError(f"mariadb-install-db exited {proc.returncode}")
        sock = self._p("db", "mysqld.sock")
        # mariadbd has no daemon mode: it stays our child; stopped via its pid file.
        self._mariadb = subprocess.Popen(
            [
                self._bin("mariadbd"),
                "--no-defaults",
                f"--datadir={datadir}",
                "--user=root",
                "--bind-address=127.0.0.1",
                f"--port={self.db_port}",
                f"--socket={sock}",
                f"--pid-file={self._pidfile('mariadb')}",
                f"--log-error={self.log_dir / 'mariadb.err'}",
                "--skip-name-resolve",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=64M",
                "--innodb-lock-wait-timeout=900",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

        def ready() -> bool:
            if self._mariadb is not None and self._mariadb.poll() is not None:
                raise SlurmError(f"mariadbd exited {self._mariadb.returncode}")
            return sock.exists() and self._pidfile("mariadb").exists()

        wait_for(ready, timeout, "mariadbd to accept connections")
        pw = self._db_password
        self._mysql(
            "CREATE DATABASE slurm_acct_db;"
            f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{pw}';"
            f"CREATE USER 'slurm'@'localhost' IDENTIFIED BY '{pw}';"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
        )

    def _start_slurmdbd(self, timeout: float) -> None:
        # slurmdbd finds slurmdbd.conf beside $SLURM_CONF.
        self._daemon("slurmdbd", self._bin("slurmdbd"))
        self._wait_pidfile("slurmdbd")

        def answers() -> bool:
            return self.run("sacctmgr", "-n", "-P", "list", "cluster", check=False).returncode == 0

        wait_for(answers, timeout, "slurmdbd to answer sacctmgr")
        self.run("sacctmgr", "-i", "add", "cluster", self.cluster_name)

    # ------------------------------------------------------------------ stop
    def stop(self, keep_tmpdir: bool | None = None) -> None:
        """Cancel leftover jobs, then stop every daemon by its pid file."""
        if self.tmpdir == Path():
            return
        if self.started:
            try:
                if self._ctld_up():
                    self.cancel_all(timeout=30)
            except Exception:  # noqa: BLE001 - best effort; daemons go regardless
                pass
        self.started = False
        # Read every pid first: the daemons delete their pid files as they exit.
        order = [f"slurmd-{n}" for n in self.nodes] + ["slurmctld", "slurmdbd", "mariadb", "munged"]
        pids = {d: read_pid(self._pidfile(d)) for d in order}
        for daemon in order:
            pid = pids[daemon]
            if pid and pid_alive(pid):
                kill_pid(pid, timeout=30)
        if self._mariadb is not None:
            if self._mariadb.poll() is None:  # never wrote its pid file
                self._mariadb.kill()
            self._mariadb.wait(timeout=30)
            self._mariadb = None
        release_ports(self._ports)
        self._ports = []
        if keep_tmpdir is None:
            keep_tmpdir = os.environ.get("DCSLURM_KEEP_TMP") == "1"
        if not keep_tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    # ----------------------------------------------------------------- nodes
    def node_states(self) -> dict[str, str]:
        """Node -> sinfo state (%T); a trailing '*' means not responding."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T").stdout
        states: dict[str, str] = {}
        for line in out.splitlines():
            name, _, state = line.strip().partition(" ")
            if name:
                states[name] = state.strip()
        return states

    def wait_idle(self, timeout: float = 60) -> None:
        """Wait until every node is idle (and responding)."""
        wait_for(
            lambda: all(s == "idle" for s in self.node_states().values()),
            timeout,
            "all nodes idle",
            on_timeout=lambda: f"sinfo: {self._safe_states()}\n{self.log_tail()}",
        )

    def wait_node_state(self, node: str, states: set[str] | str, timeout: float = 90) -> str:
        """Wait until ``node``'s sinfo state is one of ``states``; returns it."""
        wanted = {states} if isinstance(states, str) else set(states)

        def check() -> str | None:
            s = self.node_states().get(node, "")
            return s if s in wanted else None

        return wait_for(
            check,
            timeout,
            f"node {node} in {sorted(wanted)}",
            on_timeout=lambda: f"sinfo: {self._safe_states()}",
        )

    def _safe_states(self) -> str:
        try:
            return str(self.node_states())
        except Exception as e:  # noqa: BLE001 - only used inside error messages
            return f"(sinfo failed: {e})"

    def slurmd_pid(self, node: str) -> int | None:
        pid = read_pid(self._pidfile(f"slurmd-{node}"))
        return pid if pid and pid_alive(pid) else None

    def stop_node(self, node: str, sig: int = signal.SIGTERM) -> None:
        """Stop ``node``'s slurmd (SIGKILL: a crash). Its running jobs go on.

        slurmctld notices only through pings: the node turns "idle*"/"down*"
        after up to SlurmdTimeout (30 s); ``wait_node_state`` waits for that.
        """
        pid = self.slurmd_pid(node)
        if pid is None:
            raise SlurmError(f"slurmd of {node} is not running")
        kill_pid(pid, sig=sig, timeout=30)

    def start_node(self, node: str, timeout: float = 60) -> None:
        """(Re)start ``node``'s slurmd and wait until the node is usable again."""
        if self.slurmd_pid(node) is None:
            self._start_slurmd(node)
        self.wait_node_state(node, _UP_STATES, timeout)

    def set_node_state(self, node: str, state: str, reason: str = "test") -> None:
        """``scontrol update`` a node (e.g. DOWN, DRAIN, RESUME)."""
        args = ["scontrol", "update", f"NodeName={node}", f"State={state}"]
        if state.upper() in ("DOWN", "DRAIN", "FAIL"):
            args.append(f"Reason={reason}")
        self.run(*args)

    # ------------------------------------------------------------------ jobs
    def sbatch(self, script: str | Path, *args: str) -> str:
        """Submit a batch script (text or path); returns the job id."""
        if isinstance(script, str) and (script.startswith("#!") or "\n" in script):
            self._script_no += 1
            path = self._p("scripts", f"job{self._script_no}.sh")
            path.write_text(script)
            script = path
        out = self.run("sbatch", "--parsable", *args, str(script)).stdout
        return out.strip().split(";")[0]

    def jobs(self) -> list[tuple[str, str]]:
        """(job id, state) of every job squeue still lists; array tasks one by one."""
        out = self.run("squeue", "-h", "-r", "-o", "%i %T").stdout
        return [tuple(line.split()[:2]) for line in out.splitlines() if line.strip()]  # type: ignore[misc]

    def job_state(self, job_id: str) -> str | None:
        """Current state via scontrol (finished jobs too: MinJobAge keeps them)."""
        proc = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        for field in proc.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return None

    def wait_jobs_done(self, timeout: float = 120) -> None:
        """Poll squeue until no job of this cluster is left."""
        wait_for(
            lambda: not self.jobs(),
            timeout,
            "all jobs to finish",
            interval=0.5,
            on_timeout=lambda: f"squeue: {self.jobs()}\n{self.log_tail()}",
        )

    def cancel_all(self, timeout: float = 60) -> None:
        """scancel every job (all are ours: the cluster is private) and wait."""
        if not self.jobs():
            return
        user = pwd.getpwuid(os.getuid()).pw_name
        self.run("scancel", f"--user={user}", check=False)
        self.wait_jobs_done(timeout)

    def __repr__(self) -> str:
        return f"SlurmCluster({self.cluster_name}, nodes={self.nodes}, conf={self.conf})"

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["SETUP_HINT", "SlurmCluster", "SlurmError", "ensure_hosts"]
