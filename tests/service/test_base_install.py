"""A base install (``pip install koprs-bridge``, no extras) works: the CLI, a NATS run with a
``local:`` source, the consumer imports; what needs an extra fails naming it.

Slow (``slow`` marker): one fresh virtualenv for the module, the project installed into it from
this checkout without extras (pip's cache and configured indexes are reused). Every command
runs in that virtualenv, from a folder outside the checkout, without ``PYTHONPATH``, so it
imports the installed copy and nothing the test environment has.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.js.api import DeliverPolicy

# The first test also waits for the virtualenv: pip may have to fetch what its cache lacks.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
EXTRA_MODULES = (  # what the extras install (s3, fast, otel, faststream), and uvloop
    "aioboto3",
    "aiobotocore",
    "botocore",
    "orjson",
    "opentelemetry.sdk",
    "opentelemetry.exporter.otlp",
    "faststream",
    "uvloop",
)
LOCAL = "{name: inbox, interval: 5s, local: {path: inbox, create: true}}"
NEEDS_AN_EXTRA = {"bridge.sources.stores.s3": "s3", "bridge.consumer.faststream": "faststream"}


@dataclass(frozen=True)
class BaseInstall:
    """A virtualenv with koprs-bridge installed without extras."""

    root: Path
    workdir: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def script(self) -> Path:
        return self.root / "bin" / "koprs-bridge"

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}
            and not k.startswith("KOPRS_BRIDGE_")
        }
        env["PATH"] = f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args],
            cwd=self.workdir,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def python_code(self, code: str) -> subprocess.CompletedProcess[str]:
        return self.run(self.python, "-c", textwrap.dedent(code))

    def cli(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return self.run(self.script, *args)


@pytest.fixture(scope="module")
def base_install(tmp_path_factory: pytest.TempPathFactory) -> BaseInstall:
    root = tmp_path_factory.mktemp("base-venv") / "venv"
    # This interpreter's pip installs into the new virtualenv (`pip --python`), which then
    # needs no pip of its own: faster. Without a pip here, the virtualenv gets one.
    own_pip = importlib.util.find_spec("pip") is None
    venv = [sys.executable, "-m", "venv", *([] if own_pip else ["--without-pip"]), str(root)]
    subprocess.run(venv, check=True, capture_output=True, timeout=120)
    pip = (
        [str(root / "bin" / "python"), "-m", "pip"]
        if own_pip
        else [sys.executable, "-m", "pip", "--python", str(root / "bin" / "python")]
    )
    installed = subprocess.run(
        [*pip, "install", "--disable-pip-version-check", "--quiet", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert installed.returncode == 0, f"pip install . failed:\n{installed.stderr[-4000:]}"
    return BaseInstall(root=root, workdir=tmp_path_factory.mktemp("base-workdir"))


def test_the_virtualenv_has_no_extra_and_imports_the_installed_copy(
    base_install: BaseInstall,
) -> None:
    found = base_install.python_code(
        f"""
        import importlib.util, json
        import bridge

        def installed(module):
            try:
                return importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                return False

        modules = {list(EXTRA_MODULES)!r}
        print(json.dumps({{"file": bridge.__file__, "present": [m for m in modules if installed(m)]}}))
        """
    )
    assert found.returncode == 0, found.stderr
    result = json.loads(found.stdout)
    assert result["present"] == []
    assert Path(result["file"]).is_relative_to(base_install.root)


def test_help(base_install: BaseInstall) -> None:
    for command in (base_install.cli("--help"), base_install.cli("run", "--help")):
        assert command.returncode == 0, command.stderr
        assert "usage: koprs-bridge" in command.stdout
    module = base_install.run(base_install.python, "-m", "bridge", "--help")
    assert module.returncode == 0, module.stderr


def test_every_module_imports_but_those_of_an_extra_which_name_it(
    base_install: BaseInstall,
) -> None:
    found = base_install.python_code(
        """
        import importlib, json, pkgutil
        import bridge
        from bridge.errors import MissingExtraError

        results = {}
        for info in pkgutil.walk_packages(bridge.__path__, "bridge."):
            if info.name == "bridge.__main__":  # runs the CLI
                continue
            try:
                importlib.import_module(info.name)
            except MissingExtraError as exc:
                results[info.name] = ["MissingExtraError", exc.extra, str(exc)]
            except Exception as exc:
                results[info.name] = [type(exc).__name__, None, str(exc)]
            else:
                results[info.name] = "ok"
        print(json.dumps(results))
        """
    )
    assert found.returncode == 0, found.stderr
    results = json.loads(found.stdout)
    assert len(results) > 40  # the walk found the package's modules
    failed = {name: r for name, r in results.items() if r != "ok"}
    assert set(failed) == set(NEEDS_AN_EXTRA), failed
    for name, extra in NEEDS_AN_EXTRA.items():
        kind, named, message = failed[name]
        assert (kind, named) == ("MissingExtraError", extra)
        assert f"pip install 'koprs-bridge[{extra}]'" in message


def test_public_imports(base_install: BaseInstall) -> None:
    found = base_install.python_code(
        """
        import bridge, bridge.consumer
        from bridge import *  # noqa: F403 - every public name, S3Store included
        from bridge.consumer import *  # noqa: F403
        from bridge.consumer import Reflector, run_handler, watch_nats, watch_redis
        from bridge.errors import MissingExtraError

        names = [getattr(bridge, n) for n in bridge.__all__]
        names += [getattr(bridge.consumer, n) for n in bridge.consumer.__all__]
        try:
            S3Store("bucket")
        except MissingExtraError as exc:
            assert isinstance(exc, ImportError) and exc.extra == "s3", exc
            print(exc)
        else:
            raise AssertionError("S3Store was created without the s3 extra")
        """
    )
    assert found.returncode == 0, found.stderr
    assert "pip install 'koprs-bridge[s3]'" in found.stdout


def test_the_library_raises_missing_extra_where_the_extra_is_used(
    base_install: BaseInstall,
) -> None:
    """Without the CLI's check: building an s3: source, or the tracer of an exporter."""
    found = base_install.python_code(
        """
        from bridge.errors import MissingExtraError
        from bridge.service.config import parse_config
        from bridge.service.runner import build_source
        from bridge.telemetry.tracing import build_provider

        config = parse_config({
            "broker": {"url": "nats://127.0.0.1:1"},
            "sources": [{"name": "docs", "interval": 5, "s3": {"bucket": "docs-bucket"}}],
            "tracing": {"exporter": "otlp"},
        })
        for build, arg in ((build_source, config.sources[0]), (build_provider, config.tracing)):
            try:
                build(arg)
            except MissingExtraError as exc:
                print(exc.extra, exc)
            else:
                raise AssertionError(f"{build.__name__} worked without its extra")
        """
    )
    assert found.returncode == 0, found.stderr
    lines = found.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("s3 source 'docs' (s3:) needs the 's3' extra")
    assert lines[1].startswith("otel tracing.exporter 'otlp' needs the 'otel' extra")


def _write(base_install: BaseInstall, name: str, text: str) -> Path:
    path = base_install.workdir / name
    path.write_text(textwrap.dedent(text), "utf-8")
    return path


def test_check_of_a_config_without_extras(base_install: BaseInstall) -> None:
    config = _write(
        base_install,
        "local.yaml",
        f"""
        broker: {{url: "nats://127.0.0.1:4222"}}
        sources:
          - name: inbox
            interval: 5s
            local: {{path: "{base_install.workdir / "inbox"}", create: true}}
          - name: page
            interval: 30s
            http: {{url: "https://example.com/config.json"}}
        """,
    )
    checked = base_install.cli("check", "--config", config)
    assert checked.returncode == 0, checked.stderr
    assert "OK" in checked.stdout


@pytest.mark.parametrize(
    ("extra", "section"),
    [
        ("s3", "sources:\n  - {name: docs, interval: 5s, s3: {bucket: docs-bucket}}\n"),
        ("otel", f"sources: [{LOCAL}]\ntracing: {{exporter: otlp}}\n"),
        ("otel", f"sources: [{LOCAL}]\ntracing: {{exporter: console}}\n"),
    ],
)
@pytest.mark.parametrize("command", ["check", "run"])
def test_a_config_needing_a_missing_extra_is_refused_naming_it(
    base_install: BaseInstall, extra: str, section: str, command: str
) -> None:
    config = _write(
        base_install, f"needs-{extra}.yaml", 'broker: {url: "nats://127.0.0.1:1"}\n' + section
    )
    refused = base_install.cli(command, "--config", config)
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert f"pip install 'koprs-bridge[{extra}]'" in refused.stderr
    assert str(config) in refused.stderr
    assert "Traceback" not in refused.stderr + refused.stdout


async def test_a_nats_run_with_a_local_source_publishes(
    base_install: BaseInstall, nats_url: str
) -> None:
    name = f"base-install-{uuid.uuid4().hex[:8]}"  # streams outlive tests: a fresh subject
    inbox = base_install.workdir / "run-inbox"
    inbox.mkdir()
    (inbox / "hello.json").write_text('{"hello": "base install"}', "utf-8")
    config = _write(
        base_install,
        "run.yaml",
        f"""
        broker: {{url: "{nats_url}"}}
        sources:
          - name: {name}
            interval: 200ms
            local: {{path: "{inbox}"}}
        """,
    )
    log = base_install.workdir / "run.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            base_install.script,
            "run",
            "--config",
            str(config),
            cwd=base_install.workdir,
            env=base_install.env(),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        event = await _first_event(nats_url, f"koprs.external.{name}.>", process)
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = log.read_text("utf-8", "replace")
    assert "Traceback" not in text, text
    assert event["type"] == "dev.koprs.external.added.v1"
    assert event["subject"] == "hello.json"


async def _first_event(
    url: str, subject: str, process: asyncio.subprocess.Process
) -> dict[str, str]:
    """The first event on ``subject`` (the stream is created by the bridge: wait for it)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        while True:
            assert process.returncode is None, "the bridge exited"
            with contextlib.suppress(nats.js.errors.NotFoundError):
                sub = await js.subscribe(
                    subject, deliver_policy=DeliverPolicy.ALL, ordered_consumer=True
                )
                break
            await asyncio.sleep(0.05)
        try:
            msg = await sub.next_msg(timeout=60)
        finally:
            await sub.unsubscribe()
        headers = msg.headers or {}
        return {"type": headers.get("ce-type", ""), "subject": headers.get("ce-subject", "")}
    finally:
        await nc.close()


def test_events_are_the_same_bytes_without_orjson(base_install: BaseInstall) -> None:
    """The ``fast`` extra only makes encoding faster: ids and bytes do not change."""
    code = """
        import sys
        from datetime import UTC, datetime
        from bridge import Added, HttpResource, Modified, StoredObject
        from bridge.cloudevents import EventEncoder

        encoder = EventEncoder("s", "https://example.com", now=lambda: datetime(2026, 1, 2, tzinfo=UTC))
        body = '{"name": "caf\\u00e9", "n": [1, 2.5, null], "emoji": "\\U0001f600"}'.encode()
        events = [
            Added(HttpResource("https://example.com/a b", 200, body, etag='"e1"')),
            Modified(StoredObject("dir/\\u00fcber.json", '"etag"', 12)),
            Added({"key": "k", "version": "v", "x": 1.5, "y": ["\\u00e9", 2**70]}),
        ]
        for event in encoder.encode_all(events, 3):
            sys.stdout.write(event.to_structured().hex() + "\\n")
        """
    base = base_install.python_code(code)
    assert base.returncode == 0, base.stderr
    here = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert importlib.util.find_spec("orjson") is not None  # the test environment has `fast`
    assert base.stdout.splitlines() == here.stdout.splitlines()
    assert len(base.stdout.splitlines()) == 3
