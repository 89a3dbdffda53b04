"""Prometheus metrics of the identity service; labels carry types and reasons, never personal data."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry

from services.identity.domain import Resolution
from touchstream.metrics import ServiceMetrics


class IdentityMetrics:
    """The shared service metrics plus the identity graph's own counters."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.service = ServiceMetrics("identity", registry)
        self.customers_created = self.service.counter("customers_created", "New customers created in the graph.")
        self.merges = self.service.counter("merges", "Customers merged into an older one.")
        self.merges_refused = self.service.counter(
            "merges_refused", "Merges the graph refused, by reason.", ["reason"]
        )
        self.identifiers_invalid = self.service.counter(
            "identifiers_invalid", "Identifiers left out of matching, by type and reason.", ["type", "reason"]
        )
        self.events_replayed = self.service.counter(
            "events_replayed", "Events resolved before (redelivered), answered from the graph's memory."
        )

    def count_resolution(self, resolution: Resolution) -> None:
        """Count what a resolution changed; a replay changed nothing."""
        if resolution.replayed:
            self.events_replayed.inc()
            return
        if resolution.created:
            self.customers_created.inc()
        self.merges.inc(len(resolution.merges))
        for refusal in resolution.refused:
            self.merges_refused.labels(refusal.reason).inc()
