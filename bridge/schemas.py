"""The JSON Schemas of what the bridge publishes, loaded from ``schemas/`` (shipped in wheels)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["load_schema", "schema_dir", "schemas_by_id"]


def schema_dir() -> Path:
    """``bridge/_schemas`` in an installed wheel, ``schemas/`` in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_schemas", here.parent / "schemas"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no schemas folder next to {here}")


@cache
def schemas_by_id() -> dict[str, dict[str, Any]]:
    """Every schema, keyed by its ``$id`` (the URI a ``dataschema`` attribute names)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(schema_dir().rglob("*.json")):
        schema = json.loads(path.read_text("utf-8"))
        found[schema["$id"]] = schema
    return found


def load_schema(uri: str) -> dict[str, Any]:
    """The schema whose ``$id`` is ``uri``; KeyError names the known ids if there is none."""
    try:
        return schemas_by_id()[uri]
    except KeyError:
        known = ", ".join(sorted(schemas_by_id()))
        raise KeyError(f"no schema with $id {uri!r} (known: {known})") from None
