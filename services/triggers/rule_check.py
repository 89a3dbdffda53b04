"""`touchstream rules validate`: check a rule file against schemas/rules.schema.json and the parser,
reporting each problem with its line and column in the YAML file."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from services.triggers.rules import RuleError, parse_rule_file
from touchstream import avro

SCHEMA_FILE = avro.SCHEMA_DIR / "rules.schema.json"  # package data of touchstream (schemas/)
_RULE_IN_MESSAGE = re.compile(r"rule (?:'(?P<id>[^']+)'|#(?P<n>\d+))(?:: field '(?P<field>[^']+)')?")


def rule_file_problems(text: str, source: str) -> list[str]:
    """Return `source:line:column: message` for every problem in the rule file `text` (empty if none).

    >>> rule_file_problems("rules:\\n  - id: r\\n    when: {score: churn_risk, crosses_above: 2, rearm_below: 0}\\n"
    ...                    "    action: {endpoint: e}\\n", "f.yaml")
    ['f.yaml:3:46: rules[0].when: 2 is greater than the maximum of 1 (at crosses_above)']
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{mark.line + 1}:{mark.column + 1}" if mark is not None else "1:1"
        return [f"{source}:{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}"]
    validator = Draft202012Validator(json.loads(SCHEMA_FILE.read_text(encoding="utf-8")))
    problems = []
    for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path))):
        detail = _most_specific(error)
        path = list(error.absolute_path)
        line, column = _position(root, list(detail.absolute_path) or path)
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
        line, column = _position(root, _path_of_rule_error(str(exc), document))
        return [f"{source}:{line}:{column}: {str(exc).removeprefix(source + ': ')}"]
    return []


def validate_files(paths: Sequence[Path], out: Any) -> int:
    """Print the problems of each file (or that it is fine) to `out`; return the exit code."""
    failed = False
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            print(f"{path}: cannot read: {exc}", file=out)
            failed = True
            continue
        problems = rule_file_problems(text, str(path))
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


def _position(root: yaml.Node | None, path: Iterable[Any]) -> tuple[int, int]:
    """Return the 1-based line and column of the deepest node along `path`."""
    node = root
    best = (1, 1)
    if node is not None:
        best = (node.start_mark.line + 1, node.start_mark.column + 1)
    for step in path:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == str(step)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
            child = node.value[step]
        if child is None:
            break
        node = child
        best = (node.start_mark.line + 1, node.start_mark.column + 1)
    return best


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
