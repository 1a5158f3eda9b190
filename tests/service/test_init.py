"""``koprs-bridge init``: the starter config it writes is accepted by ``check`` as written, and
still is with every optional key it shows as a comment switched on (so the comments cannot
drift from the config schema)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.cli import main
from bridge.service.config import load_config

OPTIONAL = re.compile(r"^(\s*)# (\s*[a-z_]+:.*)$")
SECRETS = {
    "APP_TOKEN": "t0ken",
    "BROKER_PASSWORD": "pw",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "S3_KEY": "k",
    "S3_SECRET": "s",
}


def init(tmp_path: Path, *args: str) -> Path:
    output = tmp_path / "bridge.yaml"
    assert main(["init", "--output", str(output), *args]) == 0
    return output


def every_option_on(text: str) -> str:
    lines = []
    for line in text.splitlines():
        match = OPTIONAL.match(line)
        lines.append(match.group(1) + match.group(2) if match else line)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("broker", ["nats://127.0.0.1:4222", "redis://127.0.0.1:6379/0"])
def test_the_starter_config_checks_as_written_and_with_every_option(
    tmp_path: Path, broker: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "drop"
    output = init(
        tmp_path,
        "--broker", broker,
        "--http", "https://config.example.com/app.json",
        "--http", "https://config.example.com/app.json?x=1",
        "--s3", "s3://manifests/prod/",
        "--local", str(folder),
        "--interval", "10s",
    )  # fmt: skip
    assert "koprs-bridge check --config" in capsys.readouterr().out
    config = load_config(output, env={})
    assert [(s.name, s.kind, s.interval_s) for s in config.sources] == [
        ("config-example-com-app-json", "http", 10.0),
        ("config-example-com-app-json-2", "http", 10.0),
        ("manifests-prod", "s3", 10.0),
        (config.sources[3].name, "local", 10.0),
    ]
    assert not folder.exists()  # created by the bridge at start (create: true), not by init
    assert main(["check", "--config", str(output)]) == 0
    full = tmp_path / "full.yaml"
    full.write_text(every_option_on(output.read_text()))
    assert full.read_text() != output.read_text()
    for name, value in SECRETS.items():  # {env: NAME} secrets are read from the process env
        monkeypatch.setenv(name, value)
    config = load_config(full, env={})
    assert config.leader_election is not None


def test_leader_election_when_a_redis_is_named(tmp_path: Path) -> None:
    output = init(tmp_path, "--http", "https://a.example/x", "--redis", "redis://127.0.0.1:1/0")
    config = load_config(output, env={})
    assert config.leader_election is not None


def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "--output", str(tmp_path / "a.yaml")]) == 2
    assert "name at least one source" in capsys.readouterr().err
    assert main(["init", "--output", "-", "--http", "ftp://x/y"]) == 2
    assert "expected an http:// or https:// URL" in capsys.readouterr().err
    assert main(["init", "--output", "-", "--s3", "bucket/prefix"]) == 2
    assert "expected s3://bucket" in capsys.readouterr().err
    existing = init(tmp_path, "--http", "https://a.example/x")
    assert main(["init", "--output", str(existing), "--http", "https://a.example/y"]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["init", "--output", str(existing), "--force", "--local", "."]) == 0
