"""Payload templates: JSON-like data whose strings may hold `${placeholder}`s, filled by lookup only.

A string that is exactly one placeholder takes the value's own type (a number stays a
number, `reasons` stays a list); a placeholder inside longer text is filled with its text
form. `$$` writes a literal `$`. Nothing is evaluated.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping
from typing import Any

PLACEHOLDERS = frozenset({
    "action_id",
    "rule_id",
    "customer_id",
    "message_id",
    "event_time",
    "event_time_ms",
    "scores.churn_risk",
    "scores.purchase_propensity",
    "segment",
    "stage",
    "reasons",
    "model_version",
    "event_type",
    "event_name",
    "value_tier",
    "trigger",
})
# `${features.<name>}` reads any feature the score carries (null when it is absent).
_FEATURE_PLACEHOLDER = re.compile(r"^features\.[a-z0-9_]+$")


class _PayloadTemplate(string.Template):
    # Dotted names such as `scores.churn_risk`, matched case-sensitively.
    flags = re.NOFLAG
    idpattern = r"[a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*"


_WHOLE_PLACEHOLDER = re.compile(r"^\$\{(" + _PayloadTemplate.idpattern + r")\}$")


def template_placeholders(template: Any) -> set[str]:
    """Return every placeholder name in `template`; raise ValueError on anything not JSON-like.

    >>> sorted(template_placeholders({"to": "${customer_id}", "text": ["risk ${scores.churn_risk}"]}))
    ['customer_id', 'scores.churn_risk']
    """
    if isinstance(template, str):
        parsed = _PayloadTemplate(template)
        if not parsed.is_valid():
            raise ValueError(f"malformed placeholder in {template!r} (write $$ for a literal $)")
        return set(parsed.get_identifiers())
    if isinstance(template, Mapping):
        names: set[str] = set()
        for key, value in template.items():
            if not isinstance(key, str):
                raise ValueError(f"keys must be text, got {key!r}")
            names |= template_placeholders(value)
        return names
    if isinstance(template, list):
        return set().union(*(template_placeholders(item) for item in template))
    if template is None or isinstance(template, bool | int | float):
        return set()
    raise ValueError(f"{type(template).__name__} value {template!r} is not JSON (quote it to make it text)")


def unknown_placeholders(names: set[str]) -> set[str]:
    """Return the names that are neither a known placeholder nor `features.<name>`.

    >>> sorted(unknown_placeholders({"customer_id", "features.purchase_count", "email"}))
    ['email']
    """
    return {name for name in names if name not in PLACEHOLDERS and not _FEATURE_PLACEHOLDER.match(name)}


def render_template(template: Any, context: Mapping[str, Any]) -> Any:
    """Fill the placeholders of `template` from `context`.

    >>> render_template({"risk": "${scores.churn_risk}", "note": "risk is ${scores.churn_risk}"},
    ...                 {"scores.churn_risk": 0.75})
    {'risk': 0.75, 'note': 'risk is 0.75'}
    """
    if isinstance(template, str):
        whole = _WHOLE_PLACEHOLDER.match(template)
        if whole:
            return context.get(whole.group(1))
        texts = {name: _as_text(context.get(name)) for name in _PayloadTemplate(template).get_identifiers()}
        return _PayloadTemplate(template).substitute(texts)
    if isinstance(template, Mapping):
        return {key: render_template(value, context) for key, value in template.items()}
    if isinstance(template, list):
        return [render_template(item, context) for item in template]
    return template


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
