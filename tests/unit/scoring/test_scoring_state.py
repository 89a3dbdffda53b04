"""Customer state in event time: RFM folding, idempotency, out-of-order events, merges."""

from __future__ import annotations

from services.scoring.features import FEATURE_NAMES, features_at
from services.scoring.labels import DAY_MS, PendingExample
from services.scoring.state import (
    CustomerState,
    Touchpoint,
    apply_touchpoint,
    merge_states,
    state_from_dict,
    state_to_dict,
    touchpoint_from_record,
)


def purchase(message_id: str, day: float, amount: float = 10.0) -> Touchpoint:
    t = int(day * DAY_MS)
    return Touchpoint(message_id, t, t, event_name="Order Completed", order_amount=amount)


def visit(message_id: str, day: float) -> Touchpoint:
    return Touchpoint(message_id, int(day * DAY_MS), int(day * DAY_MS), event_type="page")


def test_rfm_totals_follow_event_time_not_arrival_order() -> None:
    state = CustomerState()
    for touch in (purchase("b", 20, 30.0), purchase("a", 5, 10.0), visit("c", 40), purchase("d", 30, 20.0)):
        apply_touchpoint(state, touch)
    assert (state.first_purchase_ms, state.last_purchase_ms) == (5 * DAY_MS, 30 * DAY_MS)
    assert (state.first_touch_ms, state.last_touch_ms) == (5 * DAY_MS, 40 * DAY_MS)
    assert (state.purchase_count, state.monetary_total) == (3, 60.0)
    features = features_at(state, 50 * DAY_MS)
    assert set(features) == set(FEATURE_NAMES)
    assert features["recency_days"] == 20.0
    assert features["mean_interpurchase_days"] == 12.5
    assert features["tenure_days"] == 45.0


def test_replaying_a_message_changes_nothing() -> None:
    state = CustomerState()
    assert apply_touchpoint(state, purchase("m1", 1))
    before = state_to_dict(state)
    assert not apply_touchpoint(state, purchase("m1", 1))
    assert state_to_dict(state) == before


def test_complaints_are_counted() -> None:
    record = {
        "message_id": "m", "type": "track", "event": "Complaint", "timestamp_ms": 5, "received_at_ms": 6,
        "order": None, "feedback": {"kind": "complaint", "text": None, "rating": 1}, "consent": ["email"],
    }
    touch = touchpoint_from_record(record)
    state = CustomerState()
    apply_touchpoint(state, touch)
    assert state.complaints == 1 and not touch.is_purchase and touch.consent == ("email",)


def test_decayed_counts_shrink_with_event_time() -> None:
    state = CustomerState()
    apply_touchpoint(state, purchase("m1", 0))
    soon, later = features_at(state, 1 * DAY_MS), features_at(state, 180 * DAY_MS)
    assert soon["purchases_decayed_90d"] > later["purchases_decayed_90d"] > 0


def test_state_survives_serialisation() -> None:
    state = CustomerState()
    apply_touchpoint(state, purchase("m1", 3))
    state.pending.append(PendingExample(3 * DAY_MS, 93 * DAY_MS, {"recency_days": 0.0}, 0.4))
    assert state_from_dict(state_to_dict(state)) == state


def test_merge_sums_totals_keeps_extremes_and_unions_pending() -> None:
    survivor, merged = CustomerState(), CustomerState()
    apply_touchpoint(survivor, purchase("s1", 10, 10.0))
    apply_touchpoint(survivor, purchase("s2", 50, 10.0))
    apply_touchpoint(merged, purchase("m1", 2, 5.0))
    apply_touchpoint(merged, visit("m2", 60))
    survivor.pending = [PendingExample(int(50 * DAY_MS), int(140 * DAY_MS), {}, 0.5)]
    merged.pending = [PendingExample(int(1 * DAY_MS), int(91 * DAY_MS), {}, 0.5)]

    assert merge_states(survivor, merged, "merge-1")

    assert (survivor.purchase_count, survivor.monetary_total) == (3, 25.0)
    assert survivor.first_purchase_ms == 2 * DAY_MS and survivor.last_purchase_ms == 50 * DAY_MS
    assert survivor.last_touch_ms == 60 * DAY_MS
    assert [e.t_ms for e in survivor.pending] == [1 * DAY_MS, 50 * DAY_MS]
    # The survivor's purchase on day 50 falls in the merged customer's window (day 1 to 91).
    assert survivor.pending[0].positive
    assert survivor.has_applied("m1")


def test_merge_is_idempotent_on_merge_id() -> None:
    survivor, merged = CustomerState(), CustomerState()
    apply_touchpoint(merged, purchase("m1", 2, 5.0))
    assert merge_states(survivor, merged, "merge-1")
    assert not merge_states(survivor, merged, "merge-1")
    assert survivor.purchase_count == 1
