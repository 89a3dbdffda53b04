"""Event names mean orders, refunds, complaints, feedback, consent and unsubscribes, as the SDKs send them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.ingest.segment import EventRejected, to_touchpoint
from touchstream import avro
from touchstream.event_semantics import (
    EventSemanticsError,
    Meaning,
    default_event_semantics,
    load_event_semantics,
    parse_event_semantics,
)
from touchstream.privacy import consent_update

RECEIVED = 1_764_000_000_000


def track(event: str, properties: dict[str, Any] | None = None, semantics: Any = None, **fields: Any) -> dict[str, Any]:
    payload = {"userId": "u1", "event": event, "properties": properties or {}, **fields}
    options = {"semantics": semantics} if semantics is not None else {}
    record = to_touchpoint(payload, "track", "shop", RECEIVED, **options)
    assert avro.validation_errors("TouchpointEvent", record) == []
    return record


@pytest.mark.parametrize("name", ["Order Completed", "order_completed", "ORDER COMPLETED", "Order-Completed"])
def test_an_order_event_in_any_spelling_is_an_order(name: str) -> None:
    record = track(name, {"total": 59.9, "revenue": 50.0, "currency": "EUR", "order_id": "o-1",
                          "products": [{"product_id": "p-1", "price": 29.95, "quantity": 2}]})
    assert record["order"] == {"order_id": "o-1", "amount": 59.9, "currency": "EUR",
                               "items": [{"sku": "p-1", "quantity": 2, "price": 29.95}]}
    assert record["event"] == name  # the name travels as sent: rules compare it exactly


def test_revenue_is_the_amount_when_there_is_no_total() -> None:
    assert track("Order Completed", {"revenue": 20})["order"]["amount"] == 20.0


def test_a_refund_is_a_negative_order() -> None:
    record = track("Order Refunded", {"total": 30, "currency": "EUR", "order_id": "o-1"})
    assert record["order"]["amount"] == -30.0 and record["order"]["order_id"] == "o-1"


def test_an_order_event_without_an_amount_carries_no_order() -> None:
    assert track("Order Refunded", {"order_id": "o-1"})["order"] is None


def test_a_complaint_event_is_a_complaint_with_its_text_and_rating() -> None:
    record = track("Complaint Submitted", {"text": "parcel arrived broken", "rating": 1})
    assert record["feedback"] == {"kind": "complaint", "text": "parcel arrived broken", "rating": 1}


@pytest.mark.parametrize(("rating", "kind"), [(1, "complaint"), (2, "complaint"), ("2", "complaint"),
                                              (3, "feedback"), (5, "feedback"), (4.6, "feedback")])
def test_feedback_rated_low_is_a_complaint(rating: Any, kind: str) -> None:
    record = track("Feedback Submitted", {"rating": rating, "comment": "ok"})
    assert record["feedback"]["kind"] == kind
    assert record["feedback"]["text"] == "ok"


def test_feedback_without_a_rating_stays_feedback() -> None:
    assert track("Product Reviewed", {"review_body": "nice"})["feedback"] == {
        "kind": "feedback", "text": "nice", "rating": None}


def test_an_unsubscribe_withdraws_its_categories_only() -> None:
    record = track("Unsubscribed", {"email_id": "e-1"})
    assert record["consent"] == ["-email", "-marketing"]
    assert consent_update(("email", "loyalty", "marketing"), record["consent"]) == ("loyalty",)
    named = track("Unsubscribed", {"categories": ["newsletter"]})
    assert consent_update(("newsletter", "email"), named["consent"]) == ("email",)


def test_a_consent_event_states_the_categories_in_its_properties() -> None:
    assert track("Consent Updated", {"categories": ["email", "sms"]})["consent"] == ["email", "sms"]
    assert track("Consent Updated", {"categories": {"email": True, "sms": False}})["consent"] == ["email"]
    assert track("Consent Updated", {"categories": []})["consent"] == ["none"]
    assert track("Consent Updated", {})["consent"] == []  # says nothing: unchanged


def test_fields_the_call_carries_win_over_what_the_name_means() -> None:
    record = track("Order Completed", {"total": 10}, order={"amount": 99.0, "currency": "USD"},
                   complaint={"text": "x"}, consent=["sms"])
    assert record["order"]["amount"] == 99.0
    assert track("Unsubscribed", {}, consent=["sms"])["consent"] == ["sms"]
    assert track("Feedback Submitted", {"rating": 1}, feedback={"rating": 4})["feedback"]["kind"] == "feedback"


def test_names_outside_the_table_and_page_calls_mean_nothing_more() -> None:
    record = track("Order Viewed Thrice", {"total": 10})
    assert record["order"] is None and record["feedback"] is None and record["consent"] == []
    page = to_touchpoint({"userId": "u1", "name": "Purchase", "properties": {"total": 5}}, "page", "s", RECEIVED)
    assert page["order"] is None


@pytest.mark.parametrize(
    ("event", "properties", "field"),
    [
        ("Order Completed", {"total": "ten"}, "properties.total"),
        ("Order Completed", {"total": 1, "products": "p-1"}, "properties.products"),
        ("Order Completed", {"total": 1, "products": [{"quantity": "2"}]}, "properties.products[0].quantity"),
        ("Order Completed", {"total": 1, "currency": 978}, "properties.currency"),
        ("Feedback Submitted", {"rating": "great"}, "properties.rating"),
        ("Complaint Submitted", {"text": {"a": 1}}, "properties.text"),
        ("Consent Updated", {"categories": 7}, "properties.categories"),
    ],
)
def test_unusable_properties_are_refused_naming_the_property(event: str, properties: dict[str, Any],
                                                             field: str) -> None:
    with pytest.raises(EventRejected) as refused:
        track(event, properties)
    assert refused.value.field == field


def test_a_file_adds_names_changes_property_names_and_can_drop_a_default() -> None:
    table = parse_event_semantics("""
events:
  Ticket Opened: complaint
  NPS Answered: {meaning: feedback, complaint_at_or_below: 6}
  Order Refunded: known
properties:
  rating: score
  amount: [grand_total]
""")
    assert track("Ticket Opened", {}, table)["feedback"]["kind"] == "complaint"
    assert track("NPS Answered", {"score": 6}, table)["feedback"]["kind"] == "complaint"
    assert track("NPS Answered", {"score": 7}, table)["feedback"]["kind"] == "feedback"
    assert track("Order Completed", {"grand_total": 80, "total": 1}, table)["order"]["amount"] == 80.0
    assert track("Order Refunded", {"grand_total": 80}, table)["order"] is None
    assert table.meaning_of("Order Refunded").meaning is Meaning.KNOWN


def test_replace_defaults_starts_from_an_empty_table() -> None:
    table = parse_event_semantics("replace_defaults: true\nevents:\n  Bought: order\n")
    assert table.names() == ["Bought"]
    assert track("Order Completed", {"total": 5}, table)["order"] is None


def test_every_problem_in_a_file_is_reported_with_its_line() -> None:
    text = """events:
  Ticket Opened: grumble
  ticket_opened: complaint
  Ticket-Opened: complaint
  Quiet: {meaning: known, withdraws: [email]}
properties:
  ratings: [score]
extra: 1
"""
    with pytest.raises(EventSemanticsError) as error:
        parse_event_semantics(text, "events.yaml")
    assert error.value.problems == [
        "events.yaml:8:8: extra: unknown field; use events, properties, replace_defaults",
        "events.yaml:2:18: events.Ticket Opened: unknown meaning 'grumble'; use one of order, refund, complaint, "
        "feedback, consent, unsubscribe, known",
        "events.yaml:4:18: events.Ticket-Opened: names the same event as 'ticket_opened' (case, spaces, _ and - do "
        "not count)",
        "events.yaml:5:10: events.Quiet: withdraws is only for meaning unsubscribe",
        "events.yaml:7:12: properties.ratings: unknown property role; use amount, currency, order_id, items, rating, "
        "text, categories",
    ]


def test_a_missing_file_is_an_error_naming_it(tmp_path: Any) -> None:
    with pytest.raises(EventSemanticsError, match=r"missing\.yaml: cannot read"):
        load_event_semantics(tmp_path / "missing.yaml")


def test_the_defaults_know_the_spec_names_rules_use() -> None:
    table = default_event_semantics()
    for name, meaning in [("Order Completed", Meaning.ORDER), ("Order Refunded", Meaning.REFUND),
                          ("Complaint Submitted", Meaning.COMPLAINT), ("Feedback Submitted", Meaning.FEEDBACK),
                          ("Unsubscribed", Meaning.UNSUBSCRIBE), ("Birthday", Meaning.KNOWN),
                          ("Checkout Started", Meaning.KNOWN)]:
        row = table.meaning_of(name)
        assert row is not None and row.meaning is meaning, name
    assert table.meaning_of("Something Else") is None


def test_the_shipped_example_file_is_valid_and_means_what_its_comments_say() -> None:
    path = Path(__file__).resolve().parents[3] / "deploy" / "events" / "example.yaml"
    table = load_event_semantics(path)
    assert track("NPS Answered", {"score": 6}, table)["feedback"]["kind"] == "complaint"
    assert track("Order Cancelled", {"grand_total": 25}, table)["order"]["amount"] == -25.0
    assert consent_update(("sms", "email"), track("SMS Opt Out", {}, table)["consent"]) == ("email",)
    assert table.meaning_of("Order Completed").meaning is Meaning.ORDER  # the defaults stay
