"""`touchstream rules validate FILE`: line-numbered errors, non-zero exit on any."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.triggers.rule_check import rule_file_problems
from services.triggers.settings import DEFAULT_RULES_FILE
from touchstream_cli.cli import main

BAD = """\
policy:
  frequency_cap_per_day: 2
rules:
  - id: fine
    when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.6}
    action: {endpoint: marketing}
  - id: bad-condition
    when:
      event:
        all:
          - {field: features.feedback_rating, le: "two"}
    action: {endpoint: marketing}
  - id: typo
    when: {changes: segment}
    action: {endpoint: marketing}
    cooldown_hour: 3
"""


def test_validate_prints_each_error_with_its_line_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(BAD)
    assert main(["rules", "validate", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{path}:11:51: rules[1].when: 'two' is not of type 'number' (at event.all.0.le)",
        f"{path}:13:5: rules[2]: Additional properties are not allowed ('cooldown_hour' was unexpected)",
    ]


def test_validate_accepts_the_shipped_rules(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "validate", str(DEFAULT_RULES_FILE)]) == 0
    assert capsys.readouterr().out.strip() == f"{DEFAULT_RULES_FILE}: ok (5 rules)"


def test_one_bad_file_among_good_ones_fails_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.yaml"
    assert main(["rules", "validate", str(DEFAULT_RULES_FILE), str(missing)]) == 1
    assert f"{missing}: cannot read" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Checks the schema cannot express come from the parser, still with a line.
        ("rules:\n  - id: r\n    when: {score: churn_risk, crosses_above: 0.5, rearm_below: 0.6}\n"
         "    action: {endpoint: e}\n", "f.yaml:3:64: rule 'r': field 'when.rearm_below': 0.6 is above"),
        ("rules:\n  - id: r\n    when: {changes: stage}\n    action: {endpoint: e, template: {a: '${email}'}}\n",
         "f.yaml:4:37: rule 'r': field 'action.template': unknown placeholder(s) email"),
        ("rules:\n  - {id: r, when: {changes: stage}, action: {endpoint: e}}\n"
         "  - {id: r, when: {changes: segment}, action: {endpoint: e}}\n", "f.yaml:3:5: rule 'r': id is used twice"),
        ("rules:\n  - id: r\n    when: {changes: stage}\n    quiet_hours: {start: 21:00, end: '08:00'}\n"
         "    action: {endpoint: e}\n", "f.yaml:4:26: rules[0].quiet_hours.start: 1260 is not of type 'string'"),
        ("rules: [\n", "f.yaml:2:1: not valid YAML"),
        ("rules:\n  - id: r\n    when: {silence: {start: {field: segment, eq: x}}}\n    action: {endpoint: e}\n",
         "f.yaml:3:21: rules[0].when: 'hours' is a required property (at silence)"),
    ],
)
def test_problems_point_at_the_line(text: str, expected: str) -> None:
    (problem,) = rule_file_problems(text, "f.yaml")
    assert problem.startswith(expected), problem


NAMES = """\
rules:
  - id: known-names
    when:
      event:
        any:
          - {field: event.name, eq: Order Completed}
          - {field: event.name, in: [complaint_submitted, Birthday]}
    action: {endpoint: marketing}
  - id: typo
    when:
      silence:
        start: {field: event.name, eq: Complaint Submited}
        stop: {field: event.name, in: [Complaint Answered, Ticket Escalated]}
        hours: 24
    action: {endpoint: marketing, template: {name: Not An Event}}
"""


def test_every_event_name_a_rule_compares_must_be_known_each_unknown_one_is_an_error_with_its_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(NAMES)
    assert main(["rules", "validate", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": event name")[0] for line in lines] == [
        f"{path}:12:40: rule 'typo'", f"{path}:13:60: rule 'typo'"]
    assert "'Complaint Submited' is not in the event semantics table" in lines[0]
    assert "'Ticket Escalated'" in lines[1]


def test_a_semantics_file_makes_a_name_known(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules, events = tmp_path / "rules.yaml", tmp_path / "events.yaml"
    rules.write_text(NAMES)
    events.write_text("events:\n  Complaint Submited: complaint\n  Ticket Escalated: known\n")
    assert main(["rules", "validate", str(rules), "--events", str(events)]) == 0
    assert capsys.readouterr().out.strip() == f"{rules}: ok (2 rules)"


def test_the_semantics_file_setting_is_read_and_its_problems_reported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    rules, events = tmp_path / "rules.yaml", tmp_path / "events.yaml"
    rules.write_text(NAMES)
    events.write_text("events:\n  Complaint Submited: complaint\n  Ticket Escalated: known\n")
    monkeypatch.setenv("TOUCHSTREAM_EVENT_SEMANTICS_FILE", str(events))
    assert main(["rules", "validate", str(rules)]) == 0
    events.write_text("events:\n  Ticket Escalated: escalation\n")
    assert main(["rules", "validate", str(rules)]) == 1
    assert capsys.readouterr().err.startswith(f"{events}:2:21: events.Ticket Escalated: unknown meaning")
