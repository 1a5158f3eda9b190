"""Reflector: a cache of current items fed by a watch.

The rules are checked with a scripted watch; then against the real bridge and nats-server: the
cache equals the watched folder, and a watch that lists again drops what disappeared.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import nats.js.api
import nats.js.errors
import pytest

from bridge.consumer import Envelope, Reflector, watch_nats
from bridge.consumer.base import Delivery, Synced
from bridge.events import Modified, Removed
from bridge.service.config import parse_config
from bridge.service.runner import Bridge
from bridge.sinks.nats import NatsSink, NatsSinkConfig
from bridge.sources.stores import StoredObject
from tests.support.events import nats_test_config, object_events
from tests.support.scripted import ScriptedWatch, envelope

# -- a scripted watch (also used by the handler tests) ----------------------------------------


def resource(env: Envelope) -> Any:
    return env.event.resource


# -- the rules --------------------------------------------------------------------------------


async def test_list_then_changes() -> None:
    a, b = envelope("a"), envelope("b")
    a2, gone = envelope("a", Modified, etag="e2", revision=2), envelope("b", Removed, revision=3)
    watch = ScriptedWatch([]).add(a, initial=True).add(b, initial=True).synced("files")
    watch.add(a2).add(gone)
    script = list(watch.script)
    reflector = Reflector()
    seen = []
    async for item in reflector.reflect(watch):
        seen.append((item, reflector.items("files"), reflector.synced))
    assert [s[0] for s in seen] == script  # passed through as they are
    assert [(s[1], s[2]) for s in seen] == [  # the store, each time an item is handed on
        ({"a": resource(a)}, False),
        ({"a": resource(a), "b": resource(b)}, False),
        ({"a": resource(a), "b": resource(b)}, True),
        ({"a": resource(a2), "b": resource(b)}, True),
        ({"a": resource(a2)}, True),
    ]
    assert reflector.get("files", "a") == resource(a2)
    assert reflector.get("files", "b") is None
    assert reflector.get("files", "b", "none") == "none"
    assert reflector.get("web", "a") is None
    assert reflector.items("web") == {}
    assert reflector.envelopes("files") == {"a": a2}
    assert reflector.sources() == ["files"]
    assert len(reflector) == 1
    assert watch.settled == []  # reflect() leaves acknowledging to the caller


async def test_items_is_a_snapshot() -> None:
    reflector = Reflector()
    reflector.apply(ScriptedWatch([]).delivery(envelope("a"), initial=True))
    snapshot = reflector.items("files")
    reflector.apply(ScriptedWatch([]).delivery(envelope("b")))
    assert list(snapshot) == ["a"]
    assert sorted(reflector.items("files")) == ["a", "b"]


async def test_a_new_list_drops_what_it_lacks() -> None:
    w = ScriptedWatch([]).add(envelope("a"), initial=True).add(envelope("b"), initial=True)
    w.synced("files").add(envelope("c", revision=2))  # a live one
    a2 = envelope("a", Modified, etag="e2", revision=3)
    w.add(a2, initial=True).synced("files")  # listed again: only a is left
    reflector = Reflector()
    await reflector.run(w)
    assert reflector.items("files") == {"a": resource(a2)}


async def test_an_empty_new_list_empties_its_sources_only() -> None:
    w = ScriptedWatch([]).add(envelope("a"), initial=True)
    w.add(envelope("x", source="web"), initial=True).synced()
    w.synced("files")  # files listed again: nothing
    reflector = Reflector()
    await reflector.run(w)
    assert reflector.items("files") == {}
    assert list(reflector.items("web")) == ["x"]
    assert reflector.sources() == ["web"]


async def test_an_item_removed_during_a_new_list_is_not_kept() -> None:
    w = ScriptedWatch([]).add(envelope("a"), initial=True).synced()
    w.add(envelope("a"), initial=True).add(envelope("a", Removed, revision=2))
    w.add(envelope("b", revision=2), initial=True).synced()
    reflector = Reflector()
    await reflector.run(w)
    assert list(reflector.items("files")) == ["b"]


async def test_run_acknowledges_every_delivery() -> None:
    w = ScriptedWatch([]).add(envelope("a"), initial=True).synced().add(envelope("b"))
    reflector = Reflector()
    await reflector.run(w)
    assert [(how, env_id) for how, env_id, _ in w.settled] == [
        ("ack", envelope("a").id),
        ("ack", envelope("b").id),
    ]


async def test_wait_synced_and_wait_for() -> None:
    w = ScriptedWatch([], then_wait=True).add(envelope("a"), initial=True).synced()
    w.add(envelope("b"))
    reflector = Reflector()
    task = asyncio.create_task(reflector.run(w))
    try:
        async with asyncio.timeout(10):
            await reflector.wait_synced()
            assert "a" in reflector.items("files")
            await reflector.wait_for(lambda r: r.get("files", "b") is not None)
            await reflector.wait_synced()  # at once now
    finally:
        await w.aclose()
        await task
    assert reflector.synced
    assert reflector.changes == 3


# -- with the real bridge and nats-server -------------------------------------------------------


class Folder:
    """A watched folder whose files change atomically (never listed half written)."""

    def __init__(self, root: Path) -> None:
        self.path = root / "watched"
        self.staging = root / "staging"
        self.path.mkdir()
        self.staging.mkdir()

    def put(self, name: str, data: bytes) -> None:
        (self.staging / name).write_bytes(data)
        os.replace(self.staging / name, self.path / name)

    def delete(self, name: str) -> None:
        (self.path / name).unlink()

    def state(self) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in self.path.iterdir()}


def sizes(reflector: Reflector) -> dict[str, int]:
    items = reflector.items("files")
    assert all(isinstance(r, StoredObject) for r in items.values())
    return {key: r.size for key, r in items.items()}


@contextlib.asynccontextmanager
async def running_bridge(config: NatsSinkConfig, folder: Folder) -> AsyncIterator[Bridge]:
    raw = {
        "broker": {
            "url": config.url,
            "stream": config.stream,
            "subject_prefix": config.subject_prefix,
        },
        "sources": [
            {
                "name": "files",
                "interval": 0.05,
                "max_backoff": 0.2,
                "local": {"path": str(folder.path)},
            }
        ],
    }
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
        nc = await nats.connect(config.url)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(config.stream)
        await nc.close()


@contextlib.asynccontextmanager
async def reflecting(config: NatsSinkConfig) -> AsyncIterator[Reflector]:
    reflector = Reflector()
    watch = watch_nats(
        config.url,
        ["files"],
        stream=config.stream,
        subject_prefix=config.subject_prefix,
        fetch_timeout_s=0.5,
    )
    task = asyncio.create_task(reflector.run(watch))
    try:
        yield reflector
    finally:
        await watch.aclose()
        await task


async def until(reflector: Reflector, folder: Folder) -> None:
    async with asyncio.timeout(30):
        await reflector.wait_for(lambda r: sizes(r) == folder.state())


async def test_cache_equals_the_folder(nats_url: str, tmp_path: Path) -> None:
    config = nats_test_config(nats_url)
    folder = Folder(tmp_path)
    folder.put("a.yaml", b"a: 1\n")
    folder.put("b c.yaml", b"b: 1\n")
    folder.put("gone.yaml", b"x\n")
    async with running_bridge(config, folder), reflecting(config) as early:
        await until(early, folder)
        folder.delete("gone.yaml")
        folder.put("a.yaml", b"a: 22\n")
        folder.put("new.yaml", b"n\n")
        await until(early, folder)
        async with reflecting(config) as late:  # lists what the stream says now
            async with asyncio.timeout(30):
                await late.wait_synced()
            assert sizes(late) == folder.state() == sizes(early)
            assert {k: v.id for k, v in late.envelopes("files").items()} == {
                k: v.id for k, v in early.envelopes("files").items()
            }
            folder.delete("b c.yaml")
            await until(late, folder)
            await until(early, folder)
    assert sorted(early.items("files")) == ["a.yaml", "new.yaml"]
    assert early.synced


async def test_a_new_list_drops_what_the_stream_lost(
    nats_url: str,
) -> None:
    """The consumer disappears and the stream (max_msgs 4) drops messages past the watch's
    position: the watch lists again, and the cache keeps only what the new list has."""
    config = nats_test_config(nats_url)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(
        nats.js.api.StreamConfig(
            name=config.stream, subjects=[f"{config.subject_prefix}.>"], max_msgs=4
        )
    )
    sink = NatsSink(config)
    watch = watch_nats(
        nats_url, ["files"], stream=config.stream, subject_prefix=config.subject_prefix,
        fetch_timeout_s=0.5,
    )  # fmt: skip
    reflector = Reflector()
    items = aiter(reflector.reflect(watch))
    try:
        await sink.publish("files", object_events(["a", "b", "c"]))
        async with asyncio.timeout(30):
            while not reflector.synced:
                await anext(items)
        assert sorted(reflector.items("files")) == ["a", "b", "c"]
        assert watch.consumer_name is not None
        await js.delete_consumer(config.stream, watch.consumer_name)
        await sink.publish("files", object_events(["d", "e", "f", "g"], revision=2))
        await sink.publish("files", object_events(["a"], kind=Modified, revision=3, etag="e2"))
        before = reflector.changes
        async with asyncio.timeout(30):
            while not isinstance(await anext(items), Synced):
                pass
    finally:
        await watch.aclose()
        await sink.aclose()
        await js.delete_stream(config.stream)
        await nc.close()
    assert reflector.changes == before + 5  # e, f, g, a listed again, then Synced
    assert sorted(reflector.items("files")) == ["a", "e", "f", "g"]
    assert reflector.items("files")["a"].etag == "e2"


@pytest.mark.parametrize("fed", ["run", "reflect"])
async def test_feeding_from_a_real_watch(fed: str, nats_url: str) -> None:
    config = nats_test_config(nats_url)
    sink = NatsSink(config)
    await sink.publish("files", object_events(["a", "b"]))
    watch = watch_nats(
        nats_url, ["files"], stream=config.stream, subject_prefix=config.subject_prefix,
        durable="cache", fetch_timeout_s=0.5,
    )  # fmt: skip
    reflector = Reflector()

    async def feed() -> None:
        if fed == "run":
            await reflector.run(watch)
            return
        async for item in reflector.reflect(watch):
            if isinstance(item, Delivery):
                await item.ack()

    task = asyncio.create_task(feed())
    try:
        async with asyncio.timeout(30):
            await reflector.wait_synced()
            await sink.publish("files", object_events(["a"], kind=Removed, revision=2))
            await reflector.wait_for(lambda r: list(r.items("files")) == ["b"])
        nc = await nats.connect(nats_url)
        info = await nc.jetstream().consumer_info(config.stream, "cache")
        await nc.close()
        assert info.num_ack_pending == 0
    finally:
        await watch.aclose()
        await task
        await sink.aclose()
        nc = await nats.connect(nats_url)
        await nc.jetstream().delete_stream(config.stream)
        await nc.close()
