"""The ``Sink`` contract, run against every sink: memory, NATS and Redis (both content modes).

What a consumer reads back is read with the raw client libraries (nats-py JetStream pull
consumers, redis-py ``XRANGE``/``HGETALL``), decoded by the rules of each content mode, and
validated against the JSON Schemas in ``schemas/``. Backend-specific behaviour is tested in
``test_sinks_memory.py``, ``test_sinks_nats.py`` and ``test_sinks_redis.py``, which share the
helpers of ``tests/support/events.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bridge.errors import PublishError
from bridge.events import Modified, Removed
from bridge.sinks import Sink
from tests.support.backends import Backend, memory_backend, nats_backend, redis_backend
from tests.support.events import (
    SPECIAL_KEYS,
    expected,
    http_event,
    object_events,
)

_CLUSTERS = (pytest.mark.servers, pytest.mark.clusters)

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
