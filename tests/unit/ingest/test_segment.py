"""Segment-shaped calls become TouchpointEvent records, or are refused naming the field."""

from __future__ import annotations

import json

import pytest

from services.ingest.segment import EventRejected, to_touchpoint
from touchstream import avro

RECEIVED = 1_764_000_000_000


def test_track_call_with_order_and_identifiers() -> None:
    record = to_touchpoint(
        {"userId": "u1", "event": "Order Completed", "messageId": "m1", "timestamp": "2026-01-02T03:04:05Z",
         "properties": {"total": 12.5, "currency": "EUR"}, "context": {"traits": {"email": "A@b.co"}},
         "channel": "Store_POS"},
        "track", "shop", RECEIVED)
    assert record["message_id"] == "m1"
    assert record["timestamp_ms"] == 1767323045000
    assert record["channel"] == "store_pos"
    assert {"type": "user_id", "value": "u1"} in record["identifiers"]
    assert {"type": "email", "value": "A@b.co"} in record["identifiers"]
    assert record["order"]["amount"] == 12.5 and record["order"]["currency"] == "EUR"
    assert json.loads(record["properties_json"])["properties"]["total"] == 12.5
    assert avro.validation_errors("TouchpointEvent", record) == []


def test_crm_fields_complaint_consent_and_identifier_map() -> None:
    record = to_touchpoint(
        {"type": "track", "event": "Complaint", "wechat_openid": "o-1", "identifiers": {"loyalty_card": "LC9"},
         "complaint": {"text": "late", "rating": 1}, "consent": ["marketing_email"]},
        None, "callcentre", RECEIVED)
    assert record["feedback"] == {"kind": "complaint", "text": "late", "rating": 1}
    assert record["consent"] == ["marketing_email"]
    assert {i["type"] for i in record["identifiers"]} == {"wechat_openid", "loyalty_card"}
    assert record["timestamp_ms"] == RECEIVED


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"event": "x"}, "userId"),
        ({"userId": "u", "event": ""}, "event"),
        ({"userId": "u", "event": "x", "timestamp": "yesterday"}, "timestamp"),
        ({"userId": "u", "event": "x", "order": {"amount": "ten"}}, "order.amount"),
        ({"userId": "u", "event": "x", "messageId": 7}, "messageId"),
        ({"userId": "u", "event": "x", "consent": "all"}, "consent"),
        ({"userId": ["u"], "event": "x"}, "userId"),
        ({"userId": "u", "event": "x", "complaint": {"rating": "bad"}}, "complaint.rating"),
    ],
)
def test_bad_events_are_refused_naming_the_field(payload: dict[str, object], field: str) -> None:
    with pytest.raises(EventRejected) as refused:
        to_touchpoint(payload, "track", "s", RECEIVED)
    assert refused.value.field == field
    assert refused.value.reason


def test_unknown_call_type_is_refused() -> None:
    with pytest.raises(EventRejected, match="type"):
        to_touchpoint({"type": "launch", "userId": "u"}, None, "s", RECEIVED)


def test_clock_skew_is_corrected_with_sent_at() -> None:
    # The client's clock runs 60 s fast: it stamped the event 10 s before sending it.
    payload = {"userId": "u", "event": "x", "timestamp": "2026-01-01T00:01:00Z", "sentAt": "2026-01-01T00:01:10Z"}
    received = 1767225610000 - 60_000  # 2026-01-01T00:00:10Z on our clock
    record = to_touchpoint(payload, "track", "s", received)
    assert record["timestamp_ms"] == received - 10_000
    assert json.loads(record["properties_json"])["originalTimestamp"] == "2026-01-01T00:01:00Z"


def test_batch_sent_at_applies_unless_the_event_has_its_own() -> None:
    payload = {"userId": "u", "event": "x", "timestamp": 1_000_000_000_000}
    assert to_touchpoint(payload, "track", "s", 1_000_000_000_500, batch_sent_at_ms=1_000_000_000_100
                         )["timestamp_ms"] == 1_000_000_000_400
    own = {**payload, "sentAt": 1_000_000_000_000}
    assert to_touchpoint(own, "track", "s", 1_000_000_000_500, batch_sent_at_ms=1)["timestamp_ms"] == 1_000_000_000_500
    assert to_touchpoint(payload, "track", "s", 1_000_000_000_500)["timestamp_ms"] == 1_000_000_000_000


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"timestamp": float("nan")}, "timestamp"),
        ({"timestamp": float("inf")}, "timestamp"),
        ({"timestamp": 10**30}, "timestamp"),
        ({"timestamp": -1}, "timestamp"),
        ({"timestamp": "0001-01-01T00:00:00-14:00"}, "timestamp"),
        ({"timestamp": "9999-12-31T23:59:59+00:00"}, "timestamp"),
        ({"timestamp": "2026-01-01T00:00:00Z", "sentAt": "x"}, "sentAt"),
        ({"timestamp": "1970-01-01T00:00:01Z", "sentAt": "2099-01-01T00:00:00Z"}, "timestamp"),
        ({"order": {"amount": float("inf")}}, "order.amount"),
        ({"order": {"amount": 10**400}}, "order.amount"),
        ({"order": {"amount": 1, "items": [{"quantity": 2**31}]}}, "order.items[0].quantity"),
        ({"complaint": {"rating": -(2**40)}}, "complaint.rating"),
        ({"email": "a" * 600}, "email"),
        ({"channel": "c" * 65}, "channel"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(payload: dict[str, object], field: str) -> None:
    with pytest.raises(EventRejected) as refused:
        to_touchpoint({"userId": "u", "event": "x", **payload}, "track", "s", RECEIVED)
    assert refused.value.field == field


def test_historical_timestamps_are_kept() -> None:
    assert to_touchpoint({"userId": "u", "event": "x", "timestamp": "1997-03-01T00:00:00"}, "track", "s", RECEIVED
                         )["timestamp_ms"] == 857174400000


def test_values_json_cannot_hold_are_refused_not_crashed_on() -> None:
    # Callers other than the HTTP API (replays, tests) can pass Python values JSON text never yields.
    with pytest.raises(EventRejected) as refused:
        to_touchpoint({"userId": "u", "event": "x", "properties": {"n": 2**70}}, "track", "s", RECEIVED)
    assert refused.value.field == "properties"
    with pytest.raises(EventRejected):
        to_touchpoint({"userId": "u", "event": "x", "traits": {"name": "\ud800"}}, "track", "s", RECEIVED)


def test_alias_call_links_previous_id_without_a_type_field() -> None:
    # POST /v1/alias carries the call type in the path, not in the body.
    record = to_touchpoint({"previousId": "anon-7", "userId": "u-7"}, "alias", "s", RECEIVED)
    assert {"type": "user_id", "value": "anon-7"} in record["identifiers"]


def test_an_event_stamped_beyond_the_tolerance_is_refused_naming_the_field() -> None:
    with pytest.raises(EventRejected) as refused:
        to_touchpoint({"userId": "u", "event": "x", "timestamp": "2099-01-01T00:00:00Z"}, "track", "s", RECEIVED,
                      event_time_tolerance_s=300)
    assert refused.value.field == "timestamp"
    assert "after the time it was received; at most 300 s is accepted" in refused.value.reason
    with pytest.raises(EventRejected) as refused:
        to_touchpoint({"userId": "u", "event": "x", "originalTimestamp": RECEIVED + 301_000}, "track", "s",
                      RECEIVED, event_time_tolerance_s=300)
    assert refused.value.field == "originalTimestamp"


def test_a_fast_client_clock_corrected_by_sent_at_is_not_refused_but_a_future_event_still_is() -> None:
    fast = {"userId": "u", "event": "x", "timestamp": RECEIVED + 3_600_000, "sentAt": RECEIVED + 3_600_000}
    assert to_touchpoint(fast, "track", "s", RECEIVED, event_time_tolerance_s=300)["timestamp_ms"] == RECEIVED
    within = {"userId": "u", "event": "x", "timestamp": RECEIVED + 300_000}
    assert to_touchpoint(within, "track", "s", RECEIVED, event_time_tolerance_s=300)["timestamp_ms"] == within[
        "timestamp"]
    stamped_ahead = {**fast, "timestamp": RECEIVED + 2 * 3_600_000}
    with pytest.raises(EventRejected, match="once corrected for clock skew"):
        to_touchpoint(stamped_ahead, "track", "s", RECEIVED, event_time_tolerance_s=300)
