"""A rule backtest's report (`touchstream rules backtest --json`) as the rules page keeps and shows it. Pure.

The console never runs a backtest itself (it would have to read the whole `scores` topic): the report is
sent to `PUT /v1/rules/backtest` (`touchstream rules backtest --console URL` does that), checked here field
by field, and the latest one is kept in the read model. Anything it does not understand is refused with
the field and the reason, never stored half-read.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

BUCKETS = ("day", "week")
MAX_RULES = 500
MAX_PERIODS = 3_000
MAX_REASONS = 50
MAX_TEXT = 500
_PERIOD = {"day": re.compile(r"\d{4}-\d{2}-\d{2}"), "week": re.compile(r"\d{4}-W\d{2}")}


class BacktestReportError(ValueError):
    """The report is not one the rules page can show: `field` says where, `reason` why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class BacktestRule:
    """What one rule would have done over the backtest's window."""

    rule_id: str
    fired: int
    customers: int
    fired_by_period: dict[str, int]
    held_out: int
    held_for_quiet_hours: int
    stopped: dict[str, int]


@dataclass(frozen=True)
class BacktestResult:
    """The latest backtest report sent to the console, and when it arrived."""

    received_at_ms: int
    bucket: str
    window_from: str | None
    window_to: str | None
    scores_replayed: int
    scores_in_window: int
    customers_in_window: int
    rules: tuple[BacktestRule, ...]
    rules_file: str | None = None
    source: str | None = None
    first_event: str | None = None
    last_event: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> BacktestResult:
        data = json.loads(text)
        return cls(**{**data, "rules": tuple(BacktestRule(**rule) for rule in data["rules"])})

    def periods(self) -> list[str]:
        """Every period any rule fired in, in order (ISO days and ISO weeks sort as text)."""
        return sorted({period for rule in self.rules for period in rule.fired_by_period})


def _count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BacktestReportError(field, "must be a whole number")
    if value < 0:
        raise BacktestReportError(field, "must not be negative")
    return value


def _text(value: Any, field: str, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise BacktestReportError(field, "must be a non-empty string" + (" or null" if optional else ""))
    if len(value) > MAX_TEXT:
        raise BacktestReportError(field, f"longer than {MAX_TEXT} characters")
    return value


def _counts(value: Any, field: str, limit: int, key_pattern: re.Pattern[str] | None = None,
            key_hint: str = "") -> dict[str, int]:
    if not isinstance(value, dict):
        raise BacktestReportError(field, "must be an object of counts")
    if len(value) > limit:
        raise BacktestReportError(field, f"more than {limit} entries")
    counts = {}
    for key, n in value.items():
        if key_pattern is not None and not key_pattern.fullmatch(key):
            raise BacktestReportError(f"{field}.{key}", f"is not a {key_hint}")
        counts[str(_text(key, f"{field} key", optional=False))] = _count(n, f"{field}.{key}")
    return counts


def parse_backtest_report(data: Any, received_at_ms: int) -> BacktestResult:
    """Check a backtest report (the JSON `touchstream rules backtest --json` prints) and keep what the page shows.

    >>> r = parse_backtest_report({"bucket": "week", "window": {"from": None, "to": None}, "scores_replayed": 9,
    ...     "scores_in_window": 9, "customers_in_window": 3, "rules": [{"rule_id": "r", "fired": 2, "customers": 2,
    ...     "fired_by_period": {"2026-W36": 2}, "held_out": 1, "held_for_quiet_hours": 0, "stopped": {}}]}, 5)
    >>> r.rules[0].fired_by_period, r.periods()
    ({'2026-W36': 2}, ['2026-W36'])
    >>> parse_backtest_report({"bucket": "month"}, 5)
    Traceback (most recent call last):
    ...
    services.console.backtests.BacktestReportError: bucket: must be one of day, week
    """
    if not isinstance(data, dict):
        raise BacktestReportError("report", "must be a JSON object (the output of `touchstream rules backtest --json`)")
    bucket = data.get("bucket")
    if bucket not in BUCKETS:
        raise BacktestReportError("bucket", f"must be one of {', '.join(BUCKETS)}")
    window = data.get("window")
    if not isinstance(window, dict):
        raise BacktestReportError("window", "must be an object with `from` and `to`")
    rules = data.get("rules")
    if not isinstance(rules, list):
        raise BacktestReportError("rules", "must be a list")
    if len(rules) > MAX_RULES:
        raise BacktestReportError("rules", f"more than {MAX_RULES} rules")
    parsed = []
    for n, rule in enumerate(rules):
        where = f"rules[{n}]"
        if not isinstance(rule, dict):
            raise BacktestReportError(where, "must be an object")
        parsed.append(BacktestRule(
            rule_id=str(_text(rule.get("rule_id"), f"{where}.rule_id", optional=False)),
            fired=_count(rule.get("fired"), f"{where}.fired"),
            customers=_count(rule.get("customers", 0), f"{where}.customers"),
            fired_by_period=_counts(rule.get("fired_by_period"), f"{where}.fired_by_period", MAX_PERIODS,
                                    _PERIOD[bucket], "day (2026-03-02)" if bucket == "day" else "week (2026-W10)"),
            held_out=_count(rule.get("held_out", 0), f"{where}.held_out"),
            held_for_quiet_hours=_count(rule.get("held_for_quiet_hours", 0), f"{where}.held_for_quiet_hours"),
            stopped=_counts(rule.get("stopped", {}), f"{where}.stopped", MAX_REASONS)))
    if len({rule.rule_id for rule in parsed}) != len(parsed):
        raise BacktestReportError("rules", "a rule_id appears twice")
    return BacktestResult(
        received_at_ms=received_at_ms, bucket=bucket,
        window_from=_text(window.get("from"), "window.from"), window_to=_text(window.get("to"), "window.to"),
        scores_replayed=_count(data.get("scores_replayed", 0), "scores_replayed"),
        scores_in_window=_count(data.get("scores_in_window", 0), "scores_in_window"),
        customers_in_window=_count(data.get("customers_in_window", 0), "customers_in_window"),
        rules=tuple(parsed), rules_file=_text(data.get("rules_file"), "rules_file"),
        source=_text(data.get("source"), "source"), first_event=_text(data.get("first_event"), "first_event"),
        last_event=_text(data.get("last_event"), "last_event"))
