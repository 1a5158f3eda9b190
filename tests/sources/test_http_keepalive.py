"""A source's HTTP connection lives across polls: its keep-alive expiry outlives the interval
(httpx's default, 5 s, closed it before every poll at 10 s)."""

from __future__ import annotations

import httpx
import pytest

from bridge.service.config import parse_config
from bridge.service.factories import build_source, http_limits
from bridge.sources.http import HttpPoller


@pytest.mark.parametrize("interval_s", [0.5, 10, 30, 300])
async def test_the_connection_of_a_source_outlives_its_interval(interval_s: float) -> None:
    raw = {
        "broker": {"url": "nats://127.0.0.1:1"},
        "sources": [
            {"name": "doc", "interval": interval_s, "http": {"url": "http://127.0.0.1:1/doc"}}
        ],
    }
    spec = build_source(parse_config(raw, env={}).sources[0])
    assert isinstance(spec.source, HttpPoller)
    client = spec.source._client
    assert isinstance(client, httpx.AsyncClient)
    pool = client._transport._pool  # type: ignore[attr-defined]
    try:
        assert pool._keepalive_expiry > interval_s * 1.5
        assert http_limits(interval_s).keepalive_expiry == pool._keepalive_expiry
    finally:
        await spec.source.aclose()
