"""A config part whose extra is missing is refused naming the extra: ``check``, ``run`` and a
reload (the extras are made "missing" by pointing them at a module that does not exist; the
real thing, a base install in a fresh virtualenv, is ``test_base_install.py``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from bridge import extras
from bridge.cli import main
from bridge.errors import ConfigError, MissingExtraError
from bridge.extras import check_config_extras, require_extra
from bridge.service.config import load_config, parse_config
from bridge.service.reload import ConfigWatcher
from bridge.service.runner import Bridge, build_source

NOWHERE = "koprs_bridge_tests_no_such_module"


@pytest.fixture
def without_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    for extra in ("s3", "otel", "faststream"):
        monkeypatch.setitem(extras.EXTRAS, extra, (NOWHERE,))


def _local(tmp_path: Path) -> dict[str, object]:
    return {"name": "files", "interval": 5, "local": {"path": str(tmp_path), "create": True}}


def _s3() -> dict[str, object]:
    return {"name": "docs", "interval": 5, "s3": {"bucket": "docs-bucket"}}


def _write(path: Path, *sources: dict[str, object], **more: object) -> Path:
    document = {"broker": {"url": "nats://127.0.0.1:1"}, "sources": list(sources), **more}
    path.write_text(yaml.safe_dump(document), "utf-8")
    return path


def test_the_error_is_a_config_error_and_an_import_error() -> None:
    with pytest.raises(MissingExtraError) as caught:
        require_extra("s3", "S3Store", [NOWHERE])
    error = caught.value
    assert isinstance(error, ConfigError)
    assert isinstance(error, ImportError)
    assert (error.extra, error.name, error.feature) == ("s3", NOWHERE, "S3Store")
    assert "pip install 'koprs-bridge[s3]'" in str(error)


def test_installed_extras_pass(tmp_path: Path) -> None:
    """The test environment has every extra: nothing is refused."""
    config = parse_config(
        {
            "broker": {"url": "nats://127.0.0.1:1"},
            "sources": [_s3()],
            "tracing": {"exporter": "otlp"},
        }
    )
    check_config_extras(config)


@pytest.mark.usefixtures("without_extras")
@pytest.mark.parametrize(
    ("more", "extra", "where"),
    [
        ({}, "s3", "sources[1] ('docs', s3:)"),
        ({"tracing": {"exporter": "otlp"}}, "otel", "tracing.exporter 'otlp'"),
        ({"tracing": {"exporter": "console"}}, "otel", "tracing.exporter 'console'"),
    ],
)
def test_check_exits_2_naming_the_extra(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    more: dict[str, object],
    extra: str,
    where: str,
) -> None:
    sources = [_local(tmp_path), _s3()] if extra == "s3" else [_local(tmp_path)]
    path = _write(tmp_path / "bridge.yaml", *sources, **more)
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {where} needs the {extra!r} extra" in err
    assert f"pip install 'koprs-bridge[{extra}]'" in err
    assert main(["run", "--config", str(path), "--reload-interval", "0"]) == 2
    assert f"pip install 'koprs-bridge[{extra}]'" in capsys.readouterr().err


@pytest.mark.usefixtures("without_extras")
def test_building_an_s3_source_names_it_and_the_extra() -> None:
    config = parse_config({"broker": {"url": "nats://127.0.0.1:1"}, "sources": [_s3()]})
    with pytest.raises(MissingExtraError, match=r"source 'docs' \(s3:\) needs the 's3' extra"):
        build_source(config.sources[0])


@pytest.mark.usefixtures("without_extras")
async def test_a_reload_adding_an_s3_source_is_rejected_with_the_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rejected as an invalid config is: one error line naming the extra, no traceback."""
    path = _write(tmp_path / "bridge.yaml", _local(tmp_path / "files"))
    watcher = ConfigWatcher(path, interval_s=60, env={})
    bridge = Bridge(load_config(path, env={}))
    _write(path, _local(tmp_path / "files"), _s3())
    assert await watcher.check(bridge) is None
    assert watcher.rejected == 1
    assert watcher.last_error is not None
    assert "pip install 'koprs-bridge[s3]'" in watcher.last_error
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "pip install 'koprs-bridge[s3]'" in errors[0].getMessage()
    assert errors[0].exc_info is None
