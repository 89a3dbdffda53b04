"""Triggers beyond score crossings, and the policies every decision passes through."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.triggers.actions import retention_action_record
from services.triggers.conditions import ConditionError, holds, parse_condition
from services.triggers.crossing import (
    CrossingState,
    DecisionContext,
    Outcome,
    evaluate_scores,
    fire_due_timers,
    is_held_out,
)
from services.triggers.events import ScoreUpdated
from services.triggers.rules import RuleError
from tests.unit.triggers.factories import a_score, rules_from
from touchstream import avro
from touchstream.eventtime import DAY_MS, HOUR_MS

ACTION = "    action: {endpoint: marketing}\n"


def run(rules_yaml: str, scores: list[Any], *, policy: str = "", now: datetime | None = None,
        states: dict[Any, CrossingState] | None = None) -> tuple[list[Any], dict[Any, CrossingState], DecisionContext]:
    rule_set = rules_from(rules_yaml, policy)
    now_ms = int((now or datetime(2026, 11, 25, 12, tzinfo=ZoneInfo("UTC"))).timestamp() * 1000)
    context = DecisionContext(rule_set.policy, now_ms)
    decisions, changed = evaluate_scores(rule_set.rules, scores, states or {}, context)
    return decisions, changed, context


def outcomes(decisions: list[Any]) -> list[tuple[str, str, str | None]]:
    return [(d.rule.id, d.outcome.value, d.reason) for d in decisions]


# -- segment and stage changes ------------------------------------------------------------

SEGMENT_RULE = """
  - id: slipping
    when: {changes: segment, to: [at_risk, hibernating], from: [loyal, champions]}
""" + ACTION


def test_segment_change_fires_on_the_change_only() -> None:
    scores = [a_score(segment="loyal", at_ms=0), a_score(segment="loyal", at_ms=1),
              a_score(segment="at_risk", at_ms=2), a_score(segment="at_risk", at_ms=3)]
    decisions, changed, _ = run(SEGMENT_RULE, scores)
    assert [(d.score.event_time_ms, d.outcome) for d in decisions] == [(2, Outcome.FIRED)]
    assert changed[("slipping", "cus_1")].last_value == "at_risk"


def test_first_segment_seen_is_not_a_change_and_from_filters() -> None:
    assert run(SEGMENT_RULE, [a_score(segment="at_risk")])[0] == []  # nothing known before
    # new -> at_risk is a change, but not from loyal/champions
    assert run(SEGMENT_RULE, [a_score(segment="new", at_ms=0), a_score(segment="at_risk", at_ms=1)])[0] == []


def test_stage_change_to_any_value() -> None:
    rules = "  - id: stage-moved\n    when: {changes: stage}\n" + ACTION
    scores = [a_score(stage="new", at_ms=0), a_score(stage="habit_forming", at_ms=1), a_score(stage="loyal", at_ms=2)]
    assert [d.score.stage for d in run(rules, scores)[0]] == ["habit_forming", "loyal"]


# -- event predicates -----------------------------------------------------------------------

COMPLAINT_RULE = """
  - id: bad-complaint
    when:
      event:
        all:
          - {field: features.is_complaint, eq: 1}
          - {field: features.feedback_rating, le: 2}
""" + ACTION


def test_event_predicate_complaint_with_low_rating() -> None:
    low = a_score(features={"is_complaint": 1.0, "feedback_rating": 1.0}, at_ms=1)
    high = a_score(features={"is_complaint": 1.0, "feedback_rating": 4.0}, at_ms=2)
    unknown = a_score(features={"is_complaint": 1.0}, at_ms=3)  # rating not carried: fails closed
    decisions, _, _ = run(COMPLAINT_RULE, [low, high, unknown])
    assert [d.score.event_time_ms for d in decisions] == [1]


def test_event_predicate_fires_on_every_match_limited_by_cooldown() -> None:
    rules = "  - id: buy\n    when: {event: {field: event.name, eq: Order Completed}}\n" + ACTION + \
            "    cooldown_hours: 24\n"
    scores = [a_score(event_name="Order Completed", at_ms=n * 13 * HOUR_MS, message_id=f"m{n}") for n in range(3)]
    assert outcomes(run(rules, scores)[0]) == [("buy", "fired", None), ("buy", "suppressed", "cooldown"),
                                               ("buy", "fired", None)]


def test_third_purchase_predicate_on_purchase_count() -> None:
    rules = """
  - id: third
    when:
      event:
        all:
          - {field: event.name, in: [Order Completed]}
          - {field: features.purchase_count, eq: 3}
""" + ACTION
    scores = [a_score(event_name=name, features={"purchase_count": count}, at_ms=n)
              for n, (name, count) in enumerate([("Order Completed", 2.0), ("Page Viewed", 2.0),
                                                 ("Order Completed", 3.0), ("Page Viewed", 3.0)])]
    assert [d.score.event_time_ms for d in run(rules, scores)[0]] == [2]


# -- silence timers in event time -----------------------------------------------------------

NO_PURCHASE = """
  - id: no-purchase-30d
    when:
      silence:
        start: {field: event.name, eq: Order Completed}
        days: 30
""" + ACTION

UNANSWERED = """
  - id: complaint-unanswered
    when:
      silence:
        start: {field: features.is_complaint, eq: 1}
        stop: {field: event.name, eq: Complaint Answered}
        hours: 24
        restart: false
""" + ACTION


def test_purchase_starts_a_timer_and_each_purchase_pushes_it_back() -> None:
    buy = [a_score(event_name="Order Completed", at_ms=t, message_id=f"b{t}") for t in (0, 10 * DAY_MS)]
    decisions, changed, _ = run(NO_PURCHASE, buy)
    assert decisions == []
    assert changed[("no-purchase-30d", "cus_1")].timer_due_ms == 40 * DAY_MS


def test_timer_fires_when_the_watermark_passes_the_deadline_with_the_starting_score() -> None:
    rule_set = rules_from(NO_PURCHASE)
    _, changed = evaluate_scores(rule_set.rules, [a_score(event_name="Order Completed", message_id="b0")], {})
    key = ("no-purchase-30d", "cus_1")
    rules = {r.id: r for r in rule_set.rules}
    context = DecisionContext(rule_set.policy, now_ms=123)
    assert fire_due_timers(rules, [key], changed, 30 * DAY_MS - 1, context) == ([], {})  # not yet
    decisions, cleared = fire_due_timers(rules, [key], changed, 30 * DAY_MS, context)
    (decided,) = decisions
    assert (decided.outcome, decided.trigger, decided.score.event_time_ms) == (Outcome.FIRED, "silence", 30 * DAY_MS)
    assert decided.score.received_at_ms == 123  # latency counts from when the timer fired
    assert decided.idempotency_source == f"silence@{30 * DAY_MS}:b0"
    assert cleared[key].timer_due_ms == 0
    # Firing again from the same state gives the same action id (a replay is dropped by delivery).
    again, _ = fire_due_timers(rules, [key], changed, 31 * DAY_MS, context)
    assert retention_action_record(again[0], 0)["action_id"] == retention_action_record(decided, 0)["action_id"]


def test_an_event_after_the_deadline_fires_the_timer_before_it_counts() -> None:
    scores = [a_score(event_name="Order Completed", at_ms=0, message_id="b0"),
              a_score(event_name="Order Completed", at_ms=45 * DAY_MS, message_id="b45")]
    decisions, changed, _ = run(NO_PURCHASE, scores)
    assert [(d.trigger, d.score.event_time_ms) for d in decisions] == [("silence", 30 * DAY_MS)]
    assert changed[("no-purchase-30d", "cus_1")].timer_due_ms == 75 * DAY_MS  # and restarted


def test_answer_cancels_the_complaint_timer_and_a_second_complaint_keeps_the_first_deadline() -> None:
    complaint = {"features": {"is_complaint": 1.0}}
    scores = [a_score(at_ms=0, message_id="c1", **complaint), a_score(at_ms=5 * HOUR_MS, message_id="c2", **complaint)]
    _, changed, _ = run(UNANSWERED, scores)
    assert changed[("complaint-unanswered", "cus_1")].timer_due_ms == 24 * HOUR_MS
    answered = [*scores, a_score(at_ms=6 * HOUR_MS, event_name="Complaint Answered", message_id="a")]
    decisions, changed, context = run(UNANSWERED, answered)
    assert decisions == [] and changed[("complaint-unanswered", "cus_1")].timer_due_ms == 0
    assert context.timer_events == {("complaint-unanswered", "started"): 1, ("complaint-unanswered", "stopped"): 1}


def test_timer_state_survives_the_json_snapshot_round_trip() -> None:
    score = a_score(features={"is_complaint": 1.0}, consent=("marketing",), event_name="Complaint",
                    time_zone="Asia/Tokyo")
    _, changed, _ = run(UNANSWERED, [score])
    assert ScoreUpdated.from_json(json.loads(changed[("complaint-unanswered", "cus_1")].timer_snapshot)) == score


# -- audience, consent, hold-out, frequency cap, quiet hours ---------------------------------

TIERS = "policy:\n  value_tiers: {high: 500, medium: 100, low: 0}\n"


def test_audience_filters_segment_value_tier_and_channel() -> None:
    rules = """
  - id: vip
    when: {event: {field: event.type, eq: track}}
    audience: {segment: [at_risk], value_tier: [high], channel: [app, web]}
""" + ACTION
    ok = a_score(features={"monetary_total": 800.0}, channel="app", at_ms=1)
    poor = a_score(features={"monetary_total": 50.0}, channel="app", at_ms=2)
    other_segment = a_score(features={"monetary_total": 800.0}, channel="app", segment="loyal", at_ms=3)
    no_channel = a_score(features={"monetary_total": 800.0}, at_ms=4)  # ScoreUpdate has no channel yet
    decisions, _, _ = run(rules, [ok, poor, other_segment, no_channel], policy=TIERS)
    assert [d.score.event_time_ms for d in decisions] == [1]


def test_unknown_value_tier_is_refused_when_parsing() -> None:
    rules = "  - id: vip\n    when: {changes: stage}\n    audience: {value_tier: [platinum]}\n" + ACTION
    with pytest.raises(RuleError, match="unknown tier"):
        rules_from(rules, TIERS)


def test_missing_consent_suppresses_with_the_reason() -> None:
    rules = "  - id: mail\n    when: {changes: stage}\n    consent: marketing_email\n" + ACTION
    scores = [a_score(stage="new", at_ms=0), a_score(stage="loyal", at_ms=1, consent=("analytics",)),
              a_score(stage="at_risk", at_ms=2, consent=("marketing_email",))]
    assert outcomes(run(rules, scores)[0]) == [("mail", "suppressed", "consent"), ("mail", "fired", None)]


def test_frequency_cap_counts_across_rules_per_local_day() -> None:
    rules = "".join(f"  - id: r{n}\n    when: {{event: {{field: event.type, eq: track}}}}\n{ACTION}" for n in range(3))
    rules += ("  - id: service\n    when: {event: {field: event.type, eq: track}}\n"
              "    frequency_capped: false\n" + ACTION)
    policy = "policy: {frequency_cap_per_day: 2, default_time_zone: Asia/Shanghai}\n"
    # 15:00 UTC on day 0 is 23:00 in Shanghai; 16:30 UTC is already the next local day.
    scores = [a_score(at_ms=15 * HOUR_MS, message_id="a"), a_score(at_ms=16 * HOUR_MS + HOUR_MS // 2, message_id="b")]
    decisions, _, context = run(rules, scores, policy=policy)
    assert outcomes(decisions) == [
        ("r0", "fired", None), ("r1", "fired", None), ("r2", "suppressed", "frequency_cap"), ("service", "fired", None),
        ("r0", "fired", None), ("r1", "fired", None), ("r2", "suppressed", "frequency_cap"), ("service", "fired", None)]
    assert context.caps == {("cus_1", "1970-01-01"): 2, ("cus_1", "1970-01-02"): 2}


def test_cap_starts_from_the_counts_already_stored() -> None:
    rules = "  - id: r0\n    when: {event: {field: event.type, eq: track}}\n" + ACTION
    rule_set = rules_from(rules, "policy: {frequency_cap_per_day: 1}\n")
    context = DecisionContext(rule_set.policy, 0, caps={("cus_1", "1970-01-01"): 1})
    decisions, _ = evaluate_scores(rule_set.rules, [a_score()], {}, context)
    assert outcomes(decisions) == [("r0", "suppressed", "frequency_cap")]


QUIET = """
  - id: greet
    when: {event: {field: event.name, eq: Birthday}}
    quiet_hours: {start: "21:00", end: "08:00", mode: MODE}
""" + ACTION


def test_quiet_hours_hold_until_the_window_opens_in_the_customers_zone() -> None:
    birthday = a_score(event_name="Birthday", time_zone="Asia/Shanghai")
    # 14:00 UTC is 22:00 in Shanghai: quiet until 08:00 there, i.e. 00:00 UTC.
    now = datetime(2026, 11, 25, 14, tzinfo=ZoneInfo("UTC"))
    (decided,) = run(QUIET.replace("MODE", "hold"), [birthday], now=now)[0]
    assert (decided.outcome, decided.reason) == (Outcome.FIRED, "quiet_hours_hold")
    assert decided.not_before_ms == int(datetime(2026, 11, 26, 0, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)
    record = retention_action_record(decided, 0)
    assert '"not_before_ms":' in record["payload_json"]
    assert avro.validation_errors("RetentionAction", record) == []
    # The same moment is 14:00 in London: not quiet.
    (london,) = run(QUIET.replace("MODE", "hold"), [a_score(event_name="Birthday", time_zone="Europe/London")],
                    now=now)[0]
    assert (london.reason, london.not_before_ms) == (None, None)


def test_quiet_hours_drop_suppresses_and_unknown_zone_falls_back_to_the_default() -> None:
    now = datetime(2026, 11, 25, 23, tzinfo=ZoneInfo("UTC"))
    (decided,) = run(QUIET.replace("MODE", "drop"), [a_score(event_name="Birthday", time_zone="Mars/Olympus")],
                     now=now)[0]
    assert (decided.outcome, decided.reason) == (Outcome.SUPPRESSED, "quiet_hours")


def test_unquoted_clock_time_is_refused_because_yaml_reads_it_as_a_number() -> None:
    with pytest.raises(RuleError, match=r"quiet_hours.start': must be a quoted \"HH:MM\", got 1260"):
        rules_from(QUIET.replace('"21:00"', "21:00").replace("MODE", "hold"))


def test_held_out_customer_is_not_counted_against_the_cap() -> None:
    customer = next(f"cus_{n}" for n in range(1000) if is_held_out("r0", f"cus_{n}", 50))
    rules = "  - id: r0\n    when: {event: {field: event.type, eq: track}}\n    holdout_percent: 50\n" + ACTION
    decisions, _, context = run(rules, [a_score(customer_id=customer)], policy="policy: {frequency_cap_per_day: 1}\n")
    assert outcomes(decisions) == [("r0", "held_out", "holdout")] and context.caps == {}


# -- the condition language -----------------------------------------------------------------

@pytest.mark.parametrize(
    ("raw", "message"),
    [({"field": "email", "eq": 1}, "unknown field 'email'"),
     ({"field": "event.name", "matches": "x"}, "exactly one operator"),
     ({"field": "event.name", "eq": 1, "ne": 2}, "exactly one operator"),
     ({"field": "features.x", "le": "2"}, "must be a number"),
     ({"all": []}, "non-empty list"),
     ({"all": [{"field": "segment", "eq": "a"}], "any": []}, "stands alone"),
     ("__import__('os')", "must be a mapping")],
)
def test_bad_conditions_are_refused(raw: Any, message: str) -> None:
    with pytest.raises(ConditionError, match=message):
        parse_condition(raw)


def test_combinators_and_operators() -> None:
    facts = {"segment": "at_risk", "consent": ["email"], "features.x": 2.0, "event.name": None}
    assert holds(parse_condition({"any": [{"field": "segment", "eq": "x"}, {"field": "features.x", "gt": 1}]}), facts)
    assert holds(parse_condition({"not": {"field": "segment", "in": ["loyal"]}}), facts)
    assert holds(parse_condition({"field": "consent", "contains": "email"}), facts)
    assert holds(parse_condition({"field": "event.name", "exists": False}), facts)
    assert not holds(parse_condition({"field": "features.y", "ne": 3}), facts)  # absent: false, even for ne


leaf = st.fixed_dictionaries({"field": st.sampled_from(["segment", "features.x", "event.name", "consent"]),
                              "op": st.sampled_from(["eq", "ne", "lt", "ge", "in", "contains", "exists"])})
values = st.one_of(st.none(), st.floats(allow_nan=True), st.text(max_size=5), st.lists(st.text(max_size=3), max_size=3))


@given(leaf, values, values)
def test_evaluation_never_raises_whatever_the_facts(spec: dict[str, str], expected: Any, actual: Any) -> None:
    raw: dict[str, Any] = {"field": spec["field"]}
    op = spec["op"]
    raw[op] = {"lt": 1.0, "ge": 0.0, "in": ["a"], "exists": True}.get(op, expected if expected is not None else "a")
    try:
        condition = parse_condition(raw)
    except ConditionError:
        return
    assert holds(condition, {spec["field"]: actual}) in (True, False)
