"""Builders for triggers unit tests: rules and scores with sensible defaults."""

from __future__ import annotations

from typing import Any

from services.triggers.events import Reason, ScoreUpdated
from services.triggers.rules import ActionSpec, Rule, ScoreCrossing, parse_rule_file


def a_rule(**overrides: Any) -> Rule:
    fields: dict[str, Any] = {
        "id": "churn-risk-high",
        "when": ScoreCrossing("churn_risk", crosses_above=0.7, rearm_below=0.6),
        "action": ActionSpec("marketing", {"customer": "${customer_id}", "risk": "${scores.churn_risk}"}),
        "cooldown_hours": 24.0,
        "holdout_percent": 0.0,
    }
    return Rule(**{**fields, **overrides})


def rules_from(yaml_rules: str, policy: str = "") -> Any:
    """Parse rules written as YAML list items (and an optional policy block) into a RuleSet."""
    return parse_rule_file(f"{policy}\nrules:\n{yaml_rules}", "test.yaml")


def a_score(risk: float = 0.5, *, customer_id: str = "cus_1", at_ms: int = 0, message_id: str | None = None,
            **fields: Any) -> ScoreUpdated:
    values: dict[str, Any] = {
        "customer_id": customer_id,
        "message_id": message_id or f"msg-{customer_id}-{at_ms}-{risk}",
        "event_time_ms": at_ms,
        "received_at_ms": 1_700_000_000_000 + at_ms,
        "scores": {"churn_risk": risk, "purchase_propensity": 1 - risk},
        "segment": "at_risk",
        "stage": "lapsing",
        "reasons": (Reason("recency_days", 0.8), Reason("frequency", -0.2)),
        "model_version": "logreg-v1",
    }
    return ScoreUpdated(**{**values, **fields})
