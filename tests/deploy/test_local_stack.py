"""The files that run the compose stack without a registry (``scripts/compose-e2e``).

Static checks; the stack itself runs in ``scripts/compose-e2e`` (CI runs it from
``scripts/test``): the local Dockerfiles lint clean, and ``deploy/compose/local.yml`` binds
every port docker-compose.yml publishes to 127.0.0.1, the same container ports, nothing more.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_deploy import REPO, compose, tool

LOCAL = REPO / "deploy/compose/local"
_IGNORED = ["DL3008"]  # apt versions: the suite's, from the machine's mirror, not pinned here


class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags (``!override``, ``!reset``): the tagged value itself."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


_ComposeLoader.add_constructor("!override", _tagged)
_ComposeLoader.add_constructor("!reset", _tagged)


def override() -> dict[str, Any]:
    document: dict[str, Any] = yaml.load(
        (REPO / "deploy/compose/local.yml").read_text(), Loader=_ComposeLoader
    )
    return document


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in LOCAL.glob("*.Dockerfile")))
def test_local_dockerfile_passes_hadolint(dockerfile: str) -> None:
    ignores = [arg for code in _IGNORED for arg in ("--ignore", code)]
    result = subprocess.run(
        [tool("hadolint"), "--no-color", *ignores, dockerfile],
        cwd=LOCAL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_local_image_has_its_variable_in_the_compose_file() -> None:
    raw = (REPO / "docker-compose.yml").read_text()
    for variable in ("NATS_IMAGE", "REDIS_IMAGE", "S3_IMAGE", "WEB_IMAGE", "KOPRS_BRIDGE_IMAGE"):
        assert f"${{{variable}:-" in raw, variable
    images = {
        name: s["image"] for name, s in compose({"S3_IMAGE": "local/s3:1"})["services"].items()
    }
    assert images["s3"] == "local/s3:1"
    assert images["nats"] == "nats:2.10-alpine"  # registry images by default


def _published(ports: list[str]) -> set[tuple[str, str, str]]:
    """(host ip, host port, container port) of compose's short port syntax."""
    found = set()
    for port in ports:
        parts = str(port).split(":")
        ip, host, inside = (["0.0.0.0", *parts] if len(parts) == 2 else parts)[-3:]
        found.add((ip, host, inside))
    return found


def test_local_override_binds_every_published_port_to_loopback() -> None:
    services = compose()["services"]
    overridden = override()["services"]
    publishing = {name for name, s in services.items() if s.get("ports")}
    assert publishing == {name for name, s in overridden.items() if s.get("ports")}
    for name in publishing:
        base = {(host, inside) for _ip, host, inside in _published(services[name]["ports"])}
        local = _published(overridden[name]["ports"])
        assert {ip for ip, _host, _inside in local} == {"127.0.0.1"}, name
        expected = base - {("9001", "9001")} if name == "s3" else base  # no MinIO console
        assert {(host, inside) for _ip, host, inside in local} == expected, name
    assert "!override" in (REPO / "deploy/compose/local.yml").read_text()


def test_local_s3_server_takes_minios_command_line() -> None:
    script = (LOCAL / "koprs-s3-server").read_text()
    command = compose()["services"]["s3"]["command"]
    assert command[:2] == ["server", "/data"]
    assert 'if [ "${1:-}" = server ]' in script
    assert "MINIO_ROOT_USER" in script
    assert "MINIO_ROOT_PASSWORD" in script


def test_compose_e2e_scripts_parse() -> None:
    for script in ("scripts/compose-e2e", "scripts/test"):
        result = subprocess.run(
            ["bash", "-n", str(REPO / script)], capture_output=True, check=False
        )
        assert result.returncode == 0, result.stderr
    assert Path(REPO / "scripts/compose-e2e").stat().st_mode & 0o111
