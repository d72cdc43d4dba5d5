"""Shared fixtures: one real Kafka broker per test session, and isolated settings per test.

Set KAFKA_BOOTSTRAP_SERVERS to run the suite against an existing cluster instead; every
test then works under its own topic prefix, so nothing it creates collides with anything.
"""

from __future__ import annotations

import gc
import os
import sys
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from stream.config import Settings
from stream.devtools.broker import LocalBroker, free_port
from stream.devtools.cluster import CONTROLLERS, LocalCluster, free_ports
from stream.errors import BrokerError
from tests.kit.cluster import BROKERS
from tests.kit.reaper import watch

_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Free what a failed test's traceback held: the sockets of the clients it left open
    are then reported with it (pytest's check ends its teardown), not by whichever later
    test's garbage collection happens to find them."""
    if item.stash.get(_FAILED, False):
        sys.last_type = sys.last_value = sys.last_traceback = None
        gc.collect()


# The modules of the tests marked `cluster`: under pytest-xdist (`./dev test`) they all run
# on one worker, whose session starts one cluster, not one per worker.
_CLUSTER_MODULES = frozenset(
    f"tests/{name}.py"
    for name in ("test_cluster", "test_cluster_lag", "test_cluster_ops", "test_offset_fetch")
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.nodeid.split("::")[0]
        if item.get_closest_marker("cluster") and module not in _CLUSTER_MODULES:
            raise pytest.UsageError(
                f"{item.nodeid} is marked cluster: add {module} to _CLUSTER_MODULES in "
                "tests/conftest.py (so its tests run on the one worker with the cluster)"
            )


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Each test is its own unit of work, but for the cluster's modules: one unit, one
    worker (xdist's own `--dist loadgroup` does not group under pytest 9.2: it sets a node
    id that pytest no longer reads)."""
    from xdist.scheduler import LoadScopeScheduling

    class ClusterTogether(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return "cluster" if nodeid.split("::")[0] in _CLUSTER_MODULES else nodeid

    return ClusterTogether(config, log)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    home = tmp_path_factory.mktemp("kafka")
    reaper = watch(home)  # SIGKILLs the broker if this session dies without its teardown
    broker = LocalBroker(home=home, port=free_port())
    try:
        broker.start()
        yield broker.bootstrap_servers
    finally:
        broker.stop()
        reaper.terminate()
        reaper.wait()


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three brokers and three controllers for the tests marked `cluster`, started only
    when one of them runs. Always our own: those tests kill its processes."""
    home = tmp_path_factory.mktemp("cluster")
    reaper = watch(home)  # SIGKILLs the nodes if this session dies without its teardown
    for attempt in range(3):  # a free port block can be taken between the probe and the start
        port = free_ports(BROKERS + CONTROLLERS)
        cluster = LocalCluster(home=home / str(attempt), port=port, brokers=BROKERS)
        try:
            cluster.start()
            break
        except BrokerError:
            if attempt == 2:
                raise
    try:
        yield cluster
    finally:
        cluster.kill()  # its data goes with the session: no need for a clean shutdown
        reaper.terminate()
        reaper.wait()


@pytest.fixture
def cluster(local_cluster: LocalCluster) -> Iterator[LocalCluster]:
    yield local_cluster
    local_cluster.start()  # whatever the test stopped comes back for the next one


@pytest.fixture
def cluster_env(local_cluster: LocalCluster, prefix: str) -> dict[str, str]:
    """The environment a `stream` process gets on the cluster, under this test's prefix."""
    return {**_clean_environ(), **_isolated(local_cluster.bootstrap_servers, prefix)}


@pytest.fixture
def prefix() -> str:
    """A topic and group prefix no other test uses."""
    return f"t{uuid.uuid4().hex[:10]}."


@pytest.fixture
def env(kafka_bootstrap: str, prefix: str, tmp_path: Path) -> dict[str, str]:
    """The environment a `stream` process under test gets: this test's broker and prefix,
    and a state folder of its own."""
    state = {"STREAM_STATE_DIR": str(tmp_path / "state")}
    return {**_clean_environ(), **_isolated(kafka_bootstrap, prefix), **state}


def _clean_environ() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("STREAM_", "SYNTHETIC_", "TOGETHER_"))
    }


def _isolated(bootstrap: str, prefix: str) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "STREAM_TOPIC_PREFIX": prefix,
        "STREAM_METRICS_PORT": "0",  # tests run workers side by side
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)
