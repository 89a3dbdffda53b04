"""Prometheus helpers: names follow touchstream_<service>_<noun>_<unit>."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# The *_created series double every counter and say nothing an operator needs.
disable_created_metrics()

# Event-to-webhook latencies are sub-second when healthy and minutes when retrying.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def metric_name(service: str, noun: str, unit: str) -> str:
    """Build a metric name in the project's convention.

    >>> metric_name("ingest", "events", "total")
    'touchstream_ingest_events_total'
    """
    return f"touchstream_{service}_{noun}_{unit}"


# Every service counts the records it takes in and sends on under these nouns (ServiceMetrics below).
EVENTS_IN = "events_in"
EVENTS_OUT = "events_out"
# triggers' histogram from ingest's receive time to the receiver's 2xx, by rule.
EVENT_TO_WEBHOOK = "event_to_webhook"


def events_in_total(service: str) -> str:
    """Name the counter of records `service` consumed, by topic (what another service scrapes).

    >>> events_in_total("identity")
    'touchstream_identity_events_in_total'
    """
    return metric_name(service, EVENTS_IN, "total")


def events_out_total(service: str) -> str:
    """Name the counter of records `service` produced, by topic."""
    return metric_name(service, EVENTS_OUT, "total")


# Every service's stream kernel declares these two (ServiceMetrics, streams.ConsumerLag).
BATCH_SIZE = "batch_size"
CONSUMER_LAG = "consumer_lag"


def batch_size_events(service: str) -> str:
    """Name the histogram of events per batch (its `_count` is batches, its `_sum` events).

    >>> batch_size_events("console")
    'touchstream_console_batch_size_events'
    """
    return metric_name(service, BATCH_SIZE, "events")


def consumer_lag_messages(service: str) -> str:
    """Name the gauge of messages the service's consumer group is behind, by topic and partition."""
    return metric_name(service, CONSUMER_LAG, "messages")


# What the console's overview reads off other services' /metrics (tests/unit/test_deploy_monitoring.py
# checks each is exposed by the service named).
EVENT_TO_WEBHOOK_SECONDS = metric_name("triggers", EVENT_TO_WEBHOOK, "seconds")


class ServiceMetrics:
    """Create a service's metrics with names in the project's convention."""

    def __init__(self, service: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.service = service
        self.registry = registry
        self.events_in = self.counter(EVENTS_IN, "Records consumed, by topic.", ["topic"])
        self.events_out = self.counter(EVENTS_OUT, "Records produced, by topic.", ["topic"])
        self.events_failed = self.counter("events_failed", "Records sent to deadletter, by reason.", ["reason"])
        self.batch_seconds = self.histogram("batch_duration", "Time to process one batch.")
        self.batch_events = Histogram(
            batch_size_events(service),
            "Events per batch.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500),
            registry=registry,
        )
        self.redis_errors = self.counter("redis_errors", "Redis commands that failed.")
        self.up = Gauge(metric_name(service, "up", "info"), "1 while the service runs.", registry=registry)
        self.up.set(1)

    def counter(self, noun: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(metric_name(self.service, noun, "total"), doc, labels, registry=self.registry)

    def histogram(
        self, noun: str, doc: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> Histogram:
        name = metric_name(self.service, noun, "seconds")
        return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

    def gauge(self, noun: str, unit: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(metric_name(self.service, noun, unit), doc, labels, registry=self.registry)


def render(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """Return the exposition body and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
