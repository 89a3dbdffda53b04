"""Score a touchpoint and learn matured examples: the whole scoring flow, without I/O.

The service loads customer states, hands them here in event order, and saves what comes
back; tests drive the same flow with plain dicts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from services.scoring.features import features_at
from services.scoring.labels import DAY_MS, PendingExample, event_day, is_prediction_point, split_matured
from services.scoring.model import Learner
from services.scoring.segments import StageRules, lifecycle_stage, rfm_segment
from services.scoring.state import CustomerState, Touchpoint, apply_touchpoint


@dataclass(frozen=True)
class Scored:
    """A customer's scores right after one touchpoint."""

    propensity: float
    # The model's inputs plus the raw RFM totals, for rules and the customer-360 view.
    features: dict[str, float]
    reasons: list[tuple[str, float]]
    segment: str
    stage: str
    model_version: str
    new_example: PendingExample | None = None

    @property
    def churn_risk(self) -> float:
        return 1.0 - self.propensity


@dataclass(frozen=True)
class LearningOutcome:
    """What one round of learning from matured examples did."""

    learned: int = 0
    positives: int = 0
    drift_alarms: int = 0


class ScoringEngine:
    """Apply touchpoints to states, score them, and learn examples whose labels matured."""

    def __init__(
        self,
        learner: Learner,
        horizon_days: float = 90,
        lateness_days: float = 1.0,
        rules: StageRules | None = None,
        reason_count: int = 3,
    ) -> None:
        self.learner = learner
        self.horizon_ms = int(horizon_days * DAY_MS)
        self.lateness_ms = int(lateness_days * DAY_MS)
        self.rules = rules or StageRules(active_days=horizon_days, churned_days=2 * horizon_days)
        self.reason_count = reason_count

    def maturity_cutoff(self, watermark_ms: int) -> int:
        """Return the due time up to which labels are final, given a partition's watermark."""
        return watermark_ms - self.lateness_ms

    def score(self, state: CustomerState, touch: Touchpoint, watermark_ms: int) -> Scored:
        """Fold `touch` into `state` and score it; store a prediction point if this is the day's first."""
        applied = apply_touchpoint(state, touch)
        t = touch.timestamp_ms
        features = features_at(state, t)
        model = self.learner.model
        propensity = model.predict_propensity(features)
        example = None
        # A redelivered event was already a prediction point (or not) the first time.
        cutoff = self.maturity_cutoff(watermark_ms)
        if applied and is_prediction_point(state.last_example_day, t, self.horizon_ms, cutoff):
            example = PendingExample(t_ms=t, due_ms=t + self.horizon_ms, features=features, propensity=propensity)
            state.pending.append(example)
            state.last_example_day = event_day(t)
        return Scored(
            propensity=propensity,
            features=features | rfm_totals(state),
            reasons=model.reason_codes(features, self.reason_count),
            segment=rfm_segment(state, t, self.rules),
            stage=lifecycle_stage(state, t, self.rules),
            model_version=model.version,
            new_example=example,
        )

    def learn_matured(self, states: Iterable[CustomerState], maturity_cutoff_ms: int) -> LearningOutcome:
        """Take every example due by the cutoff out of `states`, account its score, then learn it."""
        matured: list[PendingExample] = []
        for state in states:
            done, state.pending = split_matured(state.pending, maturity_cutoff_ms)
            matured.extend(done)
        matured.sort(key=lambda e: (e.due_ms, e.t_ms, e.positive))
        positives = alarms = 0
        for example in matured:
            if self.learner.quality.update(example.positive, example.propensity):
                alarms += 1
            self.learner.model.learn(example.features, example.positive)
            positives += example.positive
        return LearningOutcome(learned=len(matured), positives=positives, drift_alarms=alarms)


def rfm_totals(state: CustomerState) -> dict[str, float]:
    """Return the raw frequency and monetary totals shown next to the model features."""
    return {"purchase_count": float(state.purchase_count), "monetary_total": state.monetary_total}


def score_update_record(customer_id: str, touch: Touchpoint, scored: Scored) -> dict[str, Any]:
    """Return the ScoreUpdate record for `scored`."""
    return {
        "customer_id": customer_id,
        "message_id": touch.message_id,
        "event_time_ms": touch.timestamp_ms,
        "received_at_ms": touch.received_at_ms,
        "churn_risk": scored.churn_risk,
        "purchase_propensity": scored.propensity,
        "segment": scored.segment,
        "stage": scored.stage,
        "reasons": [{"feature": name, "contribution": value} for name, value in scored.reasons],
        "features": dict(scored.features),
        "model_version": scored.model_version,
        "event_type": touch.event_type,
        "event_name": touch.event_name,
        "consent": list(touch.consent),
    }
