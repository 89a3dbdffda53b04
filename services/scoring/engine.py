"""Score touchpoints, check silent customers' crossings, and learn matured examples: the whole flow, without I/O.

The service loads customer states, hands them here in event order, and saves what comes
back; tests drive the same flow with plain dicts.

Examples (prediction points the model later learns from) are a customer's events (at most
one per event-time day) and, while the customer stays silent, one every `step_days` after
the last of those: without the silent ones the model would only ever see customers at the
moment they act and could not learn what silence means. Each asks "a purchase within the
next step?", so its label matures one step later.

A silent customer's examples need nothing but the state as it was at the last event: its
silent path (features.py). They are made in bulk from stored paths when they mature
(`silent_examples`), or, if the customer acts first, from the state right before that event
(`observe_event`), which also labels the one whose window the event falls in.

A longer horizon is the chain of steps of a customer who stays silent:
P(no purchase in k steps) = product over j < k of (1 - p(path as of t + j * step)). That is
the chain rule, exact if the model is calibrated for a silent customer at each step, and it
needs no label longer than one step. ScoreUpdates carry the chain over `horizon_days`.

Nothing here runs per customer per tick: a silent customer's next ScoreUpdate is due only
when its scores cross what a rule watches (crossings.py), and the model is evaluated for a
whole batch of customers and times in one numpy computation (`assess`, `horizon_forecasts`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.scoring.btyd import BtydInputs, BtydPrior
from services.scoring.crossings import (
    WatchedChanges,
    next_crossings,
    next_segment_change_ms,
    next_stage_change_ms,
    threshold_side,
)
from services.scoring.features import (
    MODEL_FEATURES,
    PATH_FIELDS,
    features_at,
    path_model_inputs,
    sentiment_features,
    silent_path,
)
from services.scoring.labels import DAY_MS, PendingExample, event_day, is_prediction_point, split_matured
from services.scoring.model import PRIOR_REASON, Learner
from services.scoring.segments import StageRules, lifecycle_stage, rfm_segment
from services.scoring.state import CustomerState, Touchpoint, apply_touchpoint
from services.scoring.value import VALUE_WARM_UP, predicted_value, value_reasons
from touchstream.privacy import CONSENT_WITHDRAWN

# The ScoreUpdate event_type of a crossing check's update (no touchpoint behind it).
RESCORE = "rescore"
_NO_PATH = np.zeros(0)


@dataclass
class ScoringPoint:
    """A customer as of one time in a batch: right after an event, or at a silent customer's crossing check."""

    customer_id: str
    touch: Touchpoint
    path: np.ndarray
    # The model's inputs plus the raw RFM totals (and the event's own facts), for rules and people.
    features: dict[str, float]
    segment: str
    stage: str
    consent: list[str] | None
    time_zone: str | None
    late: bool = False
    # Examples this point made (its own, and a silent customer's that its event closed); their
    # prequential propensity is filled in by `assess`.
    new_examples: list[PendingExample] = field(default_factory=list)

    @property
    def t_ms(self) -> int:
        return self.touch.timestamp_ms


@dataclass(frozen=True)
class Scored:
    """A customer's scores at one point."""

    propensity: float
    features: dict[str, float]
    reasons: list[tuple[str, float]]
    segment: str
    stage: str
    model_version: str
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


@dataclass(frozen=True)
class SilentBatch:
    """Silent customers' matured examples, made from their paths; `next_ms[i]` is customer i's next one (or NaN)."""

    rows: np.ndarray
    times_ms: np.ndarray
    next_ms: np.ndarray


class ScoringEngine:
    """Apply touchpoints to states, score them, schedule crossing checks, and learn examples whose labels matured."""

    def __init__(
        self,
        learner: Learner,
        horizon_days: float = 90,
        step_days: float = 14.0,
        lateness_days: float = 1.0,
        rules: StageRules | None = None,
        reason_count: int = 3,
        max_silence_days: float = 730.0,
        watched: WatchedChanges | None = None,
        value_horizon_days: float = 365.0,
    ) -> None:
        self.learner = learner
        self.value_horizon_days = value_horizon_days
        self.horizon_days = horizon_days
        self.step_days = step_days
        self.step_ms = int(step_days * DAY_MS)
        self.lateness_ms = int(lateness_days * DAY_MS)
        self.rules = rules or StageRules(at_risk_days=horizon_days, churned_days=2 * horizon_days)
        self.reason_count = reason_count
        self.max_silence_ms = int(max_silence_days * DAY_MS)
        self.watched = watched or WatchedChanges()

    def maturity_cutoff(self, watermark_ms: int) -> int:
        """Return the due time up to which labels are final, given a partition's watermark."""
        return watermark_ms - self.lateness_ms

    def observe_event(
        self, customer_id: str, state: CustomerState, touch: Touchpoint, watermark_ms: int,
        silent_from_ms: int | None,
    ) -> ScoringPoint:
        """Fold `touch` into `state`; close the silent examples it ends and make its own if it is the day's first.

        `silent_from_ms` is the customer's next silent example not yet made (None: none
        waiting). A touchpoint older than the customer's newest one is folded in but is no
        prediction point: its features would already contain later events, some of them
        inside its own label window.
        """
        t = touch.timestamp_ms
        in_order = state.last_touch_ms is None or t >= state.last_touch_ms
        made: list[PendingExample] = []
        if in_order and silent_from_ms is not None and not state.has_applied(touch.message_id):
            made = self._close_silent_examples(state, silent_from_ms, t)
        # Before applying: does this order open a purchase day? (The prior counts days, value counts orders.)
        opens_day = state.last_purchase_ms is None or event_day(state.last_purchase_ms) != event_day(t)
        applied = apply_touchpoint(state, touch)
        if applied and touch.is_purchase and state.purchase_count:
            self.learner.spend.observe_purchase(state.purchase_count, state.monetary_total / state.purchase_count)
            self.learner.purchase_day_share.update(float(opens_day))
        cutoff = self.maturity_cutoff(watermark_ms)
        path = silent_path(state)
        if applied and in_order and is_prediction_point(state.last_example_day, t, self.step_ms, cutoff):
            example = PendingExample(t, t + self.step_ms, path.tolist(), math.nan)
            state.pending.append(example)
            state.last_example_day, state.last_example_ms = event_day(t), t
            made.append(example)
        point = self._point(customer_id, state, touch, path, late=t < cutoff)
        point.features |= event_facts(touch)
        point.new_examples = made
        return point

    def observe_check(self, customer_id: str, state: CustomerState, t_ms: int) -> ScoringPoint:
        """Return the customer as of its crossing check at `t_ms` (no new event)."""
        return self._point(customer_id, state, rescore_touchpoint(customer_id, t_ms), silent_path(state))

    def _point(self, customer_id: str, state: CustomerState, touch: Touchpoint, path: np.ndarray,
               late: bool = False) -> ScoringPoint:
        t = touch.timestamp_ms
        self.learner.rfm_quantiles.observe(state, t)
        consent = list(state.consent) if state.consent is not None else None
        if consent is None and touch.event_type != RESCORE:
            consent = [c for c in touch.consent if c != CONSENT_WITHDRAWN]
        return ScoringPoint(
            customer_id, touch, path, features_at(state, t) | rfm_totals(state) | sentiment_features(state),
            rfm_segment(state, t, self.learner.rfm_quantiles), lifecycle_stage(state, t, self.rules),
            consent, state.time_zone or touch.time_zone, late,
        )

    def _close_silent_examples(self, state: CustomerState, from_ms: int, until_ms: int) -> list[PendingExample]:
        """Make the silent examples before `until_ms` from the state as it still is; labels come with the event."""
        path = silent_path(state).tolist()
        made = []
        g = from_ms
        while g < until_ms and state.last_touch_ms is not None and g - state.last_touch_ms <= self.max_silence_ms:
            example = PendingExample(g, g + self.step_ms, path, math.nan)
            state.pending.append(example)
            made.append(example)
            g += self.step_ms
        return made

    def next_silent_example_ms(self, state: CustomerState, closed_until_ms: int | None = None) -> int | None:
        """Return the time of the customer's next silent example, or None once it has been silent too long.

        After an event that made an example, one step after it; after one that did not (a
        second event that day, a late one), the old schedule goes on past what is closed.
        """
        if state.last_example_ms is None or state.last_touch_ms is None:
            return None
        g = state.last_example_ms + self.step_ms
        if closed_until_ms is not None and closed_until_ms > g:
            g += -(-(closed_until_ms - g) // self.step_ms) * self.step_ms
        return g if g - state.last_touch_ms <= self.max_silence_ms else None

    def assess(self, points: list[ScoringPoint]) -> list[Scored]:
        """Score every point of a batch in one model evaluation; fill in its new examples' propensities."""
        if not points:
            return []
        paths = np.stack([p.path for p in points])
        times = np.array([p.t_ms for p in points], dtype=np.float64)
        (propensity, _), (_, purchases) = self.horizon_forecasts_at(paths, times,
                                                                    (self.horizon_days, self.value_horizon_days))
        value = self._value_features(paths, purchases)
        examples = [e for p in points for e in p.new_examples]
        if examples:
            inputs, btyd = path_model_inputs(np.array([e.path for e in examples]),
                                             np.array([e.t_ms for e in examples], dtype=np.float64))
            for example, hazard in zip(examples, self.learner.model.hazards(inputs, btyd), strict=True):
                example.propensity = float(hazard)
        reasons = self._reasons(paths, times) if self.reason_count else [[] for _ in points]
        version = self.learner.model.version
        return [
            Scored(float(p), point.features | worth, why, point.segment, point.stage, version, point.late)
            for point, p, why, worth in zip(points, propensity, reasons, value, strict=True)
        ]

    def _value_features(self, paths: np.ndarray, purchases: np.ndarray) -> list[dict[str, float]]:
        """Return each point's predicted value over the value horizon, its parts and its tier (value.py)."""
        orders = np.nan_to_num(paths[:, _PURCHASE_COUNT])
        total = np.nan_to_num(paths[:, _MONETARY_TOTAL])
        mean_value = np.divide(total, orders, out=np.zeros_like(total), where=orders > 0)
        spend = self.learner.spend
        order_value = spend.expected_order_value(orders, mean_value)
        value = predicted_value(purchases, order_value)
        tiers = spend.tiers(value)
        # The reason: each part against the typical customer's (expected purchases of the points
        # scored so far, the order value of a customer with no order yet).
        typical_order_value = float(spend.expected_order_value(np.zeros(1), np.zeros(1))[0])
        # Like the tiers, none until VALUE_WARM_UP points were scored: a typical from a handful is noise.
        typical_purchases = spend.typical_purchases.get() if spend.typical_purchases.n >= VALUE_WARM_UP else 0.0
        by_purchases, by_order_value = value_reasons(purchases, order_value, typical_purchases, typical_order_value)
        spend.typical_purchases.update(float(np.mean(purchases)), len(purchases))
        return [{"predicted_value": float(v), "expected_purchases_value_horizon": float(n),
                 "expected_order_value": float(o), "value_tier": float(t),
                 "value_purchases_vs_typical": float(rp), "value_order_value_vs_typical": float(ro)}
                for v, n, o, t, rp, ro in zip(value, purchases, order_value, tiers, by_purchases, by_order_value,
                                              strict=True)]

    def _reasons(self, paths: np.ndarray, times: np.ndarray) -> list[list[tuple[str, float]]]:
        model = self.learner.model
        if not model.examples_learned:
            return [[] for _ in times]
        inputs, btyd = path_model_inputs(paths, times)
        names = (*MODEL_FEATURES, PRIOR_REASON)
        terms = np.column_stack([model.input_terms(inputs), model.prior_terms(btyd)])
        # Largest by size, ties by name (names are in a fixed order, so a stable sort keeps them).
        order = np.argsort(-np.abs(terms), axis=1, kind="stable")[:, : self.reason_count]
        return [[(names[j], float(row[j])) for j in picks if row[j] != 0.0] for row, picks in zip(terms, order,
                                                                                                     strict=True)]

    def changed_enough(self, state: CustomerState, scored: Scored) -> bool:
        """Say whether a crossing check's scores differ from the customer's last ScoreUpdate in what rules watch."""
        watched = self.watched
        if watched.propensity_thresholds and state.last_scored_propensity is not None:
            before = threshold_side(state.last_scored_propensity, watched.propensity_thresholds)
            if before != threshold_side(scored.propensity, watched.propensity_thresholds):
                return True
        return (watched.stage and scored.stage != state.last_scored_stage) or (
            watched.segment and scored.segment != state.last_scored_segment)

    @staticmethod
    def remember_sent(state: CustomerState, scored: Scored) -> None:
        state.last_scored_propensity = scored.propensity
        state.last_scored_stage, state.last_scored_segment = scored.stage, scored.segment

    def schedule_checks(self, states: dict[str, CustomerState], since_ms: dict[str, int]) -> dict[str, int | None]:
        """Set and return each customer's next crossing check after `since_ms[customer]` (None: none needed).

        One search for all of them: the propensity crossings by the model of now, the stage
        and segment marks by the state's own times.
        """
        ids = list(since_ms)
        checks: dict[str, int | None] = dict.fromkeys(ids)
        if not self.watched.anything or not ids:
            return self._store_checks(states, checks)
        thresholds = self.watched.propensity_thresholds
        searchable = [c for c in ids if states[c].last_touch_ms is not None
                      and states[c].last_scored_propensity is not None]
        if thresholds and searchable:
            paths = np.stack([silent_path(states[c]) for c in searchable])
            starts = np.array([since_ms[c] for c in searchable], dtype=np.float64)
            ends = np.array([(states[c].last_touch_ms or 0) + self.max_silence_ms for c in searchable],
                            dtype=np.float64)
            sides = threshold_side(np.array([states[c].last_scored_propensity for c in searchable]), thresholds)

            def propensity_grid(rows: np.ndarray, first_ms: np.ndarray, count: int) -> np.ndarray:
                return self.propensity_grid(paths[rows], first_ms, count)

            def propensity_at(rows: np.ndarray, times: np.ndarray) -> np.ndarray:
                return self.horizon_forecasts(paths[rows], times, self.horizon_days)[0]

            found = next_crossings(propensity_grid, propensity_at, starts, ends, sides, thresholds,
                                   float(self.step_ms))
            for c, t in zip(searchable, found, strict=True):
                checks[c] = None if math.isnan(t) else math.ceil(t)
        for c in ids:
            marks = [checks[c]]
            if self.watched.stage:
                marks.append(next_stage_change_ms(states[c], since_ms[c], self.rules))
            if self.watched.segment:
                marks.append(next_segment_change_ms(states[c], since_ms[c], self.learner.rfm_quantiles.recency))
            limit = (states[c].last_touch_ms or 0) + self.max_silence_ms
            due = [m for m in marks if m is not None and m <= limit]
            checks[c] = min(due) if due else None
        return self._store_checks(states, checks)

    @staticmethod
    def _store_checks(states: dict[str, CustomerState], checks: dict[str, int | None]) -> dict[str, int | None]:
        for c, t in checks.items():
            states[c].next_check_ms = t
        return checks

    def silent_examples(self, paths: np.ndarray, next_ms: np.ndarray, cutoff_ms: int) -> SilentBatch:
        """Return silent customers' examples whose step ended by `cutoff_ms` (all negative: no event came).

        `paths[i]` is customer i's silent path and `next_ms[i]` its next example not yet made.

        >>> from services.scoring.model import PropensityModel
        >>> state = CustomerState()
        >>> _ = apply_touchpoint(state, Touchpoint("m", 0, 0, order_amount=5.0))
        >>> batch = ScoringEngine(Learner(PropensityModel()), step_days=14, max_silence_days=40).silent_examples(
        ...     silent_path(state)[None, :], np.array([14.0 * DAY_MS]), 100 * DAY_MS)
        >>> (batch.times_ms // DAY_MS).tolist(), batch.next_ms.tolist()
        ([14.0, 28.0], [nan])
        """
        last_touch = paths[:, _LAST_TOUCH]
        # Examples with g + step <= cutoff, and g no later than the silence limit.
        until = np.minimum(cutoff_ms - self.step_ms, last_touch + self.max_silence_ms)
        counts = np.where(until >= next_ms, np.floor((until - next_ms) / self.step_ms) + 1, 0).astype(np.int64)
        rows = np.repeat(np.arange(len(next_ms)), counts)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        times = next_ms[rows] + (np.arange(len(rows)) - starts) * self.step_ms
        following = next_ms + counts * self.step_ms
        ended = following - last_touch > self.max_silence_ms
        return SilentBatch(rows, times.astype(np.float64), np.where(ended, np.nan, following))

    def learn_matured(
        self, states: Iterable[CustomerState], maturity_cutoff_ms: int, silent_paths: np.ndarray = _NO_PATH,
        silent: SilentBatch | None = None,
    ) -> LearningOutcome:
        """Learn every example due by the cutoff: those waiting in `states` and the silent ones; account each first."""
        matured: list[PendingExample] = []
        for state in states:
            done, state.pending = split_matured(state.pending, maturity_cutoff_ms)
            matured.extend(done)
        paths = [np.asarray(e.path, dtype=np.float64) for e in matured]
        times = [e.t_ms for e in matured]
        labels = [e.positive for e in matured]
        purchases = [e.purchases for e in matured]
        propensities = [e.propensity for e in matured]
        if silent is not None and len(silent.rows):
            paths.extend(silent_paths[silent.rows])
            times.extend(silent.times_ms.astype(np.int64).tolist())
            labels.extend([False] * len(silent.rows))
            purchases.extend([0] * len(silent.rows))
            propensities.extend([math.nan] * len(silent.rows))
        if not paths:
            return LearningOutcome()
        return self.learn(np.stack(paths), np.array(times, dtype=np.float64), np.array(labels, dtype=bool),
                          np.array(purchases), np.array(propensities, dtype=np.float64))

    def learn(self, paths: np.ndarray, times_ms: np.ndarray, labels: np.ndarray, purchases: np.ndarray,
              propensities: np.ndarray) -> LearningOutcome:
        """Account and learn examples in due order; a NaN propensity is predicted now, before learning."""
        order = np.lexsort((labels, times_ms))  # due = t + step: the same order as (due, t, label)
        paths, times_ms, labels = paths[order], times_ms[order], labels[order]
        purchases, propensities = purchases[order], propensities[order]
        inputs, btyd = path_model_inputs(paths, times_ms)
        model = self.learner.model
        missing = np.isnan(propensities)
        if missing.any():
            propensities[missing] = model.hazards(inputs[missing], _select(btyd, missing))
        alarms = self.learner.quality.update_many(labels, propensities)
        model.learn_many(inputs, btyd, labels)
        return LearningOutcome(learned=len(labels), positives=int(labels.sum()), drift_alarms=alarms)

    def propensity_grid(self, paths: np.ndarray, first_ms: np.ndarray, count: int) -> np.ndarray:
        """Return P(a purchase within the horizon) as of first + k * step for k < count, per path.

        The chains of neighbouring grid times share all but one step, so each step's hazard
        is computed once and the chains are sliding sums of their logs.
        """
        steps, fractions = self._chain(self.horizon_days)
        total = count + steps - 1
        at = (first_ms[:, None] + self.step_ms * np.arange(total)[None, :]).ravel()
        inputs, btyd = path_model_inputs(paths, at, np.repeat(np.arange(len(first_ms)), total))
        log_silent = np.log1p(-self.learner.model.hazards(inputs, btyd)).reshape(len(first_ms), total)
        windows = np.lib.stride_tricks.sliding_window_view(log_silent, steps, axis=1)
        return 1.0 - np.exp(windows @ fractions)

    def _chain(self, horizon_days: float) -> tuple[int, np.ndarray]:
        """Return the steps a horizon takes and the share of each one it covers (the last may be partial)."""
        steps = max(1, math.ceil(horizon_days / self.step_days - 1e-9))
        return steps, np.minimum(1.0, (horizon_days - self.step_days * np.arange(steps)) / self.step_days)

    def horizon_forecasts(self, paths: np.ndarray, times_ms: np.ndarray,
                          horizon_days: float) -> tuple[np.ndarray, np.ndarray]:
        """Return P(a purchase in (t, t + horizon]) and the expected purchases, per (path, time), chained by step."""
        # The last step may be partial: the same hazard over a shorter window.
        return self.horizon_forecasts_at(paths, times_ms, (horizon_days,))[0]

    def horizon_forecasts_at(self, paths: np.ndarray, times_ms: np.ndarray,
                             horizons_days: tuple[float, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Return `horizon_forecasts` for several horizons from one evaluation of the longest one's chain."""
        longest, _ = self._chain(max(horizons_days))
        count = len(times_ms)
        at = (np.asarray(times_ms, dtype=np.float64)[:, None] + self.step_ms * np.arange(longest)[None, :]).ravel()
        inputs, btyd = path_model_inputs(paths, at, np.repeat(np.arange(count), longest))
        model = self.learner.model
        hazard = model.hazards(inputs, btyd).reshape(count, longest)
        now = _select(btyd, slice(None, None, longest))
        orders_per_purchase_day = self.learner.orders_per_purchase_day()
        result = []
        for horizon in horizons_days:
            steps, fractions = self._chain(horizon)
            per_step = 1.0 - (1.0 - hazard[:, :steps]) ** fractions
            propensity = 1.0 - np.prod(1.0 - per_step, axis=1)
            # E[purchases] = P(any) x E[purchases | any]: the chain says whether the customer buys
            # (the learned, calibrated part), the prior how many purchase days follow a first one.
            given_any = purchases_given_any(model.prior, now, horizon)
            result.append((propensity, propensity * given_any * orders_per_purchase_day))
        return result

    def forecast(self, state: CustomerState, t_ms: int, horizon_days: float) -> HorizonForecast:
        """Return P(purchase in (t, t + horizon]) and expected purchases of one customer (reads the state only)."""
        propensity, expected = self.horizon_forecasts(silent_path(state)[None, :], np.array([float(t_ms)]),
                                                      horizon_days)
        return HorizonForecast(horizon_days, float(propensity[0]), float(expected[0]))


_LAST_TOUCH = PATH_FIELDS.index("last_touch_ms")
_PURCHASE_COUNT = PATH_FIELDS.index("purchase_count")
_MONETARY_TOTAL = PATH_FIELDS.index("monetary_total")


def _select(btyd: BtydInputs, mask: np.ndarray | slice) -> BtydInputs:
    return BtydInputs(btyd.repeats[mask], btyd.last_purchase_age[mask], btyd.age[mask])


def purchases_given_any(prior: BtydPrior, btyd: BtydInputs, horizon_days: float) -> np.ndarray:
    """Return the prior's expected purchase days in the horizon among customers who buy at least once in it.

    A silent chain of steps can say whether a customer buys, not how often: a customer who buys
    again goes on buying at their own rate. The BTYD prior knows the count's distribution; its
    E[N] / P(N >= 1) is at least one.

    >>> from services.scoring.btyd import BtydPrior
    >>> btyd = BtydInputs(np.array([0.0, 6.0]), np.array([0.0, 80.0]), np.array([30.0, 90.0]))
    >>> [round(float(n), 2) for n in purchases_given_any(BtydPrior(14.0), btyd, 365.0)]
    [2.28, 9.78]
    """
    p_any = prior.p_any(btyd, horizon_days)
    expected = prior.expected(btyd, horizon_days)
    return np.maximum(1.0, np.divide(expected, p_any, out=np.ones_like(expected), where=p_any > 1e-9))


def event_facts(touch: Touchpoint) -> dict[str, float]:
    """Return facts of the scored touchpoint itself that rules read next to the features.

    >>> event_facts(Touchpoint("m", 0, 0, is_complaint=True, rating=2, sentiment=-0.7))
    {'is_complaint': 1.0, 'feedback_rating': 2.0, 'message_sentiment': -0.7}
    """
    facts = {"is_complaint": float(touch.is_complaint)}
    if touch.rating is not None:
        facts["feedback_rating"] = float(touch.rating)
    if touch.sentiment is not None:
        # This event's own message, so a rule can react to it and not to an older one's.
        facts["message_sentiment"] = touch.sentiment
    return facts


def rfm_totals(state: CustomerState) -> dict[str, float]:
    """Return the raw frequency and monetary totals shown next to the model features."""
    return {"purchase_count": float(state.purchase_count), "monetary_total": state.monetary_total}


def score_update_record(customer_id: str, point: ScoringPoint, scored: Scored) -> dict[str, Any]:
    """Return the ScoreUpdate record of `point` scored as `scored`.

    Consent and time zone are the customer's as of the point (the latest stated on any event
    or identify call), so a crossing check or an event without them carries them too.
    """
    touch = point.touch
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
        "consent": point.consent or [],
        "channel": None if touch.event_type == RESCORE else touch.channel,
        "time_zone": point.time_zone,
    }


def rescore_touchpoint(customer_id: str, t_ms: int) -> Touchpoint:
    """Return the stand-in touchpoint a crossing check's ScoreUpdate is built from (consent comes from the state)."""
    return Touchpoint(f"rescore:{customer_id}:{t_ms}", t_ms, t_ms, event_type=RESCORE)
