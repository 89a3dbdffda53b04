"""The triggers service's Prometheus metrics; labels carry rule and endpoint names, never customer data."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry

from touchstream.metrics import ServiceMetrics


class TriggersMetrics(ServiceMetrics):
    """The shared service metrics plus decisions, deliveries and event-to-webhook latency."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        super().__init__("triggers", registry)
        self.actions = self.counter(
            "actions", "Rule decisions, by rule, outcome (fired, held_out, suppressed) and reason.",
            ["rule", "outcome", "reason"],
        )
        self.deliveries = self.counter(
            "deliveries",
            "Webhook delivery results (succeeded, retried, failed, duplicate), by rule and endpoint.",
            ["rule", "endpoint", "result"],
        )
        self.event_to_webhook = self.histogram(
            "event_to_webhook", "From ingest receiving the event to the webhook's 2xx, by rule.", ["rule"]
        )
