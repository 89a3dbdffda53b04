"""The whole scoring flow without I/O: score, wait for labels, learn from events and silence, explain."""

from __future__ import annotations

import math
import random

import numpy as np

from services.scoring.crossings import WatchedChanges
from services.scoring.engine import Scored, ScoringEngine, ScoringPoint, score_update_record
from services.scoring.features import path_model_inputs, silent_path
from services.scoring.model import Learner, PropensityModel
from services.scoring.state import CustomerState, Touchpoint
from services.scoring.value import value_in_words
from touchstream import avro
from touchstream.eventtime import DAY_MS


def engine(watched: WatchedChanges | None = None, **options: float) -> ScoringEngine:
    return ScoringEngine(Learner(PropensityModel()), horizon_days=90, step_days=14, lateness_days=1,
                         watched=watched, **options)  # type: ignore[arg-type]


def touch(message_id: str, day: float, amount: float | None = None) -> Touchpoint:
    t = int(day * DAY_MS)
    return Touchpoint(message_id, t, t, event_name="Order Completed" if amount else None, order_amount=amount)


class Stream:
    """Drive the engine as the service does, in memory: batches of events, silent examples from paths."""

    def __init__(self, scoring: ScoringEngine) -> None:
        self.scoring = scoring
        self.states: dict[str, CustomerState] = {}
        self.silent_next: dict[str, int] = {}
        self.paths: dict[str, np.ndarray] = {}
        self.watermark = 0
        self.batch: list[ScoringPoint] = []

    def event(self, customer_id: str, event: Touchpoint) -> ScoringPoint:
        self.watermark = max(self.watermark, event.timestamp_ms)
        state = self.states.setdefault(customer_id, CustomerState())
        previous = self.silent_next.pop(customer_id, None)
        point = self.scoring.observe_event(customer_id, state, event, self.watermark, previous)
        following = self.scoring.next_silent_example_ms(state, max(previous or 0, event.timestamp_ms))
        if following is not None:
            self.silent_next[customer_id], self.paths[customer_id] = following, point.path
        self.batch.append(point)
        return point

    def learn(self) -> int:
        """End the batch: score its events at once, then learn what matured."""
        self.scoring.assess(self.batch)
        self.batch = []
        cutoff = self.scoring.maturity_cutoff(self.watermark)
        ids = [c for c, t in self.silent_next.items() if t + self.scoring.step_ms <= cutoff]
        paths = np.stack([self.paths[c] for c in ids]) if ids else np.zeros((0, len(next(iter(self.paths.values())))))
        silent = self.scoring.silent_examples(paths, np.array([float(self.silent_next[c]) for c in ids]), cutoff)
        for c, following in zip(ids, silent.next_ms.tolist(), strict=True):
            if math.isnan(following):
                del self.silent_next[c]
            else:
                self.silent_next[c] = int(following)
        return self.scoring.learn_matured(self.states.values(), cutoff, paths, silent).learned


def test_prediction_points_are_sampled_per_day_and_not_for_redeliveries() -> None:
    scoring, state = engine(), CustomerState()
    first = scoring.observe_event("c", state, touch("a", 1.1, 10.0), int(1.1 * DAY_MS), None)
    same_day = scoring.observe_event("c", state, touch("b", 1.5), int(1.5 * DAY_MS), None)
    redelivered = scoring.observe_event("c", state, touch("a", 1.1, 10.0), int(1.5 * DAY_MS), None)
    assert [e.t_ms for e in first.new_examples] == [int(1.1 * DAY_MS)]
    assert same_day.new_examples == [] and redelivered.new_examples == []
    assert len(state.pending) == 1 and state.purchase_count == 1


def test_examples_are_learned_only_after_their_label_matures() -> None:
    scoring, state = engine(), CustomerState()
    scoring.assess([scoring.observe_event("c", state, touch("a", 0, 10.0), 0, None)])
    scoring.assess([scoring.observe_event("c", state, touch("b", 10, 10.0), 10 * DAY_MS, None)])
    assert scoring.learn_matured([state], scoring.maturity_cutoff(14 * DAY_MS)).learned == 0
    outcome = scoring.learn_matured([state], scoring.maturity_cutoff(15 * DAY_MS))
    assert (outcome.learned, outcome.positives) == (1, 1)
    assert scoring.learner.model.examples_learned == 1
    assert scoring.learner.model.version == "logreg-v3-n1"
    assert scoring.learner.quality.examples == 1
    assert [e.t_ms for e in state.pending] == [10 * DAY_MS]


def test_an_event_closes_the_silent_examples_before_it_and_labels_the_one_it_falls_in() -> None:
    scoring, state = engine(), CustomerState()
    scoring.observe_event("c", state, touch("a", 0, 10.0), 0, None)
    assert scoring.next_silent_example_ms(state) == 14 * DAY_MS
    # Silent on days 14 and 28; the purchase on day 40 falls in day 28's step (28, 42].
    point = scoring.observe_event("c", state, touch("b", 40, 10.0), 40 * DAY_MS, 14 * DAY_MS)
    made = [(e.t_ms // DAY_MS, e.positive) for e in point.new_examples]
    assert made == [(14, False), (28, True), (40, False)]
    # The silent ones were made from the state as it was before the event: one purchase.
    _, btyd = path_model_inputs(np.array([point.new_examples[1].path]), np.array([28.0 * DAY_MS]))
    assert btyd.repeats.tolist() == [0.0] and btyd.age.tolist() == [28.0]
    assert scoring.next_silent_example_ms(state, 40 * DAY_MS) == 54 * DAY_MS
    scoring.assess([point])
    assert all(0 < e.propensity < 1 for e in point.new_examples)


def test_a_silent_customer_makes_one_example_a_step_until_the_silence_limit() -> None:
    scoring, state = engine(max_silence_days=50), CustomerState()
    scoring.observe_event("c", state, touch("a", 0, 10.0), 0, None)
    silent = scoring.silent_examples(silent_path(state)[None, :], np.array([14.0 * DAY_MS]), 300 * DAY_MS)
    assert (silent.times_ms // DAY_MS).tolist() == [14, 28, 42] and math.isnan(silent.next_ms[0])
    partly = scoring.silent_examples(silent_path(state)[None, :], np.array([14.0 * DAY_MS]), 30 * DAY_MS)
    assert (partly.times_ms // DAY_MS).tolist() == [14] and partly.next_ms.tolist() == [28.0 * DAY_MS]


def test_an_out_of_order_event_is_folded_in_but_is_no_prediction_point() -> None:
    scoring, state = engine(), CustomerState()
    scoring.observe_event("c", state, touch("a", 20, 10.0), 20 * DAY_MS, None)
    late = scoring.observe_event("c", state, touch("b", 10, 5.0), 20 * DAY_MS, 34 * DAY_MS)
    # Its features as of day 10 would contain the day-20 purchase, inside its own label window.
    assert late.new_examples == []
    assert late.late  # ten days behind the watermark, allowed lateness is one day
    assert state.purchase_count == 2 and state.first_purchase_ms == 10 * DAY_MS


def test_a_purchase_late_within_the_allowed_lateness_still_labels_the_example() -> None:
    scoring, state = engine(), CustomerState()
    scoring.assess([scoring.observe_event("c", state, touch("a", 0, 10.0), 0, None)])
    # The partition's watermark reaches day 14.5; this customer's purchase of day 13.9 arrives after it.
    watermark = int(14.5 * DAY_MS)
    assert scoring.learn_matured([state], scoring.maturity_cutoff(watermark)).learned == 0
    point = scoring.observe_event("c", state, touch("b", 13.9, 10.0), watermark, None)
    assert not point.late
    outcome = scoring.learn_matured([state], scoring.maturity_cutoff(16 * DAY_MS))
    assert (outcome.learned, outcome.positives) == (1, 1)


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


def test_learned_model_ranks_frequent_recent_buyers_above_lapsed_ones_and_explains_the_silence() -> None:
    scoring = engine()
    stream = Stream(scoring)
    last_learn_day = 0
    for customer_id, event in synthetic_history(customers=200, days=540, seed=7):
        stream.event(customer_id, event)
        if stream.watermark // DAY_MS > last_learn_day:
            last_learn_day = stream.watermark // DAY_MS
            stream.learn()
    model = scoring.learner.model
    assert model.examples_learned > 3000
    # A purchase within two weeks is a noisier target than one within months.
    assert scoring.learner.quality.roc_auc.get() > 0.62

    frequent_recent = CustomerState(first_touch_ms=0, first_purchase_ms=0, last_purchase_ms=395 * DAY_MS,
                                    last_touch_ms=395 * DAY_MS, purchase_count=20, monetary_total=900.0,
                                    purchase_times=[int(d * 20 * DAY_MS) for d in range(20)])
    lapsed = CustomerState(first_touch_ms=0, first_purchase_ms=0, last_purchase_ms=200 * DAY_MS,
                           last_touch_ms=200 * DAY_MS, purchase_count=6, monetary_total=270.0,
                           purchase_times=[int(d * 40 * DAY_MS) for d in range(6)])
    for state in (frequent_recent, lapsed):
        state.purchases.add(state.last_purchase_ms or 0, 3.0)
        state.touches.add(state.last_purchase_ms or 0, 3.0)
    now = 400 * DAY_MS
    frequent = scoring.forecast(frequent_recent, now, 90).propensity
    gone = scoring.forecast(lapsed, now, 90).propensity
    assert frequent > gone + 0.2

    # The lapsed customer's risk is explained by the silence: recency, the prior, or empty recent windows.
    silence = {"log_recency_days", "log_days_since_last_touch", "log_overdue_ratio", "touches_30d",
               "recency_x_frequency", "repeat_buying_pattern",
               *(f"{kind}_{w}d" for kind in ("purchases", "log_spend") for w in (7, 30, 90))}
    point = scoring.observe_check("lapsed", lapsed, now)
    [scored] = scoring.assess([point])
    name, contribution = scored.reasons[0]
    assert name in silence and contribution > 0


def test_score_update_record_fits_the_avro_contract() -> None:
    scoring, state = engine(), CustomerState()
    event = Touchpoint("m1", DAY_MS, DAY_MS + 7, event_name="Order Completed", order_amount=12.5, consent=("email",))
    point = scoring.observe_event("cust-1", state, event, DAY_MS, None)
    [scored] = scoring.assess([point])
    record = score_update_record("cust-1", point, scored)
    assert avro.validation_errors("ScoreUpdate", record) == []
    assert record["churn_risk"] + record["purchase_propensity"] == 1.0
    assert record["received_at_ms"] == DAY_MS + 7 and record["consent"] == ["email"]
    assert record["segment"] == "new" and record["stage"] == "new"
    assert record["features"]["monetary_total"] == 12.5


def test_forecast_chains_the_step_model_over_silent_steps() -> None:
    scoring, state = engine(), CustomerState()
    scoring.observe_event("c", state, touch("a", 0, 10.0), 0, None)
    model = scoring.learner.model
    t = 30 * DAY_MS

    def hazard(at_ms: int) -> float:
        inputs, btyd = path_model_inputs(silent_path(state)[None, :], np.array([float(at_ms)]))
        return float(model.hazards(inputs, btyd)[0])

    assert math.isclose(scoring.forecast(state, t, 14).propensity, hazard(t), rel_tol=1e-12)
    two = scoring.forecast(state, t, 28).propensity
    assert abs(two - (1 - (1 - hazard(t)) * (1 - hazard(t + 14 * DAY_MS)))) < 1e-12
    # A partial last step: the same hazard over half the window.
    half = 1 - (1 - hazard(t)) * (1 - hazard(t + 14 * DAY_MS)) ** 0.5
    assert abs(scoring.forecast(state, t, 21).propensity - half) < 1e-12
    # Longer horizons can only add chances to buy.
    assert hazard(t) < two < scoring.forecast(state, t, 273).propensity < 1


def test_expected_purchases_are_p_any_times_the_priors_purchases_given_any_times_orders_per_day() -> None:
    scoring, state = engine(), CustomerState()
    # Four orders on three days: 4/3 orders per purchase day.
    for n, day in enumerate((0, 0, 5, 6)):
        scoring.assess([scoring.observe_event("c", state, touch(f"b{n}", day, 10.0), day * DAY_MS, None)])
    assert math.isclose(scoring.learner.orders_per_purchase_day(), 4 / 3)
    t = 30 * DAY_MS
    forecast = scoring.forecast(state, t, 365)
    _, btyd = path_model_inputs(silent_path(state)[None, :], np.array([float(t)]))
    prior = scoring.learner.model.prior
    given_any = float(prior.expected(btyd, 365.0)[0] / prior.p_any(btyd, 365.0)[0])
    assert given_any > 1.5  # a repeat buyer who buys again goes on buying: not one purchase per step
    assert math.isclose(forecast.expected_purchases, forecast.propensity * given_any * 4 / 3, rel_tol=1e-9)


def test_a_check_sends_an_update_only_when_a_watched_threshold_or_stage_was_crossed() -> None:
    scoring = engine(WatchedChanges(propensity_thresholds=(0.4,), stage=True))
    state = CustomerState(last_scored_propensity=0.45, last_scored_stage="new")
    [scored] = scoring.assess([scoring.observe_check("c", state, 0)])

    def with_scores(propensity: float, stage: str) -> object:
        return type(scored)(propensity, {}, [], "", stage, "v")

    assert not scoring.changed_enough(state, with_scores(0.42, "new"))  # type: ignore[arg-type]
    assert scoring.changed_enough(state, with_scores(0.38, "new"))  # type: ignore[arg-type]
    assert scoring.changed_enough(state, with_scores(0.44, "at_risk"))  # type: ignore[arg-type]


def test_checks_are_scheduled_where_the_untrained_path_crosses_and_stages_change() -> None:
    scoring = engine(WatchedChanges(propensity_thresholds=(0.4, 0.5), stage=True))
    state = CustomerState()
    point = scoring.observe_event("c", state, touch("a", 0, 10.0), 0, None)
    [scored] = scoring.assess([point])
    scoring.remember_sent(state, scored)
    first = scoring.schedule_checks({"c": state}, {"c": 0})["c"]
    assert first is not None and state.next_check_ms == first
    # The untrained model predicts with its BG/NBD prior alone (r = 1, alpha = 30 days): a one-off
    # buyer is alive for certain and P(buy in 90 days) = 90 / (120 + T) falls through 0.5 at T = 60
    # days (the chain's partial last step moves it a little).
    assert abs(first / DAY_MS - 60) < 1
    assert scoring.forecast(state, first, 90).propensity <= 0.5 < scoring.forecast(state, first - DAY_MS, 90).propensity
    # Below both thresholds: only the stage marks are left (at_risk after 90 days, churned after 180).
    scoring.remember_sent(state, type(scored)(0.3, {}, [], "", "at_risk", "v"))
    assert scoring.schedule_checks({"c": state}, {"c": 100 * DAY_MS})["c"] == 180 * DAY_MS + 1


def test_score_updates_stay_readable_across_the_added_channel_field() -> None:
    scoring, state = engine(), CustomerState()
    event = Touchpoint("m1", DAY_MS, DAY_MS, order_amount=5.0, channel="app")
    point = scoring.observe_event("c", state, event, DAY_MS, None)
    record = score_update_record("c", point, scoring.assess([point])[0])
    before_channel = avro.load_codec(use_versions={"ScoreUpdate": 1})
    old_record = {k: v for k, v in record.items() if k not in ("channel", "time_zone")}
    # Old writer, new reader (a new consumer reads old records) and the other way round.
    read = avro.decode("ScoreUpdate", before_channel.encode("ScoreUpdate", old_record))
    assert read["channel"] is None and read["message_id"] == "m1"
    assert avro.decode("ScoreUpdate", avro.encode("ScoreUpdate", record))["channel"] == "app"
    read = before_channel.decode("ScoreUpdate", avro.encode("ScoreUpdate", record))
    assert "channel" not in read and read["customer_id"] == "c"


def test_the_sliding_propensity_grid_equals_the_chain_at_every_grid_time() -> None:
    stream = Stream(engine())
    for customer_id, event in synthetic_history(customers=30, days=200, seed=3):
        stream.event(customer_id, event)
    stream.learn()
    scoring = stream.scoring
    paths = np.stack([silent_path(state) for state in stream.states.values()])
    first = np.full(len(paths), 210.0 * DAY_MS)
    grid = scoring.propensity_grid(paths, first, 5)
    for k in range(5):
        chained, _ = scoring.horizon_forecasts(paths, first + k * scoring.step_ms, 90)
        assert np.allclose(grid[:, k], chained, rtol=1e-12, atol=1e-12)


def spenders_among_a_population(scoring: ScoringEngine) -> tuple[CustomerState, Scored, Scored]:
    """Score sixty buyers, then a big and a small spender with the same three orders (big state, both scores)."""
    states = {f"c{n}": CustomerState() for n in range(60)}
    # Sixty buyers with one to three orders of 10-70 each: the spend model has a population to fit.
    for n, (customer, state) in enumerate(states.items()):
        for k in range(1 + n % 3):
            scoring.assess([scoring.observe_event(customer, state, touch(f"{customer}-{k}", 1 + k, 10.0 + n),
                                                  3 * DAY_MS, None)])
    scoring.learner.spend.refit()
    assert scoring.learner.spend.model.fitted
    spender, thrifty = CustomerState(), CustomerState()
    for k in range(3):
        scoring.observe_event("big", spender, touch(f"big-{k}", 1 + k, 500.0), 3 * DAY_MS, None)
        scoring.observe_event("small", thrifty, touch(f"small-{k}", 1 + k, 5.0), 3 * DAY_MS, None)
    big, small = scoring.assess([scoring.observe_check("big", spender, 4 * DAY_MS),
                                 scoring.observe_check("small", thrifty, 4 * DAY_MS)])
    return spender, big, small


def test_every_score_carries_predicted_value_from_expected_purchases_and_shrunk_order_value() -> None:
    scoring = engine()
    spender, big, small = spenders_among_a_population(scoring)
    population = scoring.learner.spend.model.population_mean
    # Same orders, same times: same expected purchases; order values shrunk toward the population's.
    assert big.features["expected_purchases_value_horizon"] == small.features["expected_purchases_value_horizon"] > 0
    assert 5.0 < small.features["expected_order_value"] < population < big.features["expected_order_value"] < 500.0
    for scored in (big, small):
        worth = scored.features
        assert math.isclose(worth["predicted_value"],
                            worth["expected_purchases_value_horizon"] * worth["expected_order_value"])
    # The value horizon (365 days) covers more purchases than the propensity's 90 days.
    [(_, in_90), (_, in_365)] = scoring.horizon_forecasts_at(np.stack([silent_path(spender)]),
                                                              np.array([4.0 * DAY_MS]), (90, 365))
    assert in_365[0] > in_90[0] and math.isclose(in_365[0], big.features["expected_purchases_value_horizon"])
    record = score_update_record("big", scoring.observe_check("big", spender, 4 * DAY_MS), big)
    assert avro.validation_errors("ScoreUpdate", record) == [] and record["features"]["predicted_value"] > 0


def test_predicted_value_carries_its_reason_against_the_typical_customer_in_numbers_and_words() -> None:
    scoring = engine()
    _, big, small = spenders_among_a_population(scoring)
    # Same history but the order value: purchases are typical-ish alike, the order value sets them apart.
    assert big.features["value_purchases_vs_typical"] == small.features["value_purchases_vs_typical"] > 0
    assert small.features["value_order_value_vs_typical"] < 1 < big.features["value_order_value_vs_typical"]
    said = value_in_words(big.features, scoring.value_horizon_days)
    assert said is not None and "spend more per order than the typical customer" in said
    # The thrifty one's three orders in three days weigh more than its small orders (0.9x): the words say so.
    assert "buy more often" in (value_in_words(small.features, scoring.value_horizon_days) or "")
