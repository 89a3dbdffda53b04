"""The whole scoring flow without I/O: score, wait for labels, learn, explain."""

from __future__ import annotations

import math
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
    assert scoring.learner.model.version == "logreg-v2-n1"
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
        state.purchases.add(state.last_purchase_ms or 0, 3.0)
        state.touches.add(state.last_purchase_ms or 0, 3.0)
    now = 400 * DAY_MS
    frequent_score = model.predict_propensity(features_at(frequent_recent, now))
    lapsed_score = model.predict_propensity(features_at(lapsed, now))
    assert frequent_score > lapsed_score + 0.2

    # The lapsed customer's risk is explained by the silence: recency, or empty recent windows.
    silence = {"log_recency_days", "log_days_since_last_touch", "log_overdue_ratio", "touches_30d",
               *(f"{kind}_{w}d" for kind in ("purchases", "log_spend") for w in (7, 30, 90))}
    reasons = model.reason_codes(features_at(lapsed, now), 3)
    assert all(name in silence and contribution > 0 for name, contribution in reasons), reasons


def test_an_out_of_order_event_is_folded_in_but_is_no_prediction_point() -> None:
    scoring, state = engine(), CustomerState()
    scoring.score(state, touch("a", 20, 10.0), watermark_ms=20 * DAY_MS)
    late = scoring.score(state, touch("b", 10, 5.0), watermark_ms=20 * DAY_MS)
    # Its features as of day 10 would contain the day-20 purchase, inside its own label window.
    assert late.new_example is None
    assert late.late  # ten days behind the watermark, allowed lateness is one day
    assert state.purchase_count == 2 and state.first_purchase_ms == 10 * DAY_MS


def test_a_purchase_late_within_the_allowed_lateness_still_labels_the_example() -> None:
    scoring, state = engine(), CustomerState()
    scoring.score(state, touch("a", 0, 10.0), watermark_ms=0)
    # The partition's watermark reaches day 90.5; this customer's purchase of day 89.9 arrives after it.
    watermark = int(90.5 * DAY_MS)
    assert scoring.learn_matured([state], scoring.maturity_cutoff(watermark)).learned == 0
    scored = scoring.score(state, touch("b", 89.9, 10.0), watermark_ms=watermark)
    assert not scored.late
    outcome = scoring.learn_matured([state], scoring.maturity_cutoff(92 * DAY_MS))
    assert (outcome.learned, outcome.positives) == (1, 1)


def test_a_silent_customer_is_rescored_every_tick_until_the_silence_limit() -> None:
    scoring = ScoringEngine(Learner(PropensityModel()), horizon_days=90, tick_days=14, tick_max_silence_days=50)
    state = CustomerState()
    scoring.score(state, touch("a", 0, 10.0), watermark_ms=0)
    ticks = []
    while (due := scoring.next_tick_ms(state)) is not None:
        scored = scoring.rescore(state, due, watermark_ms=due)
        assert scored is not None and scored.new_example is not None
        ticks.append(due // DAY_MS)
    assert ticks == [14, 28, 42]
    assert [round(math.expm1(e.features["log_recency_days"]), 9) for e in state.pending] == [0.0, 14.0, 28.0, 42.0]
    # A tick that is no longer the customer's next one (superseded, stale member) does nothing.
    assert scoring.rescore(state, 14 * DAY_MS, watermark_ms=60 * DAY_MS) is None


def test_an_event_moves_the_next_tick() -> None:
    scoring, state = engine(), CustomerState()
    scoring.score(state, touch("a", 0, 10.0), watermark_ms=0)
    assert scoring.next_tick_ms(state) == 14 * DAY_MS
    scoring.score(state, touch("b", 10), watermark_ms=10 * DAY_MS)
    assert scoring.next_tick_ms(state) == 24 * DAY_MS


def test_forecast_chains_the_horizon_model_over_silent_steps() -> None:
    scoring = engine()
    model = scoring.learner.model
    for i in range(300):
        model.learn({"log_recency_days": math.log1p(i % 200), "log_tenure_days": 5.3}, i % 200 < 60)
    state = CustomerState()
    scoring.score(state, touch("a", 0, 10.0), watermark_ms=0)
    t = 30 * DAY_MS
    p0 = model.predict_propensity(features_at(state, t))
    p1 = model.predict_propensity(features_at(state, t + 90 * DAY_MS))
    assert math.isclose(scoring.forecast(state, t, 90).propensity, p0, rel_tol=1e-12)
    two = scoring.forecast(state, t, 180).propensity
    assert abs(two - (1 - (1 - p0) * (1 - p1))) < 1e-12
    # Longer horizons can only add chances to buy.
    assert p0 < two < scoring.forecast(state, t, 273).propensity < 1


def test_expected_purchases_scale_with_purchases_per_positive_window() -> None:
    scoring, state = engine(), CustomerState()
    scoring.score(state, touch("a", 0, 10.0), watermark_ms=0)
    for day in (10, 11, 12):
        scoring.score(state, touch(f"b{day}", day, 10.0), watermark_ms=day * DAY_MS)
    scoring.learn_matured([state], scoring.maturity_cutoff(200 * DAY_MS))
    # Day 0's window saw three purchases, day 10's two, day 11's one (day 12's none).
    assert scoring.learner.purchases_per_positive.get() == 2.0
    forecast = scoring.forecast(state, 200 * DAY_MS, 90)
    assert abs(forecast.expected_purchases - 2.0 * forecast.propensity) < 1e-12


def test_score_updates_stay_readable_across_the_added_channel_field() -> None:
    scoring, state = engine(), CustomerState()
    event = Touchpoint("m1", DAY_MS, DAY_MS, order_amount=5.0, channel="app")
    record = score_update_record("c", event, scoring.score(state, event, watermark_ms=DAY_MS))
    before_channel = avro.load_codec(use_versions={"ScoreUpdate": 1})
    old_record = {k: v for k, v in record.items() if k not in ("channel", "time_zone")}
    # Old writer, new reader (a new consumer reads old records) and the other way round.
    read = avro.decode("ScoreUpdate", before_channel.encode("ScoreUpdate", old_record))
    assert read["channel"] is None and read["message_id"] == "m1"
    assert avro.decode("ScoreUpdate", avro.encode("ScoreUpdate", record))["channel"] == "app"
    read = before_channel.decode("ScoreUpdate", avro.encode("ScoreUpdate", record))
    assert "channel" not in read and read["customer_id"] == "c"
