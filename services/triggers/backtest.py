"""`touchstream rules backtest`: replay a score history through a rule file and count what it would have done.

The same engine as the live service (`evaluate_scores`, `fire_due_timers`), with rule states, caps and
silence timers in memory and nothing sent: scores in event-time order, quiet hours read at each
score's event time (the moment a live worker would have decided), silence timers firing once a later
score's event time passes their deadline. Scores before the window warm the rule states up (arming,
cooldowns) without being counted. Pure: the caller reads the history.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from services.triggers.crossing import (
    ActionDecided,
    CrossingState,
    DecisionContext,
    Outcome,
    StateKey,
    evaluate_scores,
    fire_due_timers,
)
from services.triggers.events import ScoreUpdated
from services.triggers.rules import RuleSet

BUCKETS = ("day", "week")


def period_of(epoch_ms: int, bucket: str) -> str:
    """Return the UTC day (`2026-03-02`) or ISO week (`2026-W10`) an instant falls in.

    >>> period_of(1_772_452_800_000, "day"), period_of(1_772_452_800_000, "week")
    ('2026-03-02', '2026-W10')
    """
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
    if bucket == "week":
        year, week, _ = moment.isocalendar()
        return f"{year}-W{week:02d}"
    return moment.date().isoformat()


@dataclass
class RuleOutcomes:
    """What one rule would have done inside the window."""

    rule_id: str
    fired: int = 0
    customers: set[str] = field(default_factory=set)
    fired_by_period: Counter[str] = field(default_factory=Counter)
    held_out: int = 0
    # Fired, but delivery would have waited for the end of the customer's quiet hours.
    held_for_quiet_hours: int = 0
    # Stopped, by reason: cooldown, frequency_cap, quiet_hours (mode drop), consent.
    stopped: Counter[str] = field(default_factory=Counter)

    def count(self, decided: ActionDecided, bucket: str) -> None:
        if decided.outcome is Outcome.FIRED:
            self.fired += 1
            self.customers.add(decided.score.customer_id)
            self.fired_by_period[period_of(decided.score.event_time_ms, bucket)] += 1
            if decided.reason == "quiet_hours_hold":
                self.held_for_quiet_hours += 1
        elif decided.outcome is Outcome.HELD_OUT:
            self.held_out += 1
        else:
            self.stopped[decided.reason or "unspecified"] += 1

    def to_json(self) -> dict[str, Any]:
        return {"rule_id": self.rule_id, "fired": self.fired, "customers": len(self.customers),
                "fired_by_period": dict(sorted(self.fired_by_period.items())), "held_out": self.held_out,
                "held_for_quiet_hours": self.held_for_quiet_hours,
                "stopped": {reason: self.stopped[reason] for reason in sorted(self.stopped)}}


@dataclass
class BacktestReport:
    """The per-rule outcomes and what the replay covered."""

    bucket: str
    from_ms: int | None
    to_ms: int | None
    scores_replayed: int = 0
    scores_in_window: int = 0
    customers_in_window: set[str] = field(default_factory=set)
    first_event_ms: int | None = None
    last_event_ms: int | None = None
    rules: dict[str, RuleOutcomes] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return the report as the JSON `--json` prints (the console's rules page reads this shape)."""
        return {
            "bucket": self.bucket,
            "window": {"from": _iso(self.from_ms), "to": _iso(self.to_ms)},
            "scores_replayed": self.scores_replayed,
            "scores_in_window": self.scores_in_window,
            "customers_in_window": len(self.customers_in_window),
            "first_event": _iso(self.first_event_ms),
            "last_event": _iso(self.last_event_ms),
            "rules": [outcomes.to_json() for outcomes in self.rules.values()],
        }


def _iso(epoch_ms: int | None) -> str | None:
    return None if epoch_ms is None else datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat()


def backtest(rule_set: RuleSet, scores: Iterable[ScoreUpdated], from_ms: int | None = None,
             to_ms: int | None = None, bucket: str = "day") -> BacktestReport:
    """Replay `scores` through `rule_set`; count each rule's decisions about events in [from_ms, to_ms).

    >>> from services.triggers.rules import parse_rule_file
    >>> rules = parse_rule_file("rules: [{id: r, when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.5}, "
    ...                         "action: {endpoint: e}, cooldown_hours: 24}]")
    >>> def s(risk, day): return ScoreUpdated("c", f"m{day}", day * 86_400_000, 0, {"churn_risk": risk}, "", "",
    ...                                       (), "v")
    >>> report = backtest(rules, [s(0.8, 0), s(0.4, 0.5), s(0.9, 0.6), s(0.4, 3), s(0.9, 4)])
    >>> outcome = report.to_json()["rules"][0]
    >>> outcome["fired"], outcome["stopped"], outcome["fired_by_period"]
    (2, {'cooldown': 1}, {'1970-01-01': 1, '1970-01-05': 1})
    """
    if bucket not in BUCKETS:
        raise ValueError(f"bucket must be one of {', '.join(BUCKETS)}")
    rules = rule_set.rules
    rules_by_id = {rule.id: rule for rule in rules}
    report = BacktestReport(bucket, from_ms, to_ms, rules={rule.id: RuleOutcomes(rule.id) for rule in rules})
    states: dict[StateKey, CrossingState] = {}
    # Silence deadlines, soonest first; an entry whose state moved on since is skipped when popped.
    deadlines: list[tuple[int, StateKey]] = []
    context = DecisionContext(rule_set.policy)

    def counted(decisions: list[ActionDecided], changed: dict[StateKey, CrossingState]) -> None:
        states.update(changed)
        for key, state in changed.items():
            if state.timer_due_ms:
                heapq.heappush(deadlines, (state.timer_due_ms, key))
        for decided in decisions:
            if _inside(decided.score.event_time_ms, from_ms, to_ms):
                report.rules[decided.rule.id].count(decided, bucket)

    def fire_timers_due_by(watermark_ms: int) -> None:
        due: list[StateKey] = []
        while deadlines and deadlines[0][0] <= watermark_ms:
            due_ms, key = heapq.heappop(deadlines)
            if states.get(key, CrossingState()).timer_due_ms == due_ms:
                due.append(key)
        if due:
            context.now_ms = watermark_ms
            counted(*fire_due_timers(rules_by_id, due, states, watermark_ms, context))

    for score in sorted(scores, key=lambda s: s.event_time_ms):
        if to_ms is not None and score.event_time_ms >= to_ms:
            break
        fire_timers_due_by(score.event_time_ms)
        report.scores_replayed += 1
        if _inside(score.event_time_ms, from_ms, to_ms):
            report.scores_in_window += 1
            report.customers_in_window.add(score.customer_id)
        if report.first_event_ms is None:
            report.first_event_ms = score.event_time_ms
        report.last_event_ms = score.event_time_ms
        # Quiet hours as a live worker deciding on this score would have met them.
        context.now_ms = score.event_time_ms
        decisions, changed = evaluate_scores(rules, [score], states, context)
        counted(decisions, changed)
    end_ms = to_ms if to_ms is not None else report.last_event_ms
    if end_ms is not None:
        fire_timers_due_by(end_ms - 1 if to_ms is not None else end_ms)
    return report


_REQUIRED_NUMBERS = ("event_time_ms", "churn_risk", "purchase_propensity")


def score_from_json(data: Any) -> ScoreUpdated:
    """Read one line of a score history file (a ScoreUpdate record as JSON, as `--save-scores` writes it).

    Only the ids, the event time and the two scores are required; the rest defaults as in the schema.

    >>> score_from_json({"customer_id": "c", "message_id": "m", "event_time_ms": 5, "churn_risk": 0.2,
    ...                  "purchase_propensity": 0.8}).scores
    {'churn_risk': 0.2, 'purchase_propensity': 0.8}
    >>> score_from_json({"customer_id": "c", "message_id": "m", "event_time_ms": "today"})
    Traceback (most recent call last):
    ...
    ValueError: event_time_ms: must be a number, got 'today'
    """
    if not isinstance(data, dict):
        raise ValueError("(line): must be a JSON object (a ScoreUpdate record)")
    for key in ("customer_id", "message_id"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ValueError(f"{key}: must be a non-empty string")
    for key in _REQUIRED_NUMBERS:
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key}: must be a number, got {value!r}")
    record = {"received_at_ms": data["event_time_ms"], "segment": "", "stage": "", "model_version": "", **data}
    try:
        score = ScoreUpdated.from_record(record)
    except (TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"(record): {exc}") from None
    return replace(score, event_time_ms=int(score.event_time_ms))


def _inside(epoch_ms: int, from_ms: int | None, to_ms: int | None) -> bool:
    return (from_ms is None or epoch_ms >= from_ms) and (to_ms is None or epoch_ms < to_ms)


def report_text(report: BacktestReport, rules_file: str) -> str:
    """Return the report as the table `touchstream rules backtest` prints."""
    data = report.to_json()
    window = f"{data['window']['from'] or 'the start'} .. {data['window']['to'] or 'the end'}"
    lines = [f"backtest of {rules_file}: {report.scores_replayed:,} scores replayed, {report.scores_in_window:,} of "
             f"{len(report.customers_in_window):,} customers in the window ({window}); nothing was sent", ""]
    reasons = ["holdout", "cooldown", "frequency_cap", "quiet_hours", "consent"]
    header = f"{'rule':32s} {'fired':>7s} {'customers':>9s} " + " ".join(f"{r:>13s}" for r in reasons)
    lines.append(header)
    for rule in data["rules"]:
        stopped = {"holdout": rule["held_out"], **rule["stopped"]}
        lines.append(f"{rule['rule_id'][:32]:32s} {rule['fired']:7,d} {rule['customers']:9,d} "
                     + " ".join(f"{stopped.get(r, 0):13,d}" for r in reasons))
    lines.append("")
    lines.append(f"fired per {report.bucket} (UTC):")
    for rule in data["rules"]:
        periods = ", ".join(f"{period} {count}" for period, count in rule["fired_by_period"].items()) or "none"
        held = f" ({rule['held_for_quiet_hours']} held until quiet hours ended)" if rule["held_for_quiet_hours"] else ""
        lines.append(f"  {rule['rule_id']}: {periods}{held}")
    return "\n".join(lines)
