"""The AsyncAPI 3.0 document of what a configured bridge publishes (``koprs-bridge asyncapi``).

One server (the broker; its URL shown with :func:`bridge.secrets.redact_url`, the host without
credentials), one channel per configured source, one ``send`` operation per channel and three
messages per channel (``added``, ``modified``, ``removed``):

* NATS: channel address ``<subject_prefix>.<source>.{item}``, where the ``item`` parameter is
  the item's key as a subject token (:func:`bridge.subjects.encode_item_token`);
* Redis: channel address ``koprs:external:<source>`` (a stream; every entry is one event).

Messages follow the configured content mode: ``binary`` carries the CloudEvent attributes as
``ce-*`` headers (NATS headers, or the entry's fields on Redis) and the ``data`` as payload;
``structured`` carries the whole CloudEvent as payload (``application/cloudevents+json``).
Every message also carries ``koprs-kind``, ``koprs-version`` and ``koprs-revision`` (NATS headers,
or entry fields on Redis, in both modes): outside the CloudEvent, what rebuilding a source's state
from the broker reads (:mod:`bridge.state.recovery`).
Payloads reference ``components.schemas``, which embeds the JSON Schemas of ``schemas/v1/``
(their ``$id`` kept, so a ``dataschema`` URI names them): ``http-resource`` for ``http:``
sources, ``stored-object`` for ``s3:`` and ``local:`` ones, and the envelope ``cloudevent``.
The v1 schema files use only keywords that mean the same in JSON Schema draft-07, so they are
embedded as AsyncAPI Schema Objects as they are (without their ``$schema`` line).
"""

from __future__ import annotations

import copy
import json
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from bridge.cloudevents import (
    DATA_CONTENT_TYPE,
    KIND_HEADER,
    REVISION_HEADER,
    SCHEMA_BASE_URI,
    VERSION_HEADER,
    event_type,
)
from bridge.events import EventKind
from bridge.schemas import load_schema
from bridge.secrets import redact_url
from bridge.service.config import BridgeConfig, BrokerConfig, SourceConfig
from bridge.sinks.nats import MSG_ID_HEADER, STRUCTURED_CONTENT_TYPE
from bridge.subjects import redis_stream_key

__all__ = ["ASYNCAPI_VERSION", "asyncapi_document", "render"]

ASYNCAPI_VERSION = "3.0.0"
KINDS: tuple[EventKind, ...] = ("added", "modified", "removed")
_ENVELOPE = "cloudevent"
_STATE = "state-headers"
_DATA_SCHEMA = {"http": "http-resource", "s3": "stored-object", "local": "stored-object"}
_SCHEMA_KEYS = {
    "cloudevent": "CloudEventV1",
    "http-resource": "HttpResourceV1",
    "stored-object": "StoredObjectV1",
    "custom-resource": "CustomResourceV1",
}
_MESSAGE_PREFIX = {
    "http-resource": "httpResource",
    "stored-object": "storedObject",
    "custom-resource": "customResource",
}
_SUMMARIES = {
    "added": "An item appeared (or existed when its source was first polled).",
    "modified": "An item changed: a new ETag or body digest.",
    "removed": "An item disappeared; the data is its last known state.",
}


def _schema_uri(name: str) -> str:
    return f"{SCHEMA_BASE_URI}v1/{name}.json"


def _embedded(name: str) -> dict[str, Any]:
    """A ``schemas/v1`` file as an AsyncAPI Schema Object (its ``$schema`` line dropped)."""
    schema = copy.deepcopy(load_schema(_schema_uri(name)))
    schema.pop("$schema", None)
    return schema


def asyncapi_document(config: BridgeConfig) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document (a JSON-ready dict) of what ``config`` publishes."""
    broker = config.broker
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    if broker.content_mode == "structured":
        schemas[_SCHEMA_KEYS[_ENVELOPE]] = _embedded(_ENVELOPE)
    for source in config.sources:
        data = _DATA_SCHEMA[source.kind]
        schemas.setdefault(_SCHEMA_KEYS[data], _embedded(data))
        refs: dict[str, Any] = {}
        for kind in KINDS:
            message_id = f"{_MESSAGE_PREFIX[data]}{kind.capitalize()}"
            messages.setdefault(message_id, _message(broker, kind, data))
            refs[kind] = {"$ref": f"#/components/messages/{message_id}"}
        channels[source.name] = _channel(broker, source, refs)
        operations[f"publish-{source.name}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{source.name}"},
            "title": f"Publish the changes of {source.name}",
            "summary": f"Every {source.interval_s:g} s the bridge polls {_origin(source)} "
            "and publishes what changed, once per change (deterministic ids, broker dedup).",
            "messages": [{"$ref": f"#/channels/{source.name}/messages/{kind}"} for kind in KINDS],
        }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "koprs-bridge events",
            "version": _version(),
            "description": (
                "CloudEvents 1.0 that koprs-bridge publishes for the sources of "
                f"{config.origin}: dev.koprs.external.{{added,modified,removed}}.v1, "
                f"{broker.content_mode} content mode. Item ids are deterministic, so a "
                "re-published event is dropped by the broker's deduplication."
            ),
        },
        "defaultContentType": DATA_CONTENT_TYPE,
        "servers": _servers(broker),
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def render(document: dict[str, Any], fmt: Literal["json", "yaml"] = "json") -> str:
    """The document as JSON (indented) or YAML text."""
    if fmt == "yaml":
        text: str = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
        return text
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _version() -> str:
    from bridge import __version__

    return __version__


# -- servers and channels -----------------------------------------------------------------------


def _servers(broker: BrokerConfig) -> dict[str, Any]:
    urls = [u.strip() for u in redact_url(broker.url.reveal()).split(",") if u.strip()]
    servers: dict[str, Any] = {}
    for index, url in enumerate(urls):
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2] or "localhost"
        what = (
            f"NATS JetStream, stream {broker.stream} (subjects {broker.subject_prefix}.>)"
            if broker.kind == "nats"
            else "Redis Streams, one stream per source (koprs:external:<source>)"
        )
        server: dict[str, Any] = {
            "host": host,
            "protocol": broker.kind,
            "title": f"{broker.kind} broker" + (f" {index + 1}" if len(urls) > 1 else ""),
            "description": f"{what}; URL {url} (credentials redacted).",
        }
        if parts.scheme in ("tls", "rediss"):
            server["description"] += " TLS."
        if broker.kind == "redis" and parts.path not in ("", "/"):
            server["pathname"] = parts.path
        servers[broker.kind if len(urls) == 1 else f"{broker.kind}-{index + 1}"] = server
    return servers


def _origin(source: SourceConfig) -> str:
    if source.http is not None:
        return redact_url(source.http.url)
    if source.s3 is not None:
        return f"s3://{source.s3.bucket}/{source.s3.prefix}"
    assert source.local is not None
    uri = source.local.path.absolute().as_uri()
    return uri + (f"/{source.local.prefix}" if source.local.prefix else "")


def _channel(broker: BrokerConfig, source: SourceConfig, refs: dict[str, Any]) -> dict[str, Any]:
    channel: dict[str, Any] = {"title": source.name}
    description = (
        f"Changes of source {source.name!r} ({source.kind}: {_origin(source)}), "
        f"data schema {_schema_uri(_DATA_SCHEMA[source.kind])}."
    )
    if broker.kind == "nats":
        channel["address"] = f"{broker.subject_prefix}.{source.name}.{{item}}"
        channel["description"] = (
            f"{description} One subject per item: subscribe to "
            f"{broker.subject_prefix}.{source.name}.> with DeliverPolicy.LAST_PER_SUBJECT for "
            f"the current state of every item. Nats-Msg-Id is the event id."
        )
        channel["parameters"] = {
            "item": {
                "description": (
                    "The item's key (the CloudEvent subject) as one subject token: the UTF-8 "
                    "bytes A-Z a-z 0-9 _ - as they are, every other byte as ~XX (uppercase hex); "
                    "a token over 200 characters is cut to 150 and ends in ~~ plus 32 hex "
                    "digits of the key's SHA-256 (bridge.subjects.encode_item_token)."
                ),
                "examples": ["configs~2Fapp~2Eyaml"],
            }
        }
    else:
        channel["address"] = redis_stream_key(source.name)
        channel["description"] = (
            f"{description} A Redis stream, trimmed by MAXLEN ~ {broker.maxlen}; the hash "
            f"{{{redis_stream_key(source.name)}}}:items maps each live item to the entry id of "
            "its latest event."
        )
    channel["messages"] = refs
    return channel


# -- messages -----------------------------------------------------------------------------------


def _message(broker: BrokerConfig, kind: EventKind, data: str) -> dict[str, Any]:
    data_ref = {"$ref": f"#/components/schemas/{_SCHEMA_KEYS[data]}"}
    message: dict[str, Any] = {
        "name": kind,
        "title": f"{kind.capitalize()} ({data.replace('-', ' ')})",
        "summary": _SUMMARIES[kind],
    }
    nats = broker.kind == "nats"
    if broker.content_mode == "binary":
        message["contentType"] = DATA_CONTENT_TYPE
        message["headers"] = _binary_headers(kind, data, nats=nats)
        message["payload"] = data_ref
        message["description"] = (
            "CloudEvents binary content mode: the attributes are ce-* "
            + ("headers" if nats else "fields of the stream entry, beside content-type")
            + ", percent-encoded like the CloudEvents HTTP binding (bridge.cloudevents."
            "header_value decodes them); the payload is the event's data"
            + ("." if nats else " (the entry's data field, JSON).")
        )
    else:
        message["contentType"] = STRUCTURED_CONTENT_TYPE
        if nats:
            message["headers"] = {
                "type": "object",
                "required": ["content-type", MSG_ID_HEADER, *_state_headers(kind)],
                "properties": {
                    "content-type": {"const": STRUCTURED_CONTENT_TYPE},
                    MSG_ID_HEADER: {
                        "type": "string",
                        "description": "The CloudEvent id (JetStream deduplication).",
                    },
                    **_state_headers(kind),
                },
            }
        else:
            message["headers"] = {
                "type": "object",
                "description": "The stream entry's fields beside event.",
                "required": list(_state_headers(kind)),
                "properties": _state_headers(kind),
            }
        message["payload"] = {
            "allOf": [
                {"$ref": f"#/components/schemas/{_SCHEMA_KEYS[_ENVELOPE]}"},
                {
                    "type": "object",
                    "properties": {
                        "type": {"const": event_type(kind)},
                        "dataschema": {"const": _schema_uri(data)},
                        "data": data_ref,
                    },
                },
            ]
        }
        message["description"] = "CloudEvents structured content mode (JSON event format)" + (
            "." if nats else ": the stream entry's one field, event."
        )
    return message


def _state_headers(kind: EventKind) -> dict[str, Any]:
    """The ``koprs-*`` headers (fields) of every message, from ``schemas/v1/state-headers.json``:
    what recovery reads."""
    properties: dict[str, Any] = copy.deepcopy(load_schema(_schema_uri(_STATE)))["properties"]
    properties[KIND_HEADER] = {"const": kind, "description": properties[KIND_HEADER]["description"]}
    assert set(properties) == {KIND_HEADER, VERSION_HEADER, REVISION_HEADER}
    return properties


def _binary_headers(kind: EventKind, data: str, *, nats: bool) -> dict[str, Any]:
    envelope = load_schema(_schema_uri(_ENVELOPE))
    attributes: dict[str, Any] = envelope["properties"]
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, schema in attributes.items():
        if name in ("data", "datacontenttype"):
            continue
        header = copy.deepcopy(schema)
        if name == "type":
            header = {"const": event_type(kind)}
        elif name == "dataschema":
            header = {"const": _schema_uri(data)}
        properties[f"ce-{name}"] = header
        if name in envelope["required"]:
            required.append(f"ce-{name}")
    properties["content-type"] = {"const": DATA_CONTENT_TYPE}
    required.append("content-type")
    properties.update(_state_headers(kind))
    required += _state_headers(kind)
    if nats:
        properties[MSG_ID_HEADER] = {
            "type": "string",
            "description": "Equal to ce-id: JetStream drops a copy published again.",
        }
        required.append(MSG_ID_HEADER)
    return {"type": "object", "required": required, "properties": properties}
