"""The domain's view of an incoming score: only what rules and payloads need."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Reason:
    feature: str
    contribution: float


@dataclass(frozen=True)
class ScoreUpdated:
    """A customer's scores changed after one touchpoint (a decoded `ScoreUpdate`)."""

    customer_id: str
    message_id: str
    event_time_ms: int
    received_at_ms: int
    scores: Mapping[str, float]
    segment: str
    stage: str
    reasons: tuple[Reason, ...]
    model_version: str

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ScoreUpdated:
        """Build from a decoded ScoreUpdate Avro record."""
        return cls(
            customer_id=record["customer_id"],
            message_id=record["message_id"],
            event_time_ms=record["event_time_ms"],
            received_at_ms=record["received_at_ms"],
            scores={"churn_risk": record["churn_risk"], "purchase_propensity": record["purchase_propensity"]},
            segment=record["segment"],
            stage=record["stage"],
            reasons=tuple(Reason(r["feature"], r["contribution"]) for r in record.get("reasons", ())),
            model_version=record["model_version"],
        )
