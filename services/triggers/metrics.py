"""The triggers service's Prometheus metrics; labels carry rule and endpoint names, never customer data."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry

from touchstream.metrics import EVENT_TO_WEBHOOK, ServiceMetrics, metric_name

# Read by the pipeline benchmark as well as declared here.
ACTIONS = "actions"
ACTIONS_TOTAL = metric_name("triggers", ACTIONS, "total")


class TriggersMetrics(ServiceMetrics):
    """The shared service metrics plus decisions, deliveries and event-to-webhook latency."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        super().__init__("triggers", registry)
        self.actions = self.counter(
            ACTIONS,
            "Rule decisions, by rule, outcome (fired, held_out, suppressed, backfill) and reason "
            "(holdout, cooldown, consent, frequency_cap, quiet_hours, quiet_hours_hold; for backfill, fired or "
            "holdout: what it would have been about a recent event).",
            ["rule", "outcome", "reason"],
        )
        self.timers = self.counter(
            "timers", "Silence timers, by rule and what happened (started, restarted, stopped, expired).",
            ["rule", "result"],
        )
        self.watermark = self.gauge("event_time_watermark", "seconds", "Event-time watermark that drives timers.")
        self.deliveries = self.counter(
            "deliveries",
            "Webhook delivery results (succeeded, retried, failed, duplicate), by rule and endpoint.",
            ["rule", "endpoint", "result"],
        )
        self.attempts_failed = self.counter(
            "delivery_attempts_failed", "Webhook tries that did not get a 2xx, by endpoint and cause.",
            ["endpoint", "cause"],
        )
        # The ops alert rule watches this one: an action that will never reach its receiver.
        self.dead_lettered = self.counter(
            "deliveries_dead_lettered",
            "Actions sent to deadletter instead of a receiver, by rule, endpoint and why "
            "(exhausted: last scheduled try failed; rejected: 4xx; endpoint_disabled: 410; endpoint: unknown).",
            ["rule", "endpoint", "reason"],
        )
        self.endpoint_disabled = self.counter(
            "endpoint_disabled", "Endpoints disabled because the receiver answered 410 Gone.", ["endpoint"]
        )
        self.circuit_open = self.gauge(
            "circuit_open", "state", "1 while an endpoint's circuit breaker is open or half-open.", ["endpoint"]
        )
        self.queued = self.gauge("delivery_queue", "actions", "Actions waiting for a (re)try, by endpoint.",
                                 ["endpoint"])
        self.customers_forgotten = self.counter(
            "customers_forgotten", "Customer ids erased (customers.deletions): rule states, caps and timers deleted.")
        self.deliveries_dropped = self.counter(
            "deliveries_dropped", "Actions dropped unsent (not queued, or taken out of the queue) because their "
                                  "customer was erased.")
        self.events_erased = self.counter(
            "events_erased", "Scores of erased customers not evaluated (in flight during the erasure, or read again).")
        self.event_to_webhook = self.histogram(
            EVENT_TO_WEBHOOK, "From ingest receiving the event to the webhook's 2xx, by rule.", ["rule"]
        )
