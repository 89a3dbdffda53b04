"""Retention rules: parse YAML text into frozen dataclasses, refusing anything unclear.

Rules are structured data; nothing in a rule file is ever evaluated as code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from services.triggers.conditions import Condition, ConditionError, parse_condition
from services.triggers.templates import PLACEHOLDERS, template_placeholders, unknown_placeholders
from touchstream.eventtime import HOUR_MS

# The rule file triggers evaluates unless TOUCHSTREAM_TRIGGERS_RULES_FILE names another; the console
# reads the same file (through this module, the one parser) to draw the thresholds.
DEFAULT_RULES_FILE = Path(__file__).resolve().parent.parent.parent / "deploy" / "rules" / "default.yaml"
# The ScoreUpdate fields a crossing rule may watch.
SCORE_NAMES = ("churn_risk", "purchase_propensity")
CHANGE_FIELDS = ("segment", "stage")
QUIET_MODES = ("hold", "drop")
RULE_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_CLOCK = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")


class RuleError(ValueError):
    """A rule file that cannot be used; the message names the rule and the field."""


@dataclass(frozen=True)
class ScoreCrossing:
    """Fire when `score` rises to `crosses_above` while armed; re-arm once it falls below `rearm_below`."""

    score: str
    crosses_above: float
    rearm_below: float


@dataclass(frozen=True)
class FieldChange:
    """Fire when the customer's segment or stage changes (to one of `to`, from one of `from_`; empty = any)."""

    field: str
    to: tuple[str, ...] = ()
    from_: tuple[str, ...] = ()


@dataclass(frozen=True)
class EventMatch:
    """Fire on every event the condition holds for (cooldown and caps limit repeats)."""

    condition: Condition


@dataclass(frozen=True)
class Silence:
    """Start a timer on an event matching `start`; fire when `after_ms` of event time pass without `stop`.

    With `restart`, each new `start` event pushes the deadline back ("no purchase for 30 days");
    without, the first one stands ("complaint unanswered for 24 h").
    """

    start: Condition
    after_ms: int
    stop: Condition | None = None
    restart: bool = True


Trigger = ScoreCrossing | FieldChange | EventMatch | Silence


@dataclass(frozen=True)
class Audience:
    """Who a rule is for; an empty tuple means anyone."""

    segments: tuple[str, ...] = ()
    stages: tuple[str, ...] = ()
    value_tiers: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    where: Condition | None = None


@dataclass(frozen=True)
class QuietHours:
    """A daily window, in the customer's time zone, when nothing is sent; it may wrap midnight."""

    start_minute: int
    end_minute: int
    mode: str = "hold"


@dataclass(frozen=True)
class ActionSpec:
    endpoint: str
    template: Any  # JSON-like: dicts, lists, strings with ${placeholders}, numbers, booleans, null


@dataclass(frozen=True)
class Rule:
    id: str
    when: Trigger
    action: ActionSpec
    cooldown_hours: float = 0.0
    holdout_percent: float = 0.0
    description: str = ""
    audience: Audience = Audience()
    consent: str | None = None
    quiet_hours: QuietHours | None = None
    # Whether the rule's actions count against (and are stopped by) the daily frequency cap.
    capped: bool = True

    @property
    def cooldown_ms(self) -> int:
        return round(self.cooldown_hours * HOUR_MS)


@dataclass(frozen=True)
class Policy:
    """File-wide settings: the frequency cap across rules, the fallback time zone, value tiers."""

    frequency_cap_per_day: int = 0  # 0: no cap
    default_time_zone: str = "UTC"
    # (tier, lowest features.monetary_total), highest first.
    value_tiers: tuple[tuple[str, float], ...] = ()


DEFAULT_POLICY = Policy()


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    policy: Policy = Policy()


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
    return parse_rule_file(text, source).rules


def parse_rule_file(text: str, source: str = "rules") -> RuleSet:
    """Parse a rule file's YAML text into its rules and file-wide policy."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(document, Mapping) or not isinstance(document.get("rules"), list):
        raise RuleError(f"{source}: expected a mapping with a 'rules' list at the top")
    _refuse_unknown_keys(document, {"rules", "policy"}, f"{source}")
    policy = _parse_policy(document.get("policy", {}), source)
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, raw in enumerate(document["rules"]):
        rule = _parse_rule(raw, source, index, policy)
        if rule.id in seen:
            raise RuleError(f"{source}: rule {rule.id!r}: id is used twice")
        seen.add(rule.id)
        rules.append(rule)
    return RuleSet(tuple(rules), policy)


def _parse_policy(raw: Any, source: str) -> Policy:
    where = f"{source}: field 'policy'"
    if not isinstance(raw, Mapping):
        raise RuleError(f"{where}: must be a mapping")
    _refuse_unknown_keys(raw, {"frequency_cap_per_day", "default_time_zone", "value_tiers"}, where)
    cap = _number(raw.get("frequency_cap_per_day", 0), "policy.frequency_cap_per_day", source, 0, 1000)
    if cap != int(cap):
        raise RuleError(f"{where}: field 'frequency_cap_per_day': must be a whole number")
    zone = raw.get("default_time_zone", "UTC")
    _check_time_zone(zone, f"{where}: field 'default_time_zone'")
    tiers_raw = raw.get("value_tiers", {})
    if not isinstance(tiers_raw, Mapping):
        raise RuleError(f"{where}: field 'value_tiers': must map tier name -> lowest monetary_total")
    tiers = tuple(sorted(
        ((str(name), _number(low, f"policy.value_tiers.{name}", source, 0, math.inf))
         for name, low in tiers_raw.items()),
        key=lambda tier: -tier[1]))
    return Policy(frequency_cap_per_day=int(cap), default_time_zone=zone, value_tiers=tiers)


def _parse_rule(raw: Any, source: str, index: int, policy: Policy) -> Rule:
    if not isinstance(raw, Mapping):
        raise RuleError(f"{source}: rule #{index + 1}: must be a mapping")
    rule_id = raw.get("id")
    if not isinstance(rule_id, str) or not RULE_ID_PATTERN.match(rule_id):
        raise RuleError(
            f"{source}: rule #{index + 1}: field 'id': must match {RULE_ID_PATTERN.pattern}, got {rule_id!r}"
        )
    where = f"{source}: rule {rule_id!r}"
    _refuse_unknown_keys(raw, {"id", "description", "when", "audience", "consent", "action", "cooldown_hours",
                               "holdout_percent", "quiet_hours", "frequency_capped"}, where)
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise RuleError(f"{where}: field 'description': must be text")
    consent = raw.get("consent")
    if consent is not None and (not isinstance(consent, str) or not consent):
        raise RuleError(f"{where}: field 'consent': must be a consent category name")
    capped = raw.get("frequency_capped", True)
    if not isinstance(capped, bool):
        raise RuleError(f"{where}: field 'frequency_capped': must be true or false")
    return Rule(
        id=rule_id,
        when=_parse_trigger(_required(raw, "when", where), where),
        action=_parse_action(_required(raw, "action", where), where),
        cooldown_hours=_number(raw.get("cooldown_hours", 0), "cooldown_hours", where, low=0, high=24 * 366),
        holdout_percent=_number(raw.get("holdout_percent", 0), "holdout_percent", where, low=0, high=100),
        description=description,
        audience=_parse_audience(raw.get("audience", {}), where, policy),
        consent=consent,
        quiet_hours=_parse_quiet_hours(raw.get("quiet_hours"), where),
        capped=capped,
    )


def _parse_trigger(raw: Any, where: str) -> Trigger:
    if not isinstance(raw, Mapping):
        raise RuleError(f"{where}: field 'when': must be a mapping")
    if "score" in raw:
        return _parse_crossing(raw, where)
    kinds = {"changes", "event", "silence"} & set(raw)
    if len(kinds) != 1:
        raise RuleError(f"{where}: field 'when': needs exactly one of score (crossing), changes, event, silence")
    (kind,) = kinds
    if kind == "changes":
        _refuse_unknown_keys(raw, {"changes", "to", "from"}, f"{where}: field 'when'")
        if raw["changes"] not in CHANGE_FIELDS:
            raise RuleError(f"{where}: field 'when.changes': must be one of {', '.join(CHANGE_FIELDS)}")
        return FieldChange(raw["changes"], _names(raw.get("to", []), "when.to", where),
                           _names(raw.get("from", []), "when.from", where))
    if kind == "event":
        _refuse_unknown_keys(raw, {"event"}, f"{where}: field 'when'")
        return EventMatch(_condition(raw["event"], "when.event", where))
    _refuse_unknown_keys(raw, {"silence"}, f"{where}: field 'when'")
    silence = raw["silence"]
    if not isinstance(silence, Mapping):
        raise RuleError(f"{where}: field 'when.silence': must be a mapping")
    _refuse_unknown_keys(silence, {"start", "stop", "hours", "days", "restart"}, f"{where}: field 'when.silence'")
    spans = {"hours", "days"} & set(silence)
    if len(spans) != 1:
        raise RuleError(f"{where}: field 'when.silence': needs exactly one of hours, days")
    (span,) = spans
    length = _number(silence[span], f"when.silence.{span}", where, 0, 3660 if span == "days" else 3660 * 24)
    if length <= 0:
        raise RuleError(f"{where}: field 'when.silence.{span}': must be above 0")
    restart = silence.get("restart", True)
    if not isinstance(restart, bool):
        raise RuleError(f"{where}: field 'when.silence.restart': must be true or false")
    return Silence(
        start=_condition(_required(silence, "start", f"{where}: field 'when.silence'"), "when.silence.start", where),
        after_ms=round(length * HOUR_MS * (24 if span == "days" else 1)),
        stop=_condition(silence["stop"], "when.silence.stop", where) if "stop" in silence else None,
        restart=restart,
    )


def _parse_audience(raw: Any, where: str, policy: Policy) -> Audience:
    if not isinstance(raw, Mapping):
        raise RuleError(f"{where}: field 'audience': must be a mapping")
    _refuse_unknown_keys(raw, {"segment", "stage", "value_tier", "channel", "where"}, f"{where}: field 'audience'")
    tiers = _names(raw.get("value_tier", []), "audience.value_tier", where)
    known_tiers = {name for name, _ in policy.value_tiers}
    if set(tiers) - known_tiers:
        raise RuleError(f"{where}: field 'audience.value_tier': unknown tier(s) {sorted(set(tiers) - known_tiers)}; "
                        f"define them under policy.value_tiers (known: {sorted(known_tiers) or 'none'})")
    return Audience(
        segments=_names(raw.get("segment", []), "audience.segment", where),
        stages=_names(raw.get("stage", []), "audience.stage", where),
        value_tiers=tiers,
        channels=_names(raw.get("channel", []), "audience.channel", where),
        where=_condition(raw["where"], "audience.where", where) if "where" in raw else None,
    )


def _parse_quiet_hours(raw: Any, where: str) -> QuietHours | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise RuleError(f"{where}: field 'quiet_hours': must be a mapping")
    _refuse_unknown_keys(raw, {"start", "end", "mode"}, f"{where}: field 'quiet_hours'")
    minutes = []
    for key in ("start", "end"):
        value = _required(raw, key, f"{where}: field 'quiet_hours'")
        # YAML 1.1 reads an unquoted 21:00 as the number 1260.
        match = _CLOCK.match(value) if isinstance(value, str) else None
        if not match:
            raise RuleError(f"{where}: field 'quiet_hours.{key}': must be a quoted \"HH:MM\", got {value!r}")
        minutes.append(int(match.group(1)) * 60 + int(match.group(2)))
    mode = raw.get("mode", "hold")
    if mode not in QUIET_MODES:
        raise RuleError(f"{where}: field 'quiet_hours.mode': must be one of {', '.join(QUIET_MODES)}")
    if minutes[0] == minutes[1]:
        raise RuleError(f"{where}: field 'quiet_hours': start and end are equal")
    return QuietHours(minutes[0], minutes[1], mode)


def _condition(raw: Any, field: str, where: str) -> Condition:
    try:
        return parse_condition(raw, field)
    except ConditionError as exc:
        raise RuleError(f"{where}: field {exc}") from exc


def _names(raw: Any, field: str, where: str) -> tuple[str, ...]:
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(v, str) and v for v in raw):
        raise RuleError(f"{where}: field {field!r}: must be a name or a list of names")
    return tuple(raw)


def _check_time_zone(zone: Any, where: str) -> None:
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise RuleError(f"{where}: unknown time zone {zone!r}") from exc


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
        unknown = unknown_placeholders(template_placeholders(template))
    except ValueError as exc:
        raise RuleError(f"{where}: field 'action.template': {exc}") from exc
    if unknown:
        raise RuleError(
            f"{where}: field 'action.template': unknown placeholder(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(PLACEHOLDERS))}, features.<name>"
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
