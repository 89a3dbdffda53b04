"""How one customer is kept in its hash: values small enough for a Redis listpack, read back as the page shows it."""

from __future__ import annotations

from services.console.entries import (
    DeliveryStatus,
    LatestScore,
    ScorePoint,
    TimelineEntry,
    action_value,
    customer_view,
    delivery_value,
    latest_score_values,
    parse_rule_tally,
    score_point_value,
    sum_tallies,
    touchpoint_value,
)
from services.console.readmodel import ActionTaken, DeliveryEnded, ScoreUpdated, TouchpointSeen

LISTPACK_VALUE_BYTES = 64  # Redis's hash-max-listpack-value default
T = 1_780_000_000_000
PURCHASE = TouchpointSeen("c_0123456789abcdef", "bench-5f2a9c-1234", T, "track", "Order Completed", "store_pos",
                          "ingest", 59.9, "EUR", None, None, {}, ("user_id",))
SCORE = ScoreUpdated("c_0123456789abcdef", "bench-5f2a9c-1234", T, 0.61234, 0.38766, "at_risk", "lapsing",
                     "river-logreg-v1:1234", (("log_mean_interpurchase_days", -0.31), ("log_overdue_ratio", 1.27),
                                              ("log_recency_days", 0.42)), {"log_recency_days": 1.0})
ACTION = ActionTaken("act_" + "0f" * 16, "churn-risk-high", "c_0123456789abcdef", "fired", None, "marketing", T, T + 9)
DELIVERY = DeliveryEnded("act_" + "0f" * 16, "churn-risk-high", "c_0123456789abcdef", "marketing", "delivered", 1, 204,
                         None, T, T + 310)


def test_what_a_pipeline_event_leaves_fits_redis_listpack_values() -> None:
    latest = latest_score_values(SCORE)
    assert latest is not None
    segment, model, reasons = latest
    values = [touchpoint_value(PURCHASE), score_point_value(SCORE), action_value(ACTION), delivery_value(DELIVERY),
              segment, model.encode(), *reasons]
    assert max(len(v) for v in values) <= LISTPACK_VALUE_BYTES, values
    names = [f"t:{PURCHASE.message_id}", f"a:{ACTION.action_id}", "why:0", "ch:store_pos"]
    assert max(len(n) for n in names) <= LISTPACK_VALUE_BYTES


def test_a_hash_reads_back_as_the_page_shows_it() -> None:
    latest = latest_score_values(SCORE)
    assert latest is not None
    segment, model, reasons = latest
    complaint = TouchpointSeen("c", "m-2", T + 60_000, "track", "Complaint Filed", "call_center", "crm", None, None,
                               "complaint", "late <b>parcel</b>", {"order": "o-1"}, ())
    later = ScoreUpdated("c", "m-3", T + 120_000, 0.7, 0.3, "", "", "v2", (), {})  # a rescore: no segment
    fields = {
        f"t:{PURCHASE.message_id}".encode(): touchpoint_value(PURCHASE), b"t:m-2": touchpoint_value(complaint),
        f"s:{SCORE.message_id}".encode(): score_point_value(SCORE), b"s:m-3": score_point_value(later),
        b"seg": segment, b"mv": model.encode(), **{f"why:{n}".encode(): r for n, r in enumerate(reasons)},
        f"a:{ACTION.action_id}".encode(): action_value(ACTION),
        f"d:{ACTION.action_id}".encode(): delivery_value(DELIVERY),
        b"ch:store_pos": str(T).encode(), b"ch:call_center": str(T + 60_000).encode(), b"pu": str(T).encode(),
        b"r:churn-risk-high": b"T=1780000000000;d=1;f=1", b"n:t": b"2", b"v": b"7",
        b"m:g-1": b'{"merge_id": "g-1", "kind": "merge", "merged_id": "c_9", "event_time_ms": 5}',
    }
    view = customer_view("c", "c_9", fields)
    assert view.timeline == [
        TimelineEntry("m-2", T + 60_000, "track", "Complaint Filed", "call_center", None, None, "complaint",
                      {"order": "o-1"}),
        TimelineEntry(PURCHASE.message_id, T, "track", "Order Completed", "store_pos", 59.9, "EUR"),
    ]
    assert view.scores == [ScorePoint(T, 0.6123, 0.3877, SCORE.message_id), ScorePoint(T + 120_000, 0.7, 0.3, "m-3")]
    # The profile shows the newest risk (the rescore's) beside the newest segment and its reasons, in order.
    assert view.latest_score == LatestScore(T, 0.7, 0.3, "at_risk", "lapsing", "river-logreg-v1:1234",
                                            tuple((f, round(c, 4)) for f, c in SCORE.reasons))
    assert [(a.action_id, a.rule_id, a.outcome, a.endpoint) for a in view.actions] == [
        (ACTION.action_id, "churn-risk-high", "fired", "marketing")]
    assert view.deliveries == {ACTION.action_id: DeliveryStatus(True, 1, 204, 310)}
    assert view.channels == [("call_center", T + 60_000), ("store_pos", T)]
    assert view.purchases_ms == [T] and view.merges[0]["merged_id"] == "c_9" and view.known
    assert view.tallies["churn-risk-high"].first_treated_ms == T


def test_a_timeline_longer_than_asked_is_cut_to_the_newest() -> None:
    fields = {f"t:m{n}": touchpoint_value(TouchpointSeen("c", f"m{n}", n, "track", "Page Viewed", "web", "s", None,
                                                         None, None, None)) for n in range(10)}
    assert [e.message_id for e in customer_view("c", "c", fields, timeline_limit=3).timeline] == ["m9", "m8", "m7"]
    assert not customer_view("c", "c", {}).known


def test_tallies_add_up_across_customers_with_suppressed_reasons_apart() -> None:
    total = sum_tallies(parse_rule_tally(t) for t in ("f=1;d=1;T=5", "h=1;H=7", "s:cooldown=2;s:quiet_hours=1",
                                                      "f=2;x=1;d=1"))
    assert total.counts == {"fired": 3, "held_out": 1, "suppressed:cooldown": 2, "suppressed:quiet_hours": 1}
    assert (total.delivered, total.delivery_failed) == (2, 1)
    assert parse_rule_tally(b"") == parse_rule_tally("")


def test_a_score_with_the_customers_voice_reads_back_for_the_timeline() -> None:
    heard = ScoreUpdated("c", "m-9", T, 0.4, 0.6, "", "", "v1", (), {
        "message_sentiment": -0.9, "sentiment_recent": -0.7, "sentiment_last": -0.9})
    quiet = ScoreUpdated("c", "m-10", T + 1, 0.4, 0.6, "", "", "v1", (), {
        "sentiment_recent": -0.7, "sentiment_last": -0.9})
    view = customer_view("c", "c", {b"s:m-9": score_point_value(heard), b"s:m-10": score_point_value(quiet)})
    assert view.scores == [ScorePoint(T, 0.4, 0.6, "m-9", -0.9, -0.7, -0.9),
                           ScorePoint(T + 1, 0.4, 0.6, "m-10", None, -0.7, -0.9)]
