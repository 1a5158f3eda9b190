"""Raw consumers for end-to-end checks: every event the bridge published, read with the
plain nats-py and redis-py clients from the start of the stream, decoded and validated
against the JSON Schemas (:class:`Received`, :func:`nats_consumer`, :func:`redis_consumer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import nats
import redis.asyncio as aioredis
from nats.js.api import DeliverPolicy

from bridge.cloudevents import header_value
from bridge.schemas import load_schema

ENVELOPE = "https://koprs.dev/schemas/bridge/v1/cloudevent.json"


@dataclass
class Received:
    """Events a raw consumer decoded, validated against the schemas."""

    events: list[dict[str, Any]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def add(self, event: dict[str, Any]) -> None:
        validate(event)
        async with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    async def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool]) -> None:
        async with asyncio.timeout(60), self.changed:
            await self.changed.wait_for(lambda: predicate(self.events))

    def seen(self, source: str) -> list[tuple[str, str]]:
        return [
            (e["type"].split(".")[-2], e["subject"])
            for e in self.events
            if e["subject"] and e["_source_name"] == source
        ]


def validate(event: dict[str, Any]) -> None:
    envelope = {k: v for k, v in event.items() if not k.startswith("_")}
    jsonschema.Draft202012Validator(
        load_schema(ENVELOPE), format_checker=jsonschema.FormatChecker()
    ).validate(envelope)
    jsonschema.Draft202012Validator(
        load_schema(event["dataschema"]), format_checker=jsonschema.FormatChecker()
    ).validate(event["data"])


def decode_nats(subject: str, headers: dict[str, str] | None, body: bytes) -> dict[str, Any]:
    headers = headers or {}
    if "ce-id" in headers:  # binary mode
        event: dict[str, Any] = {
            k[3:]: header_value(v) for k, v in headers.items() if k.startswith("ce-")
        }
        event["datacontenttype"] = headers["content-type"]
        event["data"] = json.loads(body)
        assert headers["Nats-Msg-Id"] == event["id"]
    else:
        event = json.loads(body)
    event["_source_name"] = subject.split(".")[2]
    return event


@contextlib.asynccontextmanager
async def nats_consumer(url: str) -> AsyncIterator[Received]:
    received = Received()
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    js = nc.jetstream()

    async def on_message(msg: Any) -> None:
        await received.add(decode_nats(msg.subject, msg.headers, msg.data))
        await msg.ack()

    # The stream may not exist yet: the bridge creates it. Retry until it does.
    while True:
        try:
            sub = await js.subscribe(
                "koprs.external.>",
                cb=on_message,
                deliver_policy=DeliverPolicy.ALL,
                ordered_consumer=True,
            )
            break
        except nats.js.errors.NotFoundError:
            await asyncio.sleep(0.05)
    try:
        yield received
    finally:
        await sub.unsubscribe()
        await nc.close()


async def fresh_nats(url: str) -> None:
    """Delete the streams earlier tests left on ``koprs.external.>``: each test starts empty."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            if info.config.name and any(
                s.startswith("koprs.external") for s in info.config.subjects or ()
            ):
                await js.delete_stream(info.config.name)
    finally:
        await nc.close()


def decode_redis(source: str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    if b"event" in fields:
        event: dict[str, Any] = json.loads(fields[b"event"])
    else:
        event = {
            k.decode()[3:]: header_value(v.decode())
            for k, v in fields.items()
            if k.startswith(b"ce-")
        }
        event["datacontenttype"] = fields[b"content-type"].decode()
        event["data"] = json.loads(fields[b"data"])
    event["_source_name"] = source
    return event


@contextlib.asynccontextmanager
async def redis_consumer(url: str, names: list[str]) -> AsyncIterator[Received]:
    received = Received()
    client = aioredis.from_url(url)
    positions: dict[Any, Any] = {f"koprs:external:{name}": "0-0" for name in names}

    async def follow() -> None:
        while True:
            try:
                replies: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]
                replies = await client.xread(positions, block=100)  # type: ignore[assignment]
            except (ConnectionError, aioredis.ConnectionError):
                await asyncio.sleep(0.05)
                continue
            for key, entries in replies:
                for entry_id, fields in entries:
                    positions[key.decode()] = entry_id
                    await received.add(decode_redis(key.decode().rsplit(":", 1)[1], fields))

    task = asyncio.create_task(follow())
    try:
        yield received
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()
