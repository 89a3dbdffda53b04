"""Prometheus metrics of the identity service; labels carry types and reasons, never personal data."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry

from services.identity.domain import (
    MERGE_REASON_PROBABILISTIC,
    REFUSAL_REASONS,
    Resolution,
    identifier_type_label,
)
from services.identity.match_model import MatchModel
from touchstream.metrics import ServiceMetrics, metric_name

# Read by the pipeline benchmark as well as declared here.
CUSTOMERS_CREATED = "customers_created"
CUSTOMERS_CREATED_TOTAL = metric_name("identity", CUSTOMERS_CREATED, "total")


class IdentityMetrics:
    """The shared service metrics plus the identity graph's own counters."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.service = ServiceMetrics("identity", registry)
        self.customers_created = self.service.counter(CUSTOMERS_CREATED, "New customers created in the graph.")
        self.merges = self.service.counter("merges", "Customers merged into another one.")
        self.probabilistic_merges = self.service.counter(
            "probabilistic_merges", "Merges made by matching personal attributes (part of merges_total).")
        self.merges_refused = self.service.counter(
            "merges_refused", "Merges of two customers the graph refused, by reason.", ["reason"]
        )
        # Every reason exists from the start at 0, so a rate() alert sees its first refusal.
        for reason in REFUSAL_REASONS:
            self.merges_refused.labels(reason)
        self.identifiers_refused = self.service.counter(
            "identifiers_refused", "Identifiers the graph did not attach to the event's customer, by type and reason.",
            ["type", "reason"],
        )
        self.identifiers_invalid = self.service.counter(
            "identifiers_invalid", "Identifiers left out of matching, by type and reason.", ["type", "reason"]
        )
        self.events_replayed = self.service.counter(
            "events_replayed", "Events resolved before (redelivered), answered from the graph's memory."
        )
        self.unmerges = self.service.counter("unmerges", "Customers split by an operator.")
        self.events_suppressed = self.service.counter(
            "events_suppressed", "Events dropped because they carry an identifier of an erased customer.")
        self.customers_deleted = self.service.counter("customers_deleted", "Customers erased by an operator.")
        self.admin_auth_refused = self.service.counter(
            "admin_auth_refused", "Customer API requests refused for their admin key: bad_key (a wrong key, counted "
            "against its address) or locked_out (429: too many wrong keys from the address).", ["reason"])
        self.possible_matches = self.service.counter(
            "possible_matches", "Pairs of customers probabilistic matching found plausible but not likely enough to "
            "merge: kept for review (GET /v1/matching/review), never merged.")
        self.match_pairs = self.service.counter("match_pairs", "Candidate record pairs compared by matching.")
        self.household_pairs = self.service.counter(
            "household_pairs", "Candidate pairs the household guard kept from matching (given name and birth date "
            "both differ).")
        self.match_model_fits = self.service.counter(
            "match_model_fits", "EM fits of the matching model, by outcome: used, or implausible (kept the last).",
            ["outcome"])
        for outcome in ("used", "implausible"):
            self.match_model_fits.labels(outcome)
        self.match_prior = self.service.gauge(
            "match_prior", "ratio", "Share of candidate pairs the matching model in use takes for one person.")

    def count_resolution(self, resolution: Resolution) -> None:
        """Count what a resolution changed; a replay changed nothing."""
        if resolution.suppressed:
            self.events_suppressed.inc()
            return
        if resolution.replayed:
            self.events_replayed.inc()
            return
        if resolution.created:
            self.customers_created.inc()
        self.merges.inc(len(resolution.merges))
        self.probabilistic_merges.inc(sum(m.reason == MERGE_REASON_PROBABILISTIC for m in resolution.merges))
        self.possible_matches.inc(len(resolution.possible_matches))
        for refusal in resolution.refused:
            if refusal.customer_id:
                self.merges_refused.labels(refusal.reason).inc()
            else:
                for identifier in refusal.identifiers:
                    self.identifiers_refused.labels(identifier_type_label(identifier.type), refusal.reason).inc()

    def count_comparisons(self, pairs: int, household_refused: int) -> None:
        self.match_pairs.inc(pairs)
        self.household_pairs.inc(household_refused)

    def count_model_fit(self, model: MatchModel, used: bool) -> None:
        self.match_model_fits.labels("used" if used else "implausible").inc()
        if used:
            self.match_prior.set(model.prior)
