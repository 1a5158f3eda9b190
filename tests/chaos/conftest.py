"""The failure suite: every test here is marked ``chaos`` and kills its replicas when it ends.

A chaos run appends a one-line report (seed, faults survived, events checked, time) to
:data:`REPORTS`; they are printed at the end of the pytest session, passed or not, so CI logs
show what each seed did.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.replicas import kill_leftover_replicas

REPORTS: list[str] = []

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.chaos)


@pytest.fixture(autouse=True)
def _kill_leftover_replicas() -> Iterator[None]:
    """Whatever happened to the test's event loop, no replica outlives the test."""
    yield
    kill_leftover_replicas()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORTS:
        terminalreporter.section("chaos runs")
        for line in REPORTS:
            terminalreporter.write_line(line)
