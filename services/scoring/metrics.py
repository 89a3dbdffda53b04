"""Scoring's Prometheus metrics: the shared service set plus live model quality."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry

from touchstream.metrics import ServiceMetrics


class ScoringMetrics:
    """Create the scoring service's metrics (labels carry no personal data)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.service = ServiceMetrics("scoring", registry)
        self.roc_auc = self.service.gauge(
            "prequential_roc_auc", "ratio", "ROC AUC of emitted propensities, over examples whose labels matured."
        )
        self.log_loss = self.service.gauge(
            "prequential_log_loss", "nats", "Mean log-loss of emitted propensities, over matured examples."
        )
        self.brier = self.service.gauge(
            "prequential_brier_score", "ratio", "Mean squared error of emitted propensities, over matured examples."
        )
        self.calibration_error = self.service.gauge(
            "prequential_calibration_error",
            "ratio",
            "Expected calibration error (10 bins) of emitted propensities, over matured examples.",
        )
        self.examples_learned = self.service.counter(
            "examples_learned", "Matured examples the model learned, by label.", ["label"]
        )
        self.pending_examples = self.service.gauge(
            "pending", "examples", "Examples waiting for their label, by partition.", ["partition"]
        )
        self.watermark = self.service.gauge(
            "event_time_watermark", "seconds", "Newest event time seen, by partition (Unix seconds).", ["partition"]
        )
        self.drift_alarms = self.service.counter("drift_alarms", "Drift detected in the model's log-loss (ADWIN).")
        self.late_events = self.service.counter(
            "events_late", "Touchpoints older than the partition watermark minus the allowed lateness."
        )
        self.crossing_checks = self.service.counter(
            "crossing_checks", "Silent customers' crossing checks that came due (event time).")
        self.crossings = self.service.counter(
            "crossings", "ScoreUpdates sent for silent customers whose scores crossed what a rule watches.")
        self.duplicates = self.service.counter("events_duplicate", "Touchpoints already applied (redeliveries).")
        self.merges = self.service.counter("merges", "identity.merges records, by outcome.", ["outcome"])
        self.checkpoints = self.service.counter("checkpoints", "Model checkpoints written to Redis.")
        self.customers_forgotten = self.service.counter(
            "customers_forgotten", "Customer ids erased (customers.deletions), states and waiting examples deleted.")
