"""``koprs-bridge asyncapi``: the AsyncAPI 3.0 document of what a configured bridge publishes.

Documents are validated against the official AsyncAPI 3.0.0 JSON Schema (vendored in
``tests/data``, see its README), and what the real sinks put on the wire is validated against
the message schemas of the document, in both content modes, on both brokers.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import uuid
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, Literal

import jsonschema
import nats
import nats.js.errors
import pytest
import redis.asyncio as aioredis
import yaml

from bridge.asyncapi import asyncapi_document, render
from bridge.cli import main
from bridge.cloudevents import CloudEvent, EventEncoder
from bridge.events import Added, ExternalEvent, Modified, Removed
from bridge.schemas import load_schema
from bridge.service.config import BridgeConfig, parse_config
from bridge.sinks.nats import NatsSink, NatsSinkConfig
from bridge.sinks.redis import RedisSink, RedisSinkConfig
from bridge.sources.http import HttpResource
from bridge.sources.stores import StoredObject

OFFICIAL_SCHEMA = Path(__file__).parents[1] / "data" / "asyncapi-3.0.0.schema.json"
KINDS: list[type[ExternalEvent[Any]]] = [Added, Modified, Removed]
Mode = Literal["binary", "structured"]


@cache
def official() -> jsonschema.Draft7Validator:
    schema = json.loads(OFFICIAL_SCHEMA.read_text("utf-8"))
    assert schema["$id"] == "http://asyncapi.com/definitions/3.0.0/asyncapi.json"
    return jsonschema.Draft7Validator(schema)


def official_errors(document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in official().iter_errors(document)
    ]


def config(url: str, mode: str = "binary", **broker: Any) -> BridgeConfig:
    return parse_config(
        {
            "broker": {"url": url, "content_mode": mode, **broker},
            "sources": [
                {"name": "doc", "interval": 30, "http": {"url": "https://cfg.test/app.json?t=1"}},
                {"name": "files", "interval": 5, "local": {"path": "/srv", "create": True}},
                {"name": "bucket", "interval": "1m", "s3": {"bucket": "manifests", "prefix": "p/"}},
            ],
        },
        env={},
    )


BROKERS = {
    "nats": "nats://alice:s3cr3t@127.0.0.1:4222",
    "redis": "redis://:s3cr3t@127.0.0.1:6379/3",
}
CASES = [(kind, mode) for kind in BROKERS for mode in ("binary", "structured")]


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


# -- the document -------------------------------------------------------------------------------


@pytest.mark.parametrize(("broker", "mode"), CASES)
def test_document_is_valid_asyncapi_3(broker: str, mode: str) -> None:
    document = asyncapi_document(config(BROKERS[broker], mode))
    assert official_errors(document) == []
    assert document["asyncapi"] == "3.0.0"
    for ref in refs(document):
        resolve(document, ref)  # every reference points at something


@pytest.mark.parametrize("mutate", ["no-protocol", "v2-action", "unknown-message-key", "no-ref"])
def test_the_official_schema_catches_mistakes(mutate: str) -> None:
    """The validation above can fail: broken documents are refused."""
    document = copy.deepcopy(asyncapi_document(config(BROKERS["nats"])))
    if mutate == "no-protocol":
        del document["servers"]["nats"]["protocol"]
    elif mutate == "v2-action":
        document["operations"]["publish-doc"]["action"] = "publish"
    elif mutate == "unknown-message-key":
        document["components"]["messages"]["storedObjectAdded"]["messageId"] = "x"
    else:
        document["operations"]["publish-doc"]["channel"] = "doc"
    assert official_errors(document) != []


def test_channels_operations_and_messages_follow_the_config() -> None:
    document = asyncapi_document(config(BROKERS["nats"], subject_prefix="acme.ext"))
    channels = document["channels"]
    assert list(channels) == ["doc", "files", "bucket"]
    assert channels["files"]["address"] == "acme.ext.files.{item}"
    assert list(channels["files"]["parameters"]) == ["item"]
    expected_schema = {
        "doc": "HttpResourceV1",
        "files": "StoredObjectV1",
        "bucket": "StoredObjectV1",
    }
    for name, channel in channels.items():
        assert list(channel["messages"]) == ["added", "modified", "removed"]
        operation = document["operations"][f"publish-{name}"]
        assert operation["action"] == "send"
        assert resolve(document, operation["channel"]["$ref"]) is channel
        assert [m["$ref"] for m in operation["messages"]] == [
            f"#/channels/{name}/messages/{kind}" for kind in ("added", "modified", "removed")
        ]
        for kind, ref in channel["messages"].items():
            message = resolve(document, ref["$ref"])
            assert message["name"] == kind
            payload = resolve(document, message["payload"]["$ref"])
            assert payload is document["components"]["schemas"][expected_schema[name]]
            headers = message["headers"]["properties"]
            assert headers["ce-type"] == {"const": f"dev.koprs.external.{kind}.v1"}
            assert headers["ce-dataschema"] == {"const": payload["$id"]}
            assert "Nats-Msg-Id" in message["headers"]["required"]
    schemas = document["components"]["schemas"]
    assert (
        schemas["StoredObjectV1"]["$id"] == "https://koprs.dev/schemas/bridge/v1/stored-object.json"
    )
    assert (
        schemas["HttpResourceV1"]["properties"]
        == load_schema(schemas["HttpResourceV1"]["$id"])["properties"]
    )
    assert "$schema" not in schemas["HttpResourceV1"]


def test_redis_channels_are_the_streams() -> None:
    document = asyncapi_document(config(BROKERS["redis"], "structured"))
    assert {n: c["address"] for n, c in document["channels"].items()} == {
        "doc": "koprs:external:doc",
        "files": "koprs:external:files",
        "bucket": "koprs:external:bucket",
    }
    assert all("parameters" not in c for c in document["channels"].values())
    server = document["servers"]["redis"]
    assert (server["host"], server["protocol"], server["pathname"]) == (
        "127.0.0.1:6379",
        "redis",
        "/3",
    )
    message = document["components"]["messages"]["httpResourceRemoved"]
    assert message["contentType"] == "application/cloudevents+json"
    # the 'event' field is the payload; beside it only the koprs-* fields recovery reads
    assert sorted(message["headers"]["properties"]) == [
        "koprs-kind",
        "koprs-revision",
        "koprs-version",
    ]
    envelope, specific = message["payload"]["allOf"]
    assert resolve(document, envelope["$ref"])["$id"].endswith("/v1/cloudevent.json")
    assert specific["properties"]["type"] == {"const": "dev.koprs.external.removed.v1"}


@pytest.mark.parametrize(("broker", "mode"), CASES)
def test_secrets_are_redacted(broker: str, mode: str) -> None:
    document = asyncapi_document(config(BROKERS[broker], mode))
    for fmt in ("json", "yaml"):
        text = render(document, "yaml" if fmt == "yaml" else "json")
        assert "s3cr3t" not in text
        assert "t=1" not in text  # the HTTP source's query string may hold a token
        assert "***" in text
    (server,) = document["servers"].values()
    assert "@" not in server["host"]


def test_several_nats_urls_are_several_servers() -> None:
    url = "nats://a.test:4222,nats://Zq9secret@b.test:4223"
    document = asyncapi_document(config(url))
    assert [s["host"] for s in document["servers"].values()] == ["a.test:4222", "b.test:4223"]
    assert official_errors(document) == []
    assert "Zq9secret" not in render(document)


# -- the command ---------------------------------------------------------------------------------


def write_config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "bridge.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "broker": {"url": url},
                "sources": [{"name": "files", "interval": 1, "local": {"path": str(tmp_path)}}],
            }
        )
    )
    return path


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_command_prints_the_document(
    fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, BROKERS["redis"])
    assert main(["asyncapi", "--config", str(path), "--format", fmt]) == 0
    out = capsys.readouterr().out
    parsed = json.loads(out) if fmt == "json" else yaml.safe_load(out)
    assert official_errors(parsed) == []
    assert list(parsed["channels"]) == ["files"]
    assert "s3cr3t" not in out


def test_command_default_is_json_and_bad_config_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, BROKERS["nats"])
    assert main(["asyncapi", "--config", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["servers"]["nats"]["protocol"] == "nats"
    path.write_text("broker: {url: ftp://x}\nsources: []\n")
    assert main(["asyncapi", "--config", str(path)]) == 2
    assert "broker.url" in capsys.readouterr().err


# -- what the sinks publish matches the document -------------------------------------------------


def conforms(document: dict[str, Any], schema: dict[str, Any], instance: Any) -> None:
    """Validate ``instance`` against a schema of the document (its #/ references resolved)."""
    root = {"allOf": [schema], "components": document["components"]}
    jsonschema.Draft7Validator(root, format_checker=jsonschema.FormatChecker()).validate(instance)


def published_events() -> dict[str, list[CloudEvent]]:
    files = EventEncoder("files", "file:///srv")
    doc = EventEncoder("doc", "https://cfg.test/app.json")
    http = HttpResource("https://cfg.test/app.json", 200, b'{"a": 1}', '"e"', None, "text/json")
    return {
        "files": [
            files.encode(kind(StoredObject(f"dir/{kind.__name__} x.yaml", "e1", 3, None)), 5)
            for kind in KINDS
        ],
        "doc": [doc.encode(kind(http), 9) for kind in KINDS],
    }


def message_for(document: dict[str, Any], source: str, event: CloudEvent) -> dict[str, Any]:
    kind = event.type.split(".")[-2]
    ref = document["channels"][source]["messages"][kind]["$ref"]
    message: dict[str, Any] = resolve(document, ref)
    return message


def address_pattern(address: str) -> re.Pattern[str]:
    return re.compile(re.escape(address).replace(re.escape("{item}"), "[^.]+") + "$")


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_nats_wire_matches_the_document(mode: Mode, nats_url: str) -> None:
    tag = uuid.uuid4().hex[:12]
    stream, prefix = f"T{tag}", f"t{tag}.koprs.external"
    document = asyncapi_document(config(nats_url, mode, stream=stream, subject_prefix=prefix))
    events = published_events()
    sink = NatsSink(
        NatsSinkConfig(url=nats_url, stream=stream, subject_prefix=prefix, content_mode=mode)
    )
    nc = await nats.connect(nats_url)
    try:
        for source, batch in events.items():
            await sink.publish(source, batch)
        js = nc.jetstream()
        sub = await js.subscribe(f"{prefix}.>", ordered_consumer=True)
        try:
            msgs = [await sub.next_msg(timeout=10) for _ in range(6)]
        finally:
            await sub.unsubscribe()
        checked = 0
        for msg in msgs:
            source = msg.subject.split(".")[-2]
            assert address_pattern(document["channels"][source]["address"]).match(msg.subject)
            event_id = msg.headers["Nats-Msg-Id"] if msg.headers else ""
            event = next(e for e in events[source] if e.id == event_id)
            message = message_for(document, source, event)
            conforms(document, message["headers"], dict(msg.headers or {}))
            conforms(document, message["payload"], json.loads(msg.data))
            assert message["contentType"] == (msg.headers or {})["content-type"]
            checked += 1
        assert checked == 6
    finally:
        await sink.aclose()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(stream)
        await nc.close()


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_redis_wire_matches_the_document(mode: Mode, redis_url: str) -> None:
    document = asyncapi_document(config(redis_url, mode))
    events = published_events()
    sink = RedisSink(RedisSinkConfig(url=redis_url, content_mode=mode))
    client = aioredis.from_url(redis_url)
    try:
        for source, batch in events.items():
            await sink.publish(source, batch)
        checked = 0
        for source in events:
            address = document["channels"][source]["address"]
            entries: list[tuple[bytes, dict[bytes, bytes]]]
            entries = await client.xrange(address)  # type: ignore[assignment]
            assert len(entries) == 3
            for _, raw in entries:
                fields = {k.decode(): v.decode() for k, v in raw.items()}
                if mode == "structured":
                    assert next(iter(fields)) == "event"
                    payload = json.loads(fields.pop("event"))
                    event = next(e for e in events[source] if e.id == payload["id"])
                    message = message_for(document, source, event)
                    conforms(document, message["headers"], fields)
                else:
                    payload = json.loads(fields.pop("data"))
                    event = next(e for e in events[source] if e.id == fields["ce-id"])
                    message = message_for(document, source, event)
                    conforms(document, message["headers"], fields)
                conforms(document, message["payload"], payload)
                checked += 1
        assert checked == 6
    finally:
        await sink.aclose()
        await client.aclose()


def test_a_wrong_instance_is_refused_by_the_message_schemas() -> None:
    """The wire checks above can fail: a payload of the wrong schema is refused."""
    document = asyncapi_document(config(BROKERS["nats"]))
    event = published_events()["doc"][0]  # an HTTP event
    message = message_for(document, "files", event)  # ... checked as a stored object
    with pytest.raises(jsonschema.ValidationError):
        conforms(document, message["payload"], json.loads(event.data_bytes()))
    headers, _ = event.to_binary()
    with pytest.raises(jsonschema.ValidationError):
        conforms(document, message["headers"], {**headers, "Nats-Msg-Id": event.id})
