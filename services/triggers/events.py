"""The domain's view of an incoming score: only what rules and payloads need."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
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
    event_type: str = "track"
    event_name: str | None = None
    features: Mapping[str, float] = field(default_factory=dict)
    # Consent categories the score carries; scoring fills them from the touchpoint.
    consent: tuple[str, ...] = ()
    # Not in ScoreUpdate yet: read when scoring adds them (see the triggers report / DESIGN).
    channel: str | None = None
    time_zone: str | None = None

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
            event_type=record.get("event_type") or "track",
            event_name=record.get("event_name"),
            features=dict(record.get("features") or {}),
            consent=tuple(record.get("consent") or ()),
            channel=record.get("channel"),
            time_zone=record.get("time_zone"),
        )

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict that `from_json` turns back into an equal value (timer snapshots)."""
        data = asdict(self)
        data["scores"], data["features"] = dict(self.scores), dict(self.features)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScoreUpdated:
        values = dict(data)
        values["reasons"] = tuple(Reason(**r) for r in values.get("reasons", ()))
        values["consent"] = tuple(values.get("consent", ()))
        return cls(**values)
