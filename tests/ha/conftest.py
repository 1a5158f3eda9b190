"""High availability: leases, fencing, checkpoints and fair sharing, in-process
(test_ha.py) and with replicas as processes (test_ha_processes.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the test's Redis (its URL as ``.url``)."""
    client = aioredis.from_url(redis_url)
    client.url = redis_url  # type: ignore[attr-defined]
    yield client
    await client.aclose()
