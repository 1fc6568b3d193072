"""Session fixtures for real daemons (tests/infra) and the slow/apptainer policy.

Fixtures (all real processes on 127.0.0.1, private to this pytest session):

* ``slurm_cluster`` (session): SLURM with nodes n1..n4 (2 CPUs, 2000 MB
  each), ``MaxArraySize=40``, no accounting. Sets ``os.environ["SLURM_CONF"]``.
* ``slurm_cluster_acct`` (session): a second, separate cluster with
  slurmdbd + MariaDB, so ``sacct`` works. Tests that request it see its
  ``SLURM_CONF`` in ``os.environ`` while they run.
* ``s3_server`` (session): SeaweedFS S3; sets AWS_*/FSSPEC_S3_* env vars.
* ``s3_bucket`` (function): a fresh, uniquely named bucket, ``"s3://name"``.

Code that runs outside a test (a module-scoped fixture, a thread) while both
clusters exist should pass ``cluster.env`` explicitly rather than rely on
``os.environ["SLURM_CONF"]``.

Tests marked ``slow`` or ``apptainer`` are skipped by default. They run when
``DCSLURM_TEST_ALL=1``, with ``--run-all``, with ``--runslow`` (slow) /
``--run-apptainer`` (apptainer), or when ``-m`` names the marker
(``-m slow``, ``-m "slow or apptainer"``); the ``-m`` expression then decides.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator

import pytest

from tests.infra.s3_server import S3Server
from tests.infra.slurm_cluster import SlurmCluster

_GATED = {"slow": "--runslow", "apptainer": "--run-apptainer", "soak": "--run-soak"}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dcslurm")
    group.addoption("--runslow", action="store_true", help="also run tests marked slow")
    group.addoption("--run-apptainer", action="store_true", help="also run tests marked apptainer")
    group.addoption("--run-soak", action="store_true", help="also run tests marked soak (20-35 minutes)")
    group.addoption(
        "--run-all", action="store_true", help="run slow and apptainer tests too (= DCSLURM_TEST_ALL=1)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("DCSLURM_TEST_ALL") == "1" or config.getoption("--run-all"):
        return
    markexpr = config.getoption("markexpr") or ""
    for marker, option in _GATED.items():
        if config.getoption(option) or re.search(rf"\b{marker}\b", markexpr):
            continue
        skip = pytest.mark.skip(
            reason=f"{marker}: run with {option}, -m {marker} or DCSLURM_TEST_ALL=1"
        )
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


class _EnvPatch:
    """Set environment variables now, restore the previous values later."""

    def __init__(self, values: dict[str, str]) -> None:
        self._saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)

    def restore(self) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _cluster(accounting: bool) -> Iterator[SlurmCluster]:
    cluster = SlurmCluster(accounting=accounting).start()
    patch = _EnvPatch(cluster.env)
    try:
        yield cluster
    finally:
        patch.restore()
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The session's SLURM cluster (no accounting); see tests/infra/slurm_cluster.py."""
    yield from _cluster(accounting=False)


@pytest.fixture(scope="session")
def slurm_cluster_acct() -> Iterator[SlurmCluster]:
    """A separate SLURM cluster with slurmdbd + MariaDB accounting (sacct works)."""
    yield from _cluster(accounting=True)


@pytest.fixture(autouse=True)
def _slurm_conf_for_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Point SLURM_CONF at the cluster this test asked for (both may be running)."""
    name = next((n for n in ("slurm_cluster_acct", "slurm_cluster") if n in request.fixturenames), None)
    if name is None:
        yield
        return
    cluster: SlurmCluster = request.getfixturevalue(name)
    patch = _EnvPatch(cluster.env)
    try:
        yield
    finally:
        patch.restore()
        # A test that stopped a node and failed before restarting it must not
        # leave the next tests one node short.
        for node in cluster.nodes:
            if cluster.started and cluster.slurmd_pid(node) is None:
                cluster.start_node(node)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The session's S3 server; AWS_*/FSSPEC_S3_* point at it while the session runs."""
    server = S3Server().start()
    patch = _EnvPatch(server.env)
    # fsspec reads FSSPEC_* variables once, at import (collection imported it
    # already): refresh its config so in-process fsspec.open("s3://...") sees them.
    import fsspec.config

    saved_s3_conf = dict(fsspec.config.conf["s3"]) if "s3" in fsspec.config.conf else None
    fsspec.config.set_conf_env(fsspec.config.conf)
    try:
        yield server
    finally:
        patch.restore()
        if saved_s3_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_s3_conf
        server.close()


@pytest.fixture
def s3_bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh bucket named after the test; returns ``"s3://<name>"``."""
    if not s3_server.running():  # a test stopped or killed it and did not restart it
        s3_server.start()
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    return s3_server.make_bucket(f"t-{stem or 'x'}-{secrets.token_hex(4)}")
