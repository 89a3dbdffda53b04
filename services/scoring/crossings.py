"""When a silent customer's ScoreUpdate would next tell triggers something new.

Between events a customer's scores move with time alone, along a known path (features.py:
recency and age grow, decayed windows shrink). Triggers only reacts to some of that: a
score crossing a rule's `crosses_above` or `rearm_below`, and a segment or stage change
when a rule watches one. So instead of rescoring silent customers on a tick, scoring
computes when the next such crossing happens and sets one timer per customer for it
(service.py); when the timer fires it checks again with the model of that moment.

The thresholds come from the rule file triggers evaluates, read with triggers' own parser
(services/triggers/rules.py), so there is one definition of a rule and no second copy of
its numbers to fall out of step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from services.scoring.labels import DAY_MS
from services.scoring.segments import QuintileSketch, StageRules
from services.scoring.state import CustomerState
from services.triggers.rules import FieldChange, RuleSet, ScoreCrossing

# Bisection steps after the coarse search: a step of 14 days is narrowed to ~80 minutes.
REFINE_STEPS = 8
# Coarse steps searched at once (14-day steps: about six months).
CHUNK_STEPS = 13


@dataclass(frozen=True)
class WatchedChanges:
    """What of a ScoreUpdate the rules react to that time alone can change."""

    # On the purchase-propensity scale (churn risk r is propensity 1 - r), sorted.
    propensity_thresholds: tuple[float, ...] = ()
    stage: bool = False
    segment: bool = False

    @property
    def anything(self) -> bool:
        return bool(self.propensity_thresholds) or self.stage or self.segment


def watched_changes(rules: RuleSet) -> WatchedChanges:
    """Return the thresholds and fields the rules watch.

    >>> from services.triggers.rules import parse_rule_file
    >>> rules = parse_rule_file('''
    ... rules:
    ...   - {id: risk, when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.6}, action: {endpoint: m}}
    ...   - {id: stage, when: {changes: stage, to: at_risk}, action: {endpoint: m}}
    ... ''')
    >>> watched_changes(rules)
    WatchedChanges(propensity_thresholds=(0.3, 0.4), stage=True, segment=False)
    """
    thresholds: set[float] = set()
    fields: set[str] = set()
    for rule in rules.rules:
        trigger = rule.when
        if isinstance(trigger, ScoreCrossing):
            for value in (trigger.crosses_above, trigger.rearm_below):
                # Rounded: 1 - 0.7 is 0.30000000000000004, the rule means 0.3.
                thresholds.add(round(1.0 - value if trigger.score == "churn_risk" else value, 12))
        elif isinstance(trigger, FieldChange):
            fields.add(trigger.field)
    return WatchedChanges(tuple(sorted(thresholds)), "stage" in fields, "segment" in fields)


def threshold_side(propensity: np.ndarray | float, thresholds: tuple[float, ...]) -> np.ndarray:
    """Return how many thresholds lie strictly below each propensity (equal sides: nothing crossed).

    Churn risk r >= c is propensity <= 1 - c, so a risk reaching `crosses_above` is a
    propensity leaving the side above the threshold.

    >>> threshold_side(np.array([0.2, 0.3, 0.35, 0.9]), (0.3, 0.4)).tolist()
    [0, 0, 1, 2]
    """
    return np.searchsorted(np.asarray(thresholds, dtype=np.float64), propensity, side="left")


def next_crossings(
    propensity_grid: Callable[[np.ndarray, np.ndarray, int], np.ndarray],
    propensity_at: Callable[[np.ndarray, np.ndarray], np.ndarray],
    starts_ms: np.ndarray,
    ends_ms: np.ndarray,
    sides: np.ndarray,
    thresholds: tuple[float, ...],
    coarse_ms: float,
    chunk_steps: int = CHUNK_STEPS,
) -> np.ndarray:
    """Return, per customer, the first time in (start, end] its propensity is on another side than `sides`.

    `propensity_grid(rows, first_ms, count)` gives the propensity of customer `rows[i]` at
    first_ms[i] + k * coarse for k < count (one row each); `propensity_at(rows, times)` that
    of customer `rows[i]` at `times[i]`. The search steps `coarse_ms` at a time (a crossing
    there and back within one step is not seen; nor one after the last step before `end`),
    `chunk_steps` steps at once, going on only for the customers not found yet, then bisects.
    NaN where nothing is crossed.

    >>> def grid(rows, first, count):
    ...     return 1.0 - (first[:, None] + 10.0 * np.arange(count)) / 100.0
    >>> def at(rows, times):
    ...     return 1.0 - times / 100.0
    >>> next_crossings(grid, at, np.array([0.0, 0.0]), np.array([100.0, 30.0]), np.array([2, 2]), (0.3, 0.6), 10.0)
    array([40., nan])
    >>> next_crossings(grid, at, np.array([45.0]), np.array([100.0]), np.array([1]), (0.3, 0.6), 10.0).round(1)
    array([70.])
    >>> next_crossings(grid, at, np.array([0.0, 45.0]), np.array([100.0, 100.0]), np.array([2, 1]), (0.3, 0.6), 10.0,
    ...                chunk_steps=2).round(1)
    array([40., 70.])
    """
    count = len(starts_ms)
    found = np.full(count, np.nan)
    if not count or not thresholds:
        return found
    steps = int(np.ceil(np.max(ends_ms - starts_ms) / coarse_ms))
    high = np.full(count, np.nan)
    pending = np.arange(count)
    done = 0
    # Most customers cross within months when they cross at all: searching the whole silence
    # limit (two years) for every one of them would evaluate the model ~4 times as often.
    while pending.size and done < steps:
        take = min(chunk_steps, steps - done)
        times = starts_ms[pending, None] + coarse_ms * (done + np.arange(1, take + 1))[None, :]
        propensity = propensity_grid(pending, starts_ms[pending] + coarse_ms * (done + 1), take)
        changed = (threshold_side(propensity, thresholds) != sides[pending, None]) & (times <= ends_ms[pending, None])
        crossing = changed.any(axis=1)
        hit = np.flatnonzero(crossing)
        high[pending[hit]] = times[hit, np.argmax(changed[hit], axis=1)]
        # Those past their end are not searched further.
        pending = pending[~crossing & (times[:, -1] < ends_ms[pending])]
        done += take
    which = np.flatnonzero(~np.isnan(high))
    if not which.size:
        return found
    high = high[which]
    low = high - coarse_ms
    for _ in range(REFINE_STEPS):
        middle = (low + high) / 2.0
        across = threshold_side(propensity_at(which, middle), thresholds) != sides[which]
        high, low = np.where(across, middle, high), np.where(across, low, middle)
    found[which] = high
    return found


def next_stage_change_ms(state: CustomerState, t_ms: int, rules: StageRules) -> int | None:
    """Return when silence alone next changes the lifecycle stage (at_risk, then churned), if ever.

    >>> state = CustomerState(last_purchase_ms=0, purchase_count=1)
    >>> next_stage_change_ms(state, 10 * DAY_MS, StageRules(at_risk_days=90, churned_days=180)) // DAY_MS
    90
    """
    return _next_recency_mark(state, t_ms, (rules.at_risk_days, rules.churned_days))


def next_segment_change_ms(state: CustomerState, t_ms: int, recency: QuintileSketch) -> int | None:
    """Return when the customer's recency next passes a quintile cut (the R of RFM changes), if ever."""
    return _next_recency_mark(state, t_ms, recency.cuts())


def _next_recency_mark(state: CustomerState, t_ms: int, marks_days: Iterable[float]) -> int | None:
    if state.last_purchase_ms is None:
        return None
    # Just past the mark: the stage and segment rules compare with a strict "more than".
    times = [state.last_purchase_ms + int(days * DAY_MS) + 1 for days in marks_days]
    later = [t for t in times if t > t_ms]
    return min(later) if later else None
