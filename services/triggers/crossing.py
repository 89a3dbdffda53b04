"""Rule evaluation: triggers (score crossing with hysteresis, segment/stage change, event predicate,
silence timer in event time), then the policies every decision passes (audience, consent, cooldown,
hold-out, frequency cap, quiet hours). Pure: state in, state and decisions out."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.triggers.conditions import holds
from services.triggers.events import ScoreUpdated
from services.triggers.rules import (
    Audience,
    EventMatch,
    FieldChange,
    Policy,
    QuietHours,
    Rule,
    ScoreCrossing,
    Silence,
)


class Outcome(StrEnum):
    FIRED = "fired"
    HELD_OUT = "held_out"
    SUPPRESSED = "suppressed"
    # About an event older than the backfill horizon (imported history): recorded, never delivered.
    BACKFILL = "backfill"


@dataclass(frozen=True)
class CrossingState:
    """What one rule remembers about one customer between scores."""

    # A customer with no state yet is armed, so their first score can fire.
    armed: bool = True
    cooldown_until_ms: int = 0
    # Segment or stage change: the value seen last ("" before the first score).
    last_value: str = ""
    # Silence: the event-time deadline (0 = no timer) and the score that started it, as JSON.
    timer_due_ms: int = 0
    timer_snapshot: str = ""


@dataclass(frozen=True)
class ActionDecided:
    """A rule's trigger fired for a customer, with what to do about it."""

    rule: Rule
    score: ScoreUpdated
    outcome: Outcome
    reason: str | None
    # What the action id is derived from; a timer uses its deadline and starting event.
    source_id: str = ""
    # Quiet hours with `hold`: deliver no earlier than this (epoch ms, wall clock).
    not_before_ms: int | None = None
    trigger: str = "score"

    @property
    def idempotency_source(self) -> str:
        return self.source_id or self.score.message_id


StateKey = tuple[str, str]  # (rule_id, customer_id)
CapKey = tuple[str, str]  # (customer_id, local date YYYY-MM-DD)


@dataclass
class DecisionContext:
    """What decisions share within one batch: the file's policy, the wall clock, daily counts."""

    policy: Policy = field(default_factory=Policy)
    now_ms: int = 0
    # Fired actions per (customer, local day), as loaded from Redis and counted up here.
    caps: dict[CapKey, int] = field(default_factory=dict)
    caps_changed: set[CapKey] = field(default_factory=set)
    # Silence timer transitions, by (rule_id, started | restarted | stopped | expired).
    timer_events: Counter[tuple[str, str]] = field(default_factory=Counter)


def is_held_out(rule_id: str, customer_id: str, percent: float) -> bool:
    """Say whether the customer is in the rule's control group; the same answer on every worker, forever.

    >>> is_held_out("r", "c-1", 0), is_held_out("r", "c-1", 100)
    (False, True)
    """
    digest = hashlib.sha256(f"holdout\x1f{rule_id}\x1f{customer_id}".encode()).digest()
    # 10,000 buckets so fractional percentages such as 2.5 are honoured.
    return int.from_bytes(digest[:8], "big") % 10_000 < round(percent * 100)


def customer_zone(score: ScoreUpdated, policy: Policy) -> ZoneInfo:
    """Return the customer's time zone, or the policy's default when unknown or unusable."""
    for name in (score.time_zone, policy.default_time_zone):
        if name:
            try:
                return ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return ZoneInfo("UTC")


def local_day(epoch_ms: int, zone: ZoneInfo) -> str:
    """Return the calendar date at `epoch_ms` in `zone`.

    >>> local_day(0, ZoneInfo("Asia/Shanghai")), local_day(0, ZoneInfo("America/New_York"))
    ('1970-01-01', '1969-12-31')
    """
    return datetime.fromtimestamp(epoch_ms / 1000, tz=zone).date().isoformat()


def quiet_hours_end_ms(now_ms: int, zone: ZoneInfo, quiet: QuietHours) -> int | None:
    """Return when the quiet window around `now_ms` ends (epoch ms), or None if `now_ms` is outside it.

    >>> q = QuietHours(start_minute=21 * 60, end_minute=8 * 60)
    >>> utc = ZoneInfo("UTC")
    >>> quiet_hours_end_ms(23 * 3_600_000, utc, q) == 32 * 3_600_000  # 23:00 -> held until 08:00 next day
    True
    >>> quiet_hours_end_ms(12 * 3_600_000, utc, q) is None
    True
    """
    local = datetime.fromtimestamp(now_ms / 1000, tz=zone)
    minute = local.hour * 60 + local.minute
    start, end = quiet.start_minute, quiet.end_minute
    inside = start <= minute < end if start < end else (minute >= start or minute < end)
    if not inside:
        return None
    opens = local.replace(hour=end // 60, minute=end % 60, second=0, microsecond=0)
    if opens <= local:
        opens += timedelta(days=1)  # wall-clock arithmetic in the zone: DST-safe for the opening hour
    return int(opens.timestamp() * 1000)


def value_tier(features: Mapping[str, float], policy: Policy) -> str | None:
    """Return the customer's value tier by lifetime spend (`features.monetary_total`), or None.

    >>> value_tier({"monetary_total": 250.0}, Policy(value_tiers=(("high", 500.0), ("medium", 100.0))))
    'medium'
    """
    spend = features.get("monetary_total")
    if spend is None:
        return None
    return next((name for name, low in policy.value_tiers if spend >= low), None)


def score_facts(score: ScoreUpdated, policy: Policy) -> dict[str, Any]:
    """Return the fields a condition may read, by name (see services/triggers/conditions.py)."""
    facts: dict[str, Any] = {
        "event.type": score.event_type,
        "event.name": score.event_name,
        "event.channel": score.channel,
        "segment": score.segment,
        "stage": score.stage,
        "value_tier": value_tier(score.features, policy),
        "consent": list(score.consent),
    }
    facts.update({f"scores.{name}": value for name, value in score.scores.items()})
    facts.update({f"features.{name}": value for name, value in score.features.items()})
    return facts


def in_audience(audience: Audience, facts: Mapping[str, Any]) -> bool:
    """Say whether the customer is one the rule is for."""
    wanted = ((audience.segments, "segment"), (audience.stages, "stage"), (audience.value_tiers, "value_tier"),
              (audience.channels, "event.channel"))
    if any(names and facts.get(name) not in names for names, name in wanted):
        return False
    return audience.where is None or holds(audience.where, facts)


def decide(rule: Rule, state: CrossingState, score: ScoreUpdated, context: DecisionContext, *,
           source_id: str = "", trigger: str = "score", facts: Mapping[str, Any] | None = None,
           ) -> tuple[CrossingState, ActionDecided | None]:
    """Pass a triggered rule through audience, consent, cooldown, hold-out, frequency cap and quiet hours."""
    policy = context.policy
    facts = facts if facts is not None else score_facts(score, policy)
    if not in_audience(rule.audience, facts):
        return state, None

    def decision(outcome: Outcome, reason: str | None, not_before_ms: int | None = None) -> ActionDecided:
        return ActionDecided(rule, score, outcome, reason, source_id, not_before_ms, trigger)

    if rule.consent is not None and rule.consent not in score.consent:
        return state, decision(Outcome.SUPPRESSED, "consent")
    if score.event_time_ms < state.cooldown_until_ms:
        return state, decision(Outcome.SUPPRESSED, "cooldown")
    # Cooldown and the daily cap count in event time, so a replay of history decides exactly
    # as live traffic did; quiet hours look at the clock, because they protect the person at
    # the moment the message would reach them.
    cooling = replace(state, cooldown_until_ms=score.event_time_ms + rule.cooldown_ms)
    if is_held_out(rule.id, score.customer_id, rule.holdout_percent):
        return cooling, decision(Outcome.HELD_OUT, "holdout")
    zone = customer_zone(score, policy)
    cap_key = (score.customer_id, local_day(score.event_time_ms, zone))
    capped = rule.capped and policy.frequency_cap_per_day > 0
    if capped and context.caps.get(cap_key, 0) >= policy.frequency_cap_per_day:
        return state, decision(Outcome.SUPPRESSED, "frequency_cap")
    reason, not_before_ms = None, None
    if rule.quiet_hours is not None:
        opens = quiet_hours_end_ms(context.now_ms, zone, rule.quiet_hours)
        if opens is not None:
            if rule.quiet_hours.mode == "drop":
                return state, decision(Outcome.SUPPRESSED, "quiet_hours")
            reason, not_before_ms = "quiet_hours_hold", opens
    if capped:
        context.caps[cap_key] = context.caps.get(cap_key, 0) + 1
        context.caps_changed.add(cap_key)
    return cooling, decision(Outcome.FIRED, reason, not_before_ms)


def next_crossing_state(
    rule: Rule, state: CrossingState, score: ScoreUpdated, context: DecisionContext | None = None
) -> tuple[CrossingState, ActionDecided | None]:
    """Apply one score to the rule's state; return the new state and the decision, if the rule triggered.

    >>> from services.triggers.rules import parse_rules
    >>> from services.triggers.events import ScoreUpdated
    >>> rule = parse_rules('''rules: [{id: r, when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.6},
    ...                                action: {endpoint: e}}]''')[0]
    >>> def score(risk): return ScoreUpdated("c", "m", 0, 0, {"churn_risk": risk}, "", "", (), "v1")
    >>> state, decided = next_crossing_state(rule, CrossingState(), score(0.8))
    >>> state.armed, decided.outcome
    (False, <Outcome.FIRED: 'fired'>)
    >>> next_crossing_state(rule, state, score(0.9))[1] is None  # still above: no new edge
    True
    """
    state, decisions = next_rule_state(rule, state, score, context or DecisionContext())
    return state, decisions[-1] if decisions else None


def next_rule_state(
    rule: Rule, state: CrossingState, score: ScoreUpdated, context: DecisionContext,
    facts: Mapping[str, Any] | None = None,
) -> tuple[CrossingState, list[ActionDecided]]:
    """Apply one score to one rule's state; return the new state and the decisions it led to (0, 1 or 2).

    `facts` are `score_facts(score, context.policy)`, passed in when already built for this score.
    """
    when = rule.when
    facts = facts if facts is not None else score_facts(score, context.policy)
    if isinstance(when, Silence):
        return _next_silence_state(rule, when, state, score, context, facts)
    triggered = False
    if isinstance(when, ScoreCrossing):
        level = score.scores[when.score]
        if not state.armed:
            if level < when.rearm_below:
                state = replace(state, armed=True)
        elif level >= when.crosses_above:
            state, triggered = replace(state, armed=False), True
    elif isinstance(when, FieldChange):
        value = score.segment if when.field == "segment" else score.stage
        previous = state.last_value
        if value != previous:
            state = replace(state, last_value=value)
            # The first value seen is where the customer is, not a change.
            triggered = (bool(previous) and (not when.to or value in when.to)
                         and (not when.from_ or previous in when.from_))
    elif isinstance(when, EventMatch):
        triggered = holds(when.condition, facts)
    if not triggered:
        return state, []
    state, decided = decide(rule, state, score, context, trigger=_trigger_name(when), facts=facts)
    return state, [decided] if decided else []


def _next_silence_state(rule: Rule, when: Silence, state: CrossingState, score: ScoreUpdated,
                        context: DecisionContext, facts: Mapping[str, Any]) -> tuple[CrossingState,
                                                                                     list[ActionDecided]]:
    decisions: list[ActionDecided] = []
    if state.timer_due_ms and score.event_time_ms >= state.timer_due_ms:
        # This event came after the deadline: the silence lasted, so the timer fires first.
        state, decided = expire_timer(rule, state, context)
        decisions += [decided] if decided else []
    if state.timer_due_ms and when.stop is not None and holds(when.stop, facts):
        state = replace(state, timer_due_ms=0, timer_snapshot="")
        context.timer_events[(rule.id, "stopped")] += 1
    elif holds(when.start, facts) and (when.restart or not state.timer_due_ms):
        context.timer_events[(rule.id, "restarted" if state.timer_due_ms else "started")] += 1
        snapshot = json.dumps(score.to_json(), separators=(",", ":"))
        state = replace(state, timer_due_ms=score.event_time_ms + when.after_ms, timer_snapshot=snapshot)
    return state, decisions


def expire_timer(rule: Rule, state: CrossingState, context: DecisionContext) -> tuple[CrossingState,
                                                                                       ActionDecided | None]:
    """Fire a silence timer: decide with the score that started it, at the deadline's event time."""
    due_ms = state.timer_due_ms
    cleared = replace(state, timer_due_ms=0, timer_snapshot="")
    context.timer_events[(rule.id, "expired")] += 1
    if not state.timer_snapshot:
        return cleared, None
    started_by = ScoreUpdated.from_json(json.loads(state.timer_snapshot))
    # The "event" is the deadline passing: latency counts from when the timer fired.
    score = replace(started_by, event_time_ms=due_ms, received_at_ms=context.now_ms or started_by.received_at_ms)
    return decide(rule, cleared, score, context, source_id=f"silence@{due_ms}:{started_by.message_id}",
                  trigger="silence")


def _trigger_name(when: object) -> str:
    return {ScoreCrossing: "score", FieldChange: "change", EventMatch: "event"}.get(type(when), "silence")


def evaluate_scores(
    rules: Iterable[Rule], scores: Iterable[ScoreUpdated], states: Mapping[StateKey, CrossingState],
    context: DecisionContext | None = None,
) -> tuple[list[ActionDecided], dict[StateKey, CrossingState]]:
    """Run a batch of scores, in order, through every rule; return decisions and the states that changed."""
    rules = tuple(rules)
    context = context or DecisionContext()
    current = dict(states)
    changed: dict[StateKey, CrossingState] = {}
    decisions: list[ActionDecided] = []
    for score in scores:
        facts = score_facts(score, context.policy)
        for rule in rules:
            key = (rule.id, score.customer_id)
            before = current.get(key, CrossingState())
            after, decided = next_rule_state(rule, before, score, context, facts)
            if after != before:
                current[key] = changed[key] = after
            decisions += decided
    return decisions, changed


def as_backfill(decisions: Iterable[ActionDecided], live_from_ms: int) -> list[ActionDecided]:
    """Return `decisions`, those about events before `live_from_ms` turned into `backfill` outcomes.

    History (an import, a consumer replaying old scores) trains the models and moves rule states,
    cooldowns and caps as live traffic would have, but a moment long past gets no webhook. What
    would have fired, and what the hold-out would have kept back, is recorded as `backfill` with
    that as its reason, so neither counts in the hold-out experiment; suppressions stay as they are.

    >>> from services.triggers.rules import parse_rules
    >>> rule = parse_rules("rules: [{id: r, when: {score: churn_risk, crosses_above: 0.5, rearm_below: 0.4}, "
    ...                    "action: {endpoint: e}}]")[0]
    >>> def decided(at_ms): return ActionDecided(rule, ScoreUpdated("c", "m", at_ms, 0, {}, "", "", (), "v"),
    ...                                          Outcome.FIRED, None, not_before_ms=at_ms + 5)
    >>> [(d.outcome.value, d.reason, d.not_before_ms) for d in as_backfill([decided(10), decided(99)], 50)]
    [('backfill', 'fired', None), ('fired', None, 104)]
    """
    marked = []
    for decided in decisions:
        if decided.score.event_time_ms < live_from_ms and decided.outcome in (Outcome.FIRED, Outcome.HELD_OUT):
            reason = "fired" if decided.outcome is Outcome.FIRED else "holdout"
            decided = replace(decided, outcome=Outcome.BACKFILL, reason=reason, not_before_ms=None)
        marked.append(decided)
    return marked


def fire_due_timers(
    rules: Mapping[str, Rule], due: Iterable[StateKey], states: Mapping[StateKey, CrossingState],
    watermark_ms: int, context: DecisionContext,
) -> tuple[list[ActionDecided], dict[StateKey, CrossingState]]:
    """Fire the silence timers in `due` whose deadline the event-time watermark has passed."""
    decisions: list[ActionDecided] = []
    changed: dict[StateKey, CrossingState] = {}
    for key in due:
        rule, state = rules.get(key[0]), states.get(key)
        # A timer index entry can outlive its rule or its timer (cancelled in the meantime).
        if rule is None or state is None or not state.timer_due_ms or state.timer_due_ms > watermark_ms:
            continue
        changed[key], decided = expire_timer(rule, state, context)
        decisions += [decided] if decided else []
    return decisions, changed
