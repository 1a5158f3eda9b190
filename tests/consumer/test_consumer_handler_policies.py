"""run_handler's policies for long-running consumers, with a scripted broker: poison events
dead-lettered after ``max_attempts`` deliveries (and the fallback when that fails), events past
the bound dead-lettered unhandled, stale retries dropped, metrics. The same behaviour against
the real brokers is in ``test_consumer_contract.py``."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Self

from bridge.consumer import Delivery, EventHandler, run_handler
from bridge.consumer.base import WatchItem
from bridge.consumer.decoding import Envelope
from bridge.events import EventKind, Modified
from bridge.telemetry.metrics import ConsumerMetrics
from tests.support.scripted import envelope


class Broker:
    """A watch over scripted deliveries that counts attempts (a nak puts the delivery back at the
    end with ``attempt + 1``) and records acks, naks and dead letters in :attr:`log`."""

    def __init__(self, max_attempts: int | None, *, dead_letter_fails: int = 0) -> None:
        self.script: deque[Delivery] = deque()
        self.max_attempts = max_attempts
        self.dead_letter_fails = dead_letter_fails
        self.log: list[tuple[str, str, int]] = []
        self.errors: list[str] = []

    def delivery(self, env: Envelope, position: int, attempt: int = 1) -> Delivery:
        async def ack() -> None:
            self.log.append(("ack", env.key, attempt))

        async def nak(delay_s: float) -> None:
            self.log.append(("nak", env.key, attempt))
            self.script.append(self.delivery(env, position, attempt + 1))

        async def dead_letter(error: str) -> bool:
            if self.dead_letter_fails:
                self.dead_letter_fails -= 1
                self.log.append(("dead-letter failed", env.key, attempt))
                return False
            self.errors.append(error)
            self.log.append(("dead-letter", env.key, attempt))
            return True

        return Delivery(
            env,
            attempt=attempt,
            max_attempts=self.max_attempts,
            position=(position, 0),
            pending=len(self.script),
            _ack=ack,
            _nak=nak,
            _dead_letter=dead_letter,
        )

    def add(self, env: Envelope, position: int, attempt: int = 1) -> Self:
        self.script.append(self.delivery(env, position, attempt))
        return self

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> WatchItem:
        await asyncio.sleep(0)
        if not self.script:
            raise StopAsyncIteration
        return self.script.popleft()

    async def aclose(self) -> None:
        return None


class Failing(EventHandler[list[str]]):
    """Fails on the keys in ``failing`` (for ever, or ``times`` times each)."""

    def __init__(self, failing: dict[str, int]) -> None:
        self.failing = dict(failing)
        self.calls: list[tuple[str, str]] = []

    async def init(self) -> list[str]:
        return []

    async def handle_event(self, kind: EventKind, resource: Any, state: list[str]) -> list[str]:
        self.calls.append((resource.path, resource.etag))
        if self.failing.get(resource.path, 0) > 0:
            self.failing[resource.path] -= 1
            raise RuntimeError(f"cannot handle {resource.path}")
        return [*state, f"{resource.path}:{resource.etag}"]


def fast(handler: EventHandler[Any], watch: Broker, **options: Any) -> Any:
    return run_handler(handler, watch, initial_backoff_s=0, max_backoff_s=0, **options)


async def test_a_poison_event_is_dead_lettered_on_its_last_delivery() -> None:
    broker = Broker(max_attempts=3).add(envelope("a"), 1).add(envelope("b", revision=2), 2)
    metrics = ConsumerMetrics()
    state = await fast(Failing({"a": 99}), broker, metrics=metrics, consumer="ops")
    assert state == ["b:e1"]
    assert [entry for entry in broker.log if entry[1] == "a"] == [
        ("nak", "a", 1),
        ("nak", "a", 2),
        ("dead-letter", "a", 3),  # acknowledged by the dead letter, not naked again
    ]
    assert broker.errors == ["RuntimeError: cannot handle a"]
    labels = {"consumer": "ops", "source": "files"}
    assert metrics.value("consumer_dead_letters_total", **labels) == 1
    assert metrics.value("consumer_handler_failures_total", **labels) == 3
    assert metrics.value("consumer_redeliveries_total", **labels) == 2
    assert metrics.value("consumer_events_handled_total", **labels) == 1


async def test_without_a_bound_a_failing_event_is_naked_again() -> None:
    broker = Broker(max_attempts=None).add(envelope("a"), 1)
    await fast(Failing({"a": 7}), broker)
    assert [how for how, _key, _attempt in broker.log] == ["nak"] * 7 + ["ack"]


async def test_an_event_past_the_bound_is_dead_lettered_unhandled() -> None:
    broker = Broker(max_attempts=2).add(envelope("a"), 1, attempt=3)
    handler = Failing({})
    await fast(handler, broker)
    assert handler.calls == []
    assert broker.log == [("dead-letter", "a", 3)]
    assert "delivered 3 times without being settled" in broker.errors[0]


async def test_a_dead_letter_that_cannot_be_written_leaves_the_event_naked() -> None:
    broker = Broker(max_attempts=1, dead_letter_fails=1).add(envelope("a"), 1)
    await fast(Failing({"a": 99}), broker)
    assert broker.log == [
        ("dead-letter failed", "a", 1),
        ("nak", "a", 1),  # not lost: delivered again...
        ("dead-letter", "a", 2),  # ... past the bound, dead-lettered then
    ]


async def test_a_stale_retry_is_dropped_after_a_newer_event_of_its_item() -> None:
    v1 = envelope("a", etag="v1")
    v2 = envelope("a", Modified, etag="v2", revision=2)
    broker = Broker(max_attempts=None).add(v1, 1).add(v2, 2).add(envelope("b", revision=3), 3)
    handler = Failing({"a": 1})  # v1 fails once; its retry comes after v2
    metrics = ConsumerMetrics()
    state = await fast(handler, broker, metrics=metrics, consumer="ops")
    assert state == ["a:v2", "b:e1"]  # never v1 after v2
    assert handler.calls == [("a", "v1"), ("a", "v2"), ("b", "e1")]
    assert broker.log[-1] == ("ack", "a", 2)  # the retry, acknowledged unhandled
    assert metrics.value("consumer_stale_events_total", consumer="ops", source="files") == 1


async def test_a_retry_of_an_item_with_no_newer_event_is_handled() -> None:
    broker = Broker(max_attempts=None).add(envelope("a", etag="v1"), 5).add(envelope("b"), 6)
    handler = Failing({"a": 1})
    assert await fast(handler, broker) == ["b:e1", "a:v1"]


async def test_a_newer_event_failing_too_keeps_the_order() -> None:
    v1 = envelope("a", etag="v1")
    v2 = envelope("a", Modified, etag="v2", revision=2)
    broker = Broker(max_attempts=None).add(v1, 1).add(v2, 2)
    handler = Failing({"a": 2})  # both fail once; v1 comes back first, then v2
    assert await fast(handler, broker) == ["a:v1", "a:v2"]
