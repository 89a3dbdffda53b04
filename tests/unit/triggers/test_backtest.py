"""`touchstream rules backtest`: a score history through a rule file, counted per rule, nothing sent."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from services.triggers.backtest import backtest
from services.triggers.events import ScoreUpdated
from tests.unit.triggers.factories import a_score, rules_from
from touchstream.eventtime import DAY_MS, HOUR_MS
from touchstream_cli.cli import main

MONDAY_MS = 1_772_409_600_000  # 2026-03-02T00:00Z

RULES = rules_from("""
  - id: risk
    when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.5}
    action: {endpoint: marketing}
    cooldown_hours: 48
  - id: marketing-only
    when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.5}
    consent: marketing
    action: {endpoint: marketing}
    frequency_capped: false
  - id: nights-off
    when: {event: {field: event.name, eq: Order Completed}}
    quiet_hours: {start: "21:00", end: "08:00", mode: drop}
    action: {endpoint: marketing}
  - id: unanswered
    when:
      silence:
        start: {field: event.name, eq: Complaint Submitted}
        stop: {field: event.name, eq: Complaint Answered}
        hours: 24
    action: {endpoint: marketing}
    frequency_capped: false
""", policy="policy: {frequency_cap_per_day: 1}")


def score(customer: str, hours: float, risk: float = 0.1, name: str | None = None, **fields: Any) -> ScoreUpdated:
    return a_score(risk, customer_id=customer, at_ms=MONDAY_MS + round(hours * HOUR_MS), event_name=name, **fields)


def rule_row(report: Any, rule_id: str) -> dict[str, Any]:
    return next(r for r in report.to_json()["rules"] if r["rule_id"] == rule_id)


def test_each_rule_is_counted_with_what_stopped_it() -> None:
    history = [
        score("ann", 10, 0.8),  # risk fires (cap 1 spent); marketing-only: no consent
        score("ann", 11, 0.3), score("ann", 12, 0.9),  # risk again: cooldown; marketing-only: no consent again
        score("bob", 10, 0.8, consent=("marketing",)),  # risk fires, marketing-only fires (not capped)
        score("bob", 23, name="Order Completed"),  # bob's cap was spent by risk (checked before quiet hours)
        score("fay", 23, name="Order Completed"),  # 23:00 UTC: quiet hours, dropped
        score("cat", 12, name="Order Completed"),  # fires
        score("cat", 13, name="Order Completed"),  # the day's cap is spent
        score("dan", 9, name="Complaint Submitted"),  # silence due Tuesday 09:00...
        score("eve", 8, name="Complaint Submitted"), score("eve", 20, name="Complaint Answered"),  # answered
        score("zed", 40),  # ...someone's Tuesday 16:00 score moves time past dan's deadline
    ]
    report = backtest(RULES, history, bucket="day")
    assert rule_row(report, "risk") == {
        "rule_id": "risk", "fired": 2, "customers": 2, "fired_by_period": {"2026-03-02": 2}, "held_out": 0,
        "held_for_quiet_hours": 0, "stopped": {"cooldown": 1}}
    assert rule_row(report, "marketing-only")["fired"] == 1
    assert rule_row(report, "marketing-only")["stopped"] == {"consent": 2}
    assert rule_row(report, "nights-off")["stopped"] == {"frequency_cap": 2, "quiet_hours": 1}
    assert rule_row(report, "unanswered")["fired_by_period"] == {"2026-03-03": 1}
    assert report.scores_replayed == 12 and len(report.customers_in_window) == 7


def test_scores_before_the_window_set_the_rule_states_up_without_being_counted() -> None:
    history = [score("ann", 0, 0.8), score("ann", 24 * 3, 0.9), score("bob", 24 * 3, 0.8)]
    report = backtest(RULES, history, from_ms=MONDAY_MS + DAY_MS)
    # ann crossed on Monday, before the window: Thursday's 0.9 is no new crossing; bob's is.
    assert rule_row(report, "risk")["fired"] == 1 and rule_row(report, "risk")["customers"] == 1
    assert report.scores_in_window == 2 and report.scores_replayed == 3


def test_the_window_end_stops_the_replay_and_fires_the_timers_due_before_it() -> None:
    history = [score("dan", 9, name="Complaint Submitted"), score("zed", 24 * 5, 0.9)]
    report = backtest(RULES, history, to_ms=MONDAY_MS + 2 * DAY_MS)
    assert rule_row(report, "unanswered")["fired"] == 1
    assert rule_row(report, "risk")["fired"] == 0 and report.scores_replayed == 1


def test_weeks_are_iso_weeks() -> None:
    history = [score(f"c{day}", 24 * day + 10, 0.8) for day in range(10)]
    assert rule_row(backtest(RULES, history, bucket="week"), "risk")["fired_by_period"] == {
        "2026-W10": 7, "2026-W11": 3}


def write_scores(path: Path, scores: list[ScoreUpdated]) -> None:
    lines = []
    for item in scores:
        record = asdict(item)
        record.update(record.pop("scores"))
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")


def test_the_command_prints_json_the_console_can_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules, history = tmp_path / "rules.yaml", tmp_path / "scores.jsonl"
    rules.write_text("rules:\n  - {id: risk, when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.5}, "
                     "action: {endpoint: marketing}}\n")
    write_scores(history, [score("ann", 10, 0.8), score("bob", 24 * 8, 0.9), score("cat", 24 * 20, 0.9)])
    assert main(["rules", "backtest", str(rules), "--scores", str(history), "--json", "--from", "2026-03-03",
                 "--to", "2026-03-10", "--by", "week"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["window"] == {"from": "2026-03-03T00:00:00+00:00", "to": "2026-03-11T00:00:00+00:00"}
    assert report["rules"] == [{"rule_id": "risk", "fired": 1, "customers": 1, "fired_by_period": {"2026-W11": 1},
                                "held_out": 0, "held_for_quiet_hours": 0, "stopped": {}}]
    assert (report["scores_replayed"], report["scores_in_window"], report["source"]) == (2, 1, str(history))


def test_the_command_prints_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules, history = tmp_path / "rules.yaml", tmp_path / "scores.jsonl"
    rules.write_text("rules:\n  - {id: risk, when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.5}, "
                     "action: {endpoint: marketing}, holdout_percent: 100}\n")
    write_scores(history, [score("ann", 10, 0.8)])
    assert main(["rules", "backtest", str(rules), "--scores", str(history)]) == 0
    out = capsys.readouterr().out
    assert "nothing was sent" in out
    [row] = [line for line in out.splitlines() if line.startswith("risk ")]
    assert row.split() == ["risk", "0", "0", "1", "0", "0", "0", "0"]


def test_a_bad_score_file_is_refused_naming_each_bad_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules, history = tmp_path / "rules.yaml", tmp_path / "scores.jsonl"
    rules.write_text("rules:\n  - {id: risk, when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.5}, "
                     "action: {endpoint: marketing}}\n")
    write_scores(history, [score("ann", 10, 0.8)])
    history.write_text(history.read_text() + '{"customer_id": "c"\n\n{"customer_id": "c", "message_id": "m"}\n')
    assert main(["rules", "backtest", str(rules), "--scores", str(history)]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert [e.split(": ", 1)[0] for e in errors] == [f"{history}:2", f"{history}:4"]
    assert errors[1].endswith("event_time_ms: must be a number, got None")


def test_a_rule_file_with_problems_is_not_backtested(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {id: r, when: {event: {field: event.name, eq: Oder Completed}}, "
                     "action: {endpoint: e}}\n")
    assert main(["rules", "backtest", str(rules), "--scores", str(tmp_path / "unused.jsonl")]) == 1
    assert "'Oder Completed' is not in the event semantics table" in capsys.readouterr().err


def test_bad_dates_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {id: r, when: {changes: stage}, action: {endpoint: e}}\n")
    assert main(["rules", "backtest", str(rules), "--from", "last tuesday"]) == 2
    assert "--from/--to" in capsys.readouterr().err
