"""JSON helpers shared by the wire format, the checkpoints and ``koprs-bridge tail``.

* ``orjson``: the module when the optional ``fast`` extra is installed, else None;
* :func:`jsonable`: a JSON form of any value a custom source may produce.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
from collections.abc import Mapping
from datetime import datetime
from typing import Any

__all__ = ["jsonable", "orjson"]

orjson: Any
try:
    orjson = importlib.import_module("orjson")
except ImportError:  # pragma: no cover - the test extra installs orjson
    orjson = None


def jsonable(value: Any) -> Any:
    """A JSON form of ``value``: dataclasses and pydantic models as objects, mappings (keys as
    strings), sequences and sets as arrays, bytes as base64, datetimes in ISO 8601, anything
    else unknown as its ``str``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
