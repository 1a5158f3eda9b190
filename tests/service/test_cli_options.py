"""Options shared by every subcommand (``--log-level``) work before and after its name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bridge.cli import _parser, main

COMMANDS = [
    ["run", "--config", "x.yaml"],
    ["check", "--config", "x.yaml"],
    ["status", "--config", "x.yaml"],
    ["tail", "--broker", "nats://127.0.0.1:4222"],
    ["asyncapi", "--config", "x.yaml"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_log_level_before_or_after_the_subcommand(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KOPRS_BRIDGE_LOG_LEVEL", raising=False)
    parser = _parser()
    assert parser.parse_args(command).log_level is None
    assert parser.parse_args([*command, "--log-level", "debug"]).log_level == "debug"
    assert parser.parse_args(["--log-level", "error", *command]).log_level == "error"
    both = ["--log-level", "error", *command, "--log-level", "debug"]
    assert parser.parse_args(both).log_level == "debug"  # the last one given wins


def test_the_environment_default_is_kept_by_a_subcommand_without_the_option(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KOPRS_BRIDGE_LOG_LEVEL", "warning")
    parser = _parser()
    assert parser.parse_args(["run"]).log_level == "warning"
    assert parser.parse_args(["run", "--log-level", "debug"]).log_level == "debug"


def test_an_invalid_level_after_the_subcommand_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args(["run", "--log-level", "loud"])
    assert exited.value.code == 2
    assert "invalid choice: 'loud'" in capsys.readouterr().err


def test_check_with_the_option_after_the_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bridge.yaml"
    source = {"name": "files", "interval": 5, "local": {"path": str(tmp_path)}}
    path.write_text(yaml.safe_dump({"broker": {"url": "nats://127.0.0.1:1"}, "sources": [source]}))
    assert main(["check", "--config", str(path), "--log-level", "debug"]) == 0
    assert "OK" in capsys.readouterr().out


def test_subcommand_help_lists_the_shared_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--help"])
    assert "--log-level" in capsys.readouterr().out
