"""Observability against real servers: spans, the traceparent of events, /metrics, /readyz.

Spans are collected with OpenTelemetry's InMemorySpanExporter while a real bridge runs against
nats-server or redis-server; metrics and readiness are read over HTTP from the bridge's own
server. Conditions are polled with a deadline, never waited for with a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import redis.asyncio as aioredis
import yaml
from nats.js.api import DeliverPolicy
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from bridge.cloudevents import EventEncoder, header_value
from bridge.consumer import (
    Delivery,
    EventHandler,
    Watch,
    event_handler,
    run_handler,
    watch_nats,
    watch_redis,
)
from bridge.consumer.decoding import decode_structured
from bridge.events import Added, EventKind
from bridge.service.config import BridgeConfig, TracingConfig, parse_config
from bridge.service.delivery import SourceLoop
from bridge.service.runner import Bridge, build_source
from bridge.sinks.memory import MemorySink
from bridge.sources.stores import StoredObject
from bridge.state import MemoryStateStore
from bridge.telemetry import (
    HealthServer,
    JsonFormatter,
    Metrics,
    Readiness,
    Telemetry,
    Tracing,
    format_traceparent,
)
from bridge.telemetry.tracing import otlp_traces_endpoint
from tests.support.servers import LOOPBACK, NatsServer, RedisServer, free_port

DEADLINE_S = 60.0

# -- helpers --------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


async def until(condition: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after the deadline."""
    try:
        async with asyncio.timeout(DEADLINE_S):
            while True:  # polls something outside this event loop: no event to wait on
                if result := await condition():
                    break
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")
    return result


def finished(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def unique() -> str:
    return uuid.uuid4().hex[:10]


def nats_broker(url: str, tag: str, **extra: Any) -> dict[str, Any]:
    """A stream and subject prefix of this test's own."""
    return {"url": url, "stream": f"T{tag}", "subject_prefix": f"t{tag}.external", **extra}


def folder_source(path: Path, name: str = "files", *, create: bool = False) -> dict[str, Any]:
    local = {"path": str(path), "create": create}
    return {"name": name, "interval": 0.05, "max_backoff": 0.2, "local": local}


def failing_source(name: str = "bad") -> tuple[dict[str, Any], str]:
    """An HTTP source whose server refuses connections: every poll fails."""
    url = f"http://{LOOPBACK}:{free_port()}/secret-path/doc.json"
    return {"name": name, "interval": 0.05, "max_backoff": 0.1, "http": {"url": url}}, url


@contextlib.asynccontextmanager
async def running(config: BridgeConfig, **kwargs: Any) -> AsyncIterator[Bridge]:
    bridge = Bridge(config, shutdown_grace_s=1, **kwargs)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        yield bridge
    finally:
        stop.set()
        await task


async def server_url(bridge: Bridge) -> str:
    async def started() -> str | None:
        server = bridge.telemetry.server
        return server.url if server is not None else None

    url: str = await until(started, "the health server")
    return url


@contextlib.asynccontextmanager
async def http_client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        yield client


async def scrape(client: httpx.AsyncClient, base: str) -> dict[tuple[str, frozenset[Any]], float]:
    response = await client.get(f"{base}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def sample(samples: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def poll_span_of(exporter: InMemorySpanExporter, source: str) -> ReadableSpan:
    """The poll that found the change (the first poll span with changes)."""
    return next(
        s
        for s in finished(exporter, f"poll {source}")
        if (s.attributes or {}).get("koprs.poll.changes") not in (None, 0)
    )


async def handle_first(watch: Watch, provider: TracerProvider) -> None:
    """run_handler until the first event was handled (the handler then closes the watch)."""

    class First(EventHandler[None]):
        async def handle_delivery(self, delivery: Delivery, state: None) -> None:
            await watch.aclose()

    async with asyncio.timeout(DEADLINE_S):
        await run_handler(First(), watch, tracer=provider.get_tracer("test"))


# -- traces ---------------------------------------------------------------------------------


async def test_nats_spans_traceparent_and_consumer_span(
    nats_url: str, tmp_path: Path, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    tag = unique()
    (tmp_path / "a.txt").write_text("one")
    bad, _ = failing_source()
    config = parse_config(
        {"broker": nats_broker(nats_url, tag), "sources": [folder_source(tmp_path), bad]},
        env={},
    )
    telemetry = Telemetry.from_config(config, tracer_provider=provider)
    destination = f"t{tag}.external.files.*"
    async with running(config, telemetry=telemetry):

        async def published() -> list[ReadableSpan]:
            return finished(exporter, f"publish {destination}")

        (publish,) = await until(published, "the publish span")

        async def failed_poll() -> list[ReadableSpan]:
            return [
                s
                for s in finished(exporter, "poll bad")
                if s.status.status_code == StatusCode.ERROR
            ]

        failures = await until(failed_poll, "a failed poll span")

    poll = poll_span_of(exporter, "files")
    assert poll.kind == SpanKind.INTERNAL
    assert poll.attributes is not None
    assert poll.attributes["koprs.source.name"] == "files"
    assert poll.context is not None
    assert publish.context is not None

    # the publish span: a PRODUCER child of the poll, with the messaging attributes
    assert publish.kind == SpanKind.PRODUCER
    assert publish.parent is not None
    assert publish.parent.span_id == poll.context.span_id
    assert publish.context.trace_id == poll.context.trace_id
    assert publish.status.status_code == StatusCode.UNSET
    assert dict(publish.attributes or {}) == {
        "koprs.source.name": "files",
        "messaging.system": "nats",
        "messaging.destination.name": destination,
        "messaging.destination.template": f"t{tag}.external.files.{{item}}",
        "koprs.nats.stream": f"T{tag}",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.operation": "publish",
        "messaging.batch.message_count": 1,
    }

    # a failing poll: the error is recorded on its span
    failure = failures[0]
    assert failure.status.description
    assert "ConnectError" in failure.status.description
    assert [e.name for e in failure.events] == ["exception"]
    assert not finished(exporter, "publish t{tag}.external.bad.*")

    # a raw consumer sees the poll's trace context as ce-traceparent
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().subscribe(
            f"t{tag}.external.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        msg = await sub.next_msg(timeout=10)
        await sub.unsubscribe()
    finally:
        await nc.close()
    assert msg.headers is not None
    traceparent = header_value(msg.headers["ce-traceparent"])
    assert traceparent == format_traceparent(poll.context)
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (version, trace_id, span_id) == (
        "00",
        f"{poll.context.trace_id:032x}",
        f"{poll.context.span_id:016x}",
    )
    assert int(flags, 16) & 1  # sampled

    # the consumer continues the trace: a CONSUMER span, child of the poll span
    async with watch_nats(
        nats_url, ["files"], stream=f"T{tag}", subject_prefix=f"t{tag}.external"
    ) as watch:
        await handle_first(watch, provider)
    (process,) = finished(exporter, "process files")
    assert process.kind == SpanKind.CONSUMER
    assert process.context is not None
    assert process.context.trace_id == poll.context.trace_id
    assert process.parent is not None
    assert process.parent.span_id == poll.context.span_id
    attributes = process.attributes or {}
    assert attributes["messaging.system"] == "nats"
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["cloudevents.event_id"] == header_value(msg.headers["ce-id"])
    assert attributes["cloudevents.event_subject"] == "a.txt"


async def test_redis_structured_spans_and_consumer_span(
    redis_url: str, tmp_path: Path, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    (tmp_path / "a.txt").write_text("one")
    config = parse_config(
        {
            "broker": {"url": redis_url, "content_mode": "structured"},
            "sources": [folder_source(tmp_path)],
        },
        env={},
    )
    telemetry = Telemetry.from_config(config, tracer_provider=provider)
    async with running(config, telemetry=telemetry):

        async def published() -> list[ReadableSpan]:
            return finished(exporter, "publish koprs:external:files")

        (publish,) = await until(published, "the publish span")
    poll = poll_span_of(exporter, "files")
    assert poll.context is not None
    assert publish.parent is not None
    assert publish.parent.span_id == poll.context.span_id
    attributes = publish.attributes or {}
    assert attributes["messaging.system"] == "redis"
    assert attributes["messaging.destination.name"] == "koprs:external:files"
    assert attributes["messaging.batch.message_count"] == 1

    client = aioredis.from_url(redis_url)
    try:
        entries: Any = await client.xrange("koprs:external:files")
        ((_entry_id, fields),) = entries
    finally:
        await client.aclose()
    event = json.loads(fields[b"event"])
    assert event["traceparent"] == format_traceparent(poll.context)
    envelope = decode_structured(fields[b"event"])  # the envelope schema allows traceparent
    assert envelope.traceparent == event["traceparent"]

    async with watch_redis(redis_url, ["files"]) as watch:
        await handle_first(watch, provider)
    (process,) = finished(exporter, "process files")
    assert process.parent is not None
    assert process.parent.span_id == poll.context.span_id
    assert (process.attributes or {})["messaging.system"] == "redis"


async def test_a_failing_handler_is_recorded_on_its_consumer_span(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    encoder = EventEncoder("files", "file:///data")
    encoder.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    event = encoder.encode(Added(StoredObject("a.txt", "e1", 1, None)), 7)
    envelope = decode_structured(event.to_structured(), source_name="files")
    naks: list[float] = []

    async def nak(delay_s: float) -> None:
        naks.append(delay_s)

    class OneDelivery:
        async def __aiter__(self) -> AsyncIterator[Delivery]:
            yield Delivery(envelope, _nak=nak)

        async def aclose(self) -> None:
            return None

    @event_handler(None)
    async def broken(kind: EventKind, resource: Any, state: None) -> None:
        raise RuntimeError("handler bug")

    await run_handler(broken, OneDelivery(), tracer=provider.get_tracer("test"))
    assert len(naks) == 1
    (process,) = finished(exporter, "process files")
    assert process.status.status_code == StatusCode.ERROR
    assert [e.name for e in process.events] == ["exception"]
    assert process.parent is not None
    assert process.parent.span_id == 0xB7AD6B7169203331
    assert process.context is not None
    assert process.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C


async def test_tracing_off_puts_no_traceparent_and_ids_do_not_depend_on_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.txt").write_text("one")
    config = parse_config(
        {"broker": {"url": "nats://127.0.0.1:4222"}, "sources": [folder_source(tmp_path)]},
        env={},
    )
    telemetry = Telemetry.from_config(config)
    assert telemetry.tracing.provider is None
    assert telemetry.tracing.tracer is None
    sink = MemorySink()
    loop = SourceLoop(
        build_source(config.sources[0]),
        sink,
        MemoryStateStore(),
        telemetry=telemetry.source("files"),
    )
    await loop.restore()
    assert await loop.step() is None
    (event,) = sink.published["files"]
    assert event.traceparent is None
    assert "ce-traceparent" not in event.to_binary()[0]

    traced = EventEncoder("files", "file:///data")
    traced.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    plain = EventEncoder("files", "file:///data")
    change = Added(StoredObject("a.txt", "e1", 1, None))
    assert traced.encode(change, 5).id == plain.encode(change, 5).id
    assert traced.encode(change, 5).to_binary()[0]["ce-traceparent"] == traced.traceparent


def test_tracing_config_builds_an_sdk_provider_only_when_asked() -> None:
    assert Tracing.from_config(TracingConfig()).provider is None
    console = Tracing.from_config(TracingConfig(exporter="console", service_name="x"))
    assert isinstance(console.provider, TracerProvider)
    assert console.provider.resource.attributes["service.name"] == "x"
    console.shutdown()
    otlp = Tracing.from_config(
        TracingConfig(exporter="otlp", endpoint="http://127.0.0.1:4318", sample_ratio=0.5)
    )
    assert isinstance(otlp.provider, TracerProvider)
    assert "0.5" in otlp.provider.sampler.get_description()
    otlp.shutdown()
    assert otlp_traces_endpoint("http://c:4318") == "http://c:4318/v1/traces"
    assert otlp_traces_endpoint("http://c:4318/") == "http://c:4318/v1/traces"
    assert otlp_traces_endpoint("http://c:4318/custom/path") == "http://c:4318/custom/path"


async def test_otlp_exporter_sends_the_spans_to_the_collector(tmp_path: Path) -> None:
    """exporter: otlp posts protobuf spans to <endpoint>/v1/traces (flushed at shutdown)."""
    received: list[tuple[str, str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((LOOPBACK, 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        (tmp_path / "a.txt").write_text("one")
        config = parse_config(
            {
                "broker": {"url": "nats://127.0.0.1:4222"},
                "sources": [folder_source(tmp_path)],
                "tracing": {
                    "exporter": "otlp",
                    "endpoint": f"http://{LOOPBACK}:{server.server_address[1]}",
                    "service_name": "bridge-under-test",
                },
            },
            env={},
        )
        sink = MemorySink()
        async with running(config, sink=sink):
            async with asyncio.timeout(DEADLINE_S):
                await sink.wait_for(1)
        # the bridge flushed its spans when it stopped
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert received, "no OTLP request"
    path, content_type, body = received[0]
    assert path == "/v1/traces"
    assert content_type == "application/x-protobuf"
    assert b"bridge-under-test" in body
    assert b"poll files" in body
    (event,) = sink.published["files"]
    assert event.traceparent is not None


# -- metrics --------------------------------------------------------------------------------


async def test_metrics_follow_events_and_failures(nats_url: str, tmp_path: Path) -> None:
    tag = unique()
    (tmp_path / "a.txt").write_text("one")
    bad, bad_url = failing_source()
    config = parse_config(
        {
            "broker": nats_broker(nats_url, tag),
            "sources": [folder_source(tmp_path), bad],
            "server": {"host": LOOPBACK, "port": 0},
        },
        env={},
    )
    async with running(config) as bridge, http_client() as client:
        base = await server_url(bridge)

        async def scraped(check: Callable[[dict[tuple[str, frozenset[Any]], float]], bool]) -> Any:
            samples = await scrape(client, base)
            return samples if check(samples) else None

        def added(s: dict[tuple[str, frozenset[Any]], float]) -> bool:
            return (
                sample(s, "koprs_bridge_events_published_total", source="files", kind="added") == 1
                and sample(s, "koprs_bridge_poll_errors_total", source="bad") >= 2
                and sample(s, "koprs_bridge_poll_consecutive_failures", source="bad") >= 2
            )

        samples = await until(lambda: scraped(added), "the added event and two failed polls")
        assert sample(samples, "koprs_bridge_broker_connected") == 1
        assert sample(samples, "koprs_bridge_polls_total", source="files") >= 1
        assert sample(samples, "koprs_bridge_poll_errors_total", source="files") == 0
        assert sample(samples, "koprs_bridge_poll_consecutive_failures", source="files") == 0
        assert (
            sample(samples, "koprs_bridge_last_successful_poll_timestamp_seconds", source="files")
            > 1e9
        )
        assert (
            sample(samples, "koprs_bridge_last_successful_poll_timestamp_seconds", source="bad")
            == 0
        )
        assert sample(samples, "koprs_bridge_publish_duration_seconds_count", source="files") == 1
        assert sample(samples, "koprs_bridge_poll_duration_seconds_count", source="bad") >= 2
        assert sample(samples, "koprs_bridge_publish_errors_total", source="files") == 0
        assert (
            sample(samples, "koprs_bridge_events_published_total", source="bad", kind="added") == 0
        )

        (tmp_path / "a.txt").write_text("two, longer")

        def modified(s: dict[tuple[str, frozenset[Any]], float]) -> bool:
            return (
                sample(s, "koprs_bridge_events_published_total", source="files", kind="modified")
                == 1
            )

        await until(lambda: scraped(modified), "the modified event")
        (tmp_path / "a.txt").unlink()

        def removed(s: dict[tuple[str, frozenset[Any]], float]) -> bool:
            return (
                sample(s, "koprs_bridge_events_published_total", source="files", kind="removed")
                == 1
            )

        samples = await until(lambda: scraped(removed), "the removed event")
        assert sample(samples, "koprs_bridge_publish_duration_seconds_count", source="files") == 3
        text = (await client.get(f"{base}/metrics")).text
    # labels carry source names, kinds and rejection reasons only: no URL, host or path
    assert "secret-path" not in text
    assert bad_url not in text
    assert nats_url not in text
    assert str(tmp_path) not in text
    label_names = {
        name
        for family in text_string_to_metric_families(text)
        for s in family.samples
        for name in s.labels
    }
    assert label_names <= {"source", "kind", "reason", "le"}  # reason: a fixed set


def test_each_metrics_object_has_its_own_registry() -> None:
    one, two = Metrics(), Metrics()
    one.source("a").polls.inc()
    assert b'koprs_bridge_polls_total{source="a"} 1.0' in one.render()
    assert b'source="a"' not in two.render()


def test_source_series_are_exposed_as_prometheus_counters_gauges_and_histograms() -> None:
    metrics = Metrics()
    a = metrics.source("a")
    a.polls.inc()
    a.polls.inc()
    a.consecutive_failures.inc()
    a.consecutive_failures.set(0)
    a.events["added"].inc(3)
    a.rejected["too_large"].inc()
    for seconds in (0.001, 0.0011, 40.0):  # a bucket counts values up to its bound included
        a.poll_duration.observe(seconds)
    metrics.source("b").set_lease_held(True)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }
    assert samples[("koprs_bridge_polls_total", (("source", "a"),))] == 2
    assert samples[("koprs_bridge_poll_consecutive_failures", (("source", "a"),))] == 0
    added = (("kind", "added"), ("source", "a"))
    assert samples[("koprs_bridge_events_published_total", added)] == 3
    too_large = (("reason", "too_large"), ("source", "a"))
    assert samples[("koprs_bridge_items_rejected_total", too_large)] == 1
    bucket = "koprs_bridge_poll_duration_seconds_bucket"
    assert samples[(bucket, (("le", "0.001"), ("source", "a")))] == 1
    assert samples[(bucket, (("le", "0.0025"), ("source", "a")))] == 2
    assert samples[(bucket, (("le", "30.0"), ("source", "a")))] == 2
    assert samples[(bucket, (("le", "+Inf"), ("source", "a")))] == 3
    assert samples[("koprs_bridge_poll_duration_seconds_count", (("source", "a"),))] == 3
    assert samples[("koprs_bridge_poll_duration_seconds_sum", (("source", "a"),))] == pytest.approx(
        40.0021
    )
    assert samples[("koprs_bridge_lease_held", (("source", "b"),))] == 1
    assert ("koprs_bridge_lease_held", (("source", "a"),)) not in samples  # no election for a
    assert ("koprs_bridge_polls_created", (("source", "a"),)) in samples
    metrics.forget("a")
    assert b'source="a"' not in metrics.render()


# -- health ---------------------------------------------------------------------------------


async def test_readyz_follows_the_broker(
    nats_server: NatsServer, nats_url: str, tmp_path: Path
) -> None:
    config = parse_config(
        {
            "broker": nats_broker(nats_url, unique()),
            "sources": [folder_source(tmp_path)],
            "server": {"host": LOOPBACK, "port": 0},
        },
        env={},
    )
    async with running(config) as bridge, http_client() as client:
        base = await server_url(bridge)

        async def readyz(status: int) -> httpx.Response | None:
            response = await client.get(f"{base}/readyz")
            return response if response.status_code == status else None

        ready = await until(lambda: readyz(200), "ready")
        assert ready.json() == {
            "ready": True,
            "checks": {"config": True, "broker": True},
            "not_ready": [],
        }
        assert (await client.get(f"{base}/healthz")).status_code == 200

        nats_server.stop()
        try:
            down = await until(lambda: readyz(503), "not ready without the broker")
            assert down.headers["content-type"] == "application/json"
            assert down.json() == {
                "ready": False,
                "checks": {"config": True, "broker": False},
                "not_ready": ["broker"],
            }
            assert (await client.get(f"{base}/healthz")).status_code == 200
            samples = await scrape(client, base)
            assert sample(samples, "koprs_bridge_broker_connected") == 0
        finally:
            nats_server.start()
        await until(lambda: readyz(200), "ready again once the broker is back")
        samples = await scrape(client, base)
        assert sample(samples, "koprs_bridge_broker_connected") == 1


async def test_readyz_and_lease_gauge_with_leader_election(
    redis_server: RedisServer, redis_url: str, nats_url: str, tmp_path: Path
) -> None:
    config = parse_config(
        {
            "broker": nats_broker(nats_url, unique()),
            "leader_election": {"redis_url": redis_url, "lease_ttl": "2s"},
            "sources": [folder_source(tmp_path)],
            "server": {"host": LOOPBACK, "port": 0},
        },
        env={},
    )
    async with running(config) as bridge, http_client() as client:
        base = await server_url(bridge)

        async def state(status: int, lease: float) -> httpx.Response | None:
            response = await client.get(f"{base}/readyz")
            samples = await scrape(client, base)
            held = sample(samples, "koprs_bridge_lease_held", source="files")
            return response if response.status_code == status and held == lease else None

        ready = await until(lambda: state(200, 1), "ready, leading the source")
        assert ready.json()["checks"] == {"config": True, "broker": True, "leader_election": True}
        redis_server.stop()
        try:
            down = await until(lambda: state(503, 0), "not ready, lease lost, without Redis")
            assert down.json()["not_ready"] == ["leader_election"]
            samples = await scrape(client, base)
            assert sample(samples, "koprs_bridge_leader_election_connected") == 0
        finally:
            redis_server.start()
        await until(lambda: state(200, 1), "ready and leading again once Redis is back")


async def test_health_server_routes() -> None:
    readiness = Readiness(timeout_s=0.5)

    async def ok() -> bool:
        return True

    async def hangs() -> bool:
        await asyncio.Event().wait()
        return True

    readiness.add("fine", ok)
    metrics = Metrics()
    server = HealthServer(LOOPBACK, 0, readiness, metrics)
    await server.start()
    try:
        async with http_client() as client:
            base = server.url
            assert (await client.get(f"{base}/readyz?verbose=1")).status_code == 200
            head = await client.head(f"{base}/healthz")
            assert head.status_code == 200
            assert head.content == b""
            assert (await client.get(f"{base}/nope")).status_code == 404
            post = await client.post(f"{base}/healthz")
            assert post.status_code == 405
            assert post.headers["allow"] == "GET, HEAD"
            readiness.add("hung", hangs)
            response = await client.get(f"{base}/readyz")
            assert response.status_code == 503
            assert response.json()["not_ready"] == ["hung"]
    finally:
        await server.aclose()
    no_metrics = HealthServer(LOOPBACK, 0, readiness, None)
    await no_metrics.start()
    try:
        async with http_client() as client:
            assert (await client.get(f"{no_metrics.url}/metrics")).status_code == 404
    finally:
        await no_metrics.aclose()


# -- logs -----------------------------------------------------------------------------------


def test_json_log_lines_carry_the_trace(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, _ = spans
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.telemetry.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with provider.get_tracer("test").start_as_current_span("work") as span:
            logger.warning("source %r: %s", "files", "slow", extra={"attempt": 3})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    context = span.get_span_context()
    assert first["message"] == "source 'files': slow"
    assert first["level"] == "WARNING"
    assert first["logger"] == "test.telemetry.json"
    assert first["attempt"] == 3
    assert first["time"].endswith("Z")
    assert first["trace_id"] == f"{context.trace_id:032x}"
    assert first["span_id"] == f"{context.span_id:016x}"
    assert "trace_id" not in second
    assert "ValueError: boom" in second["exception"]


def test_run_logs_json_and_serves_health(nats_url: str, tmp_path: Path) -> None:
    """The command applies the config's logging section and starts the server."""
    port = free_port()
    config = {
        "broker": nats_broker(nats_url, unique()),
        "sources": [folder_source(tmp_path / "inbox", create=True)],
        "server": {"host": LOOPBACK, "port": port},
        "logging": {"format": "json", "level": "info"},
    }
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOPRS_BRIDGE")}
    process = subprocess.Popen(
        [sys.executable, "-m", "bridge", "run", "--config", str(path)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        with httpx.Client(trust_env=False, timeout=2) as client:
            deadline = time.monotonic() + DEADLINE_S
            while True:
                assert process.poll() is None, "koprs-bridge run exited early"
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"http://{LOOPBACK}:{port}/readyz").status_code == 200:
                        break
                assert time.monotonic() < deadline, "the server never became ready"
                time.sleep(0.05)
            assert client.get(f"http://{LOOPBACK}:{port}/healthz").status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert lines, "no log lines"
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    assert any("publishing 1 source(s)" in line["message"] for line in lines)
