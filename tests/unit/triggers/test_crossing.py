"""Score crossing with hysteresis, cooldown and hold-out: one edge, one decision."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from services.triggers.crossing import (
    CrossingState,
    Outcome,
    as_backfill,
    evaluate_scores,
    is_held_out,
    next_crossing_state,
)
from tests.unit.triggers.factories import a_rule, a_score
from touchstream.eventtime import HOUR_MS


def outcomes(risks: list[float], *, step_ms: int = 48 * HOUR_MS, **rule_fields: object) -> list[str | None]:
    """Feed one customer's risks in order; return the outcome (or None) after each."""
    rule = a_rule(**rule_fields)
    state = CrossingState()
    seen: list[str | None] = []
    for n, risk in enumerate(risks):
        state, decided = next_crossing_state(rule, state, a_score(risk, at_ms=n * step_ms))
        seen.append(decided.outcome.value if decided else None)
    return seen


def test_first_score_above_threshold_fires_because_new_customers_are_armed() -> None:
    assert outcomes([0.75]) == ["fired"]


def test_staying_above_fires_once() -> None:
    assert outcomes([0.5, 0.71, 0.8, 0.95, 0.72]) == [None, "fired", None, None, None]


def test_dip_between_rearm_and_threshold_does_not_rearm() -> None:
    assert outcomes([0.75, 0.65, 0.75]) == ["fired", None, None]


def test_falling_below_rearm_then_crossing_again_fires_again() -> None:
    assert outcomes([0.75, 0.59, 0.75]) == ["fired", None, "fired"]


def test_threshold_is_inclusive() -> None:
    assert outcomes([0.7]) == ["fired"]


def test_second_crossing_within_cooldown_is_suppressed_and_disarms() -> None:
    assert outcomes([0.75, 0.5, 0.75, 0.8], step_ms=HOUR_MS) == ["fired", None, "suppressed", None]


def test_cooldown_is_measured_in_event_time() -> None:
    rule = a_rule(cooldown_hours=24)
    fired, _ = next_crossing_state(rule, CrossingState(), a_score(0.8, at_ms=0))
    assert fired.cooldown_until_ms == 24 * HOUR_MS
    rearmed = replace(fired, armed=True)
    _, early = next_crossing_state(rule, rearmed, a_score(0.8, at_ms=24 * HOUR_MS - 1))
    _, on_time = next_crossing_state(rule, rearmed, a_score(0.8, at_ms=24 * HOUR_MS))
    assert early is not None and early.outcome is Outcome.SUPPRESSED
    assert on_time is not None and on_time.outcome is Outcome.FIRED


def test_rule_on_purchase_propensity_watches_that_score() -> None:
    rule = a_rule(when=replace(a_rule().when, score="purchase_propensity"))
    # a_score sets propensity = 1 - risk
    assert next_crossing_state(rule, CrossingState(), a_score(0.75))[1] is None
    assert next_crossing_state(rule, CrossingState(), a_score(0.2))[1] is not None


def test_hold_out_is_deterministic_and_close_to_the_rule_percentage() -> None:
    customers = [f"cus_{n}" for n in range(20_000)]
    held = [c for c in customers if is_held_out("churn-risk-high", c, 10)]
    assert 0.09 < len(held) / len(customers) < 0.11
    assert held == [c for c in customers if is_held_out("churn-risk-high", c, 10)]
    # Another rule draws another control group, so no customer is held out of everything.
    other = {c for c in customers if is_held_out("first-complaint", c, 10)}
    assert len(other & set(held)) < len(held) / 2


def test_held_out_customer_gets_a_held_out_decision_and_a_cooldown() -> None:
    customer = next(f"cus_{n}" for n in range(1000) if is_held_out("churn-risk-high", f"cus_{n}", 10))
    rule = a_rule(holdout_percent=10)
    state, decided = next_crossing_state(rule, CrossingState(), a_score(0.8, customer_id=customer))
    assert decided is not None
    assert (decided.outcome, decided.reason) == (Outcome.HELD_OUT, "holdout")
    assert (state.armed, state.cooldown_until_ms) == (False, 24 * HOUR_MS)


def test_batch_applies_one_customers_scores_in_order_and_returns_only_changed_states() -> None:
    rule = a_rule()
    scores = [a_score(0.8, customer_id="a", at_ms=0), a_score(0.3, customer_id="b", at_ms=0),
              a_score(0.9, customer_id="a", at_ms=1), a_score(0.5, customer_id="a", at_ms=2)]
    decisions, changed = evaluate_scores([rule], scores, {})
    assert [(d.score.customer_id, d.outcome) for d in decisions] == [("a", Outcome.FIRED)]
    # "a" fired then re-armed; "b" never left the default state, so nothing is written for it.
    assert changed == {("churn-risk-high", "a"): CrossingState(armed=True, cooldown_until_ms=24 * HOUR_MS)}


def test_batch_starts_from_stored_state() -> None:
    stored = {("churn-risk-high", "a"): CrossingState(armed=False, cooldown_until_ms=0)}
    decisions, changed = evaluate_scores([a_rule()], [a_score(0.9, customer_id="a")], stored)
    assert decisions == [] and changed == {}


@given(st.lists(st.floats(min_value=0, max_value=1), max_size=60))
def test_never_two_decisions_without_a_rearm_between(risks: list[float]) -> None:
    rule = a_rule()
    state = CrossingState()
    rearmed_since_last = True
    for n, risk in enumerate(risks):
        state, decided = next_crossing_state(rule, state, a_score(risk, at_ms=n))
        if decided is not None:
            assert rearmed_since_last
            rearmed_since_last = False
        if risk < rule.when.rearm_below:
            rearmed_since_last = True


def test_history_before_the_horizon_becomes_backfill_and_later_scores_see_the_state_it_left() -> None:
    rule = a_rule(cooldown_hours=0.0)
    horizon_ms = 10 * HOUR_MS
    history = [a_score(0.8, at_ms=0), a_score(0.5, at_ms=HOUR_MS), a_score(0.9, at_ms=2 * HOUR_MS)]
    decisions, states = evaluate_scores([rule], history, {})
    marked = as_backfill(decisions, horizon_ms)
    assert [(d.outcome, d.reason, d.score.event_time_ms) for d in marked] == [
        (Outcome.BACKFILL, "fired", 0), (Outcome.BACKFILL, "fired", 2 * HOUR_MS)]
    # The last historical crossing left the rule disarmed: a live score still above is no new edge.
    live, _ = evaluate_scores([rule], [a_score(0.95, at_ms=11 * HOUR_MS)], states)
    assert as_backfill(live, horizon_ms) == []
    rearmed, _ = evaluate_scores([rule], [a_score(0.5, at_ms=11 * HOUR_MS), a_score(0.9, at_ms=12 * HOUR_MS)], states)
    assert [(d.outcome, d.reason) for d in as_backfill(rearmed, horizon_ms)] == [(Outcome.FIRED, None)]


def test_suppressions_about_history_stay_suppressions() -> None:
    rule = a_rule(consent="email")
    decisions, _ = evaluate_scores([rule], [a_score(0.9, at_ms=0)], {})
    assert [(d.outcome, d.reason) for d in as_backfill(decisions, HOUR_MS)] == [(Outcome.SUPPRESSED, "consent")]
