"""Reading an HTTP response body under a cap, its content codings decoded in bounded steps.

httpx decodes ``Content-Encoding`` a whole network chunk at a time, so a few kilobytes of
``gzip, gzip`` inflate to gigabytes before any cap can be checked, in one call that holds the
event loop. The poller therefore reads the raw stream (``Response.aiter_raw``) and decodes it
here:

- It asks for ``gzip, deflate`` only (:data:`ACCEPT_ENCODING`, sent whatever the client's
  default is), the codings :mod:`zlib` can decode with a bound on each call's output. Any
  other coding in a response (``br``, ``zstd``, ``compress``, ...) is refused, as are more than
  :data:`MAX_CODINGS` layers; ``identity`` and ``x-gzip`` are understood.
- Each :mod:`zlib` call produces at most :data:`DECODE_STEP` bytes and the event loop runs
  between calls, so decoding holds it for a fraction of a millisecond at a time.
- The cap bounds the bytes received and the decoded bytes, checked after every step: the
  memory used is the body kept (up to the cap) and one step per layer.
- A truncated or corrupt stream is an error (``httpx.DecodingError``), not a short body.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import zlib
from collections.abc import Iterator, Sequence

import httpx

from bridge.errors import BodyTooLargeError

__all__ = ["ACCEPT_ENCODING", "DECODE_STEP", "MAX_CODINGS", "read_capped"]

ACCEPT_ENCODING = "gzip, deflate"
"""What the poller sends as ``Accept-Encoding`` (unless told otherwise with ``with_header``)."""
MAX_CODINGS = 2
"""The most content codings decoded on one body (``gzip, gzip`` from a proxy compressing a
compressed answer again); more is refused."""
DECODE_STEP = 64 * 1024
"""The most bytes one decoding call produces before the event loop gets a turn."""
_CODINGS = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}


async def read_capped(response: httpx.Response, *, cap: int, url: str) -> tuple[bytes, str]:
    """The decoded body of ``response`` and its SHA-256 (hex, computed step by step too):
    ``BodyTooLargeError`` (naming ``url`` and ``cap``) as soon as the bytes received or decoded
    exceed ``cap``; ``httpx.DecodingError`` for a coding the poller does not decode, or a stream
    it cannot."""
    if response.is_stream_consumed:  # a transport that made it in memory (MockTransport)
        content = response.content  # httpx decoded it already: there is nothing left to bound
        if len(content) > cap:
            raise BodyTooLargeError(url, cap)
        return content, hashlib.sha256(content).hexdigest()
    codings = _content_codings(response)
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise BodyTooLargeError(url, cap)
    layers = [_Inflater(coding, response.request) for coding in reversed(codings)]
    named = ", ".join(codings) or None
    body = io.BytesIO()  # getvalue() hands over its buffer: the body is not copied at the end
    digest = hashlib.sha256()
    received = decoded = 0
    async for raw in response.aiter_raw():
        received += len(raw)
        if received > cap:
            raise BodyTooLargeError(url, cap)
        for piece in _through(layers, raw):
            if piece:
                decoded += len(piece)
                if decoded > cap:
                    raise BodyTooLargeError(url, cap, decoded_from=named)
                body.write(piece)
                digest.update(piece)
            if layers:
                await asyncio.sleep(0)  # one bounded step done: let the other tasks run
    for layer in layers:
        layer.end()
    return body.getvalue(), digest.hexdigest()


def _content_codings(response: httpx.Response) -> list[str]:
    """The response's content codings in the order they were applied (``identity`` left out),
    or ``httpx.DecodingError`` if one is not decoded here or there are too many."""
    codings: list[str] = []
    for value in response.headers.get_list("content-encoding", split_commas=True):
        token = value.strip().lower()
        if token in ("", "identity"):
            continue
        coding = _CODINGS.get(token)
        if coding is None:
            raise httpx.DecodingError(
                f"the response has Content-Encoding {token!r}, which the poller does not "
                f"decode (it asks for {ACCEPT_ENCODING})",
                request=response.request,
            )
        codings.append(coding)
    if len(codings) > MAX_CODINGS:
        raise httpx.DecodingError(
            f"the response has {len(codings)} content codings ({', '.join(codings)}); "
            f"the poller decodes at most {MAX_CODINGS}",
            request=response.request,
        )
    return codings


def _through(layers: Sequence[_Inflater], data: bytes) -> Iterator[bytes]:
    """``data`` decoded by each layer in turn, in pieces of at most ``DECODE_STEP`` bytes;
    an empty piece after each step that produced nothing for the next layer."""
    if not layers:
        yield data
        return
    for piece in layers[0].feed(data):
        if piece:
            yield from _through(layers[1:], piece)
        else:
            yield b""


class _Inflater:
    """One gzip or deflate layer, decoded with :mod:`zlib` in steps of bounded output.

    gzip may hold several members one after another (RFC 1952). deflate is the zlib format
    (RFC 9110), or raw deflate as some servers send it, told apart by the first two bytes.
    """

    def __init__(self, coding: str, request: httpx.Request) -> None:
        self.coding = coding
        self._request = request
        self._zlib: zlib._Decompress | None = None
        self._head = b""  # deflate: the bytes before the format is known
        self._ended = False  # the stream (gzip: a member) ended; more is a new member
        self._seen = False
        if coding == "gzip":
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS | 16)

    def feed(self, data: bytes) -> Iterator[bytes]:
        """``data`` decoded; one piece (perhaps empty) per zlib call, none over DECODE_STEP."""
        if not data:
            return
        self._seen = True
        if self._zlib is None:
            self._head += data
            if len(self._head) < 2:
                return
            data, self._head = self._head, b""
            wrapped = (data[0] & 0x0F) == 8 and ((data[0] << 8) | data[1]) % 31 == 0
            self._zlib = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        full = False
        while data or full:
            if self._ended:
                if self.coding != "gzip":
                    raise self._error("data after the end of the deflate stream")
                self._zlib, self._ended = zlib.decompressobj(zlib.MAX_WBITS | 16), False
            try:
                out = self._zlib.decompress(data, DECODE_STEP)
            except zlib.error as exc:
                raise self._error(f"the {self.coding} stream is corrupt: {exc}") from exc
            full = len(out) == DECODE_STEP  # zlib may hold more output without more input
            if self._zlib.eof:
                data, self._ended, full = self._zlib.unused_data, True, False
            else:
                data = self._zlib.unconsumed_tail
            yield out

    def end(self) -> None:
        """The body is over: an error if the stream is not (an empty body is accepted)."""
        if self._seen and not self._ended:
            raise self._error(f"the {self.coding} stream is truncated (the body ends first)")

    def _error(self, problem: str) -> httpx.DecodingError:
        return httpx.DecodingError(f"cannot decode the body: {problem}", request=self._request)
