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

import time
from array import array
from bisect import bisect_left
from collections.abc import Iterator

import prometheus_client.metrics
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

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
        self._sources: dict[str, SourceMetrics] = {}
        reg.register(_SourceSeries(self._sources))
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

    def source(self, name: str) -> SourceMetrics:
        """The bound metrics of source ``name`` (created, at zero, on first use)."""
        bound = self._sources.get(name)
        if bound is None:
            bound = self._sources[name] = SourceMetrics(self, name)
        return bound

    def forget(self, name: str) -> None:
        """Drop every series of source ``name`` (removed from the config by a reload)."""
        self._sources.pop(name, None)

    def render(self) -> bytes:
        """The text exposition format (``text/plain; version=0.0.4``)."""
        return generate_latest(self.registry)


class Value:
    """The value of one counter or gauge series of a source."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = value


class Timing:
    """One histogram series of a source: a count per bucket of :data:`_BUCKETS` (and +Inf)
    and the sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = array("Q", bytes(8 * (len(_BUCKETS) + 1)))
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(_BUCKETS, seconds)] += 1  # a bucket counts values <= its bound
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative counts by upper bound, as the exposition format has them."""
        total, out = 0, []
        for bound, count in zip(_BOUNDS, self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out


class SourceMetrics:
    """The series of one source: plain values, exposed by the registry's collector of all
    sources' series (:class:`_SourceSeries`). A prometheus_client child per series costs a
    lock and an object per value (about 15 KiB a source with the two histograms), most of a
    replica's memory at 10,000 sources; these cost about 1.5 KiB."""

    __slots__ = (
        "consecutive_failures",
        "created",
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
        self.created = time.time()
        """When the series were created (the counters' and histograms' ``_created``)."""
        self.polls = Value()
        self.poll_errors = Value()
        self.consecutive_failures = Value()
        self.poll_duration = Timing()
        self.last_success = Value()
        self.events = {kind: Value() for kind in KINDS}
        self.publish_errors = Value()
        self.publish_duration = Timing()
        self.rejected = {reason: Value() for reason in REJECTION_REASONS}
        self.lease_held: Value | None = None
        """Set only with leader election (:meth:`set_lease_held`), absent otherwise."""

    def set_lease_held(self, held: bool) -> None:
        if self.lease_held is None:
            self.lease_held = Value()
        self.lease_held.set(1 if held else 0)


_BOUNDS = (*(repr(float(b)) for b in _BUCKETS), "+Inf")
"""The ``le`` labels of the buckets, as prometheus_client writes them."""

_COUNTERS = (
    ("polls", "Polls of a source, failed ones included."),
    ("poll_errors", "Polls of a source that failed."),
    ("publish_errors", "Batches of a source whose publish failed."),
)
_GAUGES = (
    (
        "poll_consecutive_failures",
        "consecutive_failures",
        "Polls of a source that failed in a row (0 after a success).",
    ),
    (
        "last_successful_poll_timestamp_seconds",
        "last_success",
        "Unix time of the last successful poll of a source.",
    ),
)
_HISTOGRAMS = (
    ("poll_duration_seconds", "poll_duration", "How long polls of a source took."),
    (
        "publish_duration_seconds",
        "publish_duration",
        "From sending a batch to the broker's last acknowledgement (acknowledged batches).",
    ),
)


class _SourceSeries(Collector):
    """The per-source metrics (the table of the module docstring) of every source, read from
    their :class:`SourceMetrics` when scraped."""

    def __init__(self, sources: dict[str, SourceMetrics]) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        return self._families(list(self._sources.values()))

    def describe(self) -> Iterator[Metric]:
        """The families without their samples (what the registry and tests look at)."""
        return self._families([])

    def _families(self, sources: list[SourceMetrics]) -> Iterator[Metric]:
        created = prometheus_client.metrics._use_created  # PROMETHEUS_DISABLE_CREATED_SERIES
        ns = NAMESPACE
        for name, documentation in _COUNTERS:
            counter = CounterMetricFamily(f"{ns}_{name}", documentation, labels=["source"])
            for m in sources:
                value: Value = getattr(m, name)
                counter.add_metric([m.source], value.value, created=m.created if created else None)
            yield counter
        for name, attribute, documentation in _GAUGES:
            gauge = GaugeMetricFamily(f"{ns}_{name}", documentation, labels=["source"])
            for m in sources:
                gauge.add_metric([m.source], getattr(m, attribute).value)
            yield gauge
        events = CounterMetricFamily(
            f"{ns}_events_published",
            "Events the broker acknowledged, per source and kind (a batch published again "
            "after a failure counts again; the broker dropped the duplicates).",
            labels=["source", "kind"],
        )
        rejected = CounterMetricFamily(
            f"{ns}_items_rejected",
            "Items left out of a batch because they cannot be published (reason: unencodable, "
            "invalid (fails its data schema), too_large (over the broker's message size)); "
            "counted at every poll that finds them again.",
            labels=["source", "reason"],
        )
        for m in sources:
            at = m.created if created else None
            for kind, value in m.events.items():
                events.add_metric([m.source, kind], value.value, created=at)
            for reason, value in m.rejected.items():
                rejected.add_metric([m.source, reason], value.value, created=at)
        yield events
        yield rejected
        for name, attribute, documentation in _HISTOGRAMS:
            family = HistogramMetricFamily(f"{ns}_{name}", documentation, labels=["source"])
            for m in sources:
                timing: Timing = getattr(m, attribute)
                family.add_metric([m.source], timing.buckets(), timing.sum)
                if created:
                    family.samples.append(
                        Sample(f"{family.name}_created", {"source": m.source}, m.created, None)
                    )
            yield family
        held = GaugeMetricFamily(
            f"{ns}_lease_held",
            "1 while this replica holds the lease of a source (leads it).",
            labels=["source"],
        )
        for m in sources:
            if m.lease_held is not None:
                held.add_metric([m.source], m.lease_held.value)
        yield held


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
