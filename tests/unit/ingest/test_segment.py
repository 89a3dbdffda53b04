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
