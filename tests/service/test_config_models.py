"""The config models: every error at once, the variable behind a bad override, the JSON Schema.

The messages of single errors are pinned by ``tests/test_config.py`` and
``tests/test_bad_input.py``; here: several problems in one document are all reported (one line
each), a value from ``KOPRS_BRIDGE__...`` is blamed on the variable, the accepted spellings of
durations, sizes and flags, and the committed JSON Schema is the one the models generate and
accepts the committed configs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pydantic
import pytest
import yaml

from bridge.cli import main as cli_main
from bridge.errors import ConfigError
from bridge.service.config import (
    SCHEMA_ID,
    LocalSourceConfig,
    SourceConfig,
    config_schema,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parents[2]
SCHEMA_FILE = REPO / "schemas/config/bridge-config.schema.json"
COMMITTED_CONFIGS = [
    REPO / "deploy/compose/bridge/bridge.yaml",
    REPO / "k8s/base/bridge.yaml",
    REPO / "k8s/overlays/example/bridge.yaml",
]


def good() -> dict[str, Any]:
    return {
        "broker": {"url": "nats://127.0.0.1:4222"},
        "sources": [{"name": "a", "interval": 1, "local": {"path": "/"}}],
    }


def problems(raw: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, origin="bridge.yaml", env=env or {})
    return str(caught.value).splitlines()


def test_every_problem_of_a_document_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(
        "broker: {url: 'nats://x', colour: red, ack_timeout: soon}\n"
        "sources:\n"
        "  - {name: 'a b', interval: 1, local: {path: /}}\n"
        "  - {name: b, interval: 0, http: {url: 'ftp://x'}}\n"
        "  - {name: c, interval: 1, s3: {bucket: bkt, session_token: t}, local: {path: /}}\n"
        "logging: {format: xml}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    lines = str(caught.value).splitlines()
    assert lines == [
        f"{path}: broker: unknown key(s) colour (allowed: ack_timeout, auth, content_mode, "
        "duplicate_window, max_age, max_msgs_per_subject, maxlen, replicas, stream, "
        "subject_prefix, tls, url)",
        f"{path}: broker.ack_timeout: must be a duration (seconds, or like 500ms, 30s, 5m, 1h), "
        "not 'soon'",
        f"{path}: sources[0].name: 'a b' is not usable as a subject token: use 1-64 characters "
        "of A-Z, a-z, 0-9, '_' or '-'",
        f"{path}: sources[1].interval: must be > 0, got 0",
        f"{path}: sources[1].http.url: must be an absolute http:// or https:// URL, not 'ftp://x'",
        f"{path}: sources[2].s3: session_token needs access_key_id and secret_access_key",
        f"{path}: sources[2]: needs exactly one of http, s3, local (found local, s3)",
        f"{path}: logging.format: must be 'text' or 'json', not 'xml'",
    ]


def test_unknown_and_missing_keys_of_one_mapping_share_a_line() -> None:
    lines = problems({"sources": [{"name": "a", "interval": 1, "local": {"path": "/"}}], "x": 1, "y": 2})  # fmt: skip
    assert lines == [
        "bridge.yaml: (top level): unknown key(s) x, y (allowed: broker, leader_election, "
        "logging, max_concurrent_polls, server, sources, state, tracing)",
        "bridge.yaml: (top level): missing required key(s) broker",
    ]


def test_a_bad_value_from_the_environment_names_the_variable_not_the_file() -> None:
    lines = problems(
        good(),
        env={
            "KOPRS_BRIDGE__SOURCES__0__INTERVAL": "soon",
            "KOPRS_BRIDGE__SERVER__PORT": "70000",  # creates the server section
            "KOPRS_BRIDGE__BROKER__ACK_TIMEOUT": "2s",  # a good one: not reported
        },
    )
    assert lines == [
        "environment variable KOPRS_BRIDGE__SOURCES__0__INTERVAL: sources[0].interval: must be "
        "a duration (seconds, or like 500ms, 30s, 5m, 1h), not 'soon'",
        "environment variable KOPRS_BRIDGE__SERVER__PORT: server.port: must be a TCP port "
        "(0-65535), not 70000",
    ]


def test_a_section_created_by_the_environment_is_blamed_on_the_variable() -> None:
    lines = problems(good(), env={"KOPRS_BRIDGE__LEADER_ELECTION__LEASE_TTL": "5"})
    assert lines == [
        "environment variable KOPRS_BRIDGE__LEADER_ELECTION__LEASE_TTL: leader_election: "
        "missing required key(s) redis_url"
    ]


def test_every_unusable_environment_variable_is_reported() -> None:
    lines = problems(
        good(),
        env={"KOPRS_BRIDGE__SOURCES__3__INTERVAL": "1", "KOPRS_BRIDGE__BROKER__URL__X": "y"},
    )
    assert lines == [
        "environment variable KOPRS_BRIDGE__BROKER__URL__X: broker.url in bridge.yaml is not a "
        "mapping",
        "environment variable KOPRS_BRIDGE__SOURCES__3__INTERVAL: '3' is not an index of "
        "sources (it has 1 entries)",
    ]


@pytest.mark.parametrize(
    ("interval", "seconds"),
    [(30, 30.0), (1.5, 1.5), ("500ms", 0.5), ("30s", 30.0), (" 5m ", 300.0), ("1h", 3600.0),
     ("2.5", 2.5), ("0.001", 0.001), ("1 s", 1.0)],
)  # fmt: skip
def test_duration_spellings(interval: object, seconds: float) -> None:
    raw = good()
    raw["sources"][0]["interval"] = interval
    assert parse_config(raw).sources[0].interval_s == seconds


@pytest.mark.parametrize("interval", ["1d", "1 min", "-5s", "1e3", ".5s", "5S", True, "", [1]])
def test_duration_spellings_refused(interval: object) -> None:
    raw = good()
    raw["sources"][0]["interval"] = interval
    (line,) = problems(raw)
    assert line.startswith("bridge.yaml: sources[0].interval: must be a duration"), line


@pytest.mark.parametrize(
    ("size", "count"),
    [(65536, 65536), ("64KiB", 65536), ("1 MB", 10**6), ("16MiB", 16 * 2**20), ("2GB", 2 * 10**9),
     ("1GiB", 2**30), ("10B", 10), (" 7 ", 7)],
)  # fmt: skip
def test_size_spellings(size: object, count: int) -> None:
    raw = good()
    raw["sources"][0]["inline_body_bytes"] = size
    assert parse_config(raw).sources[0].inline_body_bytes == count


@pytest.mark.parametrize("size", ["1.5MiB", "64kib", "64K", "1TB", 1.0, False, "-1"])
def test_size_spellings_refused(size: object) -> None:
    raw = good()
    raw["sources"][0]["inline_body_bytes"] = size
    (line,) = problems(raw)
    assert line.startswith("bridge.yaml: sources[0].inline_body_bytes: must be a size in bytes")


@pytest.mark.parametrize("flag", ["yes", "true", 1, 0, "on"])
def test_flags_are_true_or_false_only(flag: object) -> None:
    raw = good()
    raw["sources"][0]["local"]["create"] = flag
    (line,) = problems(raw)
    assert line == f"bridge.yaml: sources[0].local.create: must be true or false, not {flag!r}"


def test_documents_use_the_yaml_keys_and_python_the_attribute_names(tmp_path: Path) -> None:
    raw = good()
    raw["sources"][0]["interval_s"] = raw["sources"][0].pop("interval")
    assert problems(raw) == [
        "bridge.yaml: sources[0]: unknown key(s) interval_s (allowed: http, inline_body_bytes, "
        "interval, local, max_backoff, name, s3)",
        "bridge.yaml: sources[0]: missing required key(s) interval",
    ]
    made = SourceConfig(name="a", interval_s=2, local=LocalSourceConfig(path=tmp_path))
    assert (made.interval_s, made.kind) == (2.0, "local")


def test_config_objects_are_frozen_and_dumps_hold_no_secret() -> None:
    raw = good()
    raw["broker"]["url"] = "nats://user:hunter2@127.0.0.1:4222"
    config = parse_config(raw)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.broker.stream = "OTHER"
    assert "hunter2" not in config.model_dump_json()
    assert "hunter2" not in json.dumps(config.model_dump(), default=repr)
    assert config.origin == "<config>"


def test_committed_schema_is_the_generated_one() -> None:
    committed = json.loads(SCHEMA_FILE.read_text())
    assert committed == config_schema(), (
        "schemas/config/bridge-config.schema.json is out of date: "
        "koprs-bridge config-schema > schemas/config/bridge-config.schema.json"
    )
    assert committed["$id"] == SCHEMA_ID


def test_config_schema_command_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["config-schema"]) == 0
    assert json.loads(capsys.readouterr().out) == config_schema()


@pytest.mark.parametrize("path", COMMITTED_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_schema_accepts_the_committed_configs(path: Path) -> None:
    validator = jsonschema.Draft202012Validator(config_schema())
    assert [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))] == []


@pytest.mark.parametrize(
    "change",
    [
        {"colour": "red"},
        {"sources": []},
        {"sources": [{"name": "a", "interval": "1d", "local": {"path": "/"}}]},
        {"sources": [{"name": "a", "interval": 1}]},
        {"sources": [{"name": "a", "interval": 1, "local": {"path": "/"}, "s3": {"bucket": "b"}}]},
        {"broker": {"url": "nats://x", "auth": {"token": {"env": "T", "file": "/t"}}}},
        {"broker": {"url": "nats://x", "max_msgs_per_subject": "16"}},
        {"logging": {"level": "loud"}},
        {
            "sources": [
                {"name": "a", "interval": 1, "http": {"url": "http://h", "headers": {"A B": "v"}}}
            ]
        },
    ],
)
def test_schema_refuses_what_the_models_refuse(change: dict[str, Any]) -> None:
    document = {**good(), **change}
    Draft = jsonschema.Draft202012Validator
    assert list(Draft(config_schema()).iter_errors(document)), "the schema accepted it"
    with pytest.raises(ConfigError):
        parse_config(document)


def test_schema_level_pattern_is_case_insensitive() -> None:
    validator = jsonschema.Draft202012Validator(config_schema())
    document = {**good(), "logging": {"level": "Debug"}}
    assert list(validator.iter_errors(document)) == []
    assert parse_config(document).logging.level == "DEBUG"


def test_check_prints_every_problem_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(
        "broker: {url: 'nats://x'}\n"
        "sources: [{name: 'a b', interval: 1, local: {path: /}}, {name: b, interval: never, local: {path: /}}]\n"
    )
    assert cli_main(["check", "--config", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "koprs-bridge: invalid config: 2 problems:",
        f"  {path}: sources[0].name: 'a b' is not usable as a subject token: use 1-64 characters "
        "of A-Z, a-z, 0-9, '_' or '-'",
        f"  {path}: sources[1].interval: must be a duration (seconds, or like 500ms, 30s, 5m, "
        "1h), not 'never'",
    ]
