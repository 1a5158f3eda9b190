"""The ``Sink`` contract, run against every sink: memory, NATS and Redis (both content modes).

What a consumer reads back is read with the raw client libraries (nats-py JetStream pull
consumers, redis-py ``XRANGE``/``HGETALL``), decoded by the rules of each content mode, and
validated against the JSON Schemas in ``schemas/``. Backend-specific behaviour is tested in
``test_sinks_memory.py``, ``test_sinks_nats.py`` and ``test_sinks_redis.py``, which share the
helpers of ``tests/support/events.py``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import nats
import nats.js.api
import pytest

from bridge.connections import redis_client
from bridge.errors import PublishError
from bridge.events import Modified, Removed
from bridge.sinks import Sink
from bridge.sinks.memory import MemorySink
from bridge.sinks.nats import NatsSink
from bridge.sinks.redis import RedisSink, RedisSinkConfig, items_key
from bridge.subjects import decode_item_token, redis_stream_key
from tests.support.clusters import NatsCluster, RedisClusterSet, SentinelSet
from tests.support.events import (
    SPECIAL_KEYS,
    content_mode,
    decode_nats,
    decode_redis,
    expected,
    fetch_all,
    http_event,
    nats_test_config,
    object_events,
    validate,
    xrange,
)
from tests.support.servers import NatsServer, RedisServer, ServerProcess

# -- backends --


@dataclass
class Backend:
    """A connected sink plus what a test needs to look at what it published."""

    name: str
    sink: Sink
    read: Callable[[str], Awaitable[list[dict[str, Any]]]]
    """Every event published for a source, in order, decoded and validated."""
    current: Callable[[str], Awaitable[dict[str, dict[str, Any]]]]
    """The latest event of every item still present, by item key."""
    outage: Callable[[], None]
    """Make the broker unavailable (the next publish must fail)."""
    recover: Callable[[], None]
    closers: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)


async def memory_backend() -> Backend:
    sink = MemorySink()

    async def read(source: str) -> list[dict[str, Any]]:
        return [_validated(event) for event in expected(sink.events(source))]

    async def current(source: str) -> dict[str, dict[str, Any]]:
        return {
            key: _validated(json.loads(ev.to_structured()))
            for key, ev in sink.items(source).items()
        }

    return Backend("memory", sink, read, current, lambda: sink.fail_next(1), lambda: None)


def _validated(event: dict[str, Any]) -> dict[str, Any]:
    validate(event)
    return event


async def nats_backend(
    server: NatsServer | NatsCluster, mode: str, *, replicas: int = 1, name: str = "nats"
) -> Backend:
    config = nats_test_config(server.url, content_mode=content_mode(mode), replicas=replicas)
    sink = NatsSink(config)
    await sink.connect()
    nc = await nats.connect(
        server.url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.05
    )
    js = nc.jetstream()

    async def read(source: str) -> list[dict[str, Any]]:
        subject_filter = f"{config.subject_prefix}.{source}.>"
        info = await js.stream_info(config.stream, subjects_filter=subject_filter)
        count = sum((info.state.subjects or {}).values())
        return [decode_nats(m) for m in await fetch_all(js, config.stream, subject_filter, count)]

    async def current(source: str) -> dict[str, dict[str, Any]]:
        subject_filter = f"{config.subject_prefix}.{source}.>"
        info = await js.stream_info(config.stream, subjects_filter=subject_filter)
        subjects = info.state.subjects or {}
        msgs = await fetch_all(
            js,
            config.stream,
            subject_filter,
            len(subjects),
            nats.js.api.DeliverPolicy.LAST_PER_SUBJECT,
        )
        latest = {}
        for msg in msgs:
            event = decode_nats(msg)
            token = msg.subject.rsplit(".", 1)[1]
            assert decode_item_token(token) in (event["subject"], None)
            if not event["type"].endswith(".removed.v1"):
                latest[event["subject"]] = event
        return latest

    async def close() -> None:
        try:
            await js.delete_stream(config.stream)
        finally:
            await nc.close()

    if isinstance(server, NatsCluster):
        cluster = server

        def recover() -> None:  # every node back, and the stream has elected its leader
            cluster.ensure_running()
            cluster.wait_stream_healthy(config.stream)

        outage = _stop_all(server.nodes)
    else:
        outage, recover = server.stop, server.start
    backend = Backend(f"{name}-{mode}", sink, read, current, outage, recover)
    backend.closers.append(close)
    return backend


async def redis_backend(
    server: RedisServer | RedisClusterSet | SentinelSet, url: str, mode: str, name: str = "redis"
) -> Backend:
    sink = RedisSink(RedisSinkConfig(url=url, content_mode=content_mode(mode), timeout_s=2.0))
    await sink.connect()
    client = redis_client(url)  # a cluster client for redis+cluster://

    async def read(source: str) -> list[dict[str, Any]]:
        entries = await xrange(client, redis_stream_key(source))
        return [decode_redis(fields) for _id, fields in entries]

    async def current(source: str) -> dict[str, dict[str, Any]]:
        items = cast(dict[bytes, bytes], await client.hgetall(items_key(source)))
        latest = {}
        for key, entry_id in items.items():
            [(_id, fields)] = await xrange(client, redis_stream_key(source), entry_id, entry_id)
            event = decode_redis(fields)
            assert event["subject"] == key.decode()
            latest[event["subject"]] = event
        return latest

    if isinstance(server, RedisClusterSet):
        outage, recover = _stop_all(server.nodes), server.restore
    elif isinstance(server, SentinelSet):
        outage, recover = _stop_all(server.data_nodes), server.restore
    else:
        outage, recover = server.stop, server.start
    backend = Backend(f"{name}-{mode}", sink, read, current, outage, recover)
    backend.closers.append(client.aclose)
    return backend


_CLUSTERS = (pytest.mark.servers, pytest.mark.clusters)


def _stop_all(nodes: Sequence[ServerProcess]) -> Callable[[], None]:
    def stop() -> None:
        for node in nodes:
            node.stop()

    return stop


BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("nats-binary", marks=pytest.mark.servers, id="nats-binary"),
    pytest.param("nats-structured", marks=pytest.mark.servers, id="nats-structured"),
    pytest.param("redis-binary", marks=pytest.mark.servers, id="redis-binary"),
    pytest.param("redis-structured", marks=pytest.mark.servers, id="redis-structured"),
    # the clustered topologies (tests/support/clusters.py), binary content mode
    pytest.param("nats_cluster-binary", marks=_CLUSTERS, id="nats-cluster-r3"),
    pytest.param("redis_cluster-binary", marks=_CLUSTERS, id="redis-cluster"),
    pytest.param("redis_sentinel-binary", marks=_CLUSTERS, id="redis-sentinel"),
]


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    kind: str = request.param
    if kind == "memory":
        made = await memory_backend()
    elif kind == "nats_cluster-binary":
        request.getfixturevalue("nats_cluster_url")  # every node running
        cluster = request.getfixturevalue("nats_cluster")
        made = await nats_backend(cluster, "binary", replicas=3, name="nats-cluster")
    elif kind in ("redis_cluster-binary", "redis_sentinel-binary"):
        topology = kind.partition("-")[0]
        url = request.getfixturevalue(f"{topology}_url")  # healthy and empty
        server = request.getfixturevalue(topology)
        made = await redis_backend(server, url, "binary", name=topology.replace("_", "-"))
    elif kind.startswith("nats-"):
        request.getfixturevalue("nats_url")  # a running server
        made = await nats_backend(request.getfixturevalue("nats_server"), kind[5:])
    else:
        url = request.getfixturevalue("redis_url")  # a running, empty server
        made = await redis_backend(request.getfixturevalue("redis_server"), url, kind[6:])
    try:
        yield made
    finally:
        made.recover()
        await made.sink.aclose()
        for close in made.closers:
            await close()


# -- the contract --


async def test_is_a_sink(backend: Backend) -> None:
    assert isinstance(backend.sink, Sink)
    assert backend.sink.description


async def test_published_events_read_back_in_order(backend: Backend) -> None:
    events = [*object_events(["a", "b", "c"]), *object_events(["a"], kind=Modified, revision=2)]
    await backend.sink.publish("files", events)
    web = [http_event(), http_event(body=b"\xff\xfe binary", kind=Modified, revision=2)]
    await backend.sink.publish("web", web)

    assert await backend.read("files") == expected(events)
    assert await backend.read("web") == expected(web)


async def test_empty_batch_is_a_no_op(backend: Backend) -> None:
    await backend.sink.publish("files", [])
    assert await backend.read("files") == []


async def test_connect_is_idempotent(backend: Backend) -> None:
    await backend.sink.connect()
    await backend.sink.connect()
    events = object_events(["a"])
    await backend.sink.publish("files", events)
    assert await backend.read("files") == expected(events)


async def test_same_event_published_twice_is_stored_once(backend: Backend) -> None:
    first = object_events(["a", "b"])
    await backend.sink.publish("files", first)
    await backend.sink.publish("files", first)
    more = object_events(["c"])
    await backend.sink.publish("files", [*first, *more])  # a retried batch, partly new

    assert await backend.read("files") == expected([*first, *more])


async def test_item_keys_of_any_shape(backend: Backend) -> None:
    events = object_events(SPECIAL_KEYS)
    await backend.sink.publish("files", events)

    read = await backend.read("files")
    assert read == expected(events)
    # exactly, blanks and line breaks included, in every content mode
    assert [event["subject"] for event in read] == SPECIAL_KEYS
    assert [event["data"]["path"] for event in read] == SPECIAL_KEYS
    assert sorted(await backend.current("files")) == sorted(SPECIAL_KEYS)


async def test_current_state_is_the_latest_event_per_item(backend: Backend) -> None:
    added = object_events(["a", "b", "c.d"])
    modified = object_events(["a"], kind=Modified, revision=2, etag="e2")
    removed = object_events(["b"], kind=Removed, revision=3)
    await backend.sink.publish("files", added)
    await backend.sink.publish("files", [*modified, *removed])

    current = await backend.current("files")
    assert current == {"a": expected(modified)[0], "c.d": expected(added)[2]}


async def test_sources_are_kept_apart(backend: Backend) -> None:
    files = object_events(["same-key"], source_name="files")
    other = object_events(["same-key"], source_name="other")
    await backend.sink.publish("files", files)
    await backend.sink.publish("other", other)

    assert await backend.read("files") == expected(files)
    assert await backend.read("other") == expected(other)


async def test_batches_larger_than_one_round_trip(backend: Backend) -> None:
    events = object_events([f"item-{i:05d}" for i in range(5000)])
    await backend.sink.publish("files", events)
    assert await backend.read("files") == expected(events)


async def test_invalid_source_name_is_refused(backend: Backend) -> None:
    with pytest.raises(ValueError, match="source name"):
        await backend.sink.publish("bad.name", object_events(["a"]))


async def test_unavailable_broker_fails_the_publish_then_recovers(backend: Backend) -> None:
    first = object_events(["a"])
    second = object_events(["b", "c"])
    await backend.sink.publish("files", first)

    backend.outage()
    with pytest.raises(PublishError):
        await backend.sink.publish("files", second)
    backend.recover()

    await backend.sink.publish("files", [*first, *second])  # the caller retries the batch
    events = await backend.read("files")
    assert events == expected([*first, *second])
