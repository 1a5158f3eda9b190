"""The service config: valid files load, invalid ones fail naming file, key and problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bridge.errors import ConfigError
from bridge.service.config import load_config, parse_config

VALID = """
broker:
  url: nats://127.0.0.1:4222
  content_mode: structured
  duplicate_window: 2m
leader_election:
  redis_url: redis://127.0.0.1:6379/0
  lease_ttl: 10s
sources:
  - name: app-config
    interval: 30
    http:
      url: https://config.example/app.json
      headers: {X-Team: platform}
      bearer_token: {env: APP_TOKEN}
      max_body_bytes: 1MiB
  - name: bucket
    interval: 1m
    max_backoff: 10m
    s3:
      bucket: my-bucket
      prefix: configs/
      endpoint_url: http://127.0.0.1:9000
      access_key_id: {env: S3_KEY}
      secret_access_key: {file: SECRET_FILE}
  - name: files
    interval: 500ms
    local: {path: LOCAL_DIR}
"""


def write(tmp_path: Path, text: str) -> Path:
    secret = tmp_path / "s3-secret"
    secret.write_text("very-secret-key\n")
    local = tmp_path / "data"
    local.mkdir(exist_ok=True)
    path = tmp_path / "bridge.yaml"
    path.write_text(text.replace("SECRET_FILE", str(secret)).replace("LOCAL_DIR", str(local)))
    return path


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_TOKEN", "tok-123")
    monkeypatch.setenv("S3_KEY", "AKIAEXAMPLE")


@pytest.mark.usefixtures("env")
def test_valid_config_loads_with_units_and_secrets(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, VALID))
    assert config.broker.kind == "nats"
    assert config.broker.content_mode == "structured"
    assert config.broker.duplicate_window_s == 120.0
    assert config.leader_election is not None
    assert config.leader_election.lease_ttl_s == 10.0
    http, s3, local = config.sources
    assert (http.name, http.interval_s, http.kind) == ("app-config", 30.0, "http")
    assert http.http is not None
    assert http.http.max_body_bytes == 1024 * 1024
    assert http.http.bearer_token is not None
    assert http.http.bearer_token.reveal() == "tok-123"
    assert s3.s3 is not None
    assert s3.s3.secret_access_key is not None
    assert s3.s3.secret_access_key.reveal() == "very-secret-key"
    assert (s3.interval_s, s3.max_backoff_s) == (60.0, 600.0)
    assert local.interval_s == 0.5
    # Secrets never show in a dump of the config.
    dump = repr(config)
    for secret in ("tok-123", "very-secret-key", "AKIAEXAMPLE"):
        assert secret not in dump


@pytest.mark.usefixtures("env")
def test_environment_overrides_file(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, VALID),
        env={
            "KOPRS_BRIDGE__BROKER__URL": "redis://127.0.0.1:6380/1",
            "KOPRS_BRIDGE__SOURCES__0__INTERVAL": "5s",
            "KOPRS_BRIDGE__BROKER__MAXLEN": "500",
        },
    )
    assert config.broker.kind == "redis"
    assert config.broker.maxlen == 500
    assert config.sources[0].interval_s == 5.0


INVALID = [
    ("not: [valid", "not valid YAML"),
    ("- a list", "top level must be a mapping"),
    ("sources: []\n", "missing required key(s) broker"),
    (
        "broker: {url: http://x}\nsources: [{name: a, interval: 1, local: {path: /}}]",
        "broker.url: must start with nats://",
    ),
    (
        "broker: {url: nats://x, color: red}\nsources: [{name: a, interval: 1, local: {path: /}}]",
        "broker: unknown key(s) color",
    ),
    ("broker: {url: nats://x}\nsources: []", "sources: must be a non-empty list"),
    (
        "broker: {url: nats://x}\nsources: [{name: a.b, interval: 1, local: {path: /}}]",
        "sources[0].name: 'a.b' is not usable as a subject token",
    ),
    (
        "broker: {url: nats://x}\nsources: [{name: a, interval: 0, local: {path: /}}]",
        "sources[0].interval: must be > 0",
    ),
    (
        "broker: {url: nats://x}\nsources: [{name: a, interval: soon, local: {path: /}}]",
        "sources[0].interval: must be a duration",
    ),
    (
        "broker: {url: nats://x}\nsources: [{name: a, interval: 1}]",
        "sources[0]: needs exactly one of http, s3, local",
    ),
    (
        "broker: {url: nats://x}\nsources: [{name: a, interval: 1, local: {path: /}, "
        "http: {url: 'http://x'}}]",
        "needs exactly one of http, s3, local (found http, local)",
    ),
    (
        "broker: {url: nats://x}\nsources: [{name: a, interval: 1, http: {url: 'ftp://x'}}]",
        "sources[0].http.url: must be an absolute http:// or https:// URL",
    ),
    (
        "broker: {url: nats://x}\nsources: [{name: a, interval: 1, local: {path: /}}, "
        "{name: a, interval: 2, local: {path: /}}]",
        "sources[1]: name 'a' is already used by sources[0]",
    ),
    (
        "broker: {url: nats://x}\nsources: [{name: a, interval: 1, s3: {bucket: B_}}]",
        "sources[0].s3.bucket: 'B_' is not a valid S3 bucket name",
    ),
    (
        "broker: {url: nats://x}\nsources: [{name: a, interval: 1, s3: {bucket: bkt, "
        "access_key_id: k}}]",
        "access_key_id and secret_access_key must be given together",
    ),
    (
        "broker: {url: nats://x}\nsources: [{name: a, interval: 1, s3: {bucket: bkt, "
        "session_token: t}}]",
        "sources[0].s3: session_token needs access_key_id and secret_access_key",
    ),
    (
        "broker: {url: nats://x}\nsources: [{name: a, interval: 1, s3: {bucket: bkt, "
        "role_arn: 'arn:aws:iam::1:role/r'}}]",
        "sources[0].s3: role_arn and web_identity_token_file must be given together",
    ),
    (
        "broker: {url: nats://x, auth: {token: t, creds_file: /nonexistent.creds}}\n"
        "sources: [{name: a, interval: 1, local: {path: /}}]",
        "broker.auth.creds_file: file '/nonexistent.creds' does not exist",
    ),
    (
        "broker: {url: nats://x, auth: {username: u, password: p, token: t}}\n"
        "sources: [{name: a, interval: 1, local: {path: /}}]",
        "broker.auth: give one authentication method, not username/password and token",
    ),
    (
        "broker: {url: redis://x, auth: {token: t}}\n"
        "sources: [{name: a, interval: 1, local: {path: /}}]",
        "broker.auth: unknown key(s) token (allowed: password, username)",
    ),
    (
        "broker: {url: nats://x, tls: {cert_file: /etc/hostname}}\n"
        "sources: [{name: a, interval: 1, local: {path: /}}]",
        "broker.tls: cert_file and key_file must be given together",
    ),
    (
        "broker: {url: nats://x}\nleader_election: {redis_url: 'redis://r', tls: {verify: maybe}}\n"
        "sources: [{name: a, interval: 1, local: {path: /}}]",
        "leader_election.tls.verify: must be true or false, not 'maybe'",
    ),
    (
        "broker: {url: nats://x}\nsources: [{name: a, interval: 1, http: {url: 'http://x', "
        "bearer_token: t, basic_auth: {username: u, password: p}}}]",
        "sources[0].http: give bearer_token or basic_auth, not both",
    ),
    (
        "broker: {url: nats://x}\nsources: [{name: a, interval: 1, http: {url: 'http://x', "
        "basic_auth: {username: 'a:b', password: p}}}]",
        "sources[0].http.basic_auth.username: must not contain ':'",
    ),
    (
        "broker: {url: nats://x}\nsources: [{name: a, interval: 1, http: {url: 'http://u:hunter2@h/x'}}]",
        "sources[0].http.url: must not carry credentials ('http://u:***@h/x')",
    ),
    (
        "broker: {url: nats://x}\nserver: {port: 70000}\n"
        "sources: [{name: a, interval: 1, local: {path: /}}]",
        "server.port: must be a TCP port (0-65535), not 70000",
    ),
    (
        "broker: {url: nats://x}\ntracing: {exporter: jaeger}\n"
        "sources: [{name: a, interval: 1, local: {path: /}}]",
        "tracing.exporter: must be 'none', 'console' or 'otlp', not 'jaeger'",
    ),
    (
        "broker: {url: nats://x}\ntracing: {sample_ratio: 2}\n"
        "sources: [{name: a, interval: 1, local: {path: /}}]",
        "tracing.sample_ratio: must be from 0 to 1, not 2",
    ),
    (
        "broker: {url: nats://x}\nlogging: {format: xml}\n"
        "sources: [{name: a, interval: 1, local: {path: /}}]",
        "logging.format: must be 'text' or 'json', not 'xml'",
    ),
    (
        "broker: {url: nats://x}\nsources: [{name: a, interval: 1, http: {url: 'http://x', "
        "bearer_token: {env: KOPRS_TEST_UNSET_VARIABLE}}}]",
        "bearer_token: environment variable KOPRS_TEST_UNSET_VARIABLE is not set",
    ),
    (
        "broker: {url: nats://x}\nsources: [{name: a, interval: 1, local: {path: /nonexistent/x}}]",
        "sources[0].local.path: '/nonexistent/x' is not a directory",
    ),
    (
        "broker: {url: nats://x}\nsources: [{name: a, interval: 10, max_backoff: 5, local: {path: /}}]",
        "sources[0].max_backoff: must be >= interval",
    ),
    (
        "broker: {url: nats://x, content_mode: fancy}\nsources: [{name: a, interval: 1, local: {path: /}}]",
        "broker.content_mode: must be 'binary' or 'structured'",
    ),
    (
        "broker: {url: nats://x}\nleader_election: {redis_url: redis://x, lease_ttl: 5, renew_every: 6}\n"
        "sources: [{name: a, interval: 1, local: {path: /}}]",
        "leader_election.renew_every: must be shorter than lease_ttl",
    ),
    (
        "broker: {url: nats://x}\nsources: [{name: a, interval: 1, http: {url: 'http://x', "
        "max_body_bytes: lots}}]",
        "sources[0].http.max_body_bytes: must be a size in bytes",
    ),
]


@pytest.mark.parametrize(("text", "message"), INVALID, ids=[m for _, m in INVALID])
def test_invalid_config_names_file_key_and_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).startswith(f"{path}:")
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "absent.yaml")


def test_bad_environment_override_names_the_variable() -> None:
    raw = {
        "broker": {"url": "nats://x"},
        "sources": [{"name": "a", "interval": 1, "local": {"path": "/"}}],
    }
    with pytest.raises(ConfigError, match="KOPRS_BRIDGE__SOURCES__3__INTERVAL"):
        parse_config(raw, env={"KOPRS_BRIDGE__SOURCES__3__INTERVAL": "1"})


def test_password_in_broker_url_is_redacted_in_errors_and_description() -> None:
    raw = {"broker": {"url": "ftp://user:hunter2@host"}, "sources": []}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, env={})
    assert "hunter2" not in str(caught.value)
    ok = parse_config(
        {
            "broker": {"url": "nats://user:hunter2@host:4222"},
            "sources": [{"name": "a", "interval": 1, "local": {"path": "/"}}],
        },
        env={},
    )
    assert "hunter2" not in ok.broker.description
    assert "hunter2" not in repr(ok)


@pytest.mark.usefixtures("env")
def test_check_command_exit_codes(tmp_path: Path) -> None:
    good = write(tmp_path, VALID)
    ok = subprocess.run(
        [sys.executable, "-m", "bridge", "check", "--config", str(good)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "3 source(s)" in ok.stdout
    assert "tok-123" not in ok.stdout + ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "broker: {url: nats://x}\nsources: [{name: 'a b', interval: 1, local: {path: /}}]"
    )
    failed = subprocess.run(
        [sys.executable, "-m", "bridge", "check", "--config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert failed.returncode == 2
    assert "sources[0].name" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_operations_and_security_sections_load(tmp_path: Path) -> None:
    ca, cert, key, creds = (tmp_path / n for n in ("ca.pem", "c.pem", "k.pem", "u.creds"))
    for f in (ca, cert, key, creds):
        f.write_text("x")
    config = parse_config(
        {
            "broker": {
                "url": "tls://127.0.0.1:4222",
                "tls": {"ca_file": str(ca), "cert_file": str(cert), "key_file": str(key)},
                "auth": {"creds_file": str(creds)},
            },
            "leader_election": {
                "redis_url": "rediss://127.0.0.1:6380",
                "tls": {"ca_file": str(ca), "server_name": "redis.local"},
                "auth": {"username": "bridge", "password": "pw"},
            },
            "server": {"host": "127.0.0.1", "port": 0, "metrics": False},
            "tracing": {
                "exporter": "otlp",
                "endpoint": "http://127.0.0.1:4318",
                "sample_ratio": 0.5,
            },
            "logging": {"format": "json", "level": "debug"},
            "sources": [
                {
                    "name": "a",
                    "interval": "1s",
                    "http": {
                        "url": "https://127.0.0.1/x",
                        "basic_auth": {"username": "u", "password": "p"},
                        "tls": {"ca_file": str(ca)},
                        "max_redirects": 0,
                    },
                }
            ],
        }
    )
    assert config.broker.tls is not None
    assert config.broker.tls.cert_file == cert
    assert config.broker.auth is not None
    assert config.broker.auth.creds_file == creds
    election = config.leader_election
    assert election is not None
    assert election.tls is not None
    assert election.tls.server_name == "redis.local"
    assert election.auth is not None
    assert election.auth.password is not None
    assert election.auth.password.reveal() == "pw"
    assert "pw" not in repr(config)
    assert config.server is not None
    assert (config.server.port, config.server.metrics) == (0, False)
    assert (config.tracing.exporter, config.tracing.sample_ratio) == ("otlp", 0.5)
    assert (config.logging.format, config.logging.level) == ("json", "DEBUG")
    http = config.sources[0].http
    assert http is not None
    assert http.basic_auth is not None
    assert http.basic_auth.username == "u"
    assert "'p'" not in repr(http)
    assert http.max_redirects == 0
