"""No secret value appears anywhere the service writes or shows.

One run of the real service, against real servers, with known secret values in every place a
config can hold one: the NATS password (a ``{file: ...}`` secret, first wrong, then fixed), the
leader election's Redis password (in its URL, from ``{env: ...}``), an HTTP bearer token and a
secret header, an HTTP basic-auth password (on a source that fails), and an S3 secret key. It
runs at DEBUG level through a failing phase (wrong password) and a working one, then every
output is scanned for every secret (and the basic-auth header's base64 form):

* every log record of every logger at any level, formatted as text and as JSON, with its
  traceback and its attributes;
* the error messages of failed connections (NATS and Redis, wrong passwords);
* the published CloudEvents;
* ``koprs-bridge check`` (of the config, and of an invalid config with a password in a URL)
  and ``koprs-bridge status`` (working, and with a wrong password);
* ``repr``/``str`` of the loaded config and its dumps (``model_dump``, ``model_dump_json``);
* the operations server's ``/healthz``, ``/readyz`` and ``/metrics``, and the in-memory spans.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bridge.cli import main
from bridge.connections import redis_client
from bridge.errors import BridgeError
from bridge.secrets import Secret
from bridge.service.config import AuthConfig, load_config
from bridge.sinks.nats import NatsSink, NatsSinkConfig
from bridge.sinks.redis import RedisSink, RedisSinkConfig
from bridge.telemetry import JsonFormatter, Telemetry
from tests.support.httpserver import Document, HttpTestServer
from tests.support.security import LogRecorder, recording_logs, running_bridge
from tests.support.servers import NatsServer, RedisServer, S3Server

pytestmark = pytest.mark.servers

NATS_PASSWORD = "natsPW-7Hq2xK"
NATS_WRONG = "natsWRONG-5Lp9vA"
REDIS_PASSWORD = "redisPW-2Kd8rT"
REDIS_WRONG = "redisWRONG-6Bn3sE"
BEARER = "bearerTOKEN-9Zx4mQ"
HEADER = "headerKEY-3Jw7nP"
BASIC = "basicPW-4Mn6cR"
S3_SECRET = "s3SECRET-8Wv1yU"
SECRETS = (NATS_PASSWORD, NATS_WRONG, REDIS_PASSWORD, REDIS_WRONG, BEARER, HEADER, BASIC, S3_SECRET)
FORMS = (
    *SECRETS,
    base64.b64encode(f"reader:{BASIC}".encode()).decode(),  # the Authorization header value
)


@pytest.fixture
def nats() -> Iterator[NatsServer]:
    config = f'authorization {{ users = [ {{user: bridge, password: "{NATS_PASSWORD}"}} ] }}\n'
    with NatsServer(config=config) as server:
        yield server


@pytest.fixture
def redis_acl(tmp_path: Path) -> Iterator[RedisServer]:
    acl = tmp_path / "users.acl"
    acl.write_text(f"user default off\nuser koprs on >{REDIS_PASSWORD} ~* &* +@all\n")
    with RedisServer(extra_args=["--aclfile", str(acl)]) as server:
        yield server


@pytest.fixture
def http() -> Iterator[HttpTestServer]:
    with HttpTestServer() as server:
        server.route("/doc", Document(b'{"v": 1}', etag='"v1"'))
        server.route("/broken", Document(status=500))
        yield server


def redis_url(server: RedisServer, password: str) -> str:
    return server.url.replace("redis://", f"redis://koprs:{password}@")


def bridge_config(
    nats: NatsServer,
    http: HttpTestServer,
    s3: S3Server,
    bucket: str,
    password_file: Path,
) -> dict[str, Any]:
    return {
        "broker": {
            "url": nats.url,
            "ack_timeout": "3s",
            "auth": {"username": "bridge", "password": {"file": str(password_file)}},
        },
        "leader_election": {"redis_url": {"env": "HYGIENE_REDIS_URL"}, "lease_ttl": "3s"},
        "server": {"host": "127.0.0.1", "port": 0},
        "logging": {"level": "DEBUG"},
        "sources": [
            {
                "name": "web",
                "interval": 0.1,
                "max_backoff": 0.2,
                "http": {
                    "url": http.url("/doc"),
                    "bearer_token": BEARER,
                    "headers": {"X-Api-Key": HEADER},
                },
            },
            {
                "name": "broken",
                "interval": 0.1,
                "max_backoff": 0.2,
                "http": {
                    "url": http.url("/broken"),
                    "basic_auth": {"username": "reader", "password": BASIC},
                },
            },
            {
                "name": "bucket",
                "interval": 0.1,
                "max_backoff": 0.2,
                "s3": {
                    "bucket": bucket,
                    "endpoint_url": s3.endpoint_url,
                    "region": s3.region,
                    "access_key_id": "AKIAHYGIENETEST",
                    "secret_access_key": S3_SECRET,
                },
            },
        ],
    }


async def cli(*argv: str) -> str:
    """Run ``koprs-bridge`` in a thread (it runs its own event loop); stdout and stderr."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return main(list(argv))

    code = await asyncio.to_thread(run)
    return f"exit {code}\n{out.getvalue()}\n{err.getvalue()}"


async def scrape(base: str) -> str:
    async with httpx.AsyncClient() as client:
        pages = [await client.get(f"{base}{path}") for path in ("/healthz", "/readyz", "/metrics")]
    return "\n".join(f"{page.status_code} {page.text}" for page in pages)


def everything_logged(logs: LogRecorder) -> str:
    json_formatter = JsonFormatter()
    parts = [logs.text()]
    for record in logs.records:
        parts.append(json_formatter.format(record))
        parts.append(repr({k: v for k, v in record.__dict__.items() if k != "exc_info"}))
    return "\n".join(parts)


async def connection_errors(nats: NatsServer, redis_server: RedisServer) -> list[str]:
    """The errors of connections with wrong passwords, as raised (message and repr)."""
    texts: list[str] = []
    sink = NatsSink(
        NatsSinkConfig(
            url=nats.url.replace("nats://", f"nats://bridge:{NATS_WRONG}@"),
            auth=AuthConfig(username="bridge", password=Secret.inline(NATS_WRONG)),
        )
    )
    try:
        await sink.connect()
    except BridgeError as exc:
        texts += [str(exc), repr(exc), str(exc.__cause__)]
    finally:
        await sink.aclose()
    redis_sink = RedisSink(RedisSinkConfig(url=redis_url(redis_server, REDIS_WRONG)))
    try:
        await redis_sink.connect()
    except BridgeError as exc:
        texts += [str(exc), repr(exc)]
    finally:
        await redis_sink.aclose()
    client = redis_client(redis_url(redis_server, REDIS_WRONG))
    try:
        await client.ping()
    except Exception as exc:
        texts += [str(exc), repr(exc)]
    finally:
        await client.aclose()
    assert len(texts) == 7, texts
    return texts


async def test_no_secret_appears_anywhere(
    nats: NatsServer,
    redis_acl: RedisServer,
    http: HttpTestServer,
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="cfg/app.yaml", Body=b"x: 1")
    password_file = tmp_path / "nats-password"
    password_file.write_text(NATS_WRONG + "\n")
    monkeypatch.setenv("HYGIENE_REDIS_URL", redis_url(redis_acl, REDIS_PASSWORD))
    raw = bridge_config(nats, http, s3_server, s3_bucket, password_file)
    config_file = tmp_path / "bridge.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    config = load_config(config_file)

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry.from_config(config, tracer_provider=provider)
    outputs: list[str] = []
    try:
        with recording_logs(logging.DEBUG) as logs:
            async with running_bridge(config, telemetry=telemetry) as (bridge, published):
                await logs.wait_for(
                    lambda records: any("serving /healthz" in r.getMessage() for r in records)
                )
                assert telemetry.server is not None
                base = telemetry.server.url
                # phase 1: the broker refuses the password
                await logs.wait_for(
                    lambda records: any("retrying in" in r.getMessage() for r in records)
                )
                assert not bridge.connected.is_set()
                outputs.append(await scrape(base))
                # phase 2: the password file is fixed; the broken source keeps failing
                password_file.write_text(NATS_PASSWORD + "\n")
                await published.wait_for(2)
                await logs.wait_for(
                    lambda records: any(
                        r.levelno >= logging.WARNING and "broken" in r.getMessage() for r in records
                    )
                )
                outputs.append(await scrape(base))
                outputs.append(await cli("status", "--config", str(config_file)))
                outputs.append(await cli("check", "--config", str(config_file)))
            outputs += await connection_errors(nats, redis_acl)
            monkeypatch.setenv("HYGIENE_REDIS_URL", redis_url(redis_acl, REDIS_WRONG))
            outputs.append(await cli("status", "--config", str(config_file)))
            invalid = tmp_path / "invalid.yaml"
            invalid.write_text(
                yaml.safe_dump(
                    {**raw, "broker": {"url": f"ftp://bridge:{NATS_PASSWORD}@127.0.0.1:1"}}
                )
            )
            outputs.append(await cli("check", "--config", str(invalid)))
        outputs.append(everything_logged(logs))
    finally:
        provider.shutdown()

    assert "WRONGPASS" in outputs[-3], "status said why it failed"
    assert "exit 2" in outputs[-2], "the invalid config was refused"
    assert any(source == "web" for source, _ in published.events)
    assert any(source == "bucket" for source, _ in published.events)
    outputs += [event.to_structured().decode() for _, event in published.events]
    outputs += [repr(config), str(config)]
    outputs.append(json.dumps(config.model_dump(), default=repr))
    outputs.append(config.model_dump_json())
    outputs.append(telemetry.metrics.render().decode())
    outputs += [span.to_json() for span in exporter.get_finished_spans()]
    assert exporter.get_finished_spans(), "spans were recorded"

    blob = "\n".join(outputs)
    assert "DEBUG" in blob, "debug logs were captured"
    leaks = {secret for secret in FORMS if secret in blob}
    assert not leaks, f"secret values found in the output: {sorted(leaks)}"
    # the places that name the servers do so with the password masked
    assert "koprs:***@" in blob
