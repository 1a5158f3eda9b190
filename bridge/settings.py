"""The building blocks of every settings model: :class:`ConfigModel` and the value types.

:class:`ConfigModel` is a pydantic v2 model, frozen, that refuses unknown keys. Its rules on
several keys yield :class:`Problem` s at keys of the model: :meth:`ConfigModel._given_problems`
(on which keys are given) runs even when a value is invalid, so that every error of a document
is reported at once; :meth:`ConfigModel._problems` (on the values) once all are valid.

The value types accept exactly the spellings of the YAML config (durations ``500ms``, ``30s``,
``5m``, ``1h`` or a number of seconds; sizes ``65536``, ``64KiB``, ``16MiB``; ``true``/``false``
only, no ``yes``), say what was wrong in words (``must be > 0, got 0``) and describe themselves
in the JSON Schema. :func:`bridge.service.config.error_lines` turns the errors into messages.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ModelWrapValidatorHandler,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import InitErrorDetails, core_schema

__all__ = [
    "Check",
    "ConfigModel",
    "Count",
    "Duration",
    "ExistingFile",
    "Flag",
    "Problem",
    "Size",
    "Text",
    "TextOrEmpty",
    "TextPath",
    "WebUrl",
    "at_least",
    "duration",
    "duration_at_least",
    "kind",
    "matching",
    "one_of",
    "text",
    "together",
]


class Problem(ValueError):
    """What a rule of a model found wrong, at ``at`` (keys below the model; () is the model)."""

    def __init__(self, problem: str, *at: str | int) -> None:
        super().__init__(problem)
        self.at = at


class ConfigModel(BaseModel):
    """A settings model: frozen, unknown keys refused, docstrings as schema descriptions.

    Built from a document with ``model_validate(raw, by_alias=True, by_name=False)``: a key is
    then spelled as in YAML (``interval``); in Python, fields go by name (``interval_s=``).
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
        use_attribute_docstrings=True,
    )

    @classmethod
    def _given_problems(cls, given: set[str]) -> Iterable[Problem]:
        """Rules on which keys are given (not null); run even if a value is invalid."""
        return ()

    def _problems(self) -> Iterable[Problem]:
        """Rules on the values; run once every value is valid."""
        return ()

    @model_validator(mode="wrap")
    @classmethod
    def _apply_rules(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        problems: list[Problem] = []
        if isinstance(data, dict):
            problems += cls._given_problems({str(k) for k, v in data.items() if v is not None})
        try:
            result = handler(data)
        except ValidationError as exc:
            errors = exc.errors()
        else:
            problems += result._problems()
            if not problems:
                return result
            errors = []
        # the unknown keys and the missing ones of this mapping: a problem each, first
        keys: dict[str, list[str]] = {"extra_forbidden": [], "invalid_key": [], "missing": []}
        others: list[InitErrorDetails] = []
        for error in errors:
            if error["type"] in keys and len(error["loc"]) == 1:
                keys[error["type"]].append(str(error["loc"][0]))
            else:
                others.append({"type": error["type"], "loc": error["loc"], "input": error["input"]})
                if "ctx" in error:
                    others[-1]["ctx"] = error["ctx"]
        first = []
        if unknown := sorted(keys["extra_forbidden"] + keys["invalid_key"]):
            allowed = ", ".join(sorted(cls.document_keys()))
            first.append(Problem(f"unknown key(s) {', '.join(unknown)} (allowed: {allowed})"))
        if keys["missing"]:
            first.append(Problem(f"missing required key(s) {', '.join(sorted(keys['missing']))}"))

        def details(problem: Problem) -> InitErrorDetails:
            return {
                "type": "value_error",
                "loc": problem.at,
                "input": data,
                "ctx": {"error": problem},
            }

        found = [*map(details, first), *others, *map(details, problems)]
        raise ValidationError.from_exception_data(cls.__name__, found)

    @classmethod
    def document_keys(cls) -> list[str]:
        """The keys of this model in a document (``interval``, not ``interval_s``)."""
        return [
            alias if isinstance(alias := field.validation_alias, str) else name
            for name, field in cls.model_fields.items()
        ]


def kind(value: Any) -> str:
    """What ``value`` is, for messages: "a mapping", "a list", "a string"..."""
    return _KINDS.get(type(value), "a value")


_KINDS: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
_KINDS |= {int: "a number", float: "a number", type(None): "empty"}


# -- value types --------------------------------------------------------------------------------


class Check:
    """``Annotated`` metadata: validate with ``check`` (the raw value in, the value out or a
    ``ValueError`` saying what is wrong), describe with the JSON Schema ``schema``."""

    def __init__(self, check: Callable[[Any], Any], schema: dict[str, Any]) -> None:
        self.check = check
        self.schema = schema

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(self.check)

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return dict(self.schema)


def text(value: Any, *, empty: bool = False) -> str:
    """``value`` if it is a string (not empty or only spaces, unless ``empty``)."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {kind(value)}")
    if not empty and not value.strip():
        raise ValueError("must not be empty")
    return value


def _path(value: Any) -> Path:
    return value if isinstance(value, Path) else Path(text(value))


def _existing_file(value: Any) -> Path:
    path = _path(value)
    if not path.is_file():
        raise ValueError(f"file {str(path)!r} does not exist")
    return path


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, not {value!r}")
    return value


def _web_url(value: Any) -> str:
    url = text(value)
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"must be an http:// or https:// URL, not {url!r}")
    return url


_STRING = {"type": "string", "pattern": r"\S"}
Text = Annotated[str, Check(text, _STRING)]
"""A string that is not empty (nor only spaces)."""
TextOrEmpty = Annotated[str, Check(lambda v: text(v, empty=True), {"type": "string"})]
TextPath = Annotated[Path, Check(_path, _STRING)]
ExistingFile = Annotated[Path, Check(_existing_file, {**_STRING, "description": "a file"})]
Flag = Annotated[bool, Check(_flag, {"type": "boolean"})]
WebUrl = Annotated[str, Check(_web_url, {"type": "string", "pattern": "^https?://"})]


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def duration(value: Any, *, minimum_s: float = 0.0) -> float:
    """Seconds from ``30``, ``1.5``, ``"500ms"``, ``"30s"``, ``"5m"`` or ``"1h"``; > 0, finite."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match[1]) * _DURATION_UNITS[match[2]]
    else:
        raise ValueError(f"must be a duration (seconds, or like 500ms, 30s, 5m, 1h), not {value!r}")
    if not seconds > 0:  # NaN fails too
        raise ValueError(f"must be > 0, got {value!r}")
    if math.isinf(seconds):
        raise ValueError(f"must be finite, got {value!r}")
    if seconds < minimum_s:
        raise ValueError(
            f"must be at least {minimum_s * 1000:g}ms (a shorter one is a busy loop), got {value!r}"
        )
    return seconds


def duration_at_least(minimum_s: float) -> Check:
    """A duration (see :func:`duration`) of at least ``minimum_s``."""
    number = {"minimum": minimum_s} if minimum_s else {"exclusiveMinimum": 0}
    return Check(
        lambda value: duration(value, minimum_s=minimum_s),
        _number_or({"type": "number", **number}, _DURATION, "seconds, or like 500ms, 30s, 5m, 1h"),
    )


def _number_or(number: dict[str, Any], pattern: re.Pattern[str], what: str) -> dict[str, Any]:
    return {"anyOf": [number, {"type": "string", "pattern": pattern.pattern}], "description": what}


Duration = Annotated[float, duration_at_least(0.0)]
"""A duration in seconds, > 0: a number, or ``500ms``, ``30s``, ``5m``, ``1h``."""


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}
_SIZE_UNITS |= {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _size(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        count = int(match[1]) * _SIZE_UNITS[match[2]]
    else:
        raise ValueError(f"must be a size in bytes (like 65536, 64KiB, 16MiB), not {value!r}")
    if count <= 0:
        raise ValueError(f"must be > 0, got {value!r}")
    return count


_POSITIVE_INTEGER = {"type": "integer", "exclusiveMinimum": 0}
Size = Annotated[
    int, Check(_size, _number_or(_POSITIVE_INTEGER, _SIZE, "bytes, or like 64KiB, 16MiB"))
]
"""A size in bytes, > 0: an integer, or ``64KiB``, ``16MiB``, ``1GB``... (whole numbers)."""


def at_least(minimum: int) -> Check:
    """An integer ``>= minimum``."""

    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"must be an integer >= {minimum}, not {value!r}")
        return value

    return Check(check, {"type": "integer", "minimum": minimum})


Count = Annotated[int, at_least(0)]
"""An integer >= 0."""


def one_of(*choices: str, any_case: bool = False) -> Check:
    """One of the strings ``choices`` (``any_case``: in any case, kept upper-case)."""

    def check(value: Any) -> str:
        given = str(value).upper() if any_case else value
        if given not in choices:
            if any_case:
                names = [c.lower() for c in choices]
                allowed = ", ".join(names[:-1]) + " or " + names[-1]
            else:
                allowed = ", ".join(map(repr, choices[:-1])) + f" or {choices[-1]!r}"
            raise ValueError(f"must be {allowed}, not {value!r}")
        return str(given)

    if not any_case:
        return Check(check, {"enum": list(choices)})
    # JSON Schema has no case-insensitive enum: a pattern
    words = ("".join(f"[{c.lower()}{c.upper()}]" for c in word) for word in choices)
    return Check(check, {"type": "string", "pattern": f"^({'|'.join(words)})$"})


def matching(pattern: str, problem: Callable[[str], str]) -> Check:
    """A non-empty string that fully matches ``pattern`` (else the message ``problem(value)``)."""
    compiled = re.compile(pattern)

    def check(value: Any) -> str:
        string = text(value)
        if not compiled.fullmatch(string):
            raise ValueError(problem(string))
        return string

    return Check(check, {"type": "string", "pattern": f"^(?:{pattern})$"})


def together(given: set[str], *keys: str) -> Iterator[Problem]:
    """A :class:`Problem` unless all or none of ``keys`` are given."""
    present = [key for key in keys if key in given]
    if present and len(present) != len(keys):
        yield Problem(f"{' and '.join(keys)} must be given together")
