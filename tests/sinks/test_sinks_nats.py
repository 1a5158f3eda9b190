"""NatsSink specifics: the stream it creates or fixes, subjects, headers, outages.

The behaviour every sink shares is in ``test_sinks_contract.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import nats
import nats.js
import nats.js.api
import nats.js.errors
import pytest

from bridge.cloudevents import state_headers
from bridge.errors import ConfigError, PublishError
from bridge.events import Modified
from bridge.secrets import redact_url
from bridge.sinks.nats import NatsSink, NatsSinkConfig, subject_filter_covers
from bridge.subjects import decode_item_token, nats_subject
from tests.support.events import (
    SPECIAL_KEYS,
    decode_nats,
    expected,
    fetch_all,
    http_event,
    nats_test_config,
    object_events,
)
from tests.support.servers import NatsServer, free_port

pytestmark = pytest.mark.servers


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[nats.js.JetStreamContext]:
    nc = await nats.connect(nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.05)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


@pytest.fixture
def config(nats_url: str) -> NatsSinkConfig:
    return nats_test_config(nats_url)


@pytest.fixture
async def sink(config: NatsSinkConfig, js: nats.js.JetStreamContext) -> AsyncIterator[NatsSink]:
    made = NatsSink(config)
    try:
        yield made
    finally:
        await made.aclose()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(config.stream)


async def stream_config(
    js: nats.js.JetStreamContext, config: NatsSinkConfig
) -> nats.js.api.StreamConfig:
    return (await js.stream_info(config.stream)).config


async def message_count(js: nats.js.JetStreamContext, config: NatsSinkConfig) -> int:
    state = (await js.stream_info(config.stream)).state
    return int(state.messages)


async def read(js: nats.js.JetStreamContext, config: NatsSinkConfig) -> list[dict[str, Any]]:
    count = await message_count(js, config)
    msgs = await fetch_all(js, config.stream, f"{config.subject_prefix}.>", count)
    return [decode_nats(m) for m in msgs]


# -- the stream --


async def test_connect_creates_the_stream(
    sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    await sink.connect()
    created = await stream_config(js, config)
    assert created.subjects == [f"{config.subject_prefix}.>"]
    assert created.duplicate_window == 120
    assert created.max_msgs_per_subject == 16
    assert created.max_age == 0  # unlimited
    assert created.max_bytes == -1
    assert created.num_replicas == 1
    assert created.storage == nats.js.api.StorageType.FILE
    assert created.retention == nats.js.api.RetentionPolicy.LIMITS
    assert created.discard == nats.js.api.DiscardPolicy.OLD


async def test_configured_limits_are_applied(nats_url: str, js: nats.js.JetStreamContext) -> None:
    config = nats_test_config(
        nats_url,
        duplicate_window_s=30,
        max_age_s=3600,
        max_bytes=10_000_000,
        max_msgs_per_subject=None,
    )
    sink = NatsSink(config)
    try:
        await sink.connect()
        created = await stream_config(js, config)
        assert (created.duplicate_window, created.max_age) == (30, 3600)
        assert (created.max_bytes, created.max_msgs_per_subject) == (10_000_000, -1)
    finally:
        await sink.aclose()
        await js.delete_stream(config.stream)


async def test_existing_stream_with_other_limits_is_updated(
    sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    await js.add_stream(
        name=config.stream,
        subjects=[f"{config.subject_prefix}.>"],
        description="made by hand",
        duplicate_window=10,
        max_msgs_per_subject=1,
        max_age=7200,
        max_msg_size=1_000_000,
    )
    await sink.connect()
    updated = await stream_config(js, config)
    assert updated.duplicate_window == 120
    assert updated.max_msgs_per_subject == 16
    assert updated.max_age == 0
    # what the sink does not manage is kept
    assert updated.description == "made by hand"
    assert updated.max_msg_size == 1_000_000


async def test_existing_stream_gains_the_subject_filter(
    sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    other = f"{config.stream.lower()}-other.>"
    await js.add_stream(name=config.stream, subjects=[other], duplicate_window=120)
    await sink.connect()
    assert (await stream_config(js, config)).subjects == [other, f"{config.subject_prefix}.>"]

    events = object_events(["a"])
    await sink.publish("files", events)
    assert await read(js, config) == expected(events)


async def test_existing_stream_with_a_wider_filter_is_kept(
    sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    wider = config.subject_prefix.split(".")[0] + ".*.external.>"
    await js.add_stream(name=config.stream, subjects=[wider], duplicate_window=120)
    await sink.connect()
    assert (await stream_config(js, config)).subjects == [wider]


async def test_a_stream_the_server_cannot_make_is_a_clear_error(nats_url: str) -> None:
    sink = NatsSink(nats_test_config(nats_url, replicas=3))  # one server: no R3 stream
    try:
        with pytest.raises(PublishError, match=r"cannot create or update the stream") as caught:
            await sink.connect()
        assert sink.config.stream in str(caught.value)
    finally:
        await sink.aclose()


async def test_subjects_owned_by_another_stream_are_a_clear_error(
    sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    thief = f"{config.stream}_THIEF"
    await js.add_stream(name=thief, subjects=[f"{config.subject_prefix}.>"])
    try:
        with pytest.raises(PublishError, match=r"(?i)overlap"):
            await sink.connect()
    finally:
        await js.delete_stream(thief)


async def test_a_stream_deleted_meanwhile_is_created_again(
    sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    await sink.connect()
    await js.delete_stream(config.stream)
    events = object_events(["a", "b"])
    with pytest.raises(PublishError, match="2 of 2 events"):
        await sink.publish("files", events)
    await sink.publish("files", events)
    assert await read(js, config) == expected(events)


# -- messages --


async def test_one_subject_per_item(
    sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    events = object_events(SPECIAL_KEYS)
    await sink.publish("files", events)
    msgs = await fetch_all(js, config.stream, f"{config.subject_prefix}.>", len(events))
    assert [m.subject for m in msgs] == [
        nats_subject("files", key, config.subject_prefix) for key in SPECIAL_KEYS
    ]
    for msg, key in zip(msgs, SPECIAL_KEYS, strict=True):
        assert decode_item_token(msg.subject.rsplit(".", 1)[1]) in (key, None)


async def test_last_per_subject_is_the_current_state(
    sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    first = object_events(["a", "b", "c"])
    second = object_events(["b"], kind=Modified, revision=2, etag="e2")
    third = object_events(["b"], kind=Modified, revision=3, etag="e3")
    await sink.publish("files", first)
    await sink.publish("files", [*second, *third])

    msgs = await fetch_all(
        js,
        config.stream,
        f"{config.subject_prefix}.files.>",
        3,
        nats.js.api.DeliverPolicy.LAST_PER_SUBJECT,
    )
    latest = {event["subject"]: event for event in map(decode_nats, msgs)}
    assert latest == {
        "a": expected(first)[0],
        "b": expected(third)[0],
        "c": expected(first)[2],
    }


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_headers_of_each_content_mode(
    mode: str, nats_url: str, js: nats.js.JetStreamContext
) -> None:
    config = nats_test_config(nats_url, content_mode=mode)
    sink = NatsSink(config)
    event = http_event()
    try:
        await sink.publish("web", [event])  # connects by itself
        [msg] = await fetch_all(js, config.stream, f"{config.subject_prefix}.>", 1)
    finally:
        await sink.aclose()
        await js.delete_stream(config.stream)
    assert msg.headers is not None
    assert msg.headers["Nats-Msg-Id"] == event.id
    if mode == "binary":
        headers, body = event.to_binary()
        assert msg.headers == {**headers, "Nats-Msg-Id": event.id, **state_headers(event)}
        assert msg.data == body
    else:
        assert msg.headers == {
            "Nats-Msg-Id": event.id,
            "content-type": "application/cloudevents+json",
            **state_headers(event),
        }
        assert msg.data == event.to_structured()
    assert msg.headers["koprs-kind"] == "added"
    assert msg.headers["koprs-version"] == event.version
    assert msg.headers["koprs-revision"] == str(event.revision)
    assert decode_nats(msg) == expected([event])[0]


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_any_key_is_kept_exactly(
    mode: str, nats_url: str, js: nats.js.JetStreamContext
) -> None:
    keys = ["  padded  ", "line\nbreak", "cr\r\nlf\r", "tab\there", "50% off", "ünï"]
    config = nats_test_config(nats_url, content_mode=mode)
    sink = NatsSink(config)
    try:
        await sink.publish("files", object_events(keys))
        msgs = await fetch_all(js, config.stream, f"{config.subject_prefix}.>", len(keys))
    finally:
        await sink.aclose()
        await js.delete_stream(config.stream)
    assert [decode_nats(m)["subject"] for m in msgs] == keys
    assert [decode_item_token(m.subject.rsplit(".", 1)[1]) for m in msgs] == keys
    if mode == "binary":
        # the header travels percent-encoded: nothing the NATS client would strip or fold
        assert [(m.headers or {})["ce-subject"] for m in msgs] == [
            "%20%20padded%20%20",
            "line%0Abreak",
            "cr%0D%0Alf%0D",
            "tab%09here",
            "50%25%20off",
            "%C3%BCn%C3%AF",
        ]


async def test_a_negative_acknowledgement_fails_the_batch(
    sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    await sink.connect()
    current = await stream_config(js, config)
    await js.update_stream(current.evolve(max_msg_size=512))
    small = object_events(["small"])
    big = http_event(body=b"x" * 4096, source_name="files")
    with pytest.raises(
        PublishError, match=r"1 of 2 events .*first error, for item .*size"
    ) as caught:
        await sink.publish("files", [*small, big])
    assert config.stream in str(caught.value)
    assert repr(big.subject) in str(caught.value)  # names the item
    # the stream's new limit is read again: the delivery loop leaves such events out from now on
    assert list(await sink.oversized("files", [*small, big])) == [1]
    assert await read(js, config) == expected(small)  # the caller republishes: no duplicate
    await sink.publish("files", small)
    assert await message_count(js, config) == 1


# -- outages --


async def test_hanging_server_fails_within_the_ack_timeout(
    nats_server: NatsServer, sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    await sink.connect()
    events = object_events(["a", "b", "c"])
    nats_server.pause()
    try:
        with pytest.raises(PublishError, match=r"3 of 3 events .*no acknowledgement within"):
            await sink.publish("files", events)
    finally:
        nats_server.resume()
    await sink.publish("files", events)  # what landed meanwhile is dropped as a duplicate
    assert await read(js, config) == expected(events)


async def test_publish_after_a_server_restart(
    nats_server: NatsServer, sink: NatsSink, config: NatsSinkConfig, js: nats.js.JetStreamContext
) -> None:
    first = object_events(["a"])
    await sink.publish("files", first)
    nats_server.restart()
    second = object_events(["b"])
    await sink.publish("files", [*first, *second])  # the client rejoined; the stream persisted
    assert await read(js, config) == expected([*first, *second])


async def test_stopped_server_fails_the_publish(
    nats_server: NatsServer, sink: NatsSink, config: NatsSinkConfig
) -> None:
    await sink.connect()
    nats_server.stop()
    try:
        with pytest.raises(PublishError, match=r"not connected|not acknowledged"):
            await sink.publish("files", object_events(["a"]))
    finally:
        nats_server.start()


async def test_connect_to_a_dead_address_fails() -> None:
    sink = NatsSink(NatsSinkConfig(url=f"nats://127.0.0.1:{free_port()}", connect_timeout_s=1.0))
    with pytest.raises(PublishError, match="cannot connect"):
        await sink.connect()
    await sink.aclose()


# -- configuration --


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://alice:s3cret@nats.example:4222", "nats://alice:***@nats.example:4222"),
        ("nats://s3cret@nats.example:4222", "nats://***@nats.example:4222"),
        ("tls://nats.example:4222?token=s3cret", "tls://nats.example:4222"),
        (
            "nats://a:s3cret@one.example:4222,nats://a:s3cret@two.example:4222",
            "nats://a:***@one.example:4222,nats://a:***@two.example:4222",
        ),
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ],
)
def test_description_hides_credentials(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    sink = NatsSink(NatsSinkConfig(url=url, stream="S"))
    assert sink.description == f"{shown} stream S"
    assert "s3cret" not in repr(sink)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"content_mode": "xml"}, "content_mode"),
        ({"stream": "has.dot"}, "stream"),
        ({"subject_prefix": "a.*.b"}, "subject_prefix"),
        ({"subject_prefix": "a..b"}, "subject_prefix"),
        ({"ack_timeout_s": 0}, "ack_timeout_s"),
        ({"max_age_s": 60}, "max_age_s"),  # below the 120 s duplicate window
        ({"max_msgs_per_subject": 0}, "max_msgs_per_subject"),
        ({"replicas": 0}, "replicas"),
    ],
)
def test_invalid_config(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NatsSinkConfig(**settings)
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("pattern", "covers"),
    [
        ("koprs.external.>", True),
        (">", True),
        ("koprs.>", True),
        ("*.external.>", True),
        ("koprs.*.>", True),
        ("koprs.external.*", False),
        ("koprs.external", False),
        ("koprs.external.x.>", False),
        ("other.external.>", False),
        ("koprs.external.*.>", False),
    ],
)
def test_subject_filter_covers(pattern: str, covers: bool) -> None:
    assert subject_filter_covers(pattern, "koprs.external") is covers
