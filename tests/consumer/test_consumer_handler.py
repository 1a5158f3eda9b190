"""run_handler: Kubereq-style handlers; acknowledged only after success, retried with backoff.

The rules are checked with a scripted watch (a naked delivery comes back at the end of the
script); then against the real nats-server with a durable consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import nats
import nats.js.errors
import pytest

from bridge.consumer import (
    EventHandler,
    FunctionHandler,
    TerminateReason,
    event_handler,
    run_handler,
    watch_nats,
)
from bridge.consumer.base import Delivery, Synced
from bridge.errors import DecodeError
from bridge.events import EventKind, Modified, Removed
from bridge.sinks.nats import NatsSink, NatsSinkConfig
from bridge.sources.stores import StoredObject
from tests.support.events import nats_test_config, object_events
from tests.support.scripted import ScriptedWatch, envelope


class Recorder(EventHandler[list[str]]):
    """Records what it is called with; fails the first ``failures[key]`` times for a key."""

    def __init__(self, failures: dict[str, int] | None = None) -> None:
        self.failures = dict(failures or {})
        self.calls: list[tuple[str, str, str]] = []
        self.terminated: list[tuple[TerminateReason, list[str]]] = []
        self.synced: list[Synced] = []
        self.handled: list[str] = []
        self.progress = asyncio.Event()

    async def init(self) -> list[str]:
        return []

    async def handle_delivery(self, delivery: Delivery, state: list[str]) -> list[str]:
        self.calls.append((delivery.envelope.kind, delivery.envelope.key, delivery.envelope.id))
        return await super().handle_delivery(delivery, state)

    async def handle_event(self, kind: EventKind, resource: Any, state: list[str]) -> list[str]:
        assert isinstance(resource, StoredObject)
        progress, self.progress = self.progress, asyncio.Event()
        progress.set()
        if self.failures.get(resource.path, 0) > 0:
            self.failures[resource.path] -= 1
            raise RuntimeError(f"cannot handle {resource.path} yet")
        self.handled.append(f"{kind} {resource.path}")
        return [*state, f"{kind} {resource.path}"]

    async def handle_synced(self, synced: Synced, state: list[str]) -> list[str]:
        self.synced.append(synced)
        return [*state, "synced"]

    async def terminate(self, reason: TerminateReason, state: list[str]) -> None:
        self.terminated.append((reason, state))


# -- the rules --------------------------------------------------------------------------------


async def test_state_is_threaded_and_each_event_acknowledged_after_its_handler() -> None:
    a, b = envelope("a"), envelope("b", Removed, revision=2)
    watch = ScriptedWatch([]).add(a, initial=True).synced("files").add(b)
    acked_when_called: list[int] = []

    class Checking(Recorder):
        async def handle_event(self, kind: EventKind, resource: Any, state: list[str]) -> list[str]:
            acked_when_called.append(len(watch.settled))
            return await super().handle_event(kind, resource, state)

    handler = Checking()
    state = await run_handler(handler, watch)
    assert state == ["added a", "synced", "removed b"]
    assert watch.settled == [("ack", a.id, 0.0), ("ack", b.id, 0.0)]
    assert acked_when_called == [0, 1]  # not acknowledged before the handler returned
    assert handler.synced == [Synced(("files",))]
    assert handler.terminated == [("normal", state)]


async def test_a_failing_event_is_naked_with_backoff_never_acked_and_retried() -> None:
    a, b, c = envelope("a"), envelope("b", revision=2), envelope("c", revision=3)
    watch = ScriptedWatch([]).add(a).add(b).add(c)
    handler = Recorder(failures={"b": 4})
    state = await run_handler(handler, watch, initial_backoff_s=0.1, max_backoff_s=0.5)
    assert [how for how in watch.settled if how[1] == b.id] == [
        ("nak", b.id, 0.1),
        ("nak", b.id, 0.2),
        ("nak", b.id, 0.4),
        ("nak", b.id, 0.5),  # capped
        ("ack", b.id, 0.0),
    ]
    assert [how for how in watch.settled if how[1] != b.id] == [
        ("ack", a.id, 0.0),
        ("ack", c.id, 0.0),
    ]
    assert state == ["added a", "added c", "added b"]  # the failures left the state alone
    assert [call[1] for call in handler.calls] == ["a", "b", "c", "b", "b", "b", "b"]


async def test_backoff_is_per_event() -> None:
    b1, b2 = envelope("b"), envelope("b", Modified, etag="e2", revision=2)
    watch = ScriptedWatch([]).add(b1).add(b2)
    handler = Recorder(failures={"b": 3})  # b1 fails twice, then b2 once
    await run_handler(handler, watch, initial_backoff_s=1.0, max_backoff_s=8.0)
    assert watch.settled == [
        ("nak", b1.id, 1.0),
        ("nak", b2.id, 1.0),
        ("nak", b1.id, 2.0),
        ("ack", b2.id, 0.0),
        ("ack", b1.id, 0.0),
    ]


async def test_terminate_on_cancel_is_shutdown() -> None:
    watch = ScriptedWatch([], then_wait=True).add(envelope("a"))
    handler = Recorder()
    task = asyncio.create_task(run_handler(handler, watch))
    async with asyncio.timeout(10):
        while not handler.calls:
            await handler.progress.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert handler.terminated == [("shutdown", ["added a"])]


async def test_terminate_with_the_error_that_ended_the_watch() -> None:
    error = DecodeError("garbage")
    watch = ScriptedWatch([error]).add(envelope("a"))
    watch.script.rotate(-1)  # a first, then the error
    handler = Recorder()
    with pytest.raises(DecodeError, match="garbage"):
        await run_handler(handler, watch)
    assert handler.terminated == [(error, ["added a"])]


async def test_errors_in_synced_and_terminate_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Recorder):
        async def handle_synced(self, synced: Synced, state: list[str]) -> list[str]:
            raise RuntimeError("synced broke")

        async def terminate(self, reason: TerminateReason, state: list[str]) -> None:
            raise RuntimeError("terminate broke")

    watch = ScriptedWatch([]).add(envelope("a"), initial=True).synced().add(envelope("b"))
    state = await run_handler(Broken(), watch)
    assert state == ["added a", "added b"]
    assert "synced broke" in caplog.text
    assert "terminate broke" in caplog.text


async def test_function_handler_by_decorator() -> None:
    ended: list[tuple[TerminateReason, int]] = []

    async def on_end(reason: TerminateReason, count: int) -> None:
        ended.append((reason, count))

    @event_handler(0, terminate=on_end)
    async def count(kind: EventKind, resource: Any, seen: int) -> int:
        return seen + (kind != "removed")

    assert isinstance(count, FunctionHandler)
    watch = ScriptedWatch([]).add(envelope("a"), initial=True).synced()
    watch.add(envelope("b", revision=2)).add(envelope("a", Removed, revision=3))
    assert await run_handler(count, watch) == 2
    assert ended == [("normal", 2)]


async def test_handle_event_must_be_written() -> None:
    with pytest.raises(NotImplementedError, match="handle_event"):
        await EventHandler[None]().handle_event("added", None, None)
    assert await EventHandler[int | None]().init() is None


async def test_backoff_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="initial_backoff_s"):
        await run_handler(Recorder(), ScriptedWatch([]), initial_backoff_s=2, max_backoff_s=1)


# -- with nats-server -------------------------------------------------------------------------


@pytest.fixture
def config(nats_url: str) -> NatsSinkConfig:
    return nats_test_config(nats_url)


@pytest.fixture
async def sink(config: NatsSinkConfig) -> AsyncIterator[NatsSink]:
    made = NatsSink(config)
    await made.connect()
    try:
        yield made
    finally:
        await made.aclose()
        nc = await nats.connect(config.url)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(config.stream)
        await nc.close()


async def test_failed_events_come_back_from_the_server_until_handled(
    sink: NatsSink, config: NatsSinkConfig
) -> None:
    await sink.publish("files", object_events(["a", "b"]))
    watch = watch_nats(
        config.url, ["files"], durable="handler", stream=config.stream,
        subject_prefix=config.subject_prefix, fetch_timeout_s=0.5, ack_wait_s=30.0,
    )  # fmt: skip
    handler = Recorder(failures={"b": 2, "c": 1})
    task = asyncio.create_task(
        run_handler(handler, watch, initial_backoff_s=0.05, max_backoff_s=0.1)
    )
    try:
        async with asyncio.timeout(30):
            while "added b" not in handler.handled:
                await handler.progress.wait()
            await sink.publish("files", object_events(["c"], revision=2))
            while "added c" not in handler.handled:
                await handler.progress.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await watch.aclose()
    keys = [c[1] for c in handler.calls]
    assert keys == ["a", "b", "b", "b", "c", "c"]  # b and c delivered again after each failure
    assert len({c[2] for c in handler.calls if c[1] == "b"}) == 1  # the same event each time
    assert handler.terminated == [("shutdown", ["added a", "synced", "added b", "added c"])]
    nc = await nats.connect(config.url)
    try:
        info = await nc.jetstream().consumer_info(config.stream, "handler")
    finally:
        await nc.close()
    assert info.num_ack_pending == 0  # every event acknowledged once it was handled
    assert info.num_pending == 0
