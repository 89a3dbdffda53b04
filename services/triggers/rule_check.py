"""`touchstream rules validate`: check a rule file against schemas/rules.schema.json, the parser and the
event semantics table (every event name a rule compares `event.name` with must be in it), reporting
each problem with its line and column in the YAML file."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from services.triggers.rules import RuleError, parse_rule_file
from touchstream import avro
from touchstream.event_semantics import EventSemantics, default_event_semantics
from touchstream.yaml_lines import node_position, yaml_error_position

SCHEMA_FILE = avro.SCHEMA_DIR / "rules.schema.json"  # package data of touchstream (schemas/)
_RULE_IN_MESSAGE = re.compile(r"rule (?:'(?P<id>[^']+)'|#(?P<n>\d+))(?:: field '(?P<field>[^']+)')?")


def rule_file_problems(text: str, source: str, semantics: EventSemantics | None = None) -> list[str]:
    """Return `source:line:column: message` for every problem in the rule file `text` (empty if none).

    Event names are checked against `semantics` (the default table when None).

    >>> rule_file_problems("rules:\\n  - id: r\\n    when: {score: churn_risk, crosses_above: 2, rearm_below: 0}\\n"
    ...                    "    action: {endpoint: e}\\n", "f.yaml")
    ['f.yaml:3:46: rules[0].when: 2 is greater than the maximum of 1 (at crosses_above)']
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [f"{source}:{yaml_error_position(exc)}: not valid YAML: {getattr(exc, 'problem', None) or exc}"]
    validator = Draft202012Validator(json.loads(SCHEMA_FILE.read_text(encoding="utf-8")))
    problems = []
    for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path))):
        detail = _most_specific(error)
        path = list(error.absolute_path)
        line, column = node_position(root, list(detail.absolute_path) or path)
        message = detail.message
        inner = [str(p) for p in detail.absolute_path][len(path):]
        if inner:
            message += f" (at {'.'.join(inner)})"
        problems.append(f"{source}:{line}:{column}: {_dotted(path) or '(file)'}: {message}")
    if problems:
        return problems
    try:
        parse_rule_file(text, source)
    except RuleError as exc:
        line, column = node_position(root, _path_of_rule_error(str(exc), document))
        return [f"{source}:{line}:{column}: {str(exc).removeprefix(source + ': ')}"]
    semantics = default_event_semantics() if semantics is None else semantics
    problems = []
    for path, name in event_names_compared(document):
        if semantics.meaning_of(name) is None:
            line, column = node_position(root, path)
            rule_id = document["rules"][path[1]]["id"]
            problems.append(
                f"{source}:{line}:{column}: rule {rule_id!r}: event name {name!r} is not in the event semantics "
                "table, so no event is known to carry it: fix the spelling, or add it to the file "
                f"TOUCHSTREAM_EVENT_SEMANTICS_FILE names (events: {{{name}: known}}, or its meaning)")
    return problems


# Operators whose values are event names when the field is event.name.
_NAME_OPERATORS = ("eq", "ne", "in", "not_in")


def event_names_compared(document: Any) -> list[tuple[list[Any], str]]:
    """Return (path in the document, name) of every event name a rule's conditions compare `event.name` with.

    >>> event_names_compared({"rules": [{"when": {"event": {"any": [{"field": "event.name", "in": ["A", "B"]}]}}}]})
    [(['rules', 0, 'when', 'event', 'any', 0, 'in', 0], 'A'), (['rules', 0, 'when', 'event', 'any', 0, 'in', 1], 'B')]
    """
    found: list[tuple[list[Any], str]] = []

    def walk(node: Any, path: list[Any]) -> None:
        if isinstance(node, dict):
            if node.get("field") == "event.name":
                for op in _NAME_OPERATORS:
                    value = node.get(op)
                    if isinstance(value, str):
                        found.append(([*path, op], value))
                    elif isinstance(value, list):
                        found.extend(([*path, op, i], v) for i, v in enumerate(value) if isinstance(v, str))
            for key, child in node.items():
                if key != "action":  # a template is data sent out, not a condition
                    walk(child, [*path, key])
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(child, [*path, index])

    for index, rule in enumerate(document.get("rules") or [] if isinstance(document, dict) else []):
        walk(rule, ["rules", index])
    return found


def validate_files(paths: Sequence[Path], out: Any, semantics: EventSemantics | None = None) -> int:
    """Print the problems of each file (or that it is fine) to `out`; return the exit code."""
    failed = False
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            print(f"{path}: cannot read: {exc}", file=out)
            failed = True
            continue
        problems = rule_file_problems(text, str(path), semantics)
        for problem in problems:
            print(problem, file=out)
        if problems:
            failed = True
        else:
            print(f"{path}: ok ({len(parse_rule_file(text, str(path)).rules)} rules)", file=out)
    return 1 if failed else 0


def _most_specific(error: ValidationError) -> ValidationError:
    """Follow a failed oneOf/anyOf into the branch the author most likely meant.

    That is the branch whose errors reach deepest into the data (it got furthest), with
    fewest complaints about missing keys (the wrong branches mostly say "X is required").
    """
    while error.context:
        branches: dict[Any, list[ValidationError]] = {}
        for sub in error.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)

        def fit(errors: list[ValidationError]) -> tuple[int, int, int]:
            depth = max(len(e.relative_path) for e in errors)
            missing = sum(e.validator in ("required", "additionalProperties") for e in errors)
            return depth, -missing, -len(errors)

        chosen = max(branches.values(), key=fit)
        error = max(chosen, key=lambda e: len(e.relative_path)) if len(chosen) > 1 else chosen[0]
        if not error.context:
            return error
    return error


def _path_of_rule_error(message: str, document: Any) -> list[Any]:
    match = _RULE_IN_MESSAGE.search(message)
    if not match or not isinstance(document, dict):
        return ["policy"] if "'policy'" in message else []
    rules = document.get("rules") or []
    if match.group("n"):
        index = int(match.group("n")) - 1
    else:
        ids = [r.get("id") if isinstance(r, dict) else None for r in rules]
        # "id is used twice" points at the second one.
        index = len(ids) - 1 - ids[::-1].index(match.group("id")) if match.group("id") in ids else 0
    field = match.group("field")
    return ["rules", index, *(field.split(".") if field else [])]


def _dotted(path: Sequence[Any]) -> str:
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else str(step))
    return text
