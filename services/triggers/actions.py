"""Turn a decision into a RetentionAction record: deterministic id, rendered webhook body."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from services.triggers.crossing import ActionDecided, value_tier
from services.triggers.rules import DEFAULT_POLICY, Policy
from services.triggers.templates import render_template

ACTION_TYPE = "retention.action"


def action_id(rule_id: str, customer_id: str, message_id: str) -> str:
    """Return the action's idempotency key: the same inputs after a crash and replay give the same id.

    >>> action_id("churn-risk-high", "cus_1", "msg_1") == action_id("churn-risk-high", "cus_1", "msg_1")
    True
    >>> action_id("churn-risk-high", "cus_1", "msg_1")[:4]
    'act_'
    """
    digest = hashlib.sha256(f"{rule_id}\x1f{customer_id}\x1f{message_id}".encode()).hexdigest()
    return f"act_{digest[:32]}"


def payload_context(decided: ActionDecided, the_action_id: str, policy: Policy = DEFAULT_POLICY) -> dict[str, Any]:
    """Return the values a template may refer to, by placeholder name."""
    score = decided.score
    context: dict[str, Any] = {f"features.{name}": value for name, value in score.features.items()}
    return context | {
        "action_id": the_action_id,
        "rule_id": decided.rule.id,
        "customer_id": score.customer_id,
        "message_id": score.message_id,
        "event_time": _iso_utc(score.event_time_ms),
        "event_time_ms": score.event_time_ms,
        "scores.churn_risk": score.scores["churn_risk"],
        "scores.purchase_propensity": score.scores["purchase_propensity"],
        "segment": score.segment,
        "stage": score.stage,
        "reasons": [{"feature": r.feature, "contribution": r.contribution} for r in score.reasons],
        "model_version": score.model_version,
        "event_type": score.event_type,
        "event_name": score.event_name,
        "value_tier": value_tier(score.features, policy),
        "trigger": decided.trigger,
    }


def render_payload(decided: ActionDecided, the_action_id: str, policy: Policy = DEFAULT_POLICY) -> str:
    """Return the webhook body: a Standard Webhooks style envelope around the rendered template."""
    envelope: dict[str, Any] = {
        "type": ACTION_TYPE,
        "timestamp": _iso_utc(decided.score.event_time_ms),
        "action_id": the_action_id,
        "rule_id": decided.rule.id,
        "customer_id": decided.score.customer_id,
        # Lets the receiver measure event-accepted -> webhook latency end to end.
        "received_at_ms": decided.score.received_at_ms,
        "data": render_template(decided.rule.action.template, payload_context(decided, the_action_id, policy)),
    }
    if decided.not_before_ms is not None:
        # Quiet hours with `hold`: delivery waits until then (and the receiver can see why it was late).
        envelope["not_before_ms"] = decided.not_before_ms
    return json.dumps(envelope, ensure_ascii=False, separators=(",", ":"))


def retention_action_record(
    decided: ActionDecided, created_at_ms: int, policy: Policy = DEFAULT_POLICY
) -> dict[str, Any]:
    """Return the `RetentionAction` Avro record for a decision."""
    score = decided.score
    the_action_id = action_id(decided.rule.id, score.customer_id, decided.idempotency_source)
    return {
        "action_id": the_action_id,
        "rule_id": decided.rule.id,
        "customer_id": score.customer_id,
        "outcome": decided.outcome.value,
        "reason": decided.reason,
        "endpoint": decided.rule.action.endpoint,
        "payload_json": render_payload(decided, the_action_id, policy),
        "event_time_ms": score.event_time_ms,
        "received_at_ms": score.received_at_ms,
        "created_at_ms": created_at_ms,
    }


def _iso_utc(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
