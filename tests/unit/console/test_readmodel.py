"""Pure read-model logic: records in, entries, outcomes and chart geometry out."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from services.console.auth import safe_next
from services.console.quality import model_quality
from services.console.readmodel import (
    TouchpointSeen,
    action_taken,
    conversion_uplift,
    converted_within,
    customers_merged,
    dead_lettered,
    delivery_ended,
    follow_merges,
    reason_in_words,
    score_updated,
    touchpoint_seen,
)
from services.console.settings import ConsoleSettings
from services.console.web import rule_thresholds
from services.identity.admin import hash_admin_key
from services.triggers.rules import parse_rules
from touchstream import avro
from touchstream.topics import ACTION_DELIVERIES


def a_resolved(message_id: str = "m-1", **event: object) -> dict[str, object]:
    base = {"message_id": message_id, "type": "track", "event": "Order Completed", "channel": "wechat",
            "source": "mini-program", "timestamp_ms": 1_700_000_000_000, "received_at_ms": 1_700_000_000_500,
            "identifiers": [{"type": "email", "value": "ab" * 32}, {"type": "user_id", "value": "cd" * 32}],
            "order": {"order_id": "o-1", "amount": 59.9, "currency": "EUR", "items": []},
            "feedback": None, "consent": [], "properties_json": None}
    base.update(event)
    return {"customer_id": "c_1", "event": base, "resolved_at_ms": 1_700_000_000_600}


def test_a_resolved_touchpoint_becomes_a_timeline_entry_with_hashed_identifier_types_only() -> None:
    seen = touchpoint_seen(a_resolved())
    assert (seen.customer_id, seen.message_id, seen.channel, seen.order_amount, seen.currency) == (
        "c_1", "m-1", "wechat", 59.9, "EUR")
    assert seen.identifier_types == ("email", "user_id")
    assert seen.is_purchase
    assert "ab" * 32 not in seen.to_json()  # the timeline keeps identifier types, not values
    assert TouchpointSeen.from_json(seen.to_json()) == seen


def test_a_messages_words_are_not_kept_only_its_kind() -> None:
    """Issue 20: a complaint's text stays in the event log; the stored timeline entry and its properties hold
    neither the text nor the property ingest mapped it from (the sentiment arrives with the score)."""
    from services.console.entries import customer_view, touchpoint_value

    complaint = touchpoint_seen(a_resolved(
        event="Complaint Submitted", order=None, feedback={"kind": "complaint", "text": "cold food again", "rating": 1},
        properties_json='{"properties": {"comment": "cold food again", "rating": 1, "order": "o-7"}}'))
    assert complaint.properties == {"rating": "1", "order": "o-7"}
    stored = touchpoint_value(complaint)
    assert b"cold food" not in stored
    entry = customer_view("c_1", "c_1", {"t:m-1": stored}).timeline[0]
    assert (entry.feedback_kind, entry.properties) == ("complaint", {"rating": "1", "order": "o-7"})


def test_a_page_view_is_not_a_purchase() -> None:
    assert not touchpoint_seen(a_resolved(event="Page Viewed", order=None, type="page")).is_purchase


def test_properties_are_kept_as_short_text_whatever_they_contain() -> None:
    hostile = '{"note": "<script>alert(1)</script>", "img": "<img src=x onerror=alert(2)>", "n": 3, ' \
              '"link": "javascript:alert(3)", "big": "' + "x" * 1000 + '"}'
    props = touchpoint_seen(a_resolved(properties_json=hostile)).properties
    assert props["note"] == "<script>alert(1)</script>"  # escaping is the template's job, not the model's
    assert props["link"] == "javascript:alert(3)" and props["n"] == "3"
    assert len(props["big"]) == 200


def test_too_many_properties_are_cut() -> None:
    many = "{" + ",".join(f'"k{i}": {i}' for i in range(100)) + "}"
    assert len(touchpoint_seen(a_resolved(properties_json=many)).properties) == 20


def test_score_action_merge_and_dead_letter_records_convert() -> None:
    score = score_updated({"customer_id": "c_1", "message_id": "m-1", "event_time_ms": 5, "received_at_ms": 6,
                           "churn_risk": 0.8, "purchase_propensity": 0.2, "segment": "at_risk", "stage": "lapsing",
                           "reasons": [{"feature": "overdue_ratio", "contribution": 1.2}],
                           "features": {"recency_days": 40}, "model_version": "v3"})
    assert score.reasons == (("overdue_ratio", 1.2),) and score.features == {"recency_days": 40.0}
    action = action_taken({"action_id": "a-1", "rule_id": "r", "customer_id": "c_1", "outcome": "suppressed",
                           "reason": "cooldown", "endpoint": "marketing", "payload_json": "{}",
                           "event_time_ms": 5, "received_at_ms": 6, "created_at_ms": 7})
    assert action.count_field == "suppressed:cooldown"
    merge = customers_merged({"merge_id": "g", "survivor_id": "c_1", "merged_id": "c_2", "kind": "merge",
                              "reason": "shared_identifier", "score": None, "identifiers": [],
                              "event_time_ms": 9, "caused_by": None})
    assert (merge.survivor_id, merge.merged_id, merge.kind) == ("c_1", "c_2", "merge")
    one = dead_lettered({"source": "s", "stage": "ingest", "reason": "schema: bad", "key": None,
                         "original": b"x", "failed_at_ms": 1})
    other = dead_lettered({"source": "s", "stage": "ingest", "reason": "schema: bad", "key": None,
                           "original": b"y", "failed_at_ms": 1})
    assert one.reason == "schema" and one.digest != other.digest


def test_merges_are_followed_to_the_survivor_and_cycles_stop() -> None:
    assert follow_merges("c_3", {"c_3": "c_2", "c_2": "c_1"}) == "c_1"
    assert follow_merges("c_9", {}) == "c_9"
    assert follow_merges("a", {"a": "b", "b": "a"}) in ("a", "b")


def test_uplift_matches_a_hand_computation() -> None:
    outcome = conversion_uplift(40, 20, 40, 10, 10)
    assert outcome.enough_data
    assert outcome.treated_rate == 0.5 and outcome.holdout_rate == 0.25 and outcome.uplift == 0.25
    se = math.sqrt(0.5 * 0.5 / 40 + 0.25 * 0.75 / 40)
    assert outcome.ci_low == pytest.approx(0.25 - 1.959964 * se, abs=1e-6)
    assert outcome.ci_high == pytest.approx(0.25 + 1.959964 * se, abs=1e-6)


@pytest.mark.parametrize(("treated", "holdout"), [(9, 40), (40, 9), (0, 0)])
def test_no_uplift_until_both_groups_reach_the_minimum(treated: int, holdout: int) -> None:
    outcome = conversion_uplift(treated, 0, holdout, 0, 10)
    assert not outcome.enough_data and outcome.uplift is None and outcome.ci_low is None


def test_conversion_counts_only_inside_the_window_after_the_action() -> None:
    assert converted_within(1000, [1001], 10)
    assert converted_within(1000, [1010], 10)
    assert not converted_within(1000, [1000], 10)  # the same moment is not "after"
    assert not converted_within(1000, [999, 1011], 10)


def test_reasons_read_as_words() -> None:
    assert reason_in_words("recency_days", 0.5) == "Days since the last purchase raises churn risk"
    assert reason_in_words("some_new_feature", -2.0) == "Some new feature strongly lowers churn risk"


def test_only_score_crossing_rules_give_thresholds() -> None:
    rules = parse_rules("""
rules:
  - id: high
    when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.6}
    action: {endpoint: marketing}
  - id: stage
    when: {changes: stage, to: [lapsing]}
    action: {endpoint: marketing}
""")
    assert rule_thresholds(rules) == [("high", "churn_risk", 0.7)]


@pytest.mark.parametrize("target", [
    "//evil.example/x", "https://evil.example", "evil", "", "/\\evil.example",
    # A browser drops tabs and line breaks from a Location, leaving "//evil.example".
    "/\t/evil.example", "/\n/evil.example", "/\r\n/evil.example", "\t//evil.example", "/\t\\evil.example",
    "/ /evil.example", "/\x00/evil.example", "/\x7f/evil.example", "/\u00a0/evil.example", "/\u3000/evil.example",
])
def test_login_never_redirects_off_site(target: str) -> None:
    assert safe_next(target) == "/overview"


@pytest.mark.parametrize("target", ["/customers/c_1", "/rules?rule=churn-high#outcomes", "/customers/a%2Fb"])
def test_login_keeps_a_redirect_to_a_page_of_this_site(target: str) -> None:
    assert safe_next(target) == target


def test_model_quality_is_read_from_scoring_metrics() -> None:
    text = ("touchstream_scoring_prequential_roc_auc_ratio 0.75\n"
            "touchstream_scoring_prequential_log_loss_nats 0.5\n"
            "touchstream_scoring_prequential_calibration_error_ratio 0.04\n"
            "touchstream_scoring_drift_alarms_total 1.0\n"
            "touchstream_ingest_up_info 1.0\n")
    quality = model_quality(text)
    assert (quality.roc_auc, quality.log_loss, quality.calibration_error, quality.drift_alarms) == (
        0.75, 0.5, 0.04, 1.0)
    assert quality.brier is None


def test_traits_context_and_personal_looking_values_never_reach_the_timeline() -> None:
    wrapped = ('{"properties": {"note": "mail me at ann@example.com or +1 415 555 2671", "sku": "A-1"},'
               ' "traits": {"name": "Ann Lee", "email": "ann@example.com"}, "context": {"ip": "10.0.0.1"}}')
    props = touchpoint_seen(a_resolved(properties_json=wrapped)).properties
    assert props == {"note": "mail me at [masked] or [masked]", "sku": "A-1"}


def test_a_delivery_outcome_becomes_the_actions_delivery_status() -> None:
    record = {"action_id": "a-9", "rule_id": "r", "customer_id": "c_7", "endpoint": "marketing",
              "outcome": "dead_lettered", "attempts": 10, "status": 500, "reason": "webhook: HTTP 500 " + "x" * 300,
              "event_time_ms": 1, "received_at_ms": 2, "created_at_ms": 3, "ended_at_ms": 9}
    ended = delivery_ended(avro.decode(ACTION_DELIVERIES.schema, avro.encode(ACTION_DELIVERIES.schema, record)))
    assert (ended.customer_id, ended.action_id, ended.attempts, ended.status) == ("c_7", "a-9", 10, 500)
    assert not ended.delivered and ended.reason is not None and len(ended.reason) == 200
    delivered = delivery_ended({**record, "outcome": "delivered", "status": 204, "reason": None})
    assert delivered.delivered and delivered.reason is None and delivered.ended_at_ms - delivered.received_at_ms == 7


def test_a_dead_letter_is_counted_by_stage_and_the_first_clause_of_its_reason() -> None:
    record = {"source": "actions", "stage": "delivery", "reason": "endpoint: HTTP 500 after 8 tries", "key": b"c_7",
              "original": b"whatever", "failed_at_ms": 5}
    letter = dead_lettered(record)
    assert (letter.stage, letter.reason) == ("delivery", "endpoint")
    assert dead_lettered(record).digest == letter.digest != dead_lettered({**record, "failed_at_ms": 6}).digest


def test_prod_refuses_dev_keys_and_insecure_cookies() -> None:
    real = frozenset({hash_admin_key("a-real-key")})
    with pytest.raises(ValidationError, match="dev admin key"):
        ConsoleSettings(environment="prod", cookie_secure=True, identity_admin_key="x")
    with pytest.raises(ValidationError, match="COOKIE_SECURE"):
        ConsoleSettings(environment="prod", admin_keys=real, identity_admin_key="x")
    with pytest.raises(ValidationError, match="IDENTITY_ADMIN_KEY"):
        ConsoleSettings(environment="prod", admin_keys=real, cookie_secure=True)
    ConsoleSettings(environment="prod", admin_keys=real, cookie_secure=True, identity_admin_key="x")


def test_the_console_refuses_an_unknown_environment_and_checks_prod_in_any_case(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOUCHSTREAM_ENVIRONMENT", "production")
    with pytest.raises(ValidationError, match="TOUCHSTREAM_ENVIRONMENT must be one of dev, test, prod"):
        ConsoleSettings()
    monkeypatch.setenv("TOUCHSTREAM_ENVIRONMENT", "PROD")
    with pytest.raises(ValidationError, match="dev admin key"):
        ConsoleSettings()
