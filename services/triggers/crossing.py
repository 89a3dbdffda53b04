"""Score crossing with hysteresis: when a rule fires, and what it leaves behind for the next score."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from services.triggers.events import ScoreUpdated
from services.triggers.rules import Rule


class Outcome(StrEnum):
    FIRED = "fired"
    HELD_OUT = "held_out"
    SUPPRESSED = "suppressed"


@dataclass(frozen=True)
class CrossingState:
    """What one rule remembers about one customer between scores."""

    # A customer with no state yet is armed, so their first score can fire.
    armed: bool = True
    cooldown_until_ms: int = 0


@dataclass(frozen=True)
class ActionDecided:
    """A rule's edge was crossed for a customer, with what to do about it."""

    rule: Rule
    score: ScoreUpdated
    outcome: Outcome
    reason: str | None


StateKey = tuple[str, str]  # (rule_id, customer_id)


def is_held_out(rule_id: str, customer_id: str, percent: float) -> bool:
    """Say whether the customer is in the rule's control group; the same answer on every worker, forever.

    >>> is_held_out("r", "c-1", 0), is_held_out("r", "c-1", 100)
    (False, True)
    """
    digest = hashlib.sha256(f"holdout\x1f{rule_id}\x1f{customer_id}".encode()).digest()
    # 10,000 buckets so fractional percentages such as 2.5 are honoured.
    return int.from_bytes(digest[:8], "big") % 10_000 < round(percent * 100)


def next_crossing_state(
    rule: Rule, state: CrossingState, score: ScoreUpdated
) -> tuple[CrossingState, ActionDecided | None]:
    """Apply one score to the rule's state; return the new state and the decision if the edge was crossed.

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
    value = score.scores[rule.when.score]
    if not state.armed:
        if value < rule.when.rearm_below:
            return replace(state, armed=True), None
        return state, None
    if value < rule.when.crosses_above:
        return state, None
    disarmed = replace(state, armed=False)
    if score.event_time_ms < state.cooldown_until_ms:
        return disarmed, ActionDecided(rule, score, Outcome.SUPPRESSED, "cooldown")
    # Cooldown is kept in event time so a replay of history decides exactly as live traffic did.
    cooling = replace(disarmed, cooldown_until_ms=score.event_time_ms + rule.cooldown_ms)
    if is_held_out(rule.id, score.customer_id, rule.holdout_percent):
        return cooling, ActionDecided(rule, score, Outcome.HELD_OUT, "holdout")
    return cooling, ActionDecided(rule, score, Outcome.FIRED, None)


def evaluate_scores(
    rules: Iterable[Rule], scores: Iterable[ScoreUpdated], states: Mapping[StateKey, CrossingState]
) -> tuple[list[ActionDecided], dict[StateKey, CrossingState]]:
    """Run a batch of scores, in order, through every rule; return decisions and the states that changed."""
    rules = tuple(rules)
    current = dict(states)
    changed: dict[StateKey, CrossingState] = {}
    decisions: list[ActionDecided] = []
    for score in scores:
        for rule in rules:
            key = (rule.id, score.customer_id)
            before = current.get(key, CrossingState())
            after, decided = next_crossing_state(rule, before, score)
            if after != before:
                current[key] = changed[key] = after
            if decided is not None:
                decisions.append(decided)
    return decisions, changed
