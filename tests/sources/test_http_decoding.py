"""Compressed HTTP bodies: the cap bounds the decoded size while decoding, in bounded steps.

Against a real loopback server (:class:`~tests.httpserver.HttpTestServer`). Memory is measured
with :mod:`tracemalloc` (the peak during one poll, bounded by a small multiple of the cap: a
memory bound, not a timing one); that the event loop keeps running is measured in loop turns:
every :mod:`zlib` call is recorded with the count of a ticker task at that moment, and the
bytes decoded while the ticker could not run are bounded.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import random
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from bridge import Added, BodyTooLargeError, ExternalEvent, HttpPoller, HttpResource, SourceError
from bridge.sources.http_body import ACCEPT_ENCODING, DECODE_STEP, _Inflater
from tests.support.httpserver import Document, Exchange, HttpTestServer, Reply
from tests.support.survival import assert_survives, bad_http, service

MiB = 1024 * 1024
CAP = 1 * MiB


@pytest.fixture
def server() -> Iterator[HttpTestServer]:
    with HttpTestServer() as running:
        yield running


# -- bodies ----------------------------------------------------------------------------------


def deflated(data: bytes | Iterator[bytes], *, wbits: int, level: int = 9) -> bytes:
    """``data`` compressed: ``wbits`` 31 is gzip, 15 zlib (HTTP's deflate), -15 raw deflate."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, wbits)
    blocks = [data] if isinstance(data, bytes) else data
    return b"".join([*(compressor.compress(b) for b in blocks), compressor.flush()])


def zeros(size: int) -> Iterator[bytes]:
    block = bytes(MiB)
    for _ in range(size // MiB):
        yield block


@functools.cache
def bomb(wbits: int, size: int) -> bytes:
    """``size`` bytes of zeros, compressed once (about size/1000 bytes)."""
    return deflated(zeros(size), wbits=wbits)


@functools.cache
def double_gzip_bomb(size: int) -> bytes:
    """``size`` bytes of zeros, gzip twice: 256 MiB in about 1 KB."""
    return gzip.compress(bomb(31, size), 9)


@functools.cache
def document(size: int) -> bytes:
    """A JSON-like text document of ``size`` bytes that compresses about 4:1, as real ones do."""
    rng = random.Random(size)
    words = [rng.randbytes(rng.randint(2, 9)).hex().encode() for _ in range(4000)]
    out = bytearray(b"[")
    while len(out) < size:
        out += b'{"key": "%s", "n": %d},\n' % (rng.choice(words), rng.randint(0, 10**6))
    return bytes(out[:size])


def encoded(body: bytes, encoding: str, *, chunked: bool = False) -> Callable[[Exchange], Reply]:
    """A responder sending ``body`` (already encoded) with ``Content-Encoding: encoding``."""
    headers = {"Content-Encoding": encoding, "Content-Type": "application/json"}

    def responder(_: Exchange) -> Reply:
        if chunked:
            return Reply(
                200, headers=headers, chunks=[body[i : i + 8192] for i in range(0, len(body), 8192)]
            )
        return Reply(200, body, headers)

    return responder


# -- what the event loop does meanwhile ------------------------------------------------------


@dataclass
class Ticker:
    """A task that counts its turns of the event loop."""

    count: int = 0
    running: bool = True

    async def run(self) -> None:
        while self.running:
            self.count += 1
            await asyncio.sleep(0)


@dataclass
class ZlibCalls:
    """Every zlib decompression call (httpx's or the poller's): the ticker's count when it was
    made and how many bytes it produced."""

    ticker: Ticker
    calls: list[tuple[int, int]] = field(default_factory=list)

    def record(self, produced: bytes) -> bytes:
        self.calls.append((self.ticker.count, len(produced)))
        return produced

    def decoded_per_turn(self) -> dict[int, int]:
        """Bytes decoded while the ticker was at each count (it could not run meanwhile)."""
        per_turn: dict[int, int] = {}
        for turn, size in self.calls:
            per_turn[turn] = per_turn.get(turn, 0) + size
        return per_turn


class _Recorded:
    def __init__(self, inner: Any, calls: ZlibCalls) -> None:
        self._inner, self._calls = inner, calls

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        return self._calls.record(self._inner.decompress(data, max_length))

    def flush(self, *args: int) -> bytes:
        return self._calls.record(self._inner.flush(*args))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture
async def loop_turns(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ZlibCalls]:
    ticker = Ticker()
    calls = ZlibCalls(ticker)
    real = zlib.decompressobj

    def decompressobj(*args: Any, **kwargs: Any) -> Any:
        return _Recorded(real(*args, **kwargs), calls)

    monkeypatch.setattr(zlib, "decompressobj", decompressobj)
    task = asyncio.create_task(ticker.run())
    try:
        yield calls
    finally:
        ticker.running = False
        await task


@dataclass
class Peak:
    bytes: int = 0


async def poll_traced(poller: HttpPoller, peak: Peak) -> Sequence[ExternalEvent[HttpResource]]:
    """One poll with tracemalloc on: its peak of allocated memory in ``peak``."""
    tracemalloc.start()
    try:
        return await poller.poll()
    finally:
        peak.bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


# -- bombs -----------------------------------------------------------------------------------


BOMBS = {
    "gzip, gzip": lambda: double_gzip_bomb(256 * MiB),
    "gzip": lambda: bomb(31, 64 * MiB),
    "deflate": lambda: bomb(15, 64 * MiB),
    "deflate (raw)": lambda: bomb(-15, 64 * MiB),
}


@pytest.mark.parametrize("kind", list(BOMBS))
async def test_a_compression_bomb_is_refused_at_the_cap_in_bounded_memory(
    server: HttpTestServer, kind: str
) -> None:
    body = BOMBS[kind]()
    encoding = kind.removesuffix(" (raw)")
    assert len(body) < CAP  # what is received is small: only the decoded size is over the cap
    url = server.route("/bomb", encoded(body, encoding))
    peak = Peak()
    async with HttpPoller(url).with_name("bomb").with_max_body_bytes(CAP) as poller:
        with pytest.raises(BodyTooLargeError) as caught:
            await poll_traced(poller, peak)
    assert peak.bytes < 8 * CAP, f"peak {peak.bytes / MiB:.1f} MiB for a cap of 1 MiB"
    message = str(caught.value)
    assert message.startswith(f"source 'bomb': GET {url}: response body exceeds the cap of ")
    assert f"cap of {CAP} bytes when decoded (Content-Encoding: {encoding};" in message
    assert (caught.value.cap_bytes, caught.value.decoded_from) == (CAP, encoding)
    assert poller.state() == {}


async def test_a_bomb_decodes_in_bounded_steps_between_which_the_loop_runs(
    server: HttpTestServer, loop_turns: ZlibCalls
) -> None:
    url = server.route("/bomb", encoded(double_gzip_bomb(256 * MiB), "gzip, gzip"))
    async with HttpPoller(url).with_max_body_bytes(16 * MiB) as poller:
        with pytest.raises(BodyTooLargeError):
            await poller.poll()
    per_turn = loop_turns.decoded_per_turn()
    assert sum(per_turn.values()) > 16 * MiB  # it decoded up to the cap, and a step beyond
    assert max(per_turn.values()) <= 256 * 1024, "decoded too much without letting the loop run"
    assert len(per_turn) > 64  # the ticker ran between the steps


async def test_a_large_body_under_the_cap_decodes_in_bounded_steps(
    server: HttpTestServer, loop_turns: ZlibCalls
) -> None:
    """8 MiB that arrive in one network read (they compress to 8 KB): decoded step by step."""
    body = bytes(8 * MiB)
    url = server.route("/zeros", encoded(deflated(body, wbits=31), "gzip"))
    async with HttpPoller(url).with_max_body_bytes(8 * MiB) as poller:
        (added,) = await poller.poll()
    assert added.resource.body == body
    per_turn = loop_turns.decoded_per_turn()
    assert sum(per_turn.values()) == 8 * MiB
    assert max(per_turn.values()) <= 256 * 1024, "decoded too much without letting the loop run"


# -- healthy compressed bodies ---------------------------------------------------------------


HEALTHY = {
    "gzip": lambda b: deflated(b, wbits=31),
    "x-gzip": lambda b: deflated(b, wbits=31),
    "deflate": lambda b: deflated(b, wbits=15),
    "deflate (raw)": lambda b: deflated(b, wbits=-15),
    "gzip, gzip": lambda b: deflated(deflated(b, wbits=31), wbits=31, level=1),
    "identity, gzip": lambda b: deflated(b, wbits=31),
    "gzip (two members)": lambda b: deflated(b[:1000], wbits=31) + deflated(b[1000:], wbits=31),
}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("kind", list(HEALTHY))
async def test_a_compressed_body_under_the_cap_decodes_whole(
    server: HttpTestServer, kind: str, chunked: bool
) -> None:
    body = document(3 * MiB)
    coded = HEALTHY[kind](body)
    url = server.route(
        "/doc",
        encoded(coded, kind.removesuffix(" (raw)").removesuffix(" (two members)"), chunked=chunked),
    )
    peak = Peak()
    async with HttpPoller(url).with_max_body_bytes(4 * MiB) as poller:
        (added,) = await poll_traced(poller, peak)
    assert isinstance(added, Added)
    assert added.resource.body == body
    assert added.resource.digest == hashlib.sha256(body).hexdigest()
    assert peak.bytes < 2 * len(body), f"peak {peak.bytes / MiB:.1f} MiB for a 3 MiB body"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_the_cap_is_on_the_decoded_size_exactly(
    server: HttpTestServer, encoding: str
) -> None:
    body = document(100_000)
    wbits = 31 if encoding == "gzip" else 15
    url = server.route("/doc", encoded(deflated(body, wbits=wbits), encoding))
    async with HttpPoller(url).with_max_body_bytes(len(body)) as poller:
        (added,) = await poller.poll()
    assert added.resource.body == body
    async with HttpPoller(url).with_max_body_bytes(len(body) - 1) as poller:
        with pytest.raises(BodyTooLargeError, match=f"cap of {len(body) - 1} bytes when decoded"):
            await poller.poll()


async def test_the_digest_is_of_the_decoded_body_whatever_the_coding(
    server: HttpTestServer,
) -> None:
    """The same document sent plain, then gzip at another level, then deflate: one Added, no
    Modified (ETag and digest semantics as without compression)."""
    body = document(50_000)
    codings = iter(
        [
            Reply(200, body, {"ETag": '"a"'}),
            Reply(
                200, deflated(body, wbits=31, level=1), {"ETag": '"b"', "Content-Encoding": "gzip"}
            ),
            Reply(200, deflated(body, wbits=15), {"ETag": '"c"', "Content-Encoding": "deflate"}),
        ]
    )
    url = server.route("/doc", lambda _: next(codings))
    async with HttpPoller(url) as poller:
        (added,) = await poller.poll()
        assert await poller.poll() == []
        assert await poller.poll() == []
    assert added.resource.body == body
    assert poller.state()["digest"] == hashlib.sha256(body).hexdigest()
    assert poller.state()["etag"] == '"c"'
    assert [e.headers.get("if-none-match") for e in server.requests_to("/doc")] == [
        None,
        '"a"',
        '"b"',
    ]


@pytest.mark.parametrize("wbits", [15, -15], ids=["zlib", "raw"])
def test_deflate_split_before_its_second_byte_is_told_apart(wbits: int) -> None:
    """The zlib header or raw deflate is told by the first two bytes, even when they come in
    two network reads (fed directly: over loopback they would arrive together)."""
    body = document(200_000)
    coded = deflated(body, wbits=wbits)
    inflater = _Inflater("deflate", httpx.Request("GET", "http://127.0.0.1/"))
    pieces = [p for part in (coded[:1], coded[1:2], coded[2:]) for p in inflater.feed(part)]
    inflater.end()
    assert b"".join(pieces) == body
    assert max(len(p) for p in pieces) == DECODE_STEP


# -- what is asked for, and what is refused --------------------------------------------------


async def test_only_codings_it_can_bound_are_asked_for_even_with_a_user_client(
    server: HttpTestServer,
) -> None:
    """A user's client may ask for br and zstd by default (httpx does when brotli or zstandard
    is installed): the poller asks for gzip and deflate only."""
    url = server.route("/doc", Document(b"{}"))
    headers = {"Accept-Encoding": "gzip, deflate, br, zstd"}
    async with httpx.AsyncClient(headers=headers) as client:
        await HttpPoller(url).with_client(client).poll()
    async with HttpPoller(url) as poller:
        await poller.poll()
    sent = [e.headers.get("accept-encoding") for e in server.requests_to("/doc")]
    assert sent == [ACCEPT_ENCODING, ACCEPT_ENCODING] == ["gzip, deflate"] * 2


async def test_an_accept_encoding_header_given_by_the_user_is_sent(server: HttpTestServer) -> None:
    url = server.route("/doc", Document(b"{}"))
    async with HttpPoller(url).with_header("accept-encoding", "identity") as poller:
        await poller.poll()
    (exchange,) = server.requests_to("/doc")
    assert exchange.headers.get("accept-encoding") == "identity"


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br"])
async def test_a_coding_it_does_not_decode_is_refused_by_name(
    server: HttpTestServer, encoding: str
) -> None:
    """The server ignored Accept-Encoding: the body is not passed on still encoded."""
    url = server.route("/doc", encoded(b"\x1b\x03\x00\xf8\xa5\x13\x00", encoding))
    async with HttpPoller(url).with_name("odd") as poller:
        with pytest.raises(SourceError) as caught:
            await poller.poll()
    name = encoding.rsplit(", ", maxsplit=1)[-1]
    assert str(caught.value).startswith(f"source 'odd': GET {url} failed: DecodingError: ")
    assert f"Content-Encoding {name!r}, which the poller does not decode" in str(caught.value)
    assert poller.state() == {}


async def test_more_than_two_codings_are_refused(server: HttpTestServer) -> None:
    body = deflated(deflated(deflated(b"{}", wbits=31), wbits=31), wbits=31)
    url = server.route("/doc", encoded(body, "gzip, gzip, gzip"))
    async with HttpPoller(url) as poller:
        with pytest.raises(
            SourceError,
            match=r"3 content codings \(gzip, gzip, gzip\); the "
            "poller decodes at most 2",
        ):
            await poller.poll()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_truncated_stream_is_an_error_not_a_short_body(
    server: HttpTestServer, encoding: str
) -> None:
    coded = deflated(document(100_000), wbits=31 if encoding == "gzip" else 15)
    url = server.route("/doc", encoded(coded[: len(coded) // 2], encoding))
    async with HttpPoller(url) as poller:
        with pytest.raises(SourceError, match=f"the {encoding} stream is truncated"):
            await poller.poll()
    assert poller.state() == {}


async def test_a_corrupt_stream_is_an_error(server: HttpTestServer) -> None:
    coded = bytearray(deflated(document(10_000), wbits=31))
    coded[20:40] = bytes(20)
    url = server.route("/doc", encoded(bytes(coded), "gzip"))
    async with HttpPoller(url) as poller:
        with pytest.raises(SourceError, match="the gzip stream is corrupt"):
            await poller.poll()


async def test_an_empty_body_with_a_coding_is_empty(server: HttpTestServer) -> None:
    url = server.route("/doc", encoded(b"", "gzip"))
    async with HttpPoller(url) as poller:
        (added,) = await poller.poll()
    assert added.resource.body == b""


# -- in the service --------------------------------------------------------------------------


async def test_a_bomb_in_the_service_is_a_logged_poll_error_and_the_others_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The log names the source, the URL and the cap; the healthy source delivers meanwhile."""
    with HttpTestServer() as server:
        url = server.route("/bomb", encoded(double_gzip_bomb(256 * MiB), "gzip, gzip"))
        async with service(bad_http(url, max_body_bytes="1MiB")) as run:
            await assert_survives(
                run,
                caplog,
                where=url,
                problem=(
                    "response body exceeds the cap of 1048576 bytes when decoded "
                    "(Content-Encoding: gzip, gzip;"
                ),
            )
