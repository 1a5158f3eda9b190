"""Bad input: sources that misbehave, malformed configs, malformed messages to the consumers.

Sources, at the service level (a :class:`Bridge` with one misbehaving source and one healthy HTTP
source, publishing to a :class:`MemorySink`): HTTP servers that answer garbage, hang (headers or
body trickled byte by byte past the timeout), send a body over ``max_body_bytes``, redirect in
loops, answer 5xx in bursts; S3 endpoints that answer ``AccessDenied``, ``NoSuchBucket`` or
``SlowDown`` (a small fake S3 server answering S3's XML error documents to the real aioboto3
client: moto does not produce denials or throttling). Each case must give

* a clear error in the logs: the message names the source, where it is (URL, bucket) and the
  problem;
* the same in the metrics (``koprs_bridge_poll_errors_total``,
  ``koprs_bridge_poll_consecutive_failures``);
* backoff: the engine's computed delays (the ``retrying in`` of each failure, from the log
  record's arguments, not wall time) double from the interval up to ``max_backoff``;
* no crash: the service task and the bad source's loop keep running;
* nothing lost elsewhere: the healthy source publishes every change made meanwhile.

Then configs the validation must reject with a message naming the file (or variable), key and
problem (the kinds ``tests/service/test_config.py`` does not cover), the schedule after very many
failures, and messages to the consumers (NATS and Redis) that are not koprs CloudEvents: each is
logged naming the stream, the message and the problem, and skipped; the watch goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest
import redis.asyncio

from bridge.cli import main as cli_main
from bridge.cloudevents import CloudEvent
from bridge.consumer import Delivery, NatsWatch, RedisWatch, Synced, watch_nats, watch_redis
from bridge.errors import ConfigError
from bridge.events import Added
from bridge.ha.keys import as_text
from bridge.service.config import load_config, parse_config
from bridge.service.delivery import SourceLoop, SourceSpec
from bridge.sinks.memory import MemorySink
from bridge.sinks.nats import NatsSink
from bridge.sinks.redis import RedisSink, RedisSinkConfig
from bridge.state import MemoryStateStore
from bridge.subjects import redis_stream_key
from bridge.watching import WatchConfig, watch_external_with_config
from tests.support.events import nats_test_config, object_events
from tests.support.httpserver import Exchange, HttpTestServer, Reply, version_of
from tests.support.servers import LOOPBACK
from tests.support.survival import (
    WAIT_S,
    assert_survives,
    bad_http,
    bad_s3,
    expected_delays,
    poll_failures,
    service,
)

# -- HTTP servers that misbehave below HTTP ---------------------------------------------------


Behaviour = Callable[[socket.socket, threading.Event], None]


class RawServer:
    """A TCP server on loopback that answers each connection with ``behaviour(conn, stop)``."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self._stop = threading.Event()
        self._sock = socket.create_server((LOOPBACK, 0))
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def url(self, path: str = "/doc") -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(5)
            conn.recv(65536)  # the request (small: a GET)
            self.behaviour(conn, self._stop)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join()


@contextlib.contextmanager
def raw_server(behaviour: Behaviour) -> Iterator[RawServer]:
    server = RawServer(behaviour)
    try:
        yield server
    finally:
        server.close()


def garbage(conn: socket.socket, stop: threading.Event) -> None:
    """Not HTTP at all: another protocol's greeting, then binary noise."""
    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff\xfe garbage \x07\r\n\r\n")


def silent(conn: socket.socket, stop: threading.Event) -> None:
    """Reads the request, never answers."""
    stop.wait(30)


def trickled_headers(conn: socket.socket, stop: threading.Event) -> None:
    """A status line, then one more header line every 50 ms: never the end of the headers."""
    conn.sendall(b"HTTP/1.1 200 OK\r\n")
    while not stop.wait(0.05):
        conn.sendall(b"X-Slow: 1\r\n")


def trickled_body(conn: socket.socket, stop: threading.Event) -> None:
    """Headers at once, then the 1 MB body announced one byte every 50 ms."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000000\r\n\r\n")
    while not stop.wait(0.05):
        conn.sendall(b"x")


# -- a fake S3 endpoint ------------------------------------------------------------------------


def s3_error(status: int, code: str, message: str) -> Callable[[Exchange], Reply]:
    """A responder answering every request with S3's XML error document."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>4442587FB7D0A2F9</RequestId><HostId>koprs-test</HostId></Error>"
    ).encode()
    return lambda _: Reply(status, body, {"Content-Type": "application/xml"})


async def test_http_garbage_instead_of_http(caplog: pytest.LogCaptureFixture) -> None:
    with raw_server(garbage) as server:
        async with service(bad_http(server.url())) as run:
            await assert_survives(
                run, caplog, where=server.url(), problem="RemoteProtocolError: illegal status line"
            )


@pytest.mark.parametrize("behaviour", [trickled_headers, trickled_body], ids=["headers", "body"])
async def test_http_trickling_past_the_timeout(
    behaviour: Behaviour, caplog: pytest.LogCaptureFixture
) -> None:
    """Each read gets a byte within the 0.3 s timeout, but the response never ends: the poll
    must still fail within about the timeout."""
    with raw_server(behaviour) as server:
        async with service(bad_http(server.url(), timeout="300ms")) as run:
            bad = await run.loop("bad")
            async with asyncio.timeout(3):  # ten times the timeout
                await bad.wait_for_steps(1)
            await assert_survives(run, caplog, where=server.url(), problem="timed out")


async def test_http_silent_server_times_out(caplog: pytest.LogCaptureFixture) -> None:
    """A server that reads the request and never answers: the read timeout fires."""
    with raw_server(silent) as server:
        async with service(bad_http(server.url(), timeout="300ms")) as run:
            # the read timeout or the whole request's deadline (both 0.3 s), whichever first
            await assert_survives(run, caplog, where=server.url(), problem="timed out")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_http_body_over_the_cap(chunked: bool, caplog: pytest.LogCaptureFixture) -> None:
    body = b"x" * 4096
    reply = Reply(200, chunks=[body[i : i + 512] for i in range(0, 4096, 512)]) if chunked else None
    with HttpTestServer() as server:
        url = server.route("/big", lambda _: reply or Reply(200, body))
        async with service(bad_http(url, max_body_bytes="1KiB")) as run:
            await assert_survives(
                run, caplog, where=url, problem="response body exceeds the cap of 1024 bytes"
            )


async def test_http_redirect_loop(caplog: pytest.LogCaptureFixture) -> None:
    with HttpTestServer() as server:
        url = server.route("/a", lambda _: Reply(302, headers={"Location": "/b"}))
        server.route("/b", lambda _: Reply(307, headers={"Location": "/a"}))
        async with service(bad_http(url)) as run:
            await assert_survives(run, caplog, where=url, problem="redirect loop")


async def test_http_redirect_chain_longer_than_allowed(caplog: pytest.LogCaptureFixture) -> None:
    with HttpTestServer() as server:
        for n in range(10):
            server.route(f"/r{n}", redirect_to(f"/r{n + 1}"))
        url = server.url("/r0")
        async with service(bad_http(url, max_redirects=3)) as run:
            await assert_survives(run, caplog, where=url, problem="more than 3 redirects")


async def test_http_5xx_bursts_back_off_and_recover(caplog: pytest.LogCaptureFixture) -> None:
    """503 three times, 200 (v1) twice, 500 three times, then 200 (v2): each burst backs off
    from the interval again, and both versions are published once."""
    script = [503] * 3 + [200] * 2 + [500] * 3
    lock = threading.Lock()

    def responder(_: Exchange) -> Reply:
        with lock:
            status = script.pop(0) if script else 200
            body = b'{"v": 1}' if script else b'{"v": 2}'
        return Reply(status, body if status == 200 else b"busy")

    with HttpTestServer() as server:
        url = server.route("/flaky", responder)
        async with service(bad_http(url)) as run:
            bad = await run.loop("bad")
            await run.healthy_delivers_every_change()
            await run.sink_has("bad", 2)
            async with asyncio.timeout(WAIT_S):
                await bad.wait_for_steps(bad.steps + 2)
            assert not run.task.done()
            consecutive = run.metric("koprs_bridge_poll_consecutive_failures", source="bad")
            errors = run.metric("koprs_bridge_poll_errors_total", source="bad")

    records = poll_failures(caplog, "bad")
    assert [(r.args[1], r.args[2]) for r in records] == [  # type: ignore[index]
        (n, pytest.approx(d)) for n, d in zip([1, 2, 3] * 2, expected_delays(3) * 2, strict=True)
    ]
    assert [
        f"answered HTTP {s}" in r.getMessage()
        for r, s in zip(records, [503] * 3 + [500] * 3, strict=True)
    ] == [True] * 6
    assert (errors, consecutive) == (6, 0)
    assert [(e.type.split(".")[-2], e.data["digest"]) for e in run.sink.published["bad"]] == [
        ("added", version_of(b'{"v": 1}')),
        ("modified", version_of(b'{"v": 2}')),
    ]


def redirect_to(location: str) -> Callable[[Exchange], Reply]:
    return lambda _: Reply(302, headers={"Location": location})


# -- S3 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "problem"),
    [
        (403, "AccessDenied", "access denied (AccessDenied)"),
        (404, "NoSuchBucket", "the bucket does not exist"),
        (503, "SlowDown", "SlowDown"),
    ],
    ids=["access-denied", "no-such-bucket", "slow-down"],
)
async def test_s3_errors(
    status: int, code: str, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    with HttpTestServer() as server:
        server.route("/bucket", s3_error(status, code, "from the fake S3 endpoint"))
        async with service(bad_s3(server.base_url)) as run:
            await assert_survives(
                run, caplog, where=f"bucket 'bucket' at {server.base_url}", problem=problem
            )
        assert {urlpath(e.path) for e in server.exchanges} == {"/bucket"}  # ListObjectsV2 only


def urlpath(path: str) -> str:
    return path.partition("?")[0]


# -- the schedule after very many failures -----------------------------------------------------


class Enough(Exception):
    """Raised by :class:`CountingClock` to end a watch."""


class CountingClock:
    """A clock that does not wait: it records each delay and calls ``on_limit`` after
    ``limit`` of them."""

    def __init__(self, limit: int, on_limit: Callable[[], None]) -> None:
        self.now = 0.0
        self.delays: list[float] = []
        self.limit = limit
        self.on_limit = on_limit

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.now += seconds
        if len(self.delays) >= self.limit:
            self.on_limit()
        await asyncio.sleep(0)


async def drain(watch: AsyncIterator[Any]) -> None:
    async with asyncio.timeout(WAIT_S):
        async for _ in watch:  # never yields: the source always fails
            pass


class AlwaysDown:
    name = "down"

    async def poll(self) -> list[Any]:
        raise OSError("connection refused")


async def test_backoff_survives_thousands_of_failures_in_a_row(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """2**1024 overflows a float: after 1024 failures in a row (17 minutes of a source polled
    every second with ``max_backoff: 1s``) the schedule must still answer the ceiling."""
    caplog.set_level(logging.ERROR, logger="bridge.watch")  # 2000 warnings are not the point
    spec = SourceSpec(
        name="down", source=AlwaysDown(), watch=WatchConfig(1, 1), source_uri="test://down"
    )
    loop: SourceLoop

    def stop() -> None:
        loop.stop()

    clock = CountingClock(2000, stop)
    loop = SourceLoop(spec, MemorySink(), MemoryStateStore(), clock=clock)
    async with asyncio.timeout(WAIT_S):
        await loop.run()  # returns when stopped; an exception here is the bug
    assert clock.delays == [1.0] * 2000

    def enough() -> None:
        raise Enough

    watch_clock = CountingClock(2000, enough)
    watch = watch_external_with_config(AlwaysDown(), WatchConfig(1, 1), clock=watch_clock)
    with pytest.raises(Enough):  # an OverflowError here is the bug
        await drain(watch)
    assert watch_clock.delays == [1.0] * 2000


# -- malformed configs -------------------------------------------------------------------------

BASE = "broker: {url: 'nats://127.0.0.1:4222'}\n"
LOCAL = "{name: a, interval: 1, local: {path: /}}"

BAD_CONFIGS = [
    ("", "missing required key(s) broker, sources"),
    ("just a string\n", "the top level must be a mapping, not a string"),
    (BASE + "sources: {name: a}\n", "sources: must be a non-empty list of sources"),
    (BASE + "sources: [a]\n", "sources[0]: must be a mapping, not a string"),
    (BASE + "sources: [{name: 5, interval: 1, local: {path: /}}]\n", "sources[0].name: must be a string, not a number"),
    (BASE + f"sources: [{{name: {'x' * 65}, interval: 1, local: {{path: /}}}}]\n", "use 1-64 characters"),
    (BASE + "sources: [{name: a, interval: -5s, local: {path: /}}]\n", "sources[0].interval: must be a duration"),
    (BASE + "sources: [{name: a, interval: .nan, local: {path: /}}]\n", "sources[0].interval: must be > 0, got nan"),
    (BASE + "sources: [{name: a, interval: 0.0000001, local: {path: /}}]\n", "sources[0].interval: must be at least 1ms"),
    (BASE + "sources: [{name: a, interval: .inf, local: {path: /}}]\n", "sources[0].interval: must be finite, got inf"),
    (BASE + "sources: [{name: a, interval: 1, max_backoff: .inf, local: {path: /}}]\n", "sources[0].max_backoff: must be finite"),
    (BASE + "sources: [{name: a, interval: [1], local: {path: /}}]\n", "sources[0].interval: must be a duration"),
    (BASE + "sources: [{name: a, interval: 1, inline_body_bytes: true, local: {path: /}}]\n", "sources[0].inline_body_bytes: must be a size in bytes"),
    (BASE + "sources: [{name: a, interval: 1, http: {url: 'http://h/x', max_body_bytes: 0}}]\n", "sources[0].http.max_body_bytes: must be > 0"),
    (BASE + "sources: [{name: a, interval: 1, http: {url: 'http://h/x', max_body_bytes: 1.5MiB}}]\n", "sources[0].http.max_body_bytes: must be a size in bytes"),
    (BASE + "sources: [{name: a, interval: 1, http: {url: 'http://h/x', timeout: 0}}]\n", "sources[0].http.timeout: must be > 0"),
    (BASE + "sources: [{name: a, interval: 1, http: {url: 'http://h/x', max_redirects: -1}}]\n", "sources[0].http.max_redirects: must be an integer >= 0"),
    (BASE + "sources: [{name: a, interval: 1, http: {url: 'http://h/x', headers: [X]}}]\n", "sources[0].http.headers: must be a mapping of header names to values"),
    (BASE + "sources: [{name: a, interval: 1, http: {url: 'http://h/x', headers: {'Bad Name': v}}}]\n", "sources[0].http.headers.Bad Name: is not a valid HTTP header name"),
    (BASE + "sources: [{name: a, interval: 1, http: {url: 'http://h/x', headers: {X: [1, 2]}}}]\n", "sources[0].http.headers.X: must be a string, {env: VARIABLE} or {file: /path/to/file}"),
    (BASE + "sources: [{name: a, interval: 1, http: {url: 'http://h/x', verify_tls: /nonexistent/ca.pem}}]\n", "sources[0].http.verify_tls: CA bundle '/nonexistent/ca.pem' does not exist"),
    (BASE + "sources: [{name: a, interval: 1, http: {url: 'http://h/x', bearer_token: {file: /nonexistent/token}}}]\n", "sources[0].http.bearer_token: cannot read secret file '/nonexistent/token'"),
    (BASE + "sources: [{name: a, interval: 1, s3: {bucket: bkt, endpoint_url: 'ftp://x'}}]\n", "sources[0].s3.endpoint_url: must be an http:// or https:// URL"),
    (BASE + "sources: [{name: a, interval: 1, s3: {bucket: bkt, colour: red}}]\n", "sources[0].s3: unknown key(s) colour"),
    (BASE + "sources: [{name: a, interval: 1, local: {path: /, create: yes please}}]\n", "sources[0].local.create: must be true or false"),
    ("broker: {url: ''}\nsources: [" + LOCAL + "]\n", "broker.url: must not be empty"),
    ("broker: {url: 'nats://x', ack_timeout: -1}\nsources: [" + LOCAL + "]\n", "broker.ack_timeout: must be > 0"),
    ("broker: {url: 'nats://x', stream: a.b}\nsources: [" + LOCAL + "]\n", "broker.stream: must be 1-64 characters"),
    ("broker: {url: 'nats://x', replicas: 2.5}\nsources: [" + LOCAL + "]\n", "broker.replicas: must be an integer >= 1"),
    ("broker: {url: {env: ''}}\nsources: [" + LOCAL + "]\n", "broker.url: must be a string, {env: VARIABLE} or {file: /path/to/file}"),
    (BASE + "leader_election: {redis_url: 'http://x'}\nsources: [" + LOCAL + "]\n", "leader_election.redis_url: must start with redis://, rediss://, redis+cluster://"),
    (BASE + "leader_election: {redis_url: 'redis://x', lease_ttl: 0}\nsources: [" + LOCAL + "]\n", "leader_election.lease_ttl: must be > 0"),
    (BASE + "state: {path: 5}\nsources: [" + LOCAL + "]\n", "state.path: must be a string, not a number"),
    (BASE + "sources: [" + LOCAL + "]\nsources_typo: []\n", "(top level): unknown key(s) sources_typo"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS, ids=[m[:60] for _, m in BAD_CONFIGS])
def test_malformed_config_names_file_key_and_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).startswith(f"{path}:"), str(caught.value)
    assert message in str(caught.value)


def test_config_file_that_is_not_utf8_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_bytes(b"broker: {url: 'nats://x'}\nsources: []\n# caf\xe9 in Latin-1\n")
    with pytest.raises(ConfigError, match=r"not a text file in UTF-8 \(byte \d+"):
        load_config(path, env={})
    assert cli_main(["check", "--config", str(path)]) == 2  # a message, not a traceback
    assert "not a text file in UTF-8" in capsys.readouterr().err


def test_config_path_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path, env={})


def test_environment_override_that_is_not_yaml_names_the_variable() -> None:
    raw = {"broker": {"url": "nats://x"}, "sources": [{"name": "a", "interval": 1, "local": {"path": "/"}}]}  # fmt: skip
    with pytest.raises(ConfigError, match="environment variable KOPRS_BRIDGE__SOURCES__0__INTERVAL: its value is not a valid YAML"):  # fmt: skip
        parse_config(raw, env={"KOPRS_BRIDGE__SOURCES__0__INTERVAL": "[unclosed"})


# -- malformed messages to the consumers -------------------------------------------------------


def good_events(keys: Sequence[str], revision: int) -> list[CloudEvent]:
    return object_events(keys, kind=Added, revision=revision)


def malformed_binary() -> list[tuple[str, dict[str, str], bytes, str]]:
    """(item token, headers, body, the problem the log must name) of bad NATS messages."""
    [event] = object_events(["x"], revision=99)
    headers, body = event.to_binary()
    wrong_type = {**headers, "ce-type": "com.example.something.else.v1"}
    missing = {k: v for k, v in headers.items() if k != "ce-source"}
    data = json.loads(body)
    data["size"] = "forty-two"
    return [
        ("not-json", headers, b"{not json", "CloudEvent data is not JSON"),
        ("wrong-type", wrong_type, body, "unknown CloudEvent type 'com.example.something.else.v1'"),
        ("missing-headers", missing, body, "'source' is a required property"),
        ("invalid-data", headers, json.dumps(data).encode(), "CloudEvent data does not match"),
        ("structured-garbage", {}, b"\xff\xfe not a document", "structured CloudEvent is not JSON"),
    ]


async def test_nats_consumer_skips_malformed_messages_and_goes_on(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = nats_test_config(nats_url)
    sink = NatsSink(config)
    await sink.connect()
    nc = await nats.connect(nats_url)
    watch: NatsWatch = watch_nats(
        nats_url, ["files"], stream=config.stream, subject_prefix=config.subject_prefix,
        fetch_timeout_s=0.5,
    )  # fmt: skip
    bad = malformed_binary()
    try:
        js = nc.jetstream()
        await sink.publish("files", good_events(["before"], 1))
        sequences = {}
        for token, headers, body, _ in bad:
            ack = await js.publish(
                f"{config.subject_prefix}.files.{token}", body, headers=headers or None
            )
            sequences[token] = ack.seq
        await sink.publish("files", good_events(["after"], 2))
        with caplog.at_level(logging.WARNING, logger="bridge.consumer.nats"):
            keys = await deliveries(watch, 2)
            await sink.publish("files", good_events(["live"], 3))
            keys += await deliveries(watch, 1)
    finally:
        await watch.aclose()
        await sink.aclose()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(config.stream)
        await nc.close()
    assert keys == ["before", "after", "live"]
    skipped = [r.getMessage() for r in caplog.records if "skipping message" in r.getMessage()]
    assert len(skipped) == len(bad), skipped
    for (token, _, _, problem), message in zip(bad, skipped, strict=True):
        subject = f"{config.subject_prefix}.files.{token}"
        assert f"message {sequences[token]} of stream {config.stream} ({subject})" in message
        assert problem in message, message


async def deliveries(watch: NatsWatch | RedisWatch, count: int) -> list[str]:
    """The keys of the next ``count`` deliveries (acknowledged), Synced markers skipped."""
    keys: list[str] = []
    async with asyncio.timeout(WAIT_S):
        async for item in watch:
            if isinstance(item, Synced):
                continue
            assert isinstance(item, Delivery)
            await item.ack()
            keys.append(item.envelope.key)
            if len(keys) == count:
                break
    return keys


def malformed_entries() -> list[tuple[dict[str, str | bytes], str]]:
    """(fields, the problem the log must name) of bad Redis stream entries."""
    [event] = object_events(["x"], revision=99)
    headers, body = event.to_binary()
    fields: dict[str, str | bytes] = {**headers, "data": body}
    data = json.loads(body)
    data["etag"] = 12
    return [
        ({**fields, "data": b"{not json"}, "CloudEvent data is not JSON"),
        (
            {**fields, "ce-type": "com.example.other.v1"},
            "unknown CloudEvent type 'com.example.other.v1'",
        ),
        ({k: v for k, v in fields.items() if k != "ce-id"}, "'id' is a required property"),
        ({**fields, "data": json.dumps(data)}, "CloudEvent data does not match"),
        ({"event": b"\x00 not json"}, "structured CloudEvent is not JSON"),
        ({"unrelated": "field"}, "Redis entry has neither an 'event' nor a 'data' field"),
    ]


@pytest.mark.parametrize("group", [None, "ops"])
async def test_redis_consumer_skips_malformed_entries_and_goes_on(
    redis_url: str, group: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    sink = RedisSink(RedisSinkConfig(url=redis_url))
    client = redis.asyncio.Redis.from_url(redis_url)
    watch: RedisWatch = watch_redis(redis_url, ["files"], group=group)
    bad = malformed_entries()
    stream = redis_stream_key("files")
    try:
        await sink.publish("files", good_events(["before"], 1))
        keys = await deliveries(watch, 1)  # the list, then Synced
        with caplog.at_level(logging.WARNING, logger="bridge.consumer.redis"):
            ids = [as_text(await client.xadd(stream, fields)) for fields, _ in bad]  # type: ignore[arg-type]
            await sink.publish("files", good_events(["after"], 2))
            keys += await deliveries(watch, 1)
    finally:
        await watch.aclose()
        await sink.aclose()
        await client.aclose()
    assert keys == ["before", "after"]
    skipped = [r.getMessage() for r in caplog.records if "skipping entry" in r.getMessage()]
    assert len(skipped) == len(bad), skipped
    for entry_id, (_, problem), message in zip(ids, bad, skipped, strict=True):
        assert f"entry {entry_id} of {stream}" in message
        assert problem in message, message
