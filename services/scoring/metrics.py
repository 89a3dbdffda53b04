"""Scoring's Prometheus metrics: the shared service set plus live model quality."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry

from services.scoring.sentiment import UNSCORED_REASONS
from touchstream.metrics import ServiceMetrics, metric_name

# Read by the CDNOW benchmark as well as declared here.
CROSSING_CHECKS = "crossing_checks"
CROSSINGS = "crossings"
CROSSING_CHECKS_TOTAL = metric_name("scoring", CROSSING_CHECKS, "total")
CROSSINGS_TOTAL = metric_name("scoring", CROSSINGS, "total")


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
        self.events_ahead = self.service.counter(
            "events_ahead", "Touchpoints stamped beyond the wall clock plus the event-time tolerance; "
                            "the partition watermark stopped at that bound.")
        self.events_erased = self.service.counter(
            "events_erased", "Touchpoints of erased customers dropped (in flight during the erasure, or read again).")
        self.crossing_checks = self.service.counter(
            CROSSING_CHECKS, "Silent customers' crossing checks that came due (event time).")
        self.crossings = self.service.counter(
            CROSSINGS, "ScoreUpdates sent for silent customers whose scores crossed what a rule watches.")
        self.duplicates = self.service.counter("events_duplicate", "Touchpoints already applied (redeliveries).")
        self.merges = self.service.counter("merges", "identity.merges records, by outcome.", ["outcome"])
        self.checkpoints = self.service.counter("checkpoints", "Model checkpoints written to Redis.")
        self.checkpoints_refused = self.service.counter(
            "checkpoints_refused", "Model checkpoints not loaded because their signature was missing or wrong, "
            "by reason (unsigned, bad_signature).", ["reason"])
        # Present at 0 from the start, so the first refusal is an increase an alert can see.
        for reason in ("unsigned", "bad_signature"):
            self.checkpoints_refused.labels(reason)
        self.sentiments = self.service.counter(
            "sentiments", "Complaint/feedback texts seen, by outcome: scored, or the reason they got no sentiment "
            "(empty, too_long, binary, undecodable, unsupported_language, scorer_error).", ["outcome"])
        for outcome in ("scored", *UNSCORED_REASONS):
            self.sentiments.labels(outcome)
        self.customers_forgotten = self.service.counter(
            "customers_forgotten", "Customer ids erased (customers.deletions), states and waiting examples deleted.")
