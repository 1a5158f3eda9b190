"""JSON for checkpoint records: orjson when installed (the ``fast`` extra), else the stdlib.

Records are small mappings of strings, integers and ``None``, for which both write the same
JSON; readers accept either.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from bridge.jsonable import orjson

__all__ = ["dumps", "loads"]


def _std_dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


dumps: Callable[[Any], bytes]
loads: Callable[[bytes | str], Any]
if orjson is None:  # pragma: no cover - the test extra installs orjson
    dumps, loads = _std_dumps, json.loads
else:
    dumps, loads = orjson.dumps, orjson.loads
