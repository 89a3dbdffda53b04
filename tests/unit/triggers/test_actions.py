"""RetentionAction records: deterministic ids, rendered payloads that fit the Avro contract."""

from __future__ import annotations

import json

from services.triggers.actions import action_id, render_payload, retention_action_record
from services.triggers.crossing import ActionDecided, Outcome
from services.triggers.templates import render_template
from tests.unit.triggers.factories import a_rule, a_score
from touchstream import avro


def a_decision(outcome: Outcome = Outcome.FIRED, **rule_fields: object) -> ActionDecided:
    return ActionDecided(a_rule(**rule_fields), a_score(0.75, message_id="msg-42", at_ms=1_000), outcome, None)


def test_action_id_is_stable_and_changes_with_each_input() -> None:
    ids = {action_id("r", "c", "m"), action_id("r2", "c", "m"), action_id("r", "c2", "m"), action_id("r", "c", "m2")}
    assert len(ids) == 4
    assert action_id("r", "c", "m") == action_id("r", "c", "m")
    # Field separators prevent ("ab", "c") and ("a", "bc") from colliding.
    assert action_id("ab", "c", "m") != action_id("a", "bc", "m")


def test_payload_keeps_placeholder_types_and_wraps_in_an_envelope() -> None:
    template = {"customer": "${customer_id}", "risk": "${scores.churn_risk}", "why": "${reasons}",
                "text": "risk ${scores.churn_risk} for ${customer_id}", "fixed": [1, True, None], "cost": "$$5"}
    body = json.loads(render_payload(a_decision(action=a_rule().action.__class__("marketing", template)), "act_1"))
    assert body["type"] == "retention.action"
    assert body["timestamp"] == "1970-01-01T00:00:01.000Z"
    assert (body["action_id"], body["rule_id"], body["customer_id"]) == ("act_1", "churn-risk-high", "cus_1")
    assert body["data"] == {
        "customer": "cus_1",
        "risk": 0.75,
        "why": [{"feature": "recency_days", "contribution": 0.8}, {"feature": "frequency", "contribution": -0.2}],
        "text": "risk 0.75 for cus_1",
        "fixed": [1, True, None],
        "cost": "$5",
    }


def test_rendering_never_evaluates_text() -> None:
    assert render_template("${customer_id}", {"customer_id": "__import__('os').system('x')"}) == (
        "__import__('os').system('x')")


def test_record_fits_the_retention_action_schema_and_round_trips() -> None:
    record = retention_action_record(a_decision(), created_at_ms=5_000)
    assert avro.validation_errors("RetentionAction", record) == []
    assert avro.decode("RetentionAction", avro.encode("RetentionAction", record)) == record
    assert record["action_id"] == action_id("churn-risk-high", "cus_1", "msg-42")
    assert (record["outcome"], record["endpoint"], record["received_at_ms"]) == ("fired", "marketing",
                                                                                1_700_000_001_000)


def test_held_out_record_keeps_its_reason() -> None:
    decided = ActionDecided(a_rule(), a_score(0.75), Outcome.HELD_OUT, "holdout")
    record = retention_action_record(decided, created_at_ms=0)
    assert (record["outcome"], record["reason"]) == ("held_out", "holdout")
    assert avro.validation_errors("RetentionAction", record) == []
