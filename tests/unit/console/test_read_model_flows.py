"""The console's consuming path without a broker or Redis: topic records -> updates -> the read model (the
in-memory fake, held to the Redis store's contract by tests/integration/test_console_store.py) -> what the
customer and overview pages read."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from services.console.app import updates_of
from tests.unit.console.fakes import InMemoryReadModel
from touchstream.metrics import ServiceMetrics
from touchstream.streams import Record
from touchstream.topics import IDENTITY_MERGES, SCORES


def score_record(customer: str, message: str, time_ms: int, segment: str, value: float | None,
                 tier: int = 0) -> Record:
    """A decoded ScoreUpdate as scoring sends it; `value` None: one from a scoring without value features."""
    features = {"recency_days": 3.0}
    if value is not None:
        features |= {"predicted_value": value, "value_tier": float(tier),
                     "expected_purchases_value_horizon": 2.0, "expected_order_value": value / 2}
    record: dict[str, Any] = {
        "customer_id": customer, "message_id": message, "event_time_ms": time_ms, "received_at_ms": time_ms,
        "churn_risk": 0.3, "purchase_propensity": 0.7, "segment": segment, "stage": "active" if segment else "",
        "model_version": "v1", "reasons": [{"feature": "recency_days", "contribution": 0.2}], "features": features}
    return Record(SCORES.name, 0, 0, customer.encode(), b"raw", record)


def merge_record(survivor: str, merged: str, time_ms: int) -> Record:
    return Record(IDENTITY_MERGES.name, 0, 0, survivor.encode(), b"raw", {
        "merge_id": f"g-{merged}", "survivor_id": survivor, "merged_id": merged, "kind": "merge",
        "reason": "shared_identifier", "event_time_ms": time_ms})


async def consume(model: InMemoryReadModel, records: list[Record]) -> None:
    await model.apply(updates_of(records, ServiceMetrics("console", CollectorRegistry())))


async def test_scores_value_features_reach_the_customer_page_and_the_overview_tiers() -> None:
    model = InMemoryReadModel()
    await consume(model, [score_record("c_1", "m1", 1_000, "loyal", 300.0, 4),
                          score_record("c_2", "m2", 1_000, "new", 40.0, 2),
                          score_record("c_3", "m3", 1_000, "new", None)])
    page = await model.customer("c_1")
    assert page.value is not None and (page.value.predicted_value, page.value.tier) == (300.0, 4)
    assert (page.value.expected_purchases, page.value.expected_order_value) == (2.0, 150.0)
    assert (await model.customer("c_3")).value is None  # an older scoring's score: no value to show
    assert [(t.tier, t.customers, t.predicted_value) for t in await model.value_tiers()] == [(4, 1, 300.0),
                                                                                           (2, 1, 40.0)]


async def test_a_crossing_checks_score_moves_the_value_and_a_merge_keeps_one_customer_in_the_tiers() -> None:
    model = InMemoryReadModel()
    await consume(model, [score_record("c_1", "m1", 1_000, "loyal", 300.0, 4),
                          score_record("c_2", "m2", 2_000, "new", 40.0, 2)])
    marker = await model.overview_marker()
    # A crossing check scores a silent customer without a segment: the value moves, the segment does not.
    await consume(model, [score_record("c_1", "x1", 5_000, "", 90.0, 3)])
    assert await model.segments() == {("loyal", "active"): 1, ("new", "active"): 1}
    assert await model.overview_marker() != marker  # the live overview redraws
    await consume(model, [merge_record("c_2", "c_1", 6_000)])
    # c_1's value is the newer (5,000 ms): the survivor shows it, and the tiers count one customer.
    assert (await model.customer("c_2")).value.predicted_value == 90.0  # type: ignore[union-attr]
    assert [(t.tier, t.customers) for t in await model.value_tiers()] == [(3, 1)]
    assert await model.customer_count() == 1
