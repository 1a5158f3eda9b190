"""The conftest check that fails an asyncio test which leaves tasks running."""

from __future__ import annotations

import pytest

_INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
"""

_CONFTEST = """
from tests.conftest import _asyncio_task_leak_check, _no_leaked_asyncio_tasks
"""

_TESTS = """
import asyncio

import pytest


@pytest.fixture
async def background():
    task = asyncio.create_task(asyncio.Event().wait())
    yield task
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_leaks_a_task():
    asyncio.create_task(asyncio.Event().wait(), name="forgotten")


async def test_cleans_up():
    task = asyncio.create_task(asyncio.sleep(10))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_task_owned_by_a_fixture(background):
    assert not background.done()


def test_sync_test_is_not_checked():
    pass
"""


def test_leftover_task_fails_the_test(pytester: pytest.Pytester) -> None:
    pytester.makeini(_INI)
    pytester.makeconftest(_CONFTEST)
    pytester.makepyfile(test_inner=_TESTS)

    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")

    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks_a_task*",
            "*left 1 asyncio task(s) running*",
            "*forgotten*",
        ]
    )
