"""RESP for the hot path of :class:`~bridge.sinks.redis.RedisSink`: commands and entry fields
packed to bytes here, not by redis-py (payloads are referenced, not copied), and a batch cut into
parts, each packed when needed or ahead, while the server runs the part before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bridge.cloudevents import CloudEvent, state_headers

__all__ = ["Packed", "Parts", "binary_fields", "bulk", "command", "structured_fields"]

Packed = tuple[CloudEvent, list[bytes], int]
"""An event, its packed entry fields and how many arguments they are."""


class Parts:
    """The parts of a batch, each packed when needed, or ahead with :meth:`prepare`."""

    def __init__(
        self,
        pack: Callable[[Sequence[CloudEvent], int], list[Packed]],
        events: Sequence[CloudEvent],
    ) -> None:
        self._pack = pack
        self._events = events
        self._start = 0
        self._ready: list[Packed] | None = None
        self._error: Exception | None = None

    def prepare(self) -> None:
        """Pack the next part now, if not done yet (the CPU is idle while the server works).
        An error (an event that cannot be encoded) is raised by :meth:`next`, not here."""
        if self._ready is None and self._error is None and self._start < len(self._events):
            try:
                self._ready = self._pack(self._events, self._start)
            except Exception as exc:
                self._error = exc
                return
            self._start += len(self._ready)

    def next(self) -> list[Packed]:
        """The next part; empty at the end."""
        self.prepare()
        if self._error is not None:
            raise self._error
        part, self._ready = self._ready or [], None
        return part


def bulk(arg: bytes) -> bytes:
    """``arg`` as a RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(arg), arg)


def command(*args: bytes) -> bytes:
    """A command (its name and arguments) as a RESP array of bulk strings."""
    return b"".join([b"*%d\r\n" % len(args), *[b"$%d\r\n%b\r\n" % (len(a), a) for a in args]])


_FIELD_NAMES: dict[str, bytes] = {}
"""Packed field names (a handful, the same for every event)."""
_DATA_FIELD = bulk(b"data")
_EVENT_FIELD = bulk(b"event")


def binary_fields(event: CloudEvent, out: list[bytes]) -> tuple[int, int]:
    """Append the packed field names and values of ``event`` to ``out``; return how many
    arguments that is and (about) how many bytes."""
    headers, body = event.to_binary()
    headers.update(state_headers(event))
    names = _FIELD_NAMES
    size = len(body)
    for name, value in headers.items():
        packed = names.get(name)
        if packed is None:
            packed = names[name] = bulk(name.encode())
        raw = value.encode()
        size += len(raw)
        out += (packed, b"$%d\r\n%b\r\n" % (len(raw), raw))
    out += (_DATA_FIELD, b"$%d\r\n" % len(body), body, b"\r\n")
    return 2 * len(headers) + 2, size


def structured_fields(event: CloudEvent, out: list[bytes]) -> tuple[int, int]:
    document = event.to_structured()
    out += (_EVENT_FIELD, b"$%d\r\n" % len(document), document, b"\r\n")
    extra = state_headers(event)
    for name, value in extra.items():
        raw = value.encode()
        out += (bulk(name.encode()), bulk(raw))
    return 2 + 2 * len(extra), len(document)
