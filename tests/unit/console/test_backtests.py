"""The rules page reads what `touchstream rules backtest --json` prints: the two stay in step."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.console.backtests import BacktestReportError, BacktestResult, parse_backtest_report
from services.console.charts import backtest_fired, backtest_totals
from services.triggers.backtest import backtest
from services.triggers.events import ScoreUpdated
from services.triggers.rules import parse_rule_file

RULES = parse_rule_file("""
rules:
  - {id: high, when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.5}, action: {endpoint: e},
     cooldown_hours: 48}
  - {id: low, when: {score: churn_risk, crosses_above: 0.3, rearm_below: 0.2}, action: {endpoint: e},
     holdout_percent: 50}
""")
DAY_MS = 86_400_000


def a_report(bucket: str) -> dict[str, Any]:
    scores = [ScoreUpdated(f"c{c}", f"m{c}-{d}", 1_767_225_600_000 + d * DAY_MS // 2, 0,
                           {"churn_risk": risk}, "", "", (), "v")
              for c in range(20) for d, risk in enumerate((0.1, 0.8, 0.4, 0.9, 0.1, 0.95))]
    # As the CLI prints it: the report plus where it came from.
    return {"rules_file": "rules.yaml", "source": "a file", "unreadable_records": 0,
            **backtest(RULES, scores, bucket=bucket).to_json()}


@pytest.mark.parametrize("bucket", ["day", "week"])
def test_what_the_backtest_prints_is_what_the_rules_page_charts(bucket: str) -> None:
    printed = a_report(bucket)
    result = parse_backtest_report(json.loads(json.dumps(printed)), received_at_ms=5)
    assert BacktestResult.from_json(result.to_json()) == result  # kept in Redis and read back whole
    fired = backtest_fired(result)
    for line, rule in zip(fired["series"], printed["rules"], strict=True):
        assert line["name"] == rule["rule_id"]
        assert dict(zip(fired["periods"], line["values"], strict=True)) == {
            p: rule["fired_by_period"].get(p, 0) for p in fired["periods"]}
        assert sum(line["values"]) == rule["fired"] > 0
    totals = {part["name"]: part["values"] for part in backtest_totals(result)["series"]}
    assert totals["fired"] == [rule["fired"] for rule in printed["rules"]]
    assert totals["held out"] == [rule["held_out"] for rule in printed["rules"]]
    assert totals["stopped: cooldown"] == [rule["stopped"].get("cooldown", 0) for rule in printed["rules"]]


@pytest.mark.parametrize(("change", "field"), [
    (lambda r: r.pop("window"), "window"),
    (lambda r: r.update(rules={}), "rules"),
    (lambda r: r["rules"][1].update(rule_id=""), "rules[1].rule_id"),
    (lambda r: r["rules"][0].update(held_out=True), "rules[0].held_out"),
    (lambda r: r["rules"][0].update(stopped={"cooldown": 1.5}), "rules[0].stopped.cooldown"),
    (lambda r: r["rules"][0]["fired_by_period"].update({"1997-13": 1}), "rules[0].fired_by_period.1997-13"),
    (lambda r: r["rules"].append(dict(r["rules"][0])), "rules"),
    (lambda r: r.update(scores_in_window=-3), "scores_in_window"),
    (lambda r: r.update(rules_file="x" * 501), "rules_file"),
])
def test_a_report_the_page_cannot_show_is_refused_naming_the_field(change: Any, field: str) -> None:
    report = a_report("day")
    change(report)
    with pytest.raises(BacktestReportError) as refused:
        parse_backtest_report(report, 0)
    assert refused.value.field == field
