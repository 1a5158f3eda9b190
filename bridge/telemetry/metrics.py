"""Prometheus metrics of one bridge, in a registry of its own (``Metrics.registry``).

Labels carry source names, event kinds and rejection reasons only: never a URL, a bucket, an
item key or a credential.

| metric | type | labels |
|---|---|---|
| ``koprs_bridge_polls_total`` | counter | source |
| ``koprs_bridge_poll_errors_total`` | counter | source |
| ``koprs_bridge_poll_consecutive_failures`` | gauge | source |
| ``koprs_bridge_poll_duration_seconds`` | histogram | source |
| ``koprs_bridge_last_successful_poll_timestamp_seconds`` | gauge | source |
| ``koprs_bridge_events_published_total`` | counter | source, kind |
| ``koprs_bridge_publish_errors_total`` | counter | source |
| ``koprs_bridge_items_rejected_total`` | counter | source, reason |
| ``koprs_bridge_publish_duration_seconds`` | histogram | source |
| ``koprs_bridge_lease_held`` | gauge | source |
| ``koprs_bridge_broker_connected`` | gauge | |
| ``koprs_bridge_leader_election_connected`` | gauge | |
| ``koprs_bridge_schedule_lag_seconds`` | histogram | |
| ``koprs_bridge_schedule_missed_ticks_total`` | counter | |

:class:`ConsumerMetrics` (the consumer side, :func:`bridge.consumer.run_handler`), labelled with
the consumer (durable / group name, else the handler's name) and the source:

| metric | type | labels |
|---|---|---|
| ``koprs_bridge_consumer_events_handled_total`` | counter | consumer, source |
| ``koprs_bridge_consumer_handler_failures_total`` | counter | consumer, source |
| ``koprs_bridge_consumer_redeliveries_total`` | counter | consumer, source |
| ``koprs_bridge_consumer_dead_letters_total`` | counter | consumer, source |
| ``koprs_bridge_consumer_stale_events_total`` | counter | consumer, source |
| ``koprs_bridge_consumer_lag_events`` | gauge | consumer, source |
| ``koprs_bridge_consumer_lag_seconds`` | gauge | consumer, source |
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ConsumerMetrics", "Metrics", "SourceMetrics"]

NAMESPACE = "koprs_bridge"
KINDS = ("added", "modified", "removed")
REJECTION_REASONS = ("unencodable", "invalid", "too_large")
"""Why an item was left out of a batch (see :mod:`bridge.service.vetting`)."""
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every metric of one bridge; :meth:`source` binds the children of one source."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        reg = self.registry
        ns = NAMESPACE
        self.polls = Counter(
            "polls", "Polls of a source, failed ones included.", ["source"], namespace=ns,
            registry=reg,
        )  # fmt: skip
        self.poll_errors = Counter(
            "poll_errors", "Polls of a source that failed.", ["source"], namespace=ns,
            registry=reg,
        )  # fmt: skip
        self.poll_consecutive_failures = Gauge(
            "poll_consecutive_failures",
            "Polls of a source that failed in a row (0 after a success).",
            ["source"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.poll_duration = Histogram(
            "poll_duration_seconds", "How long polls of a source took.", ["source"],
            namespace=ns, registry=reg, buckets=_BUCKETS,
        )  # fmt: skip
        self.last_success = Gauge(
            "last_successful_poll_timestamp_seconds",
            "Unix time of the last successful poll of a source.",
            ["source"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.events_published = Counter(
            "events_published",
            "Events the broker acknowledged, per source and kind (a batch published again "
            "after a failure counts again; the broker dropped the duplicates).",
            ["source", "kind"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.publish_errors = Counter(
            "publish_errors", "Batches of a source whose publish failed.", ["source"],
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.items_rejected = Counter(
            "items_rejected",
            "Items left out of a batch because they cannot be published (reason: unencodable, "
            "invalid (fails its data schema), too_large (over the broker's message size)); "
            "counted at every poll that finds them again.",
            ["source", "reason"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.publish_duration = Histogram(
            "publish_duration_seconds",
            "From sending a batch to the broker's last acknowledgement (acknowledged batches).",
            ["source"], namespace=ns, registry=reg, buckets=_BUCKETS,
        )  # fmt: skip
        self.lease_held = Gauge(
            "lease_held", "1 while this replica holds the lease of a source (leads it).",
            ["source"], namespace=ns, registry=reg,
        )  # fmt: skip
        self.broker_connected = Gauge(
            "broker_connected", "1 while the broker is connected.", namespace=ns, registry=reg
        )
        self.leader_election_connected = Gauge(
            "leader_election_connected",
            "1 while the leader election's Redis answers (absent without leader election).",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.schedule_lag = Histogram(
            "schedule_lag_seconds",
            "How late polls started after they were due (all sources): waiting for a slot "
            "(max_concurrent_polls) or for a busy event loop.",
            namespace=ns, registry=reg, buckets=_BUCKETS,
        )  # fmt: skip
        self.schedule_missed_ticks = Counter(
            "schedule_missed_ticks",
            "Ticks skipped, not queued, because a poll started or ended too late (all sources).",
            namespace=ns, registry=reg,
        )  # fmt: skip
        self._sources: dict[str, SourceMetrics] = {}

    def source(self, name: str) -> SourceMetrics:
        """The bound metrics of source ``name`` (created, at zero, on first use)."""
        bound = self._sources.get(name)
        if bound is None:
            bound = self._sources[name] = SourceMetrics(self, name)
        return bound

    def forget(self, name: str) -> None:
        """Drop every series of source ``name`` (removed from the config by a reload)."""
        self._sources.pop(name, None)
        for family in (
            self.polls,
            self.poll_errors,
            self.poll_consecutive_failures,
            self.poll_duration,
            self.last_success,
            self.publish_errors,
            self.publish_duration,
            self.lease_held,
        ):
            with contextlib.suppress(KeyError):
                family.remove(name)
        for kind in KINDS:
            with contextlib.suppress(KeyError):
                self.events_published.remove(name, kind)
        for reason in REJECTION_REASONS:
            with contextlib.suppress(KeyError):
                self.items_rejected.remove(name, reason)

    def render(self) -> bytes:
        """The text exposition format (``text/plain; version=0.0.4``)."""
        return generate_latest(self.registry)


class SourceMetrics:
    """The children of one source, bound once (a label lookup per update costs more)."""

    __slots__ = (
        "consecutive_failures",
        "events",
        "last_success",
        "lease_held",
        "poll_duration",
        "poll_errors",
        "polls",
        "publish_duration",
        "publish_errors",
        "rejected",
        "source",
    )

    def __init__(self, metrics: Metrics, source: str) -> None:
        self.source = source
        self.polls = metrics.polls.labels(source)
        self.poll_errors = metrics.poll_errors.labels(source)
        self.consecutive_failures = metrics.poll_consecutive_failures.labels(source)
        self.poll_duration = metrics.poll_duration.labels(source)
        self.last_success = metrics.last_success.labels(source)
        self.events = {kind: metrics.events_published.labels(source, kind) for kind in KINDS}
        self.publish_errors = metrics.publish_errors.labels(source)
        self.publish_duration = metrics.publish_duration.labels(source)
        self.rejected = {
            reason: metrics.items_rejected.labels(source, reason) for reason in REJECTION_REASONS
        }
        self.lease_held = metrics.lease_held
        """Labelled only with leader election (:meth:`set_lease_held`), absent otherwise."""

    def set_lease_held(self, held: bool) -> None:
        self.lease_held.labels(self.source).set(1 if held else 0)


class ConsumerMetrics:
    """Metrics of event handlers (:func:`bridge.consumer.run_handler`), in a registry of their
    own unless one is given (an application exposes it beside its own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        reg = self.registry
        ns = NAMESPACE
        labels = ["consumer", "source"]
        self.handled = Counter(
            "consumer_events_handled", "Events a handler handled (acknowledged).", labels,
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.failures = Counter(
            "consumer_handler_failures", "Handler calls that raised (each attempt).", labels,
            namespace=ns, registry=reg,
        )  # fmt: skip
        self.redeliveries = Counter(
            "consumer_redeliveries",
            "Deliveries of an event the broker had delivered before (attempt > 1).",
            labels, namespace=ns, registry=reg,
        )  # fmt: skip
        self.dead_letters = Counter(
            "consumer_dead_letters",
            "Events given up on and written to the dead-letter destination.",
            labels, namespace=ns, registry=reg,
        )  # fmt: skip
        self.stale = Counter(
            "consumer_stale_events",
            "Retried events dropped because a newer event of the same item was handled first.",
            labels, namespace=ns, registry=reg,
        )  # fmt: skip
        self.lag_events = Gauge(
            "consumer_lag_events",
            "Events of the consumer still waiting behind the one handled last.",
            labels, namespace=ns, registry=reg,
        )  # fmt: skip
        self.lag_seconds = Gauge(
            "consumer_lag_seconds",
            "Age of the event handled last (its CloudEvent time) while events are waiting "
            "behind it; 0 when none is.",
            labels, namespace=ns, registry=reg,
        )  # fmt: skip

    def render(self) -> bytes:
        """The text exposition format (``text/plain; version=0.0.4``)."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """The current value of one sample (0 when absent), e.g.
        ``value("consumer_dead_letters_total", consumer="ops", source="files")``."""
        found = self.registry.get_sample_value(f"{NAMESPACE}_{name}", labels)
        return 0.0 if found is None else found
