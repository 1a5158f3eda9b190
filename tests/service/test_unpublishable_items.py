"""One item that cannot be published does not hold back the others (issue 12, item 3).

Each input on both brokers (real nats-server and redis-server): a file name that is not UTF-8
(published under its escaped key), S3 keys with control characters (published as they are),
an event over the broker's message size, data that fails its schema and a key that cannot be
encoded (each left out, named, counted, its state not committed, tried again at the next
poll, the rest delivered), and a batch the broker keeps refusing (the source is polled again,
so deleting the culprit resolves it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from bridge.cloudevents import CloudEvent
from bridge.schemas import load_schema
from bridge.service.delivery import SourceLoop, SourceSpec
from bridge.service.vetting import data_problem
from bridge.sinks import Sink
from bridge.sinks.memory import MemorySink
from bridge.sinks.nats import NatsSink
from bridge.sinks.redis import RedisSink, RedisSinkConfig
from bridge.sources.http import HttpPoller
from bridge.sources.objects import ObjectStorePoller
from bridge.sources.stores import LocalStore, StoredObject
from bridge.sources.stores.local import file_key, file_name
from bridge.state import MemoryStateStore
from bridge.telemetry.hooks import SourceTelemetry
from bridge.telemetry.metrics import Metrics
from bridge.watching import ExternalSource, WatchConfig
from tests.support.backends import Backend, make_store, nats_backend, redis_backend
from tests.support.events import nats_test_config
from tests.support.httpserver import Document, HttpTestServer
from tests.support.servers import NatsServer, S3Server

pytestmark = pytest.mark.servers

ADDED, MODIFIED, REMOVED = (f"dev.koprs.external.{k}.v1" for k in ("added", "modified", "removed"))
BROKERS = ["nats-binary", "nats-structured", "redis-binary", "redis-structured"]


@pytest.fixture(params=BROKERS)
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    kind: str = request.param
    if kind.startswith("nats-"):
        request.getfixturevalue("nats_url")
        made = await nats_backend(request.getfixturevalue("nats_server"), kind[5:])
    else:
        url = request.getfixturevalue("redis_url")
        made = await redis_backend(request.getfixturevalue("redis_server"), url, kind[6:])
    try:
        yield made
    finally:
        await made.sink.aclose()
        for close in made.closers:
            await close()


class Loop:
    """A source's delivery loop with its metrics, stepped by hand."""

    def __init__(
        self, source: ExternalSource, sink: Sink, *, name: str = "files", inline: int = 64 << 10
    ) -> None:
        self.name = name
        self.metrics = Metrics()
        telemetry = SourceTelemetry(name, metrics=self.metrics.source(name))
        spec = SourceSpec(
            name=name,
            source=source,
            watch=WatchConfig(1),
            source_uri="file:///test",
            max_inline_body_bytes=inline,
        )
        self.state = MemoryStateStore()
        self.loop = SourceLoop(spec, sink, self.state, telemetry=telemetry)
        self.restored = False

    async def step(self) -> Exception | None:
        if not self.restored:
            await self.loop.restore()
            self.restored = True
        return await self.loop.step()

    def rejected(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "koprs_bridge_items_rejected_total", {"source": self.name, "reason": reason}
        )
        return value or 0.0

    def committed(self) -> dict[str, str]:
        return self.state.checkpoints[self.name].state


def subjects(events: Sequence[dict[str, Any]]) -> list[str]:
    return sorted(event["subject"] for event in events)


class ListedStore:
    """An object store that lists what a test says (a custom store, with its mistakes)."""

    uri = "memory://listed"

    def __init__(self, objects: Sequence[StoredObject]) -> None:
        self.objects = list(objects)

    async def list(self, prefix: str = "") -> AsyncIterator[Sequence[StoredObject]]:
        yield sorted(self.objects, key=lambda o: o.path)


def valid(path: str, etag: str = "e1") -> StoredObject:
    return StoredObject(path, etag, 1, datetime(2024, 5, 1, tzinfo=UTC))


# -- names that are not UTF-8: published, reversibly --


async def test_a_file_name_that_is_not_utf8_is_published_under_its_escaped_key(
    tmp_path: Path, broker: Backend
) -> None:
    names = [b"a.json", b"b.json", b"c%.json", b"d.json", b"bad\xff.json", b"sub\xfe/x.json"]
    for name in names:
        path = tmp_path / os.fsdecode(name)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"{}")
    store = LocalStore(tmp_path)
    loop = Loop(ObjectStorePoller(store).with_name("files"), broker.sink)
    assert await loop.step() is None
    published = await broker.read("files")
    keys = ["a.json", "b.json", "bad%FF.json", "c%.json", "d.json", "sub%FE/x.json"]
    assert subjects(published) == keys
    assert sorted(event["data"]["path"] for event in published) == keys
    assert sorted(await broker.current("files")) == keys
    # reversible: each key names its file
    assert sorted(os.fsencode(file_name(key)) for key in keys) == sorted(names)
    await store.delete("bad%FF.json")
    assert not (tmp_path / os.fsdecode(b"bad\xff.json")).exists()
    assert await loop.step() is None
    assert [(e["type"], e["subject"]) for e in (await broker.read("files"))[6:]] == [
        (REMOVED, "bad%FF.json")
    ]


def test_file_keys_round_trip_and_leave_utf8_names_alone() -> None:
    for raw in [
        b"plain.txt",
        b"100%.txt",
        b"%C3%A9",
        "日本.txt".encode(),
        b"\xff%41\xfe",
        b"a\x80b",
    ]:
        name = os.fsdecode(raw)
        key = file_key(name)
        key.encode("utf-8")  # publishable
        assert os.fsencode(file_name(key)) == raw
    assert file_key("100%.txt") == "100%.txt"  # a UTF-8 name is its own key
    # the one ambiguity: a UTF-8 name that spells the escape of a name that is not
    assert file_key("%FF") == file_key(os.fsdecode(b"\xff")) == "%FF"
    assert os.fsencode(file_name("%FF")) == b"\xff"
    assert file_key(os.fsdecode(b"\xff%41")) == "%FF%2541"


async def test_a_folder_with_both_spellings_of_a_key_lists_it_once(tmp_path: Path) -> None:
    (tmp_path / os.fsdecode(b"x\xff")).write_bytes(b"1")
    (tmp_path / "x%FF").write_bytes(b"22")
    [page] = [page async for page in LocalStore(tmp_path).list()]
    assert [(o.path, o.size) for o in page] == [("x%FF", 1)]  # the one file_name names


# -- S3 keys with control characters: published as they are --


async def test_s3_keys_with_control_characters_are_published(
    s3_server: S3Server, s3_bucket: str, broker: Backend
) -> None:
    keys = ["ok.json", "ctl\x01\x1f.json", "nul\x00.json", "del\x7f.json", "tab\there\x1b[0m.json"]
    async with make_store(s3_server, s3_bucket) as store:
        for key in keys:
            await store.put(key, b"{}")
        loop = Loop(ObjectStorePoller(store).with_name("files"), broker.sink)
        assert await loop.step() is None
    assert subjects(await broker.read("files")) == sorted(keys)
    assert sorted(await broker.current("files")) == sorted(keys)


# -- events over the broker's message size --


def deep_path(root: Path) -> str:
    """A file whose key is about 3.8 KB long: its event is over 4 KiB in either content mode."""
    parts = ["d" * 250 for _ in range(15)]
    folder = root.joinpath(*parts)
    folder.mkdir(parents=True)
    (folder / "big.json").write_bytes(b"{}")
    return "/".join([*parts, "big.json"])


@pytest.fixture
def small_nats() -> Iterator[NatsServer]:
    server = NatsServer(config="max_payload: 4096\n")
    server.start()
    try:
        yield server
    finally:
        server.close()


def small_sink(kind: str, small_nats: NatsServer, redis_url: str) -> Sink:
    """A sink whose broker refuses messages over 4 KiB: nats-server's max_payload, or the Redis
    sink's own cap."""
    if kind == "nats":
        return NatsSink(nats_test_config(small_nats.url))
    return RedisSink(RedisSinkConfig(url=redis_url, max_event_bytes=4096, timeout_s=2.0))


@pytest.mark.parametrize("kind", ["nats", "redis"])
async def test_an_event_over_the_message_size_is_left_out_and_tried_again(
    tmp_path: Path,
    kind: str,
    small_nats: NatsServer,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = small_sink(kind, small_nats, redis_url)
    for name in "abcd":
        (tmp_path / f"{name}.json").write_bytes(b"{}")
    big = deep_path(tmp_path)
    recorded: list[CloudEvent] = []
    loop = Loop(ObjectStorePoller(LocalStore(tmp_path)).with_name("files"), sink)
    loop.loop.on_published = lambda _source, events: recorded.extend(events)
    try:
        with caplog.at_level(logging.DEBUG, "bridge.delivery"):
            assert await loop.step() is None
        assert sorted(e.subject for e in recorded) == [f"{n}.json" for n in "abcd"]
        assert loop.rejected("too_large") == 1
        assert big not in loop.committed()  # not committed: found again at the next poll
        [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert big in error.getMessage()
        assert "too_large" in error.getMessage()
        assert "4096 bytes" in error.getMessage()
        caplog.clear()
        with caplog.at_level(logging.DEBUG, "bridge.delivery"):
            assert await loop.step() is None  # tried again, refused again: logged once
        assert loop.rejected("too_large") == 2
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        (tmp_path / big).unlink()
        assert await loop.step() is None  # gone before it ever went out: nothing to say
        assert loop.rejected("too_large") == 2
        assert len(recorded) == 4
    finally:
        await sink.aclose()


@pytest.fixture
def small_redis_bulk(redis_url: str) -> Iterator[str]:
    """The Redis server with ``proto-max-bulk-len`` at its minimum, 1 MiB (restored after)."""
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_url)
    client.config_set("proto-max-bulk-len", "1mb")
    try:
        yield redis_url
    finally:
        client.config_set("proto-max-bulk-len", "512mb")
        client.close()


def http_sink(kind: str, nats_url: str, redis_url: str) -> Sink:
    if kind == "nats":  # the session server: max_payload 1 MiB, the default
        return NatsSink(nats_test_config(nats_url))
    # the server's proto-max-bulk-len is 1 MiB: the sink's cap says so
    return RedisSink(RedisSinkConfig(url=redis_url, timeout_s=5.0, max_event_bytes=1 << 20))


@pytest.mark.parametrize("kind", ["nats", "redis"])
async def test_an_inlined_body_over_the_brokers_limit_goes_out_without_it(
    kind: str, nats_url: str, small_redis_bulk: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``inline_body_bytes`` above the broker's limit: the event carries the digest and size
    only, as for a body over ``inline_body_bytes``, rather than failing its batch."""
    sink = http_sink(kind, nats_url, small_redis_bulk)
    recorded: list[CloudEvent] = []
    with HttpTestServer() as server:
        doc = Document(b"x" * 1_200_000, etag='"big"')
        url = server.route("/big", doc)
        async with HttpPoller(url).with_name("web").with_max_body_bytes(4 << 20) as poller:
            loop = Loop(poller, sink, name="web", inline=2 << 20)  # inline_body_bytes: 2 MiB
            loop.loop.on_published = lambda _source, events: recorded.extend(events)
            try:
                with caplog.at_level(logging.WARNING, "bridge.delivery"):
                    assert await loop.step() is None
                assert [(e.type, e.data["size"], e.data["body"]) for e in recorded] == [
                    (ADDED, 1_200_000, None)
                ]
                assert loop.rejected("too_large") == 0
                assert any("is not inlined" in r.getMessage() for r in caplog.records)
                doc.body, doc.etag = b'{"small": true}', '"small"'
                assert await loop.step() is None
                assert recorded[1].data["body"] == {"encoding": "utf-8", "data": '{"small": true}'}
            finally:
                await sink.aclose()


# -- data that fails its schema, keys that cannot be encoded --


async def test_data_failing_its_schema_and_unencodable_keys_are_left_out(
    broker: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    store = ListedStore(
        [
            valid("a"),
            valid("b"),
            valid("c"),
            StoredObject("no-etag", None, 1, None),  # type: ignore[arg-type]  # no id
            StoredObject("negative-size", "e1", -1, None),
            StoredObject("text-size", "e1", "1", None),  # type: ignore[arg-type]
            StoredObject("naive-time", "e1", 1, datetime(2024, 5, 1)),  # no UTC offset
            valid("lone\udcffsurrogate"),  # a custom store's undecoded name
        ]
    )
    loop = Loop(ObjectStorePoller(store).with_name("files"), broker.sink)
    with caplog.at_level(logging.ERROR, "bridge.delivery"):
        assert await loop.step() is None
    assert subjects(await broker.read("files")) == ["a", "b", "c"]
    assert (loop.rejected("invalid"), loop.rejected("unencodable")) == (3, 2)
    assert sorted(loop.committed()) == ["a", "b", "c"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for item in ("no-etag", "negative-size", "text-size", "naive-time", "lone\\udcffsurrogate"):
        assert item in logged
    # fixed at the source: published at the next poll
    fixed = ("a", "b", "c", "no-etag", "negative-size", "text-size", "naive-time")
    store.objects = [valid(path) for path in fixed]
    assert await loop.step() is None
    events = await broker.read("files")
    assert [(e["type"], e["subject"]) for e in events[3:]] == [
        (ADDED, "naive-time"),
        (ADDED, "negative-size"),
        (ADDED, "no-etag"),
        (ADDED, "text-size"),
    ]


BAD_DATA: dict[str, list[dict[str, Any]]] = {
    "stored-object": [
        {"path": "p", "etag": None, "size": 1, "last_modified": None},
        {"path": 1, "etag": "e", "size": 1, "last_modified": None},
        {"path": "p", "etag": "e", "size": -1, "last_modified": None},
        {"path": "p", "etag": "e", "size": True, "last_modified": None},
        {"path": "p", "etag": "e", "size": 1.5, "last_modified": None},
        {"path": "p", "etag": "e", "size": 1, "last_modified": "2024-05-01T12:00:00"},
        {"path": "p", "etag": "e", "size": 1, "last_modified": "yesterday"},
        {"path": "p", "etag": "e", "size": 1, "last_modified": "2024-05-01"},
        {"path": "p", "etag": "e", "size": 1, "last_modified": "x" * 19 + "+00:00"},
        {"path": "p", "etag": "e", "size": 1},
        {"path": "p", "etag": "e", "size": 1, "last_modified": None, "extra": 1},
    ],
    "http-resource": [
        {"status": 99},
        {"status": 600},
        {"status": "200"},
        {"etag": 5},
        {"digest": "md5:00"},
        {"size": -3},
        {"body": {"encoding": "gzip", "data": ""}},
        {"body": {"encoding": "utf-8"}},
        {"body": "text"},
    ],
    "custom-resource": [
        {"key": "k", "version": 1, "value": None},
        {"key": "k", "version": "v"},
    ],
}
GOOD_HTTP: dict[str, Any] = {
    "url": "https://example.test/x",
    "status": 200,
    "etag": None,
    "last_modified": None,
    "content_type": None,
    "digest": "sha256:" + "0" * 64,
    "size": 0,
    "body": {"encoding": "base64", "data": ""},
}
GOOD_DATA: dict[str, list[dict[str, Any]]] = {
    "stored-object": [
        {"path": "p", "etag": "e", "size": None, "last_modified": None},
        {"path": "p", "etag": "", "size": 0, "last_modified": "2024-05-01T12:00:00.5+02:00"},
        {"path": "p", "etag": "e", "size": 1, "last_modified": "2024-05-01T12:00:00Z"},
        {"path": "p", "etag": "e", "size": 1, "last_modified": "2024-05-01T12:00:00+00:00"},
        {"path": "p", "etag": "e", "size": 1, "last_modified": "2024-05-01T12:00:00.000001+00:00"},
    ],
    "http-resource": [GOOD_HTTP, {**GOOD_HTTP, "body": None, "size": None, "etag": '"x"'}],
    "custom-resource": [
        {"key": "k", "version": "v", "value": None},
        {"key": "k", "version": "v", "value": {"any": [1, 2.5]}},
    ],
}


@pytest.mark.parametrize("schema", sorted(BAD_DATA))
def test_the_written_out_checks_agree_with_the_schema_files(schema: str) -> None:
    uri = f"https://koprs.dev/schemas/bridge/v1/{schema}.json"
    validator = jsonschema.Draft202012Validator(
        load_schema(uri), format_checker=jsonschema.FormatChecker()
    )
    base = GOOD_DATA[schema][0]
    samples = [(d, True) for d in GOOD_DATA[schema]]
    samples += [
        ({**base, **d} if schema == "http-resource" else d, False) for d in BAD_DATA[schema]
    ]
    for data, ok in samples:
        assert validator.is_valid(data) is ok, data
        assert (data_problem(uri, data) is None) is ok, data


# -- a batch the broker keeps refusing: polled again, resolved at the source --


class UnawareNatsSink(NatsSink):
    """A NATS sink that does not know its server's max_payload (as with a limit the bridge
    cannot see): the oversized message fails the whole batch."""

    async def oversized(self, source_name: str, events: Sequence[CloudEvent]) -> dict[int, str]:
        return {}


class UnawareRedisSink(RedisSink):
    async def oversized(self, source_name: str, events: Sequence[CloudEvent]) -> dict[int, str]:
        return {}


@pytest.mark.parametrize("kind", ["nats", "redis"])
async def test_a_failing_batch_is_polled_again_so_a_change_at_the_source_resolves_it(
    kind: str, nats_url: str, small_redis_bulk: str
) -> None:
    if kind == "nats":  # max_payload 1 MiB: the server drops the connection
        sink: Sink = UnawareNatsSink(nats_test_config(nats_url, ack_timeout_s=1.0))
    else:  # proto-max-bulk-len 1 MiB: the server refuses the command
        sink = UnawareRedisSink(RedisSinkConfig(url=small_redis_bulk, timeout_s=5.0))
    recorded: list[CloudEvent] = []
    with HttpTestServer() as server:
        doc = Document(b"x" * 1_200_000, etag='"big"')
        url = server.route("/big", doc)
        async with HttpPoller(url).with_name("web").with_max_body_bytes(4 << 20) as poller:
            loop = Loop(poller, sink, name="web", inline=2 << 20)
            loop.loop.on_published = lambda _source, events: recorded.extend(events)
            try:
                assert await loop.step() is not None
                assert await loop.step() is not None  # polled again: still the same
                assert len(server.requests_to("/big")) == 2
                doc.body, doc.etag = b"{}", '"small"'
                assert await loop.step() is None  # polled again: resolved
                # Modified: for all the bridge knows, the big body may have gone out
                assert [(e.type, e.data["size"]) for e in recorded] == [(MODIFIED, 2)]
                assert loop.state.checkpoints["web"].intent is None
            finally:
                await sink.aclose()


async def test_rejected_items_of_a_replayed_intent_are_set_back(tmp_path: Path) -> None:
    """A batch that failed (maybe landed) is replayed; an item of its intent that is now too
    large is left out *and* set back to its state before the intent, so it is found again."""
    small, big = MemorySink(max_event_bytes=100_000), "x" * 2000
    store = ListedStore([valid("a"), valid(big)])
    loop = Loop(ObjectStorePoller(store).with_name("files"), small)
    small.fail_next(1)
    assert await loop.step() is not None  # the intent {a, big} is recorded, nothing landed
    small.max_event_bytes = 1000  # the limit changed: big no longer fits
    assert await loop.step() is None
    assert [e.subject for e in small.events("files")] == ["a"]
    assert sorted(loop.committed()) == ["a"]
    assert loop.state.checkpoints["files"].intent is None
    assert sorted(loop.loop.spec.source.state()) == ["a"]  # type: ignore[attr-defined]
    small.max_event_bytes = None
    assert await loop.step() is None
    assert [e.subject for e in small.events("files")] == ["a", big]
