"""Conditions: structured data that says which events, scores or customers a rule is about.

A condition is a mapping, never code:
  {field: features.feedback_rating, le: 2}              one comparison
  {all: [...]} / {any: [...]} / {not: {...}}            combinations
Operators: eq, ne, lt, le, gt, ge, in, not_in, contains (a list field holds the value),
exists (true/false). A field that is absent makes every comparison false (so a rule fails
closed when the pipeline does not carry what it asks about); `exists: false` tests for it.
Event names compare as the event semantics table matches them: case, spaces, underscores and
hyphens do not count (`Order Completed` matches an SDK's `order_completed`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from touchstream.event_semantics import normalised_event_name

OPERATORS = ("eq", "ne", "lt", "le", "gt", "ge", "in", "not_in", "contains", "exists")
# Fields a condition may read; `features.<name>` and `scores.<name>` take any name.
FIELDS = ("event.type", "event.name", "event.channel", "segment", "stage", "value_tier", "consent")
EVENT_NAME = "event.name"
_DYNAMIC_FIELD = re.compile(r"^(features|scores)\.[a-z0-9_]+$")


class ConditionError(ValueError):
    """A condition that cannot be used; the message names the path inside it."""


@dataclass(frozen=True)
class Compare:
    field: str
    op: str
    value: Any


@dataclass(frozen=True)
class AllOf:
    parts: tuple[Condition, ...]


@dataclass(frozen=True)
class AnyOf:
    parts: tuple[Condition, ...]


@dataclass(frozen=True)
class Not:
    part: Condition


Condition = Compare | AllOf | AnyOf | Not


def parse_condition(raw: Any, where: str = "condition") -> Condition:
    """Parse a condition mapping; raise ConditionError naming where it went wrong.

    >>> parse_condition({"field": "event.name", "eq": "Complaint Submitted"})
    Compare(field='event.name', op='eq', value='complaint submitted')
    >>> parse_condition({"all": [{"field": "features.feedback_rating", "le": 2}]}).parts[0].op
    'le'
    """
    if not isinstance(raw, Mapping):
        raise ConditionError(f"{where}: must be a mapping")
    keys = set(raw)
    for combinator in ("all", "any"):
        if combinator in keys:
            if keys != {combinator}:
                raise ConditionError(f"{where}: '{combinator}' stands alone, got also {sorted(keys - {combinator})}")
            items = raw[combinator]
            if not isinstance(items, list) or not items:
                raise ConditionError(f"{where}.{combinator}: must be a non-empty list")
            parts = tuple(parse_condition(item, f"{where}.{combinator}[{n}]") for n, item in enumerate(items))
            return AllOf(parts) if combinator == "all" else AnyOf(parts)
    if "not" in keys:
        if keys != {"not"}:
            raise ConditionError(f"{where}: 'not' stands alone")
        return Not(parse_condition(raw["not"], f"{where}.not"))
    if "field" not in keys:
        raise ConditionError(f"{where}: needs 'field' and one operator, or all/any/not")
    field = raw["field"]
    if not isinstance(field, str) or not (field in FIELDS or _DYNAMIC_FIELD.match(field)):
        raise ConditionError(
            f"{where}.field: unknown field {field!r}; known: {', '.join(FIELDS)}, features.<name>, scores.<name>")
    ops = keys - {"field"}
    if len(ops) != 1 or not ops <= set(OPERATORS):
        raise ConditionError(f"{where}: needs exactly one operator of {', '.join(OPERATORS)}, got {sorted(ops)}")
    (op,) = ops
    value = raw[op]
    if op in ("lt", "le", "gt", "ge") and not _is_number(value):
        raise ConditionError(f"{where}.{op}: must be a number, got {value!r}")
    if op in ("in", "not_in") and not (isinstance(value, list) and value):
        raise ConditionError(f"{where}.{op}: must be a non-empty list")
    if op == "exists" and not isinstance(value, bool):
        raise ConditionError(f"{where}.exists: must be true or false")
    if isinstance(value, Mapping):
        raise ConditionError(f"{where}.{op}: must be a plain value, not a mapping")
    if field == EVENT_NAME:
        value = [_name_form(v) for v in value] if isinstance(value, list) else _name_form(value)
    return Compare(field, op, tuple(value) if isinstance(value, list) else value)


def _name_form(value: Any) -> Any:
    return normalised_event_name(value) if isinstance(value, str) else value


def holds(condition: Condition, facts: Mapping[str, Any]) -> bool:
    """Say whether `condition` holds for `facts` (field name -> value; absent means unknown).

    >>> complaint = parse_condition({"all": [{"field": "event.name", "eq": "Complaint"},
    ...                                      {"field": "features.feedback_rating", "le": 2}]})
    >>> holds(complaint, {"event.name": "complaint", "features.feedback_rating": 1.0})
    True
    >>> holds(complaint, {"event.name": "Complaint"})  # no rating known: fails closed
    False
    """
    if isinstance(condition, AllOf):
        return all(holds(part, facts) for part in condition.parts)
    if isinstance(condition, AnyOf):
        return any(holds(part, facts) for part in condition.parts)
    if isinstance(condition, Not):
        return not holds(condition.part, facts)
    present = condition.field in facts and facts[condition.field] is not None
    if condition.op == "exists":
        return present is condition.value
    if not present:
        return False
    actual, expected = facts[condition.field], condition.value
    if condition.field == EVENT_NAME and isinstance(actual, str):
        actual = normalised_event_name(actual)
    match condition.op:
        case "eq":
            return bool(actual == expected)
        case "ne":
            return bool(actual != expected)
        case "in":
            return actual in expected
        case "not_in":
            return actual not in expected
        case "contains":
            return isinstance(actual, list | tuple | set | frozenset) and expected in actual
    if not _is_number(actual):
        return False
    match condition.op:
        case "lt":
            return bool(actual < expected)
        case "le":
            return bool(actual <= expected)
        case "gt":
            return bool(actual > expected)
        case _:
            return bool(actual >= expected)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
