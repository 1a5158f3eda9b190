"""Small helpers for units: durations are seconds (``float``) everywhere inside the project."""

from __future__ import annotations

from datetime import timedelta

__all__ = ["Seconds", "to_seconds"]

Seconds = float | int | timedelta


def to_seconds(value: Seconds, *, name: str = "duration") -> float:
    """Turn a ``float``/``int`` number of seconds or a ``timedelta`` into seconds.

    Raises ``ValueError`` naming ``name`` for negative, NaN or non-numeric values.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds or a timedelta, not {value!r}")
    else:
        seconds = float(value)
    if not seconds >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
    return seconds
