"""The whole scoring flow without I/O: score, wait for labels, learn, explain."""

from __future__ import annotations

import random

from services.scoring.engine import ScoringEngine, score_update_record
from services.scoring.features import features_at
from services.scoring.labels import DAY_MS
from services.scoring.model import Learner, PropensityModel
from services.scoring.state import CustomerState, Touchpoint
from touchstream import avro


def engine(horizon_days: float = 90) -> ScoringEngine:
    return ScoringEngine(Learner(PropensityModel()), horizon_days=horizon_days, lateness_days=1)


def touch(message_id: str, day: float, amount: float | None = None) -> Touchpoint:
    t = int(day * DAY_MS)
    return Touchpoint(message_id, t, t, event_name="Order Completed" if amount else None, order_amount=amount)


def test_prediction_points_are_sampled_per_day_and_not_for_redeliveries() -> None:
    scoring, state = engine(), CustomerState()
    first = scoring.score(state, touch("a", 1.1, 10.0), watermark_ms=int(1.1 * DAY_MS))
    same_day = scoring.score(state, touch("b", 1.5), watermark_ms=int(1.5 * DAY_MS))
    redelivered = scoring.score(state, touch("a", 1.1, 10.0), watermark_ms=int(1.5 * DAY_MS))
    assert first.new_example is not None
    assert same_day.new_example is None and redelivered.new_example is None
    assert len(state.pending) == 1 and state.purchase_count == 1


def test_examples_are_learned_only_after_their_label_matures() -> None:
    scoring, state = engine(), CustomerState()
    scoring.score(state, touch("a", 0, 10.0), watermark_ms=0)
    scoring.score(state, touch("b", 30, 10.0), watermark_ms=30 * DAY_MS)
    assert scoring.learn_matured([state], scoring.maturity_cutoff(89 * DAY_MS)).learned == 0
    outcome = scoring.learn_matured([state], scoring.maturity_cutoff(91 * DAY_MS))
    assert (outcome.learned, outcome.positives) == (1, 1)
    assert scoring.learner.model.examples_learned == 1
    assert scoring.learner.model.version == "logreg-v1-n1"
    assert scoring.learner.quality.examples == 1
    assert [e.t_ms for e in state.pending] == [30 * DAY_MS]


def test_score_update_record_fits_the_avro_contract() -> None:
    scoring, state = engine(), CustomerState()
    event = Touchpoint("m1", DAY_MS, DAY_MS + 7, event_name="Order Completed", order_amount=12.5, consent=("email",))
    scored = scoring.score(state, event, watermark_ms=DAY_MS)
    record = score_update_record("cust-1", event, scored)
    assert avro.validation_errors("ScoreUpdate", record) == []
    assert record["churn_risk"] + record["purchase_propensity"] == 1.0
    assert record["received_at_ms"] == DAY_MS + 7 and record["consent"] == ["email"]
    assert record["segment"] == "new" and record["stage"] == "new"
    assert record["features"]["monetary_total"] == 12.5


def synthetic_history(customers: int, days: int, seed: int) -> list[tuple[str, Touchpoint]]:
    """Regular buyers keep buying; lapsing ones stop at a random day but keep visiting now and then."""
    rng = random.Random(seed)
    events: list[tuple[str, Touchpoint]] = []
    for n in range(customers):
        customer_id = f"c{n}"
        stops_at = days if n % 2 == 0 else rng.uniform(30, days * 0.7)
        day, k = rng.uniform(0, 20), 0
        while day < days:
            buys = day < stops_at and rng.random() < 0.6
            amount = round(rng.uniform(10, 80), 2) if buys else None
            events.append((customer_id, touch(f"{customer_id}-{k}", day, amount)))
            day += rng.expovariate(1 / 12) if day < stops_at else rng.expovariate(1 / 40)
            k += 1
    events.sort(key=lambda e: e[1].timestamp_ms)
    return events


def test_learned_model_ranks_frequent_recent_buyers_above_lapsed_ones() -> None:
    scoring = engine()
    states: dict[str, CustomerState] = {}
    watermark, last_learn_day = 0, 0
    for customer_id, event in synthetic_history(customers=200, days=540, seed=7):
        watermark = max(watermark, event.timestamp_ms)
        scoring.score(states.setdefault(customer_id, CustomerState()), event, watermark)
        if watermark // DAY_MS > last_learn_day:
            last_learn_day = watermark // DAY_MS
            scoring.learn_matured(states.values(), scoring.maturity_cutoff(watermark))

    model = scoring.learner.model
    assert model.examples_learned > 1000
    assert scoring.learner.quality.roc_auc.get() > 0.7

    frequent_recent = CustomerState(
        first_touch_ms=0, first_purchase_ms=0, last_purchase_ms=395 * DAY_MS, purchase_count=20, monetary_total=900.0
    )
    lapsed = CustomerState(
        first_touch_ms=0, first_purchase_ms=0, last_purchase_ms=200 * DAY_MS, purchase_count=6, monetary_total=270.0
    )
    for state in (frequent_recent, lapsed):
        state.recent_purchases.add(state.last_purchase_ms or 0, 3.0, 90 * DAY_MS)
        state.recent_touches.add(state.last_purchase_ms or 0, 3.0, 30 * DAY_MS)
    now = 400 * DAY_MS
    frequent_score = model.predict_propensity(features_at(frequent_recent, now))
    lapsed_score = model.predict_propensity(features_at(lapsed, now))
    assert frequent_score > lapsed_score + 0.2

    # The lapsed customer's risk is explained mostly by how long ago they last bought.
    reasons = model.reason_codes(features_at(lapsed, now), 3)
    by_name = dict(reasons)
    assert "recency_days" in by_name and by_name["recency_days"] > 0
