"""FastStream subscribers with the koprs decoders receive typed events.

The bridge runs in process against the real nats-server / redis-server and publishes what a
local folder does; FastStream's own NatsBroker / RedisBroker consume it, in both content modes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest
import redis.asyncio as aioredis
from faststream import AckPolicy
from faststream.nats import JStream, NatsBroker, PullSub, TestNatsBroker
from faststream.redis import RedisBroker, StreamSub

from bridge import Added, ExternalEvent, Modified, Removed, StoredObject
from bridge.cloudevents import EventEncoder
from bridge.consumer import Envelope, UnknownEventTypeError
from bridge.consumer.faststream import (
    koprs_nats_decoder,
    koprs_redis_decoder,
    koprs_redis_event_decoder,
    nats_decoder,
    redis_decoder,
)
from bridge.service.config import parse_config
from bridge.service.runner import Bridge
from bridge.sinks.redis import RedisSink, RedisSinkConfig

MODES = ["binary", "structured"]


# -- helpers ------------------------------------------------------------------------------------


class Folder:
    """A watched folder whose files change atomically (no half-written file is ever listed)."""

    def __init__(self, root: Path) -> None:
        self.path = root / "watched"
        self.staging = root / "staging"
        self.path.mkdir()
        self.staging.mkdir()

    def put(self, name: str, data: bytes) -> None:
        tmp = self.staging / name
        tmp.write_bytes(data)
        os.replace(tmp, self.path / name)

    def delete(self, name: str) -> None:
        (self.path / name).unlink()


@contextlib.asynccontextmanager
async def running_bridge(raw: dict[str, Any]) -> AsyncIterator[Bridge]:
    bridge = Bridge(parse_config(raw, env={}), shutdown_grace_s=1)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        async with asyncio.timeout(30):
            await bridge.connected.wait()
        yield bridge
    finally:
        stop.set()
        await task


@contextlib.asynccontextmanager
async def started(broker: NatsBroker | RedisBroker) -> AsyncIterator[None]:
    """Run ``broker``; on the way out stop its subscribers and wait for their tasks.

    FastStream's ``close()`` cancels the subscribers' consume tasks without awaiting them and
    then closes the connection under them; stopping them first, and waiting, ends them cleanly.
    """
    async with broker:
        await broker.start()
        yield
        for subscriber in broker.subscribers:
            tasks = list(getattr(subscriber, "tasks", ()))
            await subscriber.stop()
            await asyncio.gather(*tasks, return_exceptions=True)


def bridge_config(broker: dict[str, Any], folder: Folder) -> dict[str, Any]:
    return {
        "broker": broker,
        "sources": [
            {
                "name": "files",
                "interval": 0.05,
                "max_backoff": 0.2,
                "local": {"path": str(folder.path)},
            }
        ],
    }


async def next_item(queue: asyncio.Queue[Any]) -> Any:
    async with asyncio.timeout(30):
        return await queue.get()


async def drive(folder: Folder, received: asyncio.Queue[Envelope]) -> list[Envelope]:
    """Add two files, change one, delete the other; the envelopes in the order received."""
    got: list[Envelope] = []
    folder.put("a.yaml", b"a: 1\n")
    folder.put("b c.yaml", b"b: 1\n")
    got += [await next_item(received), await next_item(received)]
    folder.put("a.yaml", b"a: 22\n")
    got.append(await next_item(received))
    folder.delete("b c.yaml")
    got.append(await next_item(received))
    return got


def assert_history(got: list[Envelope]) -> None:
    assert all(isinstance(e, Envelope) for e in got)
    assert sorted((e.kind, e.key) for e in got[:2]) == [("added", "a.yaml"), ("added", "b c.yaml")]
    assert [(e.kind, e.key) for e in got[2:]] == [("modified", "a.yaml"), ("removed", "b c.yaml")]
    assert {e.source_name for e in got} == {"files"}
    added = next(e for e in got if e.key == "a.yaml")
    match added.event:
        case Added(StoredObject(path="a.yaml", size=5)):
            pass
        case other:
            pytest.fail(f"not an Added StoredObject of a.yaml: {other!r}")
    assert isinstance(got[2].event, Modified)
    assert got[2].event.resource.size == 6
    assert isinstance(got[3].event, Removed)
    assert len({e.id for e in got}) == 4


def stored_event(path: str, kind: type[ExternalEvent[Any]] = Added) -> Any:
    encoder = EventEncoder("files", "file:///srv/files")
    return encoder.encode(kind(StoredObject(path, f"etag-{path}", 3, None)), revision=7)


# -- NATS JetStream -----------------------------------------------------------------------------


def nats_names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:12]
    return f"T{tag}", f"t{tag}.koprs.external"


@contextlib.asynccontextmanager
async def deleting_stream(url: str, stream: str) -> AsyncIterator[nats.js.JetStreamContext]:
    nc = await nats.connect(url)
    try:
        yield nc.jetstream()
    finally:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(stream)
        await nc.close()


@pytest.mark.parametrize("mode", MODES)
async def test_nats_subscriber_receives_envelopes(mode: str, nats_url: str, tmp_path: Path) -> None:
    stream, prefix = nats_names()
    folder = Folder(tmp_path)
    received: asyncio.Queue[Envelope] = asyncio.Queue()
    broker = NatsBroker(nats_url)

    @broker.subscriber(
        f"{prefix}.files.>",
        stream=JStream(stream, declare=False),
        durable="operator",
        pull_sub=True,
        decoder=nats_decoder(subject_prefix=prefix),
    )
    async def on_change(envelope: Envelope) -> None:
        await received.put(envelope)

    raw = bridge_config(
        {"url": nats_url, "stream": stream, "subject_prefix": prefix, "content_mode": mode}, folder
    )
    async with deleting_stream(nats_url, stream), running_bridge(raw), started(broker):
        got = await drive(folder, received)
    assert_history(got)
    assert received.empty()


async def test_nats_event_decoder_hands_over_the_bare_event(nats_url: str, tmp_path: Path) -> None:
    stream, prefix = nats_names()
    folder = Folder(tmp_path)
    received: asyncio.Queue[ExternalEvent[Any]] = asyncio.Queue()
    broker = NatsBroker(nats_url)

    @broker.subscriber(
        f"{prefix}.>",
        stream=JStream(stream, declare=False),
        decoder=nats_decoder(subject_prefix=prefix, yields="event"),
    )
    async def on_change(event: ExternalEvent[Any]) -> None:
        await received.put(event)

    raw = bridge_config({"url": nats_url, "stream": stream, "subject_prefix": prefix}, folder)
    async with deleting_stream(nats_url, stream), running_bridge(raw), started(broker):
        folder.put("x", b"1")
        event = await next_item(received)
        folder.delete("x")
        gone = await next_item(received)
    assert isinstance(event, Added)
    assert event.resource.path == "x"
    assert isinstance(gone, Removed)
    assert gone.resource.path == "x"


async def wait_settled(js: nats.js.JetStreamContext, stream: str, durable: str) -> Any:
    """Wait until the consumer has nothing pending nor unacknowledged; return its info."""
    async with asyncio.timeout(30):
        while True:
            info = await js.consumer_info(stream, durable)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return info
            await asyncio.sleep(0.02)


async def test_nats_unknown_types_are_acked_and_skipped_malformed_rejected(
    nats_url: str,
) -> None:
    stream, prefix = nats_names()
    received: asyncio.Queue[Envelope] = asyncio.Queue()
    broker = NatsBroker(nats_url)

    @broker.subscriber(
        f"{prefix}.>",
        stream=JStream(stream, declare=False),
        durable="operator",
        pull_sub=True,
        decoder=nats_decoder(subject_prefix=prefix),
        # a nak'd message would come back and stay unacknowledged: the skip must be an ack
        ack_policy=AckPolicy.NACK_ON_ERROR,
    )
    async def on_change(envelope: Envelope) -> None:
        await received.put(envelope)

    valid = stored_event("ok.yaml")
    headers, body = valid.to_binary()
    future = {**headers, "ce-type": "dev.koprs.external.added.v2", "ce-id": "f" * 32}
    async with deleting_stream(nats_url, stream) as js:
        await js.add_stream(name=stream, subjects=[f"{prefix}.>"])
        await js.publish(f"{prefix}.files.v2", body, headers=future)
        await js.publish(f"{prefix}.files.ok~2Eyaml", body, headers=headers)
        async with started(broker):
            envelope = await next_item(received)
        info = await wait_settled(js, stream, "operator")
    assert envelope.id == valid.id
    assert info.num_redelivered == 0
    assert info.delivered.stream_seq == 2
    assert received.empty()


async def test_nats_malformed_messages_are_rejected(nats_url: str) -> None:
    stream, prefix = nats_names()
    received: asyncio.Queue[Envelope] = asyncio.Queue()
    broker = NatsBroker(nats_url)

    @broker.subscriber(
        f"{prefix}.>",
        stream=JStream(stream, declare=False),
        durable="operator",
        pull_sub=True,
        decoder=nats_decoder(subject_prefix=prefix),
    )
    async def on_change(envelope: Envelope) -> None:
        await received.put(envelope)

    valid = stored_event("ok.yaml")
    headers, body = valid.to_binary()
    async with deleting_stream(nats_url, stream) as js:
        await js.add_stream(name=stream, subjects=[f"{prefix}.>"])
        await js.publish(f"{prefix}.files.bad", b"not json", headers=headers)
        await js.publish(f"{prefix}.files.ok~2Eyaml", body, headers=headers)
        async with started(broker):
            envelope = await next_item(received)
        info = await wait_settled(js, stream, "operator")
    assert envelope.id == valid.id
    assert info.num_redelivered == 0  # the default policy terminated it: no retry loop
    assert received.empty()


@pytest.mark.parametrize("mode", MODES)
async def test_nats_in_memory_test_broker(mode: str) -> None:
    """FastStream's TestNatsBroker (no server) works with the decoder too: handy in unit tests."""
    broker = NatsBroker()
    got: list[Envelope] = []

    @broker.subscriber(
        "koprs.external.files.>",
        stream=JStream("KOPRS_EXTERNAL", declare=False),
        decoder=koprs_nats_decoder,
    )
    async def on_change(envelope: Envelope) -> None:
        got.append(envelope)

    event = stored_event("dir/a b.yaml", Modified)
    if mode == "binary":
        headers, body = event.to_binary()
    else:
        headers, body = {"content-type": "application/cloudevents+json"}, event.to_structured()
    async with TestNatsBroker(broker) as test_broker:
        await test_broker.publish(
            body,
            "koprs.external.files.dir~2Fa~20b~2Eyaml",
            headers=headers,
            stream="KOPRS_EXTERNAL",
        )
    assert [(e.kind, e.key, e.source_name, e.id) for e in got] == [
        ("modified", "dir/a b.yaml", "files", event.id)
    ]
    assert isinstance(got[0].event, Modified)


# -- Redis Streams ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_redis_subscriber_receives_envelopes(
    mode: str, redis_url: str, tmp_path: Path
) -> None:
    folder = Folder(tmp_path)
    received: asyncio.Queue[Envelope] = asyncio.Queue()
    broker = RedisBroker(redis_url)

    @broker.subscriber(
        stream=StreamSub("koprs:external:files", group="operator", consumer="pod-1"),
        decoder=koprs_redis_decoder,
    )
    async def on_change(envelope: Envelope) -> None:
        await received.put(envelope)

    raw = bridge_config({"url": redis_url, "content_mode": mode}, folder)
    client = aioredis.from_url(redis_url)
    try:
        async with running_bridge(raw), started(broker):
            got = await drive(folder, received)
            pending = await settled_group(client, "koprs:external:files", "operator")
    finally:
        await client.aclose()
    assert_history(got)
    assert pending == 0
    assert received.empty()


async def settled_group(client: aioredis.Redis, stream: str, group: str) -> int:
    """Wait until the group has read the whole stream and acknowledged it; the pending count."""
    async with asyncio.timeout(30):
        while True:
            (info,) = [g for g in await client.xinfo_groups(stream) if g["name"] == group.encode()]
            if info["lag"] == 0 and info["pending"] == 0:
                return int(info["pending"])
            await asyncio.sleep(0.02)


async def test_redis_unknown_types_are_acked_and_skipped(redis_url: str) -> None:
    received: asyncio.Queue[Envelope] = asyncio.Queue()
    broker = RedisBroker(redis_url)

    @broker.subscriber(
        stream=StreamSub("koprs:external:files", group="operator", consumer="pod-1"),
        decoder=koprs_redis_decoder,
        ack_policy=AckPolicy.NACK_ON_ERROR,
    )
    async def on_change(envelope: Envelope) -> None:
        await received.put(envelope)

    valid = stored_event("ok.yaml")
    headers, body = valid.to_binary()
    client = aioredis.from_url(redis_url)
    try:
        async with started(broker):
            future = {**headers, "ce-type": "dev.koprs.external.removed.v9", "data": body}
            await client.xadd("koprs:external:files", future)
            await client.xadd("koprs:external:files", {**headers, "data": body})
            envelope = await next_item(received)
            pending = await settled_group(client, "koprs:external:files", "operator")
    finally:
        await client.aclose()
    assert envelope.id == valid.id
    assert pending == 0
    assert received.empty()


async def test_redis_batch_subscriber_and_event_decoder(redis_url: str) -> None:
    sink = RedisSink(RedisSinkConfig(url=redis_url, content_mode="structured"))
    events = [stored_event(f"k{i}") for i in range(5)]
    try:
        await sink.publish("files", events)
    finally:
        await sink.aclose()
    received: asyncio.Queue[list[Envelope]] = asyncio.Queue()
    broker = RedisBroker(redis_url)

    @broker.subscriber(
        stream=StreamSub("koprs:external:files", last_id="0", batch=True, max_records=2),
        decoder=koprs_redis_decoder,
    )
    async def on_batch(envelopes: list[Envelope]) -> None:
        await received.put(envelopes)

    got: list[Envelope] = []
    async with started(broker):
        while len(got) < 5:
            got += await next_item(received)
    assert [e.key for e in got] == [f"k{i}" for i in range(5)]
    assert [e.id for e in got] == [e.id for e in events]

    only_events: asyncio.Queue[ExternalEvent[Any]] = asyncio.Queue()
    broker2 = RedisBroker(redis_url)

    @broker2.subscriber(
        stream=StreamSub("koprs:external:files", last_id="0"), decoder=koprs_redis_event_decoder
    )
    async def on_event(event: ExternalEvent[Any]) -> None:
        await only_events.put(event)

    async with started(broker2):
        firsts = [await next_item(only_events) for _ in range(5)]
    assert [type(e) for e in firsts] == [Added] * 5
    assert [e.resource.path for e in firsts] == [f"k{i}" for i in range(5)]


async def test_redis_decoder_refuses_other_redis_message_kinds(redis_url: str) -> None:
    errors: asyncio.Queue[BaseException] = asyncio.Queue()
    broker = RedisBroker(redis_url)
    decode = redis_decoder()

    async def checking(msg: Any) -> Any:
        try:
            return await decode(msg)
        except Exception as exc:
            await errors.put(exc)
            raise

    @broker.subscriber(list="some-list", decoder=checking)
    async def on_item(body: Any) -> None:  # pragma: no cover - never called
        pass

    async with started(broker):
        await broker.publish(b"x", list="some-list")
        error = await next_item(errors)
    assert isinstance(error, TypeError)
    assert "StreamSub" in str(error)


async def test_skip_unknown_false_raises(redis_url: str) -> None:
    """With ``skip_unknown=False`` the handler's error policy applies to unknown types too."""
    errors: asyncio.Queue[BaseException] = asyncio.Queue()
    decode = redis_decoder(skip_unknown=False)

    async def checking(msg: Any) -> Any:
        try:
            return await decode(msg)
        except Exception as exc:
            await errors.put(exc)
            raise

    broker = RedisBroker(redis_url)

    @broker.subscriber(stream=StreamSub("koprs:external:files", last_id="0"), decoder=checking)
    async def on_change(envelope: Envelope) -> None:  # pragma: no cover - never called
        pass

    headers, body = stored_event("x").to_binary()
    client = aioredis.from_url(redis_url)
    try:
        future = {**headers, "ce-type": "dev.koprs.external.added.v2", "data": body}
        await client.xadd("koprs:external:files", future)
        async with started(broker):
            error = await next_item(errors)
    finally:
        await client.aclose()
    assert isinstance(error, UnknownEventTypeError)


async def test_nats_batch_subscriber_gets_lists_without_unknown_types(nats_url: str) -> None:
    stream, prefix = nats_names()
    received: asyncio.Queue[list[Envelope]] = asyncio.Queue()
    broker = NatsBroker(nats_url)

    @broker.subscriber(
        f"{prefix}.>",
        stream=JStream(stream, declare=False),
        durable="batcher",
        pull_sub=PullSub(batch_size=10, timeout=0.2, batch=True),
        decoder=nats_decoder(subject_prefix=prefix),
    )
    async def on_batch(envelopes: list[Envelope]) -> None:
        await received.put(envelopes)

    events = [stored_event(f"k{i}") for i in range(3)]
    future_headers, future_body = stored_event("v2").to_binary()
    future_headers["ce-type"] = "dev.koprs.external.added.v2"
    async with deleting_stream(nats_url, stream) as js:
        await js.add_stream(name=stream, subjects=[f"{prefix}.>"])
        for event in events[:2]:
            headers, body = event.to_binary()
            await js.publish(f"{prefix}.files.{event.subject}", body, headers=headers)
        await js.publish(f"{prefix}.files.v2", future_body, headers=future_headers)
        headers, body = events[2].to_binary()
        await js.publish(f"{prefix}.files.k2", body, headers=headers)
        got: list[Envelope] = []
        async with started(broker):
            while len(got) < 3:
                got += await next_item(received)
            info = await wait_settled(js, stream, "batcher")
    assert [e.id for e in got] == [e.id for e in events]
    assert info.num_redelivered == 0
