"""``koprs-bridge tail`` as a subprocess against the real nats-server / redis-server.

Events are published with the real sinks; the test reads the command's stdout line by line,
then stops it with SIGINT (Ctrl-C) and expects exit status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest
import yaml

from bridge.cloudevents import CloudEvent, EventEncoder
from bridge.consumer.decoding import Envelope
from bridge.events import Added, ExternalEvent, Modified, Removed
from bridge.sinks.nats import NatsSink, NatsSinkConfig
from bridge.sinks.redis import RedisSink, RedisSinkConfig
from bridge.sources.http import HttpResource
from bridge.sources.stores import StoredObject
from bridge.tail import format_json, format_line
from tests.support.tailing import run_to_end, tail

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


def events(
    source: str, changes: list[tuple[type[ExternalEvent[Any]], str]], revision: int = 1
) -> list[CloudEvent]:
    encoder = EventEncoder(source, f"file:///srv/{source}", now=lambda: NOW)
    return [
        encoder.encode(kind(StoredObject(key, f"e-{kind.__name__}", 10 + i, None)), revision + i)
        for i, (kind, key) in enumerate(changes)
    ]


def write_config(tmp_path: Path, broker: dict[str, Any], names: list[str]) -> Path:
    path = tmp_path / "bridge.yaml"
    sources = [{"name": n, "interval": 1, "local": {"path": str(tmp_path)}} for n in names]
    path.write_text(yaml.safe_dump({"broker": broker, "sources": sources}))
    return path


# -- NATS ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def nats_sink(url: str, mode: str = "binary") -> AsyncIterator[NatsSink]:
    tag = uuid.uuid4().hex[:12]
    sink = NatsSink(
        NatsSinkConfig(
            url=url,
            stream=f"T{tag}",
            subject_prefix=f"t{tag}.koprs.external",
            content_mode="structured" if mode == "structured" else "binary",
        )
    )
    await sink.connect()  # creates the stream: tail needs it to subscribe
    try:
        yield sink
    finally:
        await sink.aclose()
        nc = await nats.connect(url)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(sink.config.stream)
        await nc.close()


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_nats_live_lines_for_the_configured_source(
    mode: str, nats_url: str, tmp_path: Path
) -> None:
    async with nats_sink(nats_url, mode) as sink:
        config = write_config(
            tmp_path,
            {
                "url": nats_url,
                "stream": sink.config.stream,
                "subject_prefix": sink.config.subject_prefix,
            },
            ["files", "other"],
        )
        await sink.publish("files", events("files", [(Added, "old")]))  # before: not shown
        async with tail("--config", str(config), "--source", "files") as t:
            await t.wait_ready()
            await sink.publish("other", events("other", [(Added, "elsewhere")]))
            await sink.publish(
                "files",
                events("files", [(Added, "a.yaml"), (Modified, "a.yaml"), (Removed, "b c")], 5),
            )
            lines = await t.lines(3)
            code, rest = await t.interrupt()
    assert code == 0
    assert rest == ""
    assert lines == [
        "2026-01-02T03:04:05.123456Z  added     files  a.yaml  size=10 etag=e-Added",
        "2026-01-02T03:04:05.123456Z  modified  files  a.yaml  size=11 etag=e-Modified",
        '2026-01-02T03:04:05.123456Z  removed   files  "b c"  size=12 etag=e-Removed',
    ]


async def test_nats_from_start_lists_then_follows_as_json(nats_url: str) -> None:
    async with nats_sink(nats_url) as sink:
        history = [
            (Added, "a"),
            (Added, "b"),
            (Removed, "b"),
            (Added, "c"),
            (Modified, "c"),
        ]
        published = events("files", history)
        await sink.publish("files", published)
        await sink.publish("web", events("web", [(Added, "page")]))
        args = ["--broker", nats_url, "--subject-prefix", sink.config.subject_prefix]
        async with tail(*args, "--from-start", "--json") as t:
            await t.wait_ready()
            listed = [json.loads(line) for line in await t.lines(4)]
            live = events("files", [(Removed, "a")], 50)
            await sink.publish("files", live)
            last = json.loads(await t.line())
            code, rest = await t.interrupt()
    assert code == 0
    assert rest == ""
    items = sorted((e["source_name"], e["key"], e["kind"], e["initial"]) for e in listed[:3])
    assert items == [
        ("files", "a", "added", True),
        ("files", "c", "modified", True),  # its latest event: the kind of its type
        ("web", "page", "added", True),
    ]
    c_line = next(e for e in listed if e["key"] == "c")
    assert c_line["id"] == published[4].id
    assert c_line["type"] == "dev.koprs.external.modified.v1"
    for line in listed[:3]:  # kind and type never contradict each other
        assert line["type"] == f"dev.koprs.external.{line['kind']}.v1"
    assert c_line["resource"] == {
        "path": "c",
        "etag": "e-Modified",
        "size": 14,
        "last_modified": None,
    }
    assert listed[3] == {"synced": []}
    assert (last["kind"], last["key"], last["initial"], last["id"]) == (
        "removed",
        "a",
        False,
        live[0].id,
    )
    assert last["type"] == "dev.koprs.external.removed.v1"


async def test_nats_without_a_stream_fails_with_a_message(nats_url: str, tmp_path: Path) -> None:
    prefix = f"none{uuid.uuid4().hex[:8]}.koprs.external"
    code, out, err = await asyncio.to_thread(
        run_to_end, "--broker", nats_url, "--subject-prefix", prefix
    )
    assert code == 1
    assert out == ""
    assert f"no JetStream stream captures {prefix}.>" in err
    config = write_config(tmp_path, {"url": nats_url, "stream": "NoSuchStream"}, ["files"])
    code, out, err = await asyncio.to_thread(run_to_end, "--config", str(config))
    assert code == 1
    assert out == ""
    assert "no JetStream stream NoSuchStream" in err


# -- Redis --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_redis_live_lines_of_every_existing_stream(
    mode: str, redis_url: str, tmp_path: Path
) -> None:
    sink = RedisSink(
        RedisSinkConfig(
            url=redis_url, content_mode="structured" if mode == "structured" else "binary"
        )
    )
    try:
        await sink.publish("files", events("files", [(Added, "before")]))
        await sink.publish("web", events("web", [(Added, "before")]))
        async with tail("--broker", redis_url) as t:  # discovers both streams
            await t.wait_ready()
            await sink.publish("web", events("web", [(Modified, "page one")], 9))
            first = await t.line()
            await sink.publish("files", events("files", [(Removed, "x/y.yaml")], 9))
            second = await t.line()
            code, rest = await t.interrupt()
    finally:
        await sink.aclose()
    assert code == 0
    assert rest == ""
    said = "".join(t.stderr)  # that a stream created later is not followed, and what to do
    assert "the streams that exist now are files, web" in said
    assert "name it with --source" in said
    assert (
        first == '2026-01-02T03:04:05.123456Z  modified  web  "page one"  size=10 etag=e-Modified'
    )
    assert (
        second == "2026-01-02T03:04:05.123456Z  removed   files  x/y.yaml  size=10 etag=e-Removed"
    )


async def test_redis_from_start_with_config(redis_url: str, tmp_path: Path) -> None:
    sink = RedisSink(RedisSinkConfig(url=redis_url))
    config = write_config(tmp_path, {"url": redis_url}, ["files", "empty"])
    try:
        await sink.publish("files", events("files", [(Added, "a"), (Added, "b"), (Removed, "a")]))
        async with tail("--config", str(config), "--from-start") as t:
            await t.wait_ready()
            listed = await t.lines(2)
            await sink.publish("files", events("files", [(Added, "z")], 20))
            live = await t.line()
            code, rest = await t.interrupt()
    finally:
        await sink.aclose()
    assert code == 0
    assert rest == ""
    assert listed == [
        "2026-01-02T03:04:05.123456Z  added     files  b  size=11 etag=e-Added  (initial)",
        "--- synced: the current state is above; live changes follow ---",
    ]
    assert live == "2026-01-02T03:04:05.123456Z  added     files  z  size=10 etag=e-Added"


async def test_redis_with_no_streams_and_no_source_fails(redis_url: str) -> None:
    code, out, err = await asyncio.to_thread(run_to_end, "--broker", redis_url)
    assert code == 1
    assert out == ""
    assert "--source" in err


def test_bad_arguments_exit_2() -> None:
    code, _, err = run_to_end("--broker", "ftp://example.test")
    assert code == 2
    assert "--broker must start with" in err
    code, _, err = run_to_end("--broker", "nats://127.0.0.1:1", "--source", "bad name")
    assert code == 2
    assert "--source" in err
    code, _, err = run_to_end()
    assert code == 2  # argparse: one of --config / --broker is required


# -- formatting ---------------------------------------------------------------------------------


def envelope(
    event: ExternalEvent[Any], key: str, source_name: str | None = "web", published: str = ""
) -> Envelope:
    return Envelope(
        event=event,
        id="0" * 32,
        type=f"dev.koprs.external.{published or event.kind}.v1",
        source="https://cfg.test/app.json",
        source_name=source_name,
        subject=key,
        time=NOW,
        dataschema="https://koprs.dev/schemas/bridge/v1/http-resource.json",
    )


def test_format_of_http_events_and_odd_keys() -> None:
    resource = HttpResource("https://cfg.test/app.json", 200, b"\xff\x00", '"e"', None, None)
    line = format_line(envelope(Modified(resource), "https://cfg.test/app.json"))
    assert line == (
        "2026-01-02T03:04:05.123456Z  modified  web  https://cfg.test/app.json  status=200 size=2 "
        f"digest=sha256:{resource.digest[:16]}"
    )
    odd = format_line(envelope(Added(resource), "line\nbreak"), initial=True)
    assert '  "line\\nbreak"  ' in odd
    assert odd.endswith("(initial)")
    data = json.loads(format_json(envelope(Added(resource), "k", source_name=None)))
    assert data["resource"]["body"] == {"encoding": "base64", "data": "/wA="}
    assert data["resource"]["size"] == 2
    assert data["source_name"] is None
    fields = re.split(r"\s{2,}", format_line(envelope(Added(resource), "k", source_name=None)))
    assert fields[2] == "https://cfg.test/app.json"


def test_an_initial_item_keeps_the_kind_of_its_type() -> None:
    """A watch lists an item whose latest event was a modification as ``Added``: tail shows
    the event as published (``modified``, its type) and marks it initial."""
    resource = HttpResource("https://cfg.test/app.json", 200, b"{}", '"e"', None, None)
    listed = envelope(Added(resource), "k", published="modified")
    data = json.loads(format_json(listed, initial=True))
    assert (data["kind"], data["type"], data["initial"]) == (
        "modified",
        "dev.koprs.external.modified.v1",
        True,
    )
    line = format_line(listed, initial=True)
    assert re.split(r"\s{2,}", line)[1] == "modified"
    assert line.endswith("(initial)")
    live = json.loads(format_json(envelope(Modified(resource), "k")))
    assert (live["kind"], live["initial"]) == ("modified", False)
