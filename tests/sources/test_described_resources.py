"""Resources describe their own event data (events.DescribedResource), so the CloudEvents
encoder needs to know no source."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from bridge.cloudevents import SCHEMA_BASE_URI, EventEncoder
from bridge.events import Added, DescribedResource, EventData
from bridge.sources.http import HttpResource
from bridge.sources.stores import StoredObject


def test_the_built_in_resources_describe_themselves() -> None:
    http = HttpResource("https://h/x", 200, b"\xff\x00", etag='"e"')
    described = http.event_data(max_inline_body_bytes=10)
    assert isinstance(http, DescribedResource)
    assert (described.key, described.version, described.schema) == (
        "https://h/x",
        http.version,
        "http-resource",
    )
    assert described.data["body"] == {"encoding": "base64", "data": "/wA="}
    assert http.event_data(max_inline_body_bytes=1).data["body"] is None  # described only
    stored = StoredObject("a/b", "etag", 3, datetime(2026, 1, 2, tzinfo=UTC))
    assert stored.event_data(0) == EventData(
        "a/b",
        "etag",
        "stored-object",
        {"path": "a/b", "etag": "etag", "size": 3, "last_modified": "2026-01-02T00:00:00+00:00"},
        plain=True,
    )


@dataclass(frozen=True)
class Reading:
    sensor: str
    celsius: float

    def event_data(self, max_inline_body_bytes: int) -> EventData:
        return EventData(self.sensor, f"{self.celsius}", "reading", {"celsius": self.celsius})


def test_the_encoder_uses_what_a_resource_says_of_itself() -> None:
    event = EventEncoder("s", "urn:s").encode(Added(Reading("t1", 21.5)), revision=1)
    assert (event.subject, event.dataschema) == ("t1", f"{SCHEMA_BASE_URI}v1/reading.json")
    assert event.data == {"celsius": 21.5}
    assert event.encoded_data is None  # not plain (a float): written by the standard library
    assert event.data_bytes() == b'{"celsius":21.5}'
