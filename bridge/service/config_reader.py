"""Reading a config document: environment overrides before validation, messages after.

:func:`apply_env` applies the ``KOPRS_BRIDGE__A__B=value`` overrides to the raw document (list
elements by index: ``KOPRS_BRIDGE__SOURCES__0__INTERVAL``) and remembers which keys each
variable set. :func:`error_lines` turns a pydantic ``ValidationError`` into one line per problem,
``file: sources[1].http.url: problem``, naming the variable instead of the file for a value
that came from the environment; unknown and missing keys of one mapping share a line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import NoneType, UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from bridge.errors import ConfigError
from bridge.settings import kind

__all__ = ["ENV_PREFIX", "Key", "apply_env", "error_lines", "key_path"]

ENV_PREFIX = "KOPRS_BRIDGE__"

Key = tuple[str | int, ...]
"""Where a value is in a document: ``("sources", 1, "http", "url")``."""


def apply_env(raw: dict[str, Any], env: Mapping[str, str], origin: str) -> dict[Key, str]:
    """Apply the ``KOPRS_BRIDGE__...`` overrides of ``env`` to ``raw`` (in place).

    Returns the variable behind each key it set or created. Unusable variables (an index that
    is not there, a path through a value that is no mapping, a value that is not YAML) are one
    :class:`~bridge.errors.ConfigError` naming each of them.
    """
    overrides: dict[Key, str] = {}
    problems: list[str] = []
    for name in sorted(env):
        if name.startswith(ENV_PREFIX):
            try:
                _apply_one(raw, name, env[name], origin, overrides)
            except ConfigError as exc:
                problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    return overrides


def _apply_one(
    raw: dict[str, Any], name: str, value: str, origin: str, overrides: dict[Key, str]
) -> None:
    keys = [k.lower() for k in name[len(ENV_PREFIX) :].split("__")]
    if not all(keys):
        raise ConfigError(f"environment variable {name}: empty key in the path")
    node: Any = raw
    where: Key = ()
    for depth, key in enumerate(keys):
        index: str | int
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(
                    f"environment variable {name}: {key!r} is not an index of "
                    f"{'.'.join(keys[:depth])} (it has {len(node)} entries)"
                )
            index = int(key)
        elif isinstance(node, dict):
            index = key
        else:
            raise ConfigError(
                f"environment variable {name}: {'.'.join(keys[:depth])} "
                f"in {origin} is not a mapping"
            )
        where = (*where, index)
        if depth == len(keys) - 1:
            try:
                node[index] = yaml.safe_load(value) if value else ""
            except yaml.YAMLError as exc:
                problem = getattr(exc, "problem", None) or exc
                raise ConfigError(
                    f"environment variable {name}: its value is not a valid YAML scalar "
                    f"or document: {problem}"
                ) from exc
            overrides[where] = name
        else:
            if isinstance(node, dict) and index not in node:
                node[index] = {}
                overrides.setdefault(where, name)
            node = node[index]


def key_path(key: Sequence[str | int]) -> str:
    """``sources[1].http.url`` for ``("sources", 1, "http", "url")``."""
    path = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in key).lstrip(".")
    return path or "(top level)"


def error_lines(
    error: ValidationError,
    model: type[BaseModel],
    origin: str,
    overrides: Mapping[Key, str] | None = None,
) -> list[str]:
    """One line per problem of ``error`` (raised validating ``model``): where, key, problem."""
    # unknown and missing keys of one mapping are gathered in one line each
    lines: dict[tuple[Key, str], list[str]] = {}
    for found in error.errors():
        key: Key = tuple(k for k in found["loc"] if k != "[key]")
        kind_ = found["type"]
        if kind_ in ("missing", "extra_forbidden", "invalid_key") and key:
            lines.setdefault((key[:-1], kind_), []).append(str(key[-1]))
        else:
            lines.setdefault((key, _problem(found)), [])
    result = []
    for (key, what), names in lines.items():
        if what == "missing":
            problem = f"missing required key(s) {', '.join(sorted(names))}"
        elif what in ("extra_forbidden", "invalid_key"):
            allowed = ", ".join(sorted(_keys_at(model, key)))
            problem = f"unknown key(s) {', '.join(sorted(set(names)))} (allowed: {allowed})"
        else:
            problem = what
        line = f"{_where(key, origin, overrides or {})}: {key_path(key)}: {problem}"
        if line not in result:
            result.append(line)
    return result


def _problem(found: Any) -> str:
    """The problem of one error of ``ValidationError.errors()``, in words."""
    if found["type"] == "value_error":
        return str(found["ctx"]["error"])
    if found["type"] in ("model_type", "model_attributes_type", "dict_type", "mapping_type"):
        return f"must be a mapping, not {kind(found['input'])}"
    if found["type"] in ("tuple_type", "list_type"):
        return f"must be a list, not {kind(found['input'])}"
    message: str = found["msg"]
    return message[:1].lower() + message[1:]


def _where(key: Key, origin: str, overrides: Mapping[Key, str]) -> str:
    """The environment variable that set ``key`` (or a mapping above it), else ``origin``."""
    for depth in range(len(key), 0, -1):
        if key[:depth] in overrides:
            return f"environment variable {overrides[key[:depth]]}"
    return origin


def _keys_at(model: type[BaseModel], key: Key) -> list[str]:
    """The keys the mapping at ``key`` below ``model`` may have (as spelled in documents)."""
    found: Any = model
    for part in key:
        found = _inner(found, part)
    found = _inner(found, None)
    if not (isinstance(found, type) and issubclass(found, BaseModel)):
        return []
    return [
        alias if isinstance(alias := field.validation_alias, str) else name
        for name, field in found.model_fields.items()
    ]


def _inner(annotation: Any, part: str | int | None) -> Any:
    """What ``annotation`` holds at ``part`` (a key, an index; None: the type itself)."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin is Union or origin is UnionType:
            annotation = next(a for a in get_args(annotation) if a is not NoneType)
        else:
            break
    if part is None:
        return annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, field in annotation.model_fields.items():
            if part in (name, field.validation_alias):
                return field.annotation
        return None
    args = get_args(annotation)
    return args[-1] if isinstance(part, str) else args[0] if args else None
