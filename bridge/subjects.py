"""Names on the wire: NATS subjects, Redis stream keys, and the item-token encoding.

A NATS subject token may not contain ``.``, ``*``, ``>`` or whitespace, yet item keys (object
paths, URLs) may contain any character. An item key becomes one token like this:

* its UTF-8 bytes ``A-Z a-z 0-9 _ -`` are kept as they are;
* every other byte is written ``~XX`` (two uppercase hex digits), so ``~`` itself is ``~7E``;
* a result longer than 200 characters is cut to its first 150 characters, followed by ``~~``
  and the first 32 hex digits of the SHA-256 of the key (``~~`` never occurs otherwise).

So ``configs/app.yaml`` is ``configs~2Fapp~2Eyaml``. Short tokens decode back to the key with
:func:`decode_item_token`; the CloudEvent's ``subject`` always carries the key itself.
"""

from __future__ import annotations

import hashlib
import re

__all__ = [
    "DEFAULT_SUBJECT_PREFIX",
    "SOURCE_NAME_PATTERN",
    "decode_item_token",
    "encode_item_token",
    "nats_subject",
    "redis_stream_key",
    "validate_source_name",
]

DEFAULT_SUBJECT_PREFIX = "koprs.external"
REDIS_STREAM_PREFIX = "koprs:external:"
SOURCE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_TOKEN = 200
_KEEP_TOKEN = 150
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPED = [chr(b) if b in _SAFE else f"~{b:02X}" for b in range(256)]


def validate_source_name(name: str) -> str:
    """Return ``name`` if it can be a subject token and a stream key; raise ValueError if not."""
    if not SOURCE_NAME_PATTERN.match(name):
        raise ValueError(
            f"source name {name!r} must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-' "
            "(it becomes a NATS subject token and part of a Redis key)"
        )
    return name


def encode_item_token(key: str) -> str:
    """The subject token of an item key (see the module docstring)."""
    token = "".join([_ESCAPED[b] for b in key.encode("utf-8")]) or "~"
    if len(token) > _MAX_TOKEN:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
        kept = token[:_KEEP_TOKEN]
        partial = kept.rfind("~", _KEEP_TOKEN - 2)  # do not cut an escape in half
        token = f"{kept if partial == -1 else kept[:partial]}~~{digest}"
    return token


def decode_item_token(token: str) -> str | None:
    """The key an item token encodes, or None for a shortened (hashed) token."""
    if "~~" in token:
        return None
    if token == "~":
        return ""
    out = bytearray()
    i = 0
    while i < len(token):
        ch = token[i]
        if ch == "~":
            out.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(ch))
            i += 1
    return out.decode("utf-8")


def nats_subject(source_name: str, key: str, prefix: str = DEFAULT_SUBJECT_PREFIX) -> str:
    """``koprs.external.<source-name>.<item-token>``."""
    return f"{prefix}.{source_name}.{encode_item_token(key)}"


def redis_stream_key(source_name: str, prefix: str = REDIS_STREAM_PREFIX) -> str:
    """``koprs:external:<source-name>``."""
    return f"{prefix}{source_name}"
