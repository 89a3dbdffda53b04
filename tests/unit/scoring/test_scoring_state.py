"""Customer state in event time: RFM folding, idempotency, out-of-order events, merges."""

from __future__ import annotations

import math
import random

import numpy as np
import orjson

from services.scoring.codec import state_from_dict, state_to_dict
from services.scoring.features import FEATURE_NAMES, PATH_FIELDS, features_at, silent_path
from services.scoring.labels import PendingExample
from services.scoring.state import (
    CustomerState,
    Touchpoint,
    apply_touchpoint,
    merge_states,
    touchpoint_from_record,
)
from touchstream.eventtime import DAY_MS


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
    assert soon["purchases_90d"] > later["purchases_90d"] > 0


def test_state_survives_serialisation_as_json() -> None:
    state = CustomerState()
    apply_touchpoint(state, purchase("m1", 3))
    path = silent_path(state).tolist()
    assert math.isnan(path[PATH_FIELDS.index("complaints_at_ms")])  # never complained
    state.pending.append(PendingExample(3 * DAY_MS, 17 * DAY_MS, path, 0.4))
    loaded = state_from_dict(orjson.loads(orjson.dumps(state_to_dict(state))))
    assert np.array_equal(loaded.pending[0].path, path, equal_nan=True)
    loaded.pending[0].path = state.pending[0].path
    assert loaded == state


def test_merge_sums_totals_keeps_extremes_and_unions_pending() -> None:
    survivor, merged = CustomerState(), CustomerState()
    apply_touchpoint(survivor, purchase("s1", 10, 10.0))
    apply_touchpoint(survivor, purchase("s2", 50, 10.0))
    apply_touchpoint(merged, purchase("m1", 2, 5.0))
    apply_touchpoint(merged, visit("m2", 60))
    survivor.pending = [PendingExample(int(50 * DAY_MS), int(140 * DAY_MS), [], 0.5)]
    merged.pending = [PendingExample(int(1 * DAY_MS), int(91 * DAY_MS), [], 0.5)]

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


def history() -> list[Touchpoint]:
    return [
        purchase("p1", 0, 20.0),
        Touchpoint("v1", 3 * DAY_MS, 3 * DAY_MS, event_type="page", channel="app"),
        purchase("p2", 10, 40.0),
        Touchpoint("c1", 12 * DAY_MS, 12 * DAY_MS, is_complaint=True, rating=1, channel="call_center"),
        Touchpoint("r1", 13 * DAY_MS, 13 * DAY_MS, rating=4, channel="wechat"),
        purchase("p3", 30, 30.0),
        Touchpoint("x1", 31 * DAY_MS, 31 * DAY_MS, channel="fax"),
    ]


def test_out_of_order_arrival_gives_the_same_features_as_event_order() -> None:
    in_order, shuffled = CustomerState(), CustomerState()
    for touch in history():
        apply_touchpoint(in_order, touch)
    for touch in random.Random(5).sample(history(), k=len(history())):
        apply_touchpoint(shuffled, touch)
    now = 40 * DAY_MS
    expected, got = features_at(in_order, now), features_at(shuffled, now)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert math.isclose(got[name], value, rel_tol=1e-9, abs_tol=1e-12), name


def test_windowed_counts_spend_and_experience_features() -> None:
    state = CustomerState()
    for touch in history():
        apply_touchpoint(state, touch)
    f = features_at(state, 40 * DAY_MS)
    # Decayed windows: the 7-day window has nearly forgotten day 0, the 365-day one has not.
    assert f["purchases_7d"] < f["purchases_30d"] < f["purchases_90d"] < f["purchases_365d"] < 3.0
    assert f["purchases_365d"] > 2.7
    assert math.isclose(f["log_spend_365d"], math.log1p(20 * math.exp(-40 / 365) + 40 * math.exp(-30 / 365)
                                                        + 30 * math.exp(-10 / 365)))
    assert (f["mean_interpurchase_days"], f["last_interpurchase_days"]) == (15.0, 20.0)
    assert math.isclose(f["interpurchase_std_days"], math.sqrt(50.0))
    assert f["days_since_last_touch"] == 9.0 and f["recency_days"] == 10.0
    assert (f["complaints"], f["ratings_count"], f["rating_mean"]) == (1.0, 2.0, 2.5)
    assert 0 < f["complaints_90d"] < 1
    assert f["channels_used"] == 5.0  # web, app, call_center, wechat, other
    assert math.isclose(f["channel_share_web"], 3 / 7) and math.isclose(f["channel_share_other"], 1 / 7)


def test_merge_keeps_windows_channels_and_purchase_times() -> None:
    survivor, merged, together = CustomerState(), CustomerState(), CustomerState()
    events = history()
    for n, touch in enumerate(events):
        apply_touchpoint(survivor if n % 2 else merged, touch)
        apply_touchpoint(together, touch)
    merge_states(survivor, merged, "m")
    now = 40 * DAY_MS
    expected, got = features_at(together, now), features_at(survivor, now)
    for name, value in expected.items():
        assert math.isclose(got[name], value, rel_tol=1e-9, abs_tol=1e-12), name


def test_states_saved_by_the_previous_version_still_load() -> None:
    old = {"first_touch_ms": 0, "last_touch_ms": 5, "first_purchase_ms": 0, "last_purchase_ms": 5,
           "purchase_count": 2, "monetary_total": 9.0, "gap_before_last_purchase_ms": 5, "complaints": 0,
           "recent_touches": {"value": 1.0, "at_ms": 5}, "recent_purchases": {"value": 1.0, "at_ms": 5},
           "pending": [{"t_ms": 5, "due_ms": 10, "features": {"recency_days": 0.0}, "propensity": 0.5,
                        "positive": False}], "last_example_day": 0, "applied_ids": ["a", "b"]}
    state = state_from_dict(old)
    assert state.purchase_count == 2 and state.has_applied("b")
    # Its waiting example was made for the 90-day model (inputs, no path): this model cannot learn it.
    assert state.pending == [] and state.last_scored_propensity is None and state.next_check_ms is None
