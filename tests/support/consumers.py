"""Brokers for the consumer contract suite (``tests/consumer/test_consumer_contract.py``):
:class:`Backend` publishes events with the real sink and opens watches on it; the ``backend``
fixture gives one per broker (NATS, Redis), cleaned up after the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import nats
import nats.js
import nats.js.errors
import pytest
import redis.asyncio

from bridge.cloudevents import CloudEvent
from bridge.consumer import (
    Delivery,
    Synced,
    Watch,
    WatchItem,
    watch_nats,
    watch_redis,
)
from bridge.consumer.dead_letters import (
    DeadLetter,
    nats_dead_letter_prefix,
    read_nats_dead_letter,
    read_redis_dead_letter,
    redis_dead_letter_prefix,
)
from bridge.errors import PublishError
from bridge.events import Added, ExternalEvent
from bridge.sinks.nats import NatsSink
from bridge.sinks.redis import RedisSink, RedisSinkConfig
from bridge.subjects import REDIS_STREAM_PREFIX, redis_stream_key
from tests.support.events import nats_test_config, object_events

pytestmark = pytest.mark.servers

_revisions = itertools.count(1)


def events(
    keys: Sequence[str],
    kind: type[ExternalEvent[Any]] = Added,
    *,
    etag: str = "e1",
    source: str = "files",
) -> list[CloudEvent]:
    """Object events; every call gets a new revision, so its event ids are new."""
    revision = next(_revisions)
    return object_events(keys, kind=kind, etag=etag, revision=revision, source_name=source)


# -- the backends -------------------------------------------------------------------------------


@dataclass
class Backend:
    """One broker, its sink, and the watches of one test (closed at teardown)."""

    kind: Literal["nats", "redis"]
    url: str
    sink: NatsSink | RedisSink
    stream: str = ""
    """NATS: the test's stream."""
    subject_prefix: str = ""
    server: Any = None
    """The broker's server process (tests.support.servers)."""
    watches: list[Watch] = field(default_factory=list)

    def watch(
        self,
        *sources: str,
        durable: str | None = None,
        consumer: str | None = None,
        **options: Any,
    ) -> Any:
        """A watch of ``sources`` (default ``files``), quick to notice what happens; with
        ``durable`` a NATS durable consumer / a Redis group (``consumer``: its member)."""
        names = sources or ("files",)
        made: Any
        if self.kind == "nats":
            settings: dict[str, Any] = {
                "stream": self.stream,
                "subject_prefix": self.subject_prefix,
                "fetch_timeout_s": 0.5,
                "request_timeout_s": 2.0,
                "reconnect_wait_s": 0.05,
                "retry_max_s": 0.2,
                "durable": durable,
            }
            settings.update(options)
            for redis_only in ("claim_idle_s", "prune_idle_s", "block_s"):
                settings.pop(redis_only, None)
            made = watch_nats(self.url, names, **settings)
        else:
            settings = {"block_s": 0.5, "retry_max_s": 0.2, "group": durable}
            if consumer is not None:
                settings["consumer"] = consumer
            settings.update(options)
            for nats_only in ("ack_wait_s", "max_ack_pending", "fetch_timeout_s"):
                settings.pop(nats_only, None)
            made = watch_redis(self.url, names, **settings)
        self.watches.append(made)
        return made

    async def publish(self, batch: list[CloudEvent], source: str = "files") -> list[CloudEvent]:
        await self.sink.publish(source, batch)
        return batch

    async def publish_retrying(self, batch: list[CloudEvent]) -> list[CloudEvent]:
        """Publish once the broker answers again (after a restart)."""
        async with asyncio.timeout(30):
            while True:
                try:
                    return await self.publish(batch)
                except PublishError:
                    await asyncio.sleep(0.05)  # the sink reconnects meanwhile

    async def restart(self) -> None:
        """Restart the broker (NATS keeps its data; this Redis keeps none)."""
        await asyncio.to_thread(self.server.restart)

    async def fresh_list(self) -> dict[str, str]:
        """key -> etag of what a new watch lists now."""
        watch = self.watch()
        items = await take(watch, 1)
        while not isinstance(items[-1], Synced):
            items += await take(watch, 1)
        await watch.aclose()
        return {
            i.envelope.key: i.envelope.event.resource.etag for i in items if isinstance(i, Delivery)
        }

    async def trim(self, keep: int) -> None:
        """Drop all but the newest ``keep`` events from the history (NATS: a message limit
        on the stream, as if older messages had expired; Redis: ``XTRIM MAXLEN``)."""
        if self.kind == "nats":
            nc = await nats.connect(self.url)
            try:
                js = nc.jetstream()
                config = (await js.stream_info(self.stream)).config
                config.max_msgs = keep
                await js.update_stream(config)
            finally:
                await nc.close()
        else:
            client = redis.asyncio.Redis.from_url(self.url)
            try:
                await client.xtrim(redis_stream_key("files"), maxlen=keep, approximate=False)
            finally:
                await client.aclose()

    async def dead_letters(self, source: str = "files") -> list[DeadLetter]:
        if self.kind == "nats":
            nc = await nats.connect(self.url)
            try:
                js = nc.jetstream()
                stream = f"{self.stream}_DEADLETTER"
                try:
                    state = (await js.stream_info(stream)).state
                except nats.js.errors.NotFoundError:
                    return []
                if state.messages == 0:  # made, its first dead letter not written yet
                    return []
                prefix = nats_dead_letter_prefix(self.subject_prefix)
                found = []
                for seq in range(state.first_seq, state.last_seq + 1):
                    msg = await js.get_msg(stream, seq)
                    assert msg.subject is not None
                    found.append(
                        read_nats_dead_letter(
                            msg.subject, msg.headers, msg.data or b"", prefix=prefix,
                            position=str(seq),
                        )
                    )  # fmt: skip
                return found
            finally:
                await nc.close()
        client = redis.asyncio.Redis.from_url(self.url)
        try:
            prefix = redis_dead_letter_prefix(REDIS_STREAM_PREFIX)
            stream = f"{prefix}{source}"
            entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(stream))
            return [
                read_redis_dead_letter(stream, fields, prefix=prefix, position=entry_id.decode())
                for entry_id, fields in entries
            ]
        finally:
            await client.aclose()

    async def unsettled(self, durable: str) -> int:
        """Deliveries of the durable consumer / group neither acknowledged nor terminated."""
        if self.kind == "nats":
            nc = await nats.connect(self.url)
            try:
                info = await nc.jetstream().consumer_info(self.stream, durable)
                return int(info.num_ack_pending)
            finally:
                await nc.close()
        client = redis.asyncio.Redis.from_url(self.url)
        try:
            summary: dict[str, Any] = await client.xpending(redis_stream_key("files"), durable)
            return int(summary["pending"])
        finally:
            await client.aclose()

    async def undecodable(self) -> None:
        """Publish one message of source ``files`` that is not a koprs CloudEvent."""
        if self.kind == "nats":
            nc = await nats.connect(self.url)
            try:
                await nc.jetstream().publish(f"{self.subject_prefix}.files.junk", b"not json")
            finally:
                await nc.close()
        else:
            client = redis.asyncio.Redis.from_url(self.url)
            try:
                await client.xadd(redis_stream_key("files"), {"event": b"not json"})
            finally:
                await client.aclose()


@pytest.fixture(params=["nats", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    made: Backend
    if request.param == "nats":
        config = nats_test_config(request.getfixturevalue("nats_url"))
        nats_sink = NatsSink(config)
        await nats_sink.connect()
        made = Backend(
            "nats", config.url, nats_sink, stream=config.stream,
            subject_prefix=config.subject_prefix, server=request.getfixturevalue("nats_server"),
        )  # fmt: skip
    else:
        url = request.getfixturevalue("redis_url")
        made = Backend(
            "redis", url, RedisSink(RedisSinkConfig(url=url)),
            server=request.getfixturevalue("redis_server"),
        )  # fmt: skip
    try:
        yield made
    finally:
        for watch in made.watches:
            await watch.aclose()
        await made.sink.aclose()
        if made.kind == "nats":
            nc = await nats.connect(made.url)
            js = nc.jetstream()
            for name in (made.stream, f"{made.stream}_DEADLETTER"):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_stream(name)
            await nc.close()


async def take(watch: Watch, count: int) -> list[WatchItem]:
    """The next ``count`` items (bounded, so a missing one fails the test instead of hanging)."""
    items: list[WatchItem] = []
    iterator = aiter(watch)
    async with asyncio.timeout(15):
        while len(items) < count:
            items.append(await anext(iterator))
    return items
