"""Rule files: the shipped sample parses and fits the JSON Schema; bad files name the rule and field."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from services.triggers.conditions import holds, parse_condition
from services.triggers.rules import RuleError, ScoreCrossing, parse_rules
from services.triggers.settings import DEFAULT_RULES_FILE

SCHEMA = json.loads((Path(__file__).resolve().parents[3] / "schemas" / "rules.schema.json").read_text())

VALID = """
rules:
  - id: churn-risk-high
    when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.6}
    action: {endpoint: marketing, template: {customer: "${customer_id}"}}
    cooldown_hours: 24
    holdout_percent: 10
"""


def test_shipped_sample_fits_the_json_schema() -> None:
    jsonschema.validate(yaml.safe_load(DEFAULT_RULES_FILE.read_text()), SCHEMA)


def test_schema_and_parser_agree_on_the_legacy_crossing_form() -> None:
    jsonschema.validate(yaml.safe_load(VALID), SCHEMA)
    (rule,) = parse_rules(VALID)
    assert (rule.id, rule.when, rule.cooldown_ms) == (
        "churn-risk-high", ScoreCrossing("churn_risk", 0.7, 0.6), 24 * 3_600_000)


def test_defaults_apply_when_optional_fields_are_absent() -> None:
    (rule,) = parse_rules("rules: [{id: r1, when: {score: churn_risk, crosses_above: 0.8, rearm_below: 0.5},"
                          " action: {endpoint: crm}}]")
    assert (rule.cooldown_hours, rule.holdout_percent, rule.action.template) == (0.0, 0.0, {})


@pytest.mark.parametrize(
    ("replace", "by", "message"),
    [
        ("score: churn_risk", "score: lifetime_value", "rule 'churn-risk-high': field 'when.score'"),
        ("rearm_below: 0.6", "rearm_below: 0.9", "field 'when.rearm_below': 0.9 is above crosses_above"),
        ("crosses_above: 0.7", "crosses_above: high", "field 'when.crosses_above': must be a number"),
        ("crosses_above: 0.7, ", "", "rule 'churn-risk-high': field 'when': field 'crosses_above' is missing"),
        ("holdout_percent: 10", "holdout_percent: 101", "field 'holdout_percent': must be between 0 and 100"),
        ("holdout_percent: 10", "holdout_percent: yes", "field 'holdout_percent': must be a number"),
        ("cooldown_hours: 24", "cooldown_hour: 24", "rule 'churn-risk-high': unknown field(s) cooldown_hour"),
        ("${customer_id}", "${email}", "field 'action.template': unknown placeholder(s) email"),
        ("${customer_id}", "${customer_id", "field 'action.template': malformed placeholder"),
        ("endpoint: marketing, ", "", "field 'action': field 'endpoint' is missing"),
        ("id: churn-risk-high", "id: Churn Risk", "rule #1: field 'id': must match"),
    ],
)
def test_bad_rule_is_refused_naming_rule_and_field(replace: str, by: str, message: str) -> None:
    assert replace in VALID
    with pytest.raises(RuleError) as raised:
        parse_rules(VALID.replace(replace, by), "rules.yaml")
    assert message in str(raised.value)
    assert str(raised.value).startswith("rules.yaml: ")


def test_template_values_that_are_not_json_are_refused() -> None:
    with pytest.raises(RuleError, match=r"date value .* is not JSON"):
        parse_rules(VALID.replace('{customer: "${customer_id}"}', "{since: 2024-01-01}"))


def test_duplicate_rule_ids_are_refused() -> None:
    twice = VALID + VALID.split("rules:\n", 1)[1]
    with pytest.raises(RuleError, match="rule 'churn-risk-high': id is used twice"):
        parse_rules(twice)


@pytest.mark.parametrize("text", ["", "rules: 3", "- a\n- b", "rules: [unclosed"])
def test_files_without_a_rules_list_are_refused(text: str) -> None:
    with pytest.raises(RuleError, match=r"^rules: "):
        parse_rules(text)


def test_yaml_tags_that_build_python_objects_are_refused() -> None:
    with pytest.raises(RuleError, match="not valid YAML"):
        parse_rules("rules: !!python/object/apply:os.system ['true']")


@pytest.mark.parametrize("sent", ["Order Completed", "order_completed", "ORDER-COMPLETED", " order  completed "])
def test_event_names_match_in_any_spelling_the_sdks_use(sent: str) -> None:
    condition = parse_condition({"field": "event.name", "in": ["Order Completed", "Purchase"]})
    assert holds(condition, {"event.name": sent})
    assert not holds(condition, {"event.name": "Order Completed Twice"})
    assert holds(parse_condition({"field": "event.name", "ne": "order completed"}), {"event.name": "Birthday"})
