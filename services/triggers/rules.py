"""Retention rules: parse YAML text into frozen dataclasses, refusing anything unclear.

Rules are structured data; nothing in a rule file is ever evaluated as code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from services.triggers.templates import PLACEHOLDERS, template_placeholders

# The ScoreUpdate fields a crossing rule may watch.
SCORE_NAMES = ("churn_risk", "purchase_propensity")
RULE_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class RuleError(ValueError):
    """A rule file that cannot be used; the message names the rule and the field."""


@dataclass(frozen=True)
class ScoreCrossing:
    """Fire when `score` rises to `crosses_above` while armed; re-arm once it falls below `rearm_below`."""

    score: str
    crosses_above: float
    rearm_below: float


@dataclass(frozen=True)
class ActionSpec:
    endpoint: str
    template: Any  # JSON-like: dicts, lists, strings with ${placeholders}, numbers, booleans, null


@dataclass(frozen=True)
class Rule:
    id: str
    when: ScoreCrossing
    action: ActionSpec
    cooldown_hours: float = 0.0
    holdout_percent: float = 0.0
    description: str = ""

    @property
    def cooldown_ms(self) -> int:
        return round(self.cooldown_hours * 3_600_000)


def parse_rules(text: str, source: str = "rules") -> tuple[Rule, ...]:
    """Parse a rule file's YAML text; raise RuleError naming the rule and field at fault.

    >>> rules = parse_rules('''
    ... rules:
    ...   - id: churn-risk-high
    ...     when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.6}
    ...     action: {endpoint: marketing, template: {offer: vip}}
    ... ''')
    >>> rules[0].when.crosses_above, rules[0].action.endpoint
    (0.7, 'marketing')
    """
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(document, Mapping) or not isinstance(document.get("rules"), list):
        raise RuleError(f"{source}: expected a mapping with a 'rules' list at the top")
    _refuse_unknown_keys(document, {"rules"}, f"{source}")
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, raw in enumerate(document["rules"]):
        rule = _parse_rule(raw, source, index)
        if rule.id in seen:
            raise RuleError(f"{source}: rule {rule.id!r}: id is used twice")
        seen.add(rule.id)
        rules.append(rule)
    return tuple(rules)


def _parse_rule(raw: Any, source: str, index: int) -> Rule:
    if not isinstance(raw, Mapping):
        raise RuleError(f"{source}: rule #{index + 1}: must be a mapping")
    rule_id = raw.get("id")
    if not isinstance(rule_id, str) or not RULE_ID_PATTERN.match(rule_id):
        raise RuleError(
            f"{source}: rule #{index + 1}: field 'id': must match {RULE_ID_PATTERN.pattern}, got {rule_id!r}"
        )
    where = f"{source}: rule {rule_id!r}"
    _refuse_unknown_keys(raw, {"id", "description", "when", "action", "cooldown_hours", "holdout_percent"}, where)
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise RuleError(f"{where}: field 'description': must be text")
    return Rule(
        id=rule_id,
        when=_parse_crossing(_required(raw, "when", where), where),
        action=_parse_action(_required(raw, "action", where), where),
        cooldown_hours=_number(raw.get("cooldown_hours", 0), "cooldown_hours", where, low=0, high=24 * 366),
        holdout_percent=_number(raw.get("holdout_percent", 0), "holdout_percent", where, low=0, high=100),
        description=description,
    )


def _parse_crossing(raw: Any, where: str) -> ScoreCrossing:
    if not isinstance(raw, Mapping):
        raise RuleError(f"{where}: field 'when': must be a mapping")
    _refuse_unknown_keys(raw, {"score", "crosses_above", "rearm_below"}, f"{where}: field 'when'")
    score = _required(raw, "score", f"{where}: field 'when'")
    if score not in SCORE_NAMES:
        raise RuleError(f"{where}: field 'when.score': must be one of {', '.join(SCORE_NAMES)}, got {score!r}")
    above = _number(_required(raw, "crosses_above", f"{where}: field 'when'"), "when.crosses_above", where, 0, 1)
    rearm = _number(_required(raw, "rearm_below", f"{where}: field 'when'"), "when.rearm_below", where, 0, 1)
    if rearm > above:
        raise RuleError(f"{where}: field 'when.rearm_below': {rearm} is above crosses_above {above}")
    return ScoreCrossing(score=score, crosses_above=above, rearm_below=rearm)


def _parse_action(raw: Any, where: str) -> ActionSpec:
    if not isinstance(raw, Mapping):
        raise RuleError(f"{where}: field 'action': must be a mapping")
    _refuse_unknown_keys(raw, {"endpoint", "template"}, f"{where}: field 'action'")
    endpoint = _required(raw, "endpoint", f"{where}: field 'action'")
    if not isinstance(endpoint, str) or not endpoint:
        raise RuleError(f"{where}: field 'action.endpoint': must be an endpoint name")
    template = raw.get("template", {})
    try:
        unknown = template_placeholders(template) - PLACEHOLDERS
    except ValueError as exc:
        raise RuleError(f"{where}: field 'action.template': {exc}") from exc
    if unknown:
        raise RuleError(
            f"{where}: field 'action.template': unknown placeholder(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(PLACEHOLDERS))}"
        )
    return ActionSpec(endpoint=endpoint, template=template)


def _required(raw: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in raw:
        raise RuleError(f"{where}: field {key!r} is missing")
    return raw[key]


def _number(value: Any, field: str, where: str, low: float, high: float) -> float:
    # bool is an int in Python; `holdout_percent: yes` must not pass as 1.
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise RuleError(f"{where}: field {field!r}: must be a number, got {value!r}")
    if not low <= value <= high:
        raise RuleError(f"{where}: field {field!r}: must be between {low} and {high}, got {value}")
    return float(value)


def _refuse_unknown_keys(raw: Mapping[str, Any], known: set[str], where: str) -> None:
    # A typo such as `cooldown_hour` would otherwise silently fall back to a default.
    unknown = set(raw) - known
    if unknown:
        raise RuleError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
