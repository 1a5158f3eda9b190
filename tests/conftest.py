"""Fixtures shared by the whole test suite.

Servers (see ``tests/support/servers.py``), each started once per session on its own loopback
port, as local binaries, or as containers with ``KOPRS_TEST_CONTAINERS=1``
(``tests/support/containers.py``: the same classes and lifecycle, so the same test code):

- ``redis_server`` (:class:`RedisServer`): ``.url``, ``.port``, ``stop()``, ``start()``,
  ``restart()``, ``pause()``, ``resume()``, ``flushall()``.
- ``nats_server`` (:class:`NatsServer`): ``.url``, ``.port``, ``.monitor_url``, ``.store_dir``,
  the same lifecycle methods; JetStream data survives ``stop()``/``start()``.
- ``s3_server`` (:class:`S3Server`): ``.endpoint_url``, ``.access_key``, ``.secret_key``,
  ``.region``, ``client()``, ``create_bucket(name)``, ``reset()``, the same lifecycle methods.

A test that stops or pauses a session server must leave it running; the function-scoped
fixtures below also bring a stopped or paused server back, so one careless test cannot break
the tests after it:

- ``redis_url``: the server's URL after FLUSHALL, so every test starts with an empty Redis.
- ``nats_url``: the server's URL (streams are not removed: use names unique to the test).
- ``s3_bucket``: the name of a new, empty bucket unique to the test.

Tests that use any server fixture are marked ``servers`` automatically, so
``pytest -m "not servers"`` runs the rest.

Every asyncio test must end with no tasks of its own still running: a test (or a function-scoped
fixture) that leaves one behind fails at teardown, after its fixtures have been torn down.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import TYPE_CHECKING, Protocol, TypeVar

import pytest
import pytest_asyncio

from bridge.telemetry.logs import quiet_asyncio_tls_notice
from tests.support import containers
from tests.support.clusters import NatsCluster, RedisClusterSet, SentinelSet
from tests.support.servers import NatsServer, RedisServer, S3Server, ServerProcess

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

pytest_plugins = ("pytester",)

quiet_asyncio_tls_notice()  # as the logging set-up of the command line does

_SERVER_FIXTURES = frozenset(
    {"redis_server", "nats_server", "s3_server", "redis_url", "nats_url", "s3_bucket"}
    | {"nats_cluster", "redis_cluster", "redis_sentinel"}
    | {"nats_cluster_url", "redis_cluster_url", "redis_sentinel_url"}
)
_CLUSTER_FIXTURES = frozenset(
    {"nats_cluster", "redis_cluster", "redis_sentinel"}
    | {"nats_cluster_url", "redis_cluster_url", "redis_sentinel_url"}
)


class _Started(Protocol):
    """What a session fixture starts: a server, or a cluster of them."""

    @property
    def name(self) -> str: ...

    @property
    def startup_s(self) -> float | None: ...

    def start(self) -> None: ...

    def close(self) -> None: ...


_started: list[_Started] = []

ServerT = TypeVar("ServerT", bound=_Started)


# -- servers --


def _session_server(server: ServerT) -> Iterator[ServerT]:
    try:
        server.start()
        _started.append(server)
        yield server
    finally:
        server.close()


def _ensure_running(server: ServerProcess) -> None:
    server.resume()
    server.start()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    yield from _session_server(containers.redis_server())


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    yield from _session_server(containers.nats_server())


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    yield from _session_server(containers.s3_server())


# Clusters (tests/support/clusters.py): started once per session, only when a test asks for one.
# The *_url fixtures bring killed nodes back and wait until the topology is healthy again.


@pytest.fixture(scope="session")
def nats_cluster() -> Iterator[NatsCluster]:
    yield from _session_server(NatsCluster())


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterSet]:
    yield from _session_server(RedisClusterSet())


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[SentinelSet]:
    yield from _session_server(SentinelSet())


@pytest.fixture
def nats_cluster_url(nats_cluster: NatsCluster) -> str:
    nats_cluster.ensure_running()
    return nats_cluster.url


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterSet) -> str:
    redis_cluster.restore()
    redis_cluster.flushall()
    return redis_cluster.url


@pytest.fixture
def redis_sentinel_url(redis_sentinel: SentinelSet) -> str:
    redis_sentinel.restore()
    redis_sentinel.flushall()
    return redis_sentinel.url


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    _ensure_running(redis_server)
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    _ensure_running(nats_server)
    return nats_server.url


@pytest.fixture
def s3_bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    _ensure_running(s3_server)
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40]
    name = f"{stem}-{uuid.uuid4().hex[:12]}".strip("-")
    s3_server.create_bucket(name)
    return name


def pytest_configure(config: pytest.Config) -> None:
    # Warnings are errors, but not these, raised from __del__ when the garbage collector meets
    # a client library's socket after a failed or broken connection: nats-py leaks the socket
    # of a refused TLS or reconnection attempt (with containers, docker-proxy accepts while the
    # server container is stopped), redis-py's cluster and sentinel clients one of a node that
    # died. They surface in whatever test runs at the next collection, not where they arose.
    # Leaked asyncio tasks still fail the test that leaves them (see below).
    config.addinivalue_line(
        "filterwarnings",
        r"ignore:Exception ignored in. <(function (StreamWriter|_SelectorTransport|"
        r"AbstractConnection)\.__del__|socket\.socket):pytest.PytestUnraisableExceptionWarning",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)
        if _CLUSTER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.clusters)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    timings = [
        f"{server.name} {server.startup_s:.2f} s"
        for server in _started
        if server.startup_s is not None
    ]
    if timings:
        terminalreporter.write_line("test servers started in: " + ", ".join(timings))


# -- asyncio tasks left behind --


def _test_loop_scope(request: pytest.FixtureRequest) -> str:
    marker = request.node.get_closest_marker("asyncio")
    scope = None if marker is None else marker.kwargs.get("loop_scope", marker.kwargs.get("scope"))
    return str(scope or request.config.getini("asyncio_default_test_loop_scope") or "function")


@pytest.fixture(autouse=True)
def _no_leaked_asyncio_tasks(request: pytest.FixtureRequest) -> None:
    """Check asyncio tests for tasks left running; sync tests get no event loop from this.

    The check itself is an async fixture so that it runs inside the test's own event loop.
    Being requested first, it is torn down after every other function-scoped fixture, and
    pytest-asyncio tears it down before it closes that loop (which would cancel the tasks).
    Only tests in a function-scoped loop (the default) are checked: a wider loop is shared
    with other tests and fixtures, so its tasks say nothing about one test.
    """
    if pytest_asyncio.is_async_test(request.node) and _test_loop_scope(request) == "function":
        request.getfixturevalue("_asyncio_task_leak_check")


@pytest.fixture
async def _asyncio_task_leak_check() -> AsyncIterator[None]:
    before = asyncio.all_tasks()
    yield
    leaked = asyncio.all_tasks() - before - {asyncio.current_task()}
    if not leaked:
        return
    described = "\n".join(f"  {task!r}" for task in leaked)
    for task in leaked:
        task.cancel()
    await asyncio.gather(*leaked, return_exceptions=True)
    pytest.fail(
        f"the test left {len(leaked)} asyncio task(s) running (now cancelled):\n{described}",
        pytrace=False,
    )
