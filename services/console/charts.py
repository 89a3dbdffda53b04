"""What each chart of the pages plots, as plain data: pure, no I/O.

The pages put each of these dicts on its chart's element (`data-chart`, JSON) and render the same
numbers as a table next to it; `static/charts.js` turns them into Apache ECharts options. The
pipeline's minute samples (`PipelineSample`) are the ring buffer the read model keeps for the
overview's last hour.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any

from touchstream.eventtime import DAY_MS

if TYPE_CHECKING:
    from services.console.backtests import BacktestResult
    from services.console.entries import ValueTier

HISTORY_MINUTES = 60
QUANTILES = (0.5, 0.95, 0.99)
QUALITY_METRICS = (("roc_auc", "ROC AUC"), ("log_loss", "log-loss"), ("brier", "Brier"),
                   ("calibration_error", "calibration error"))
NEW_CUSTOMER = "new customer"
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
# The rules page charts each rule's actions over this many days of event time, up to the newest seen.
ACTIVITY_DAYS = 90
ACTIVITY_OUTCOMES = (("fired", "fired"), ("held_out", "held out"), ("suppressed", "suppressed"),
                     ("backfill", "backfill (recorded, not sent)"))


@dataclass(frozen=True)
class PipelineSample:
    """The pipeline as the console saw it in one minute (epoch minutes): events/s by stage, latency quantiles
    (seconds) by what the latency runs until, and the model's quality."""

    minute: int
    rates: dict[str, float | None] = field(default_factory=dict)
    latency: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> {"0.5": seconds, ...}
    quality: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> PipelineSample:
        """
        >>> s = PipelineSample(5, {"ingest": 2.5}, {"touchpoint": {"0.5": 0.1}}, {"roc_auc": 0.8})
        >>> PipelineSample.from_json(s.to_json()) == s
        True
        """
        data = json.loads(text)
        return cls(int(data["minute"]), dict(data.get("rates", {})), dict(data.get("latency", {})),
                   dict(data.get("quality", {})))


def recent_samples(samples: Sequence[PipelineSample], now_minute: int, minutes: int = HISTORY_MINUTES
                   ) -> list[PipelineSample]:
    """The samples of the last `minutes` minutes up to `now_minute`, oldest first.

    >>> [s.minute for s in recent_samples([PipelineSample(m) for m in (3, 1, 100, 98, 40, 41)], 100)]
    [41, 98, 100]
    """
    return sorted((s for s in samples if now_minute - minutes < s.minute <= now_minute), key=lambda s: s.minute)


def _lines(title: str, unit: str, series: dict[str, list[list[float]]]) -> dict[str, Any]:
    return {"kind": "lines", "title": title, "unit": unit,
            "series": [{"name": name, "points": points} for name, points in series.items() if points]}


def rate_lines(samples: Sequence[PipelineSample], stages: Sequence[str]) -> dict[str, Any]:
    """Events/s of each stage, one point a minute (a minute without a rate for a stage leaves a gap).

    >>> rate_lines([PipelineSample(1, {"ingest": 2.0, "scoring": None})], ["ingest", "scoring"])["series"]
    [{'name': 'ingest', 'points': [[60000, 2.0]]}]
    """
    series: dict[str, list[list[float]]] = {stage: [] for stage in stages}
    for sample in samples:
        for stage in stages:
            value = sample.rates.get(stage)
            if value is not None:
                series[stage].append([sample.minute * 60_000, round(value, 2)])
    return _lines("Events per second, by stage", "events/s", series)


def latency_lines(samples: Sequence[PipelineSample], labels: Sequence[str]) -> dict[str, Any]:
    """p50/p95/p99 of each latency (in seconds), one point a minute.

    >>> latency_lines([PipelineSample(2, latency={"webhook": {"0.5": 0.2, "0.99": 0.9}})], ["webhook"])["series"]
    [{'name': 'webhook p50', 'points': [[120000, 0.2]]}, {'name': 'webhook p99', 'points': [[120000, 0.9]]}]
    """
    series: dict[str, list[list[float]]] = {}
    for label in labels:
        for q in QUANTILES:
            series[f"{label} p{round(q * 100)}"] = [
                [s.minute * 60_000, round(s.latency[label][str(q)], 4)] for s in samples
                if str(q) in s.latency.get(label, {})]
    return _lines("End-to-end latency from ingest accepting an event", "s", series)


def quality_lines(samples: Sequence[PipelineSample]) -> dict[str, Any]:
    """Scoring's prequential metrics, one point a minute.

    >>> quality_lines([PipelineSample(1, quality={"roc_auc": 0.75, "brier": None})])["series"]
    [{'name': 'ROC AUC', 'points': [[60000, 0.75]]}]
    """
    series = {name: [[s.minute * 60_000, round(value, 4)] for s in samples
                     if (value := s.quality.get(key)) is not None] for key, name in QUALITY_METRICS}
    return _lines("Model quality (prequential)", "", series)


def segment_heatmap(segments: Mapping[tuple[str, str], int]) -> dict[str, Any]:
    """Customers by segment (rows) and stage (columns).

    >>> segment_heatmap({("loyal", "active"): 3, ("at_risk", "lapsing"): 1})
    {'kind': 'heatmap', 'title': 'Customers by segment and stage', 'rows': ['at_risk', 'loyal'], \
'columns': ['active', 'lapsing'], 'cells': [[1, 0, 1], [0, 1, 3]], 'max': 3}
    """
    rows = sorted({segment for segment, _ in segments})
    columns = sorted({stage for _, stage in segments})
    cells = [[columns.index(stage), rows.index(segment), n] for (segment, stage), n in sorted(segments.items())]
    return {"kind": "heatmap", "title": "Customers by segment and stage", "rows": rows, "columns": columns,
            "cells": cells, "max": max(segments.values(), default=0)}


def _segment_label(value: str) -> str:
    return value.replace("|", " · ") if value else NEW_CUSTOMER


def segment_sankey(flow: Sequence[tuple[str, str, int]]) -> dict[str, Any]:
    """Changes of segment and stage as a Sankey: where customers were (left) and went (right).

    The two sides are separate nodes, so a change back and forth never makes a cycle (a Sankey cannot draw one).

    >>> segment_sankey([("", "loyal|active", 2), ("loyal|active", "at_risk|lapsing", 1)])["links"]
    [{'source': 'from new customer', 'target': 'to loyal · active', 'value': 2}, \
{'source': 'from loyal · active', 'target': 'to at_risk · lapsing', 'value': 1}]
    """
    links = [{"source": f"from {_segment_label(before)}", "target": f"to {_segment_label(after)}", "value": n}
             for before, after, n in flow]
    nodes = list(dict.fromkeys([link["source"] for link in links] + [link["target"] for link in links]))
    return {"kind": "sankey", "title": "Changes of segment and stage, last 30 days", "nodes": nodes, "links": links}


def value_tier_label(tier: int) -> str:
    """A value tier in words (scoring's tiers are the quartiles of the predicted values scored so far).

    >>> [value_tier_label(t) for t in (4, 2, 1, 0)]
    ['tier 4 (top quarter)', 'tier 2', 'tier 1 (bottom quarter)', 'not ranked yet']
    """
    return {4: "tier 4 (top quarter)", 1: "tier 1 (bottom quarter)", 0: "not ranked yet"}.get(tier, f"tier {tier}")


def value_tier_bars(tiers: Sequence[ValueTier]) -> dict[str, Any]:
    """Predicted value per value tier, highest tier first, its customers in the label.

    >>> from services.console.entries import ValueTier
    >>> value_tier_bars([ValueTier(4, 2, 900.0), ValueTier(1, 3, 30.5)])["bars"]
    [{'label': 'tier 4 (top quarter): 2 customers', 'value': 900.0}, \
{'label': 'tier 1 (bottom quarter): 3 customers', 'value': 30.5}]
    """
    return {"kind": "bars", "title": "Predicted value by value tier", "axis": "predicted value",
            "series": "predicted value",
            "bars": [{"label": f"{value_tier_label(t.tier)}: {t.customers} customer{'s' if t.customers != 1 else ''}",
                      "value": round(t.predicted_value, 2)} for t in sorted(tiers, key=lambda t: -t.tier)]}


def dead_letter_bars(rows: Sequence[tuple[str, str, int]]) -> dict[str, Any]:
    """Dead letters by stage and reason, most frequent first.

    >>> dead_letter_bars([("identity", "no usable identifier", 4)])["bars"]
    [{'label': 'identity: no usable identifier', 'value': 4}]
    """
    return {"kind": "bars", "title": "Dead letters by reason", "axis": "records", "series": "dead letters",
            "bars": [{"label": f"{stage}: {reason}", "value": n} for stage, reason, n in rows]}


def uplift_forest(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Each rule with enough data: treated and hold-out conversion, and the uplift with its 95% interval, in
    percentage points (a forest plot); the others are listed as waiting for data.

    >>> f = uplift_forest([{"rule_id": "r", "outcome": {"enough_data": True, "treated_rate": 0.6,
    ...     "holdout_rate": 0.3, "uplift": 0.3, "ci_low": 0.006, "ci_high": 0.594}},
    ...     {"rule_id": "q", "outcome": {"enough_data": False}}])
    >>> f["rules"], f["waiting"]
    ([{'rule': 'r', 'treated': 60.0, 'holdout': 30.0, 'uplift': 30.0, 'low': 0.6, 'high': 59.4}], ['q'])
    """
    rules, waiting = [], []
    for row in rows:
        outcome = row["outcome"]
        if not outcome.get("enough_data"):
            waiting.append(row["rule_id"])
            continue
        rules.append({"rule": row["rule_id"], **{name: round(100 * outcome[key], 2) for name, key in (
            ("treated", "treated_rate"), ("holdout", "holdout_rate"), ("uplift", "uplift"), ("low", "ci_low"),
            ("high", "ci_high"))}})
    return {"kind": "forest", "title": "Uplift by rule (treated minus hold-out conversion, 95% interval)",
            "unit": "pp", "rules": rules, "waiting": waiting}


def score_lines(points: Sequence[tuple[int, float, float]], thresholds: Sequence[tuple[str, float]],
                actions: Sequence[tuple[int, str, str]]) -> dict[str, Any]:
    """Risk and propensity over event time, the rules' thresholds, and when actions came (fired or not).

    >>> c = score_lines([(10, 0.6, 0.4), (0, 0.2, 0.8)], [("r (churn_risk 0.5)", 0.5)], [(10, "fired", "r")])
    >>> c["risk"], c["thresholds"], c["actions"]
    ([[0, 0.2], [10, 0.6]], [{'label': 'r (churn_risk 0.5)', 'value': 0.5}], [{'t': 10, 'outcome': 'fired', \
'rule': 'r'}])
    """
    ordered = sorted(points)
    return {"kind": "scores", "title": "Churn risk and purchase propensity over event time",
            "risk": [[t, risk] for t, risk, _ in ordered], "propensity": [[t, p] for t, _, p in ordered],
            "thresholds": [{"label": label, "value": value} for label, value in thresholds],
            "actions": [{"t": t, "outcome": outcome, "rule": rule} for t, outcome, rule in sorted(actions)]}


def dated(by_day: Mapping[int, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """Per-day counts keyed by their ISO date (UTC) instead of days since 1970, as the JSON API gives them.

    >>> dated({20399: {"fired": 2}})
    {'2025-11-07': {'fired': 2}}
    """
    return {date.fromordinal(_EPOCH_ORDINAL + day).isoformat(): dict(outcomes) for day, outcomes in by_day.items()}


def rule_activity(rule_id: str, by_date: Mapping[str, Mapping[str, int]], last_day: int,
                  days: int = ACTIVITY_DAYS) -> dict[str, Any]:
    """A rule's actions per event-time day (`by_date`: ISO date -> outcome -> actions) over the `days` days up to
    its newest action, at most `last_day` (days since 1970: the newest event time), by outcome, as stacked bars;
    `rows` are the same numbers, one per day with any action (for the table). Up to its newest action, so a
    rule that stopped firing (or history replayed) still shows its last stretch; and every day shown is whole,
    as each customer's tally keeps TALLY_DAYS_KEPT (> `days`) days before its own newest action.

    >>> by_day = {1: {"fired": 2}, 99: {"fired": 1, "suppressed": 3}, 100: {"held_out": 1}}
    >>> a = rule_activity("r", dated(by_day), 100)
    >>> a["series"]
    [{'name': 'fired', 'points': [[8553600000, 1]]}, {'name': 'held out', 'points': [[8640000000, 1]]}, \
{'name': 'suppressed', 'points': [[8553600000, 3]]}]
    >>> a["rows"], a["total"]
    ([[8553600000, 1, 0, 3, 0], [8640000000, 0, 1, 0, 0]], 5)
    >>> b = rule_activity("r", dated(by_day), 400)  # quiet for 300 days: its last stretch is still shown
    >>> b["to_ms"] // DAY_MS, b["total"]
    (100, 5)
    """
    every = {date.fromisoformat(iso).toordinal() - _EPOCH_ORDINAL: outcomes for iso, outcomes in by_date.items()}
    last_day = min([last_day, max((day for day, outcomes in every.items() if day <= last_day and any(
        outcomes.values())), default=last_day)])
    shown = {day: outcomes for day, outcomes in every.items() if last_day - days < day <= last_day}
    series = [{"name": label, "points": [[day * DAY_MS, outcomes[key]] for day, outcomes in sorted(shown.items())
                                         if outcomes.get(key)]} for key, label in ACTIVITY_OUTCOMES]
    rows = [[day * DAY_MS, *(outcomes.get(key, 0) for key, _ in ACTIVITY_OUTCOMES)]
            for day, outcomes in sorted(shown.items()) if any(outcomes.values())]
    return {"kind": "activity", "title": f"{rule_id}: actions per day, the {days} days up to its newest action",
            "rule": rule_id, "from_ms": (last_day - days + 1) * DAY_MS, "to_ms": last_day * DAY_MS,
            "series": [line for line in series if line["points"]], "columns": [label for _, label in ACTIVITY_OUTCOMES],
            "rows": rows, "total": sum(sum(row[1:]) for row in rows)}


def backtest_fired(result: BacktestResult) -> dict[str, Any]:
    """How many actions each rule of a backtest would have fired per period (day or ISO week): one line per rule.

    >>> from services.console.backtests import BacktestResult, BacktestRule
    >>> r = BacktestResult(0, "week", None, None, 9, 9, 3, (BacktestRule("a", 3, 3, {"2026-W36": 1, "2026-W38": 2},
    ...     0, 0, {}), BacktestRule("b", 1, 1, {"2026-W37": 1}, 2, 0, {"cooldown": 4})))
    >>> c = backtest_fired(r)
    >>> c["periods"], c["series"]
    (['2026-W36', '2026-W37', '2026-W38'], [{'name': 'a', 'values': [1, 0, 2]}, {'name': 'b', 'values': [0, 1, 0]}])
    """
    periods = result.periods()
    return {"kind": "periods", "title": f"Would have fired per {result.bucket} (backtest, UTC)",
            "bucket": result.bucket, "periods": periods,
            "series": [{"name": rule.rule_id, "values": [rule.fired_by_period.get(p, 0) for p in periods]}
                       for rule in result.rules]}


def backtest_totals(result: BacktestResult) -> dict[str, Any]:
    """Each rule of a backtest: fired, held out and stopped by reason, as stacked horizontal bars.

    >>> from services.console.backtests import BacktestResult, BacktestRule
    >>> r = BacktestResult(0, "day", None, None, 9, 9, 3, (BacktestRule("a", 3, 3, {}, 1, 0, {"cooldown": 2}),
    ...     BacktestRule("b", 1, 1, {}, 0, 0, {"consent": 1})))
    >>> c = backtest_totals(r)
    >>> c["categories"], c["series"]
    (['a', 'b'], [{'name': 'fired', 'values': [3, 1]}, {'name': 'held out', 'values': [1, 0]}, \
{'name': 'stopped: consent', 'values': [0, 1]}, {'name': 'stopped: cooldown', 'values': [2, 0]}])
    """
    reasons = sorted({reason for rule in result.rules for reason in rule.stopped})
    series = [{"name": "fired", "values": [rule.fired for rule in result.rules]},
              {"name": "held out", "values": [rule.held_out for rule in result.rules]},
              *({"name": f"stopped: {reason}", "values": [rule.stopped.get(reason, 0) for rule in result.rules]}
                for reason in reasons)]
    return {"kind": "stack", "title": "What the backtest's rules would have done", "unit": "actions",
            "categories": [rule.rule_id for rule in result.rules], "series": series}


def line_table(spec: Mapping[str, Any]) -> tuple[list[str], list[tuple[int, list[float | None]]]]:
    """The numbers of a `lines` chart as a table: one row per time (oldest first), one column per line.

    >>> line_table({"series": [{"name": "a", "points": [[1, 2.0], [2, 3.0]]}, {"name": "b", "points": [[2, 4.0]]}]})
    (['a', 'b'], [(1, [2.0, None]), (2, [3.0, 4.0])])
    """
    names = [line["name"] for line in spec["series"]]
    by_time: dict[int, list[float | None]] = {}
    for column, line in enumerate(spec["series"]):
        for t, value in line["points"]:
            by_time.setdefault(int(t), [None] * len(names))[column] = value
    return names, sorted(by_time.items())
