"""``koprs-bridge run`` runs on uvloop when it is installed (the ``fast`` extra), unless
``$KOPRS_BRIDGE_EVENT_LOOP=asyncio``."""

from __future__ import annotations

import asyncio

import pytest

from bridge.cli import run_loop


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def loop_kind() -> int:
    return 1 if run_loop(_wrapped()) else 0


async def _wrapped() -> int:
    return int((await loop_module()).startswith("uvloop"))


def test_uvloop_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")
    monkeypatch.delenv("KOPRS_BRIDGE_EVENT_LOOP", raising=False)
    assert loop_kind() == 1


def test_asyncio_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOPRS_BRIDGE_EVENT_LOOP", "asyncio")
    assert loop_kind() == 0
