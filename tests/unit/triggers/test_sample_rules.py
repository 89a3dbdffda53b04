"""The sample rules shipped in deploy/rules/ (the seeds' examples): each fires on what it is for, only that."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.triggers.actions import retention_action_record
from services.triggers.crossing import CrossingState, DecisionContext, Outcome, evaluate_scores, fire_due_timers
from services.triggers.rule_check import rule_file_problems
from services.triggers.rules import RuleSet, parse_rule_file
from services.triggers.settings import DEFAULT_RULES_FILE
from tests.unit.triggers.factories import a_score
from touchstream import avro
from touchstream.eventtime import DAY_MS, HOUR_MS

SAMPLES = sorted(Path(DEFAULT_RULES_FILE).parent.glob("*.yaml"))
NOON_UTC_MS = 1_795_000_000_000 - 1_795_000_000_000 % DAY_MS + 12 * HOUR_MS


@pytest.fixture(scope="module")
def rule_set() -> RuleSet:
    return parse_rule_file(DEFAULT_RULES_FILE.read_text(), str(DEFAULT_RULES_FILE))


def fired(rule_set: RuleSet, scores: list[Any], now_ms: int = NOON_UTC_MS,
          states: dict[Any, CrossingState] | None = None) -> list[tuple[str, str, str | None]]:
    decisions, _ = evaluate_scores(rule_set.rules, scores, states or {}, DecisionContext(rule_set.policy, now_ms))
    for decided in decisions:  # every decision makes a record that fits the contract
        assert avro.validation_errors("RetentionAction", retention_action_record(decided, 0, rule_set.policy)) == []
    return [(d.rule.id, d.outcome.value, d.reason) for d in decisions]


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_every_shipped_rule_file_validates(path: Path) -> None:
    assert rule_file_problems(path.read_text(), str(path)) == []


def test_the_seeds_examples_are_all_there(rule_set: RuleSet) -> None:
    assert [r.id for r in rule_set.rules] == ["high-value-churn-risk", "first-complaint-recovery",
                                              "first-complaint-unanswered-24h", "birthday-greeting",
                                              "third-purchase-loyalty"]
    assert {r.action.endpoint for r in rule_set.rules} == {"marketing"}


def test_high_value_customer_at_churn_risk_gets_the_exclusive_offer(rule_set: RuleSet) -> None:
    def score(spend: float, risk: float, consent: tuple[str, ...] = ("marketing",)) -> Any:
        return a_score(risk, features={"monetary_total": spend}, consent=consent, event_type="rescore")

    churn = [r for r in rule_set.rules if r.id == "high-value-churn-risk"]
    offer = fired(RuleSet(tuple(churn), rule_set.policy), [score(900, 0.75)])
    assert offer in ([("high-value-churn-risk", "fired", None)], [("high-value-churn-risk", "held_out", "holdout")])
    assert fired(RuleSet(tuple(churn), rule_set.policy), [score(90, 0.75)]) == []  # not high value
    assert fired(RuleSet(tuple(churn), rule_set.policy), [score(900, 0.65)]) == []  # below the threshold
    assert fired(RuleSet(tuple(churn), rule_set.policy), [score(900, 0.75, consent=())]) == [
        ("high-value-churn-risk", "suppressed", "consent")]


def test_high_value_offer_waits_for_the_end_of_quiet_hours(rule_set: RuleSet) -> None:
    churn = RuleSet(tuple(r for r in rule_set.rules if r.id == "high-value-churn-risk"), rule_set.policy)
    customer = next(f"c{n}" for n in range(100) if fired(churn, [a_score(0.8, customer_id=f"c{n}", features={
        "monetary_total": 900.0}, consent=("marketing",))])[0][1] == "fired")
    decisions, _ = evaluate_scores(churn.rules, [a_score(0.8, customer_id=customer, features={"monetary_total": 900.0},
                                                         consent=("marketing",))], {},
                                   DecisionContext(churn.policy, NOON_UTC_MS + 11 * HOUR_MS))  # 23:00 UTC
    (decided,) = decisions
    assert decided.reason == "quiet_hours_hold" and decided.not_before_ms == NOON_UTC_MS + 20 * HOUR_MS


def complaint(at_ms: int, count: float, **fields: Any) -> Any:
    return a_score(at_ms=at_ms, event_name="Complaint Submitted", features={"complaints": count},
                   message_id=f"complaint-{at_ms}", **fields)


def test_first_complaint_gets_service_recovery_and_the_second_does_not(rule_set: RuleSet) -> None:
    recovery = RuleSet(tuple(r for r in rule_set.rules if r.id == "first-complaint-recovery"), rule_set.policy)
    customer = next(f"c{n}" for n in range(100) if fired(recovery, [complaint(0, 1, customer_id=f"c{n}")]) == [
        ("first-complaint-recovery", "fired", None)])
    assert fired(recovery, [complaint(0, 1, customer_id=customer), complaint(HOUR_MS, 2, customer_id=customer)]) == [
        ("first-complaint-recovery", "fired", None)]
    # Once scoring flags complaints per event, the flag works without the event-name convention.
    flagged = a_score(customer_id=customer, event_name="Feedback", features={"complaints": 1.0, "is_complaint": 1.0})
    assert fired(recovery, [flagged]) == [("first-complaint-recovery", "fired", None)]
    # Service messages ignore marketing consent and the frequency cap.
    assert fired(recovery, [complaint(0, 1, customer_id=customer, consent=())])[0][1] == "fired"


def test_unanswered_first_complaint_escalates_after_24h_of_event_time(rule_set: RuleSet) -> None:
    escalate = RuleSet(tuple(r for r in rule_set.rules if r.id == "first-complaint-unanswered-24h"), rule_set.policy)
    rules = {r.id: r for r in escalate.rules}
    key = ("first-complaint-unanswered-24h", "cus_1")
    _, started = evaluate_scores(escalate.rules, [complaint(0, 1)], {})
    assert started[key].timer_due_ms == 24 * HOUR_MS
    context = DecisionContext(escalate.policy, NOON_UTC_MS)
    assert fire_due_timers(rules, [key], started, 24 * HOUR_MS - 1, context)[0] == []
    (decided,), _ = fire_due_timers(rules, [key], started, 24 * HOUR_MS, context)
    assert (decided.outcome, decided.trigger) == (Outcome.FIRED, "silence")
    body = retention_action_record(decided, 0)["payload_json"]
    assert '"campaign":"complaint-escalation"' in body and '"complaint_event":"complaint-0"' in body
    # Answered in time: nothing to escalate.
    answered = a_score(at_ms=3 * HOUR_MS, event_name="Complaint Answered", features={"complaints": 1.0})
    _, after = evaluate_scores(escalate.rules, [complaint(0, 1), answered], {})
    assert after.get(key, CrossingState()).timer_due_ms == 0


def test_birthday_event_brings_a_greeting_with_points_to_a_loyalty_member(rule_set: RuleSet) -> None:
    greet = RuleSet(tuple(r for r in rule_set.rules if r.id == "birthday-greeting"), rule_set.policy)
    customer = next(f"c{n}" for n in range(100) if fired(greet, [a_score(
        customer_id=f"c{n}", event_name="Birthday", consent=("loyalty",))]) == [("birthday-greeting", "fired", None)])
    decisions, _ = evaluate_scores(greet.rules, [a_score(customer_id=customer, event_name="Birthday",
                                                         consent=("loyalty",))], {},
                                   DecisionContext(greet.policy, NOON_UTC_MS))
    assert '"bonus_points":200' in retention_action_record(decisions[0], 0)["payload_json"]
    assert fired(greet, [a_score(customer_id=customer, event_name="Birthday")]) == [
        ("birthday-greeting", "suppressed", "consent")]
    assert fired(greet, [a_score(customer_id=customer, event_name="Order Completed", consent=("loyalty",))]) == []


def test_third_purchase_brings_the_loyalty_invitation_once(rule_set: RuleSet) -> None:
    invite = RuleSet(tuple(r for r in rule_set.rules if r.id == "third-purchase-loyalty"), rule_set.policy)
    customer = next(f"c{n}" for n in range(100) if fired(invite, [a_score(
        customer_id=f"c{n}", event_name="Order Completed", features={"purchase_count": 3.0})]) == [
        ("third-purchase-loyalty", "fired", None)])
    purchases = [a_score(customer_id=customer, event_name="Order Completed", at_ms=n * DAY_MS, message_id=f"o{n}",
                         features={"purchase_count": float(n + 1)}) for n in range(5)]
    assert fired(invite, purchases) == [("third-purchase-loyalty", "fired", None)]


def test_marketing_rules_are_capped_and_service_rules_are_not(rule_set: RuleSet) -> None:
    assert rule_set.policy.frequency_cap_per_day == 3
    assert {r.id for r in rule_set.rules if not r.capped} == {"first-complaint-recovery",
                                                               "first-complaint-unanswered-24h"}
