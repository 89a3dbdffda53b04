"""Score touchpoints and as-of rescores, and learn matured examples: the whole flow, without I/O.

The service loads customer states, hands them here in event order, and saves what comes
back; tests drive the same flow with plain dicts.

Prediction points (examples the model later learns from) come from two sources: a
customer's touchpoints (at most one per event-time day), and as-of rescores ("ticks")
every `tick_days` of event time after the last prediction point while the customer has
been silent less than `tick_max_silence_days`. Without ticks the model would only ever
see customers at the moment they act (recency 0) and could not learn what silence means.

The model answers "purchase within H days". A longer horizon is chained from it:
P(no purchase in k*H) = product over j < k of (1 - p(features as of t + j*H)), the
features computed as if the customer stayed silent. That is the chain rule, exact if the
model is calibrated for a silent customer at each step, and it uses no label longer
than H, so it can be learned from the first H days of data.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from services.scoring.features import features_at, model_inputs
from services.scoring.labels import DAY_MS, PendingExample, event_day, is_prediction_point, split_matured
from services.scoring.model import Learner
from services.scoring.segments import StageRules, lifecycle_stage, rfm_segment
from services.scoring.state import CustomerState, Touchpoint, apply_touchpoint
from touchstream.privacy import CONSENT_WITHDRAWN

# The ScoreUpdate event_type of an as-of rescore (no touchpoint behind it).
RESCORE = "rescore"


@dataclass(frozen=True)
class Scored:
    """A customer's scores right after one touchpoint or rescore."""

    propensity: float
    # The model's inputs plus the raw RFM totals, for rules and the customer-360 view.
    features: dict[str, float]
    reasons: list[tuple[str, float]]
    segment: str
    stage: str
    model_version: str
    new_example: PendingExample | None = None
    # The event arrived more than the allowed lateness behind its partition's watermark.
    late: bool = False

    @property
    def churn_risk(self) -> float:
        return 1.0 - self.propensity


@dataclass(frozen=True)
class LearningOutcome:
    """What one round of learning from matured examples did."""

    learned: int = 0
    positives: int = 0
    drift_alarms: int = 0


@dataclass(frozen=True)
class HorizonForecast:
    """P(at least one purchase) and expected purchases over a horizon, as of a time."""

    horizon_days: float
    propensity: float
    expected_purchases: float


class ScoringEngine:
    """Apply touchpoints to states, score them, and learn examples whose labels matured."""

    def __init__(
        self,
        learner: Learner,
        horizon_days: float = 90,
        lateness_days: float = 1.0,
        rules: StageRules | None = None,
        reason_count: int = 3,
        tick_days: float = 14.0,
        tick_max_silence_days: float = 730.0,
    ) -> None:
        self.learner = learner
        self.horizon_days = horizon_days
        self.horizon_ms = int(horizon_days * DAY_MS)
        self.lateness_ms = int(lateness_days * DAY_MS)
        self.rules = rules or StageRules(at_risk_days=horizon_days, churned_days=2 * horizon_days)
        self.reason_count = reason_count
        self.tick_ms = int(tick_days * DAY_MS)
        self.tick_max_silence_ms = int(tick_max_silence_days * DAY_MS)

    def maturity_cutoff(self, watermark_ms: int) -> int:
        """Return the due time up to which labels are final, given a partition's watermark."""
        return watermark_ms - self.lateness_ms

    def score(self, state: CustomerState, touch: Touchpoint, watermark_ms: int) -> Scored:
        """Fold `touch` into `state` and score it; store a prediction point if this is the day's first.

        A touchpoint older than the customer's newest one is folded in but is no prediction
        point: its features would already contain later events, some of them inside its
        own label window.
        """
        t = touch.timestamp_ms
        in_order = state.last_touch_ms is None or t >= state.last_touch_ms
        applied = apply_touchpoint(state, touch)
        late = t < watermark_ms - self.lateness_ms
        scored = self._score_at(state, t, watermark_ms, make_example=applied and in_order, late=late)
        return replace(scored, features=scored.features | event_facts(touch))

    def rescore(self, state: CustomerState, t_ms: int, watermark_ms: int, explain: bool = True) -> Scored | None:
        """Score `state` as of `t_ms` with no new event (a tick); None if that tick is no longer due.

        With `explain` False the reasons, segment and stage are left empty (most rescores
        only make a prediction point, and those three cost more than the prediction).
        """
        if self.next_tick_ms(state) != t_ms:
            return None
        in_order = state.last_touch_ms is None or t_ms >= state.last_touch_ms
        scored = self._score_at(state, t_ms, watermark_ms, make_example=in_order, explain=explain)
        # Move the schedule on even when no example was made, or the tick would repeat forever.
        state.last_example_ms = max(state.last_example_ms or t_ms, t_ms)
        return scored

    def next_tick_ms(self, state: CustomerState) -> int | None:
        """Return when `state` is next rescored as of, or None while there is nothing to rescore."""
        if state.last_example_ms is None or state.last_touch_ms is None:
            return None
        due = state.last_example_ms + self.tick_ms
        if due - state.last_touch_ms > self.tick_max_silence_ms:
            return None
        return due

    def _score_at(
        self, state: CustomerState, t: int, watermark_ms: int, make_example: bool, late: bool = False,
        explain: bool = True,
    ) -> Scored:
        features = features_at(state, t)
        model = self.learner.model
        propensity = model.predict_propensity(features)
        self.learner.rfm_quantiles.observe(state, t)
        example = None
        cutoff = self.maturity_cutoff(watermark_ms)
        if make_example and is_prediction_point(state.last_example_day, t, self.horizon_ms, cutoff):
            example = PendingExample(
                t_ms=t, due_ms=t + self.horizon_ms, features=model_inputs(features), propensity=propensity
            )
            state.pending.append(example)
            state.last_example_day = event_day(t)
            state.last_example_ms = t
        return Scored(
            propensity=propensity,
            features=features | rfm_totals(state),
            reasons=model.reason_codes(features, self.reason_count) if explain else [],
            segment=rfm_segment(state, t, self.learner.rfm_quantiles) if explain else "",
            stage=lifecycle_stage(state, t, self.rules) if explain else "",
            model_version=model.version,
            new_example=example,
            late=late,
        )

    def forecast(self, state: CustomerState, t_ms: int, horizon_days: float) -> HorizonForecast:
        """Return P(purchase in (t, t + horizon]) and expected purchases, chained from the H-day model.

        Reads the state only; valid for any `t_ms` at or after the customer's last event.
        """
        model = self.learner.model
        none_yet, expected, done = 1.0, 0.0, 0.0
        per_positive = self.learner.purchases_per_positive.get() or 1.0
        while done < horizon_days - 1e-9:
            step = min(self.horizon_days, horizon_days - done)
            p = model.predict_propensity(features_at(state, t_ms + int(done * DAY_MS)))
            # A partial last step: the same hazard over a shorter window.
            p_step = 1.0 - (1.0 - p) ** (step / self.horizon_days)
            expected += p_step * per_positive
            none_yet *= 1.0 - p_step
            done += step
        return HorizonForecast(horizon_days, 1.0 - none_yet, expected)

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
            if example.positive:
                self.learner.purchases_per_positive.update(max(1, example.purchases))
            positives += example.positive
        return LearningOutcome(learned=len(matured), positives=positives, drift_alarms=alarms)


def event_facts(touch: Touchpoint) -> dict[str, float]:
    """Return facts of the scored touchpoint itself that rules read next to the features.

    >>> event_facts(Touchpoint("m", 0, 0, is_complaint=True, rating=2))
    {'is_complaint': 1.0, 'feedback_rating': 2.0}
    """
    facts = {"is_complaint": float(touch.is_complaint)}
    if touch.rating is not None:
        facts["feedback_rating"] = float(touch.rating)
    return facts


def rfm_totals(state: CustomerState) -> dict[str, float]:
    """Return the raw frequency and monetary totals shown next to the model features."""
    return {"purchase_count": float(state.purchase_count), "monetary_total": state.monetary_total}


def score_update_record(customer_id: str, touch: Touchpoint, scored: Scored,
                        state: CustomerState | None = None) -> dict[str, Any]:
    """Return the ScoreUpdate record for `scored`.

    Consent and time zone are the customer's (from `state`: the latest stated on any event or
    identify call), so a rescore or an event without them carries them too.
    """
    if state is not None and state.consent is not None:
        consent = list(state.consent)
    else:
        consent = [c for c in touch.consent if c != CONSENT_WITHDRAWN]
    time_zone = (state.time_zone if state is not None else None) or touch.time_zone
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
        "consent": consent,
        "channel": None if touch.event_type == RESCORE else touch.channel,
        "time_zone": time_zone,
    }


def rescore_touchpoint(customer_id: str, t_ms: int) -> Touchpoint:
    """Return the stand-in touchpoint a rescore's ScoreUpdate is built from (consent comes from the state)."""
    return Touchpoint(f"rescore:{customer_id}:{t_ms}", t_ms, t_ms, event_type=RESCORE)
