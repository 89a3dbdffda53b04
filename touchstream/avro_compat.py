"""Avro schema compatibility by trial: write sample records with one schema, read them with another.

fastavro resolves a writer's schema against a reader's lazily, value by value: a union branch or
an enum symbol the reader lacks fails only when a record holds it. So the samples of a schema
take every branch of every union and every symbol of every enum at least once, and reading all
of them with the other schema is the check (no separate rule engine to keep in step with fastavro).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import fastavro
from fastavro.types import Schema

_PRIMITIVES: dict[str, Callable[[int], Any]] = {
    "null": lambda i: None,
    "boolean": lambda i: i % 2 == 1,
    "int": lambda i: i,
    "long": lambda i: i,
    "float": lambda i: i + 0.5,
    "double": lambda i: i + 0.25,
    "bytes": lambda i: bytes([i % 256]),
    "string": lambda i: f"s{i}",
}
# Below this depth a recursive type stops: unions take null, arrays and maps stay empty.
_MAX_DEPTH = 8


def sample_records(schema: Schema) -> list[dict[str, Any]]:
    """Return records of a parsed record schema that together take every union branch and enum symbol.

    >>> import fastavro
    >>> parsed = fastavro.parse_schema({"type": "record", "name": "R", "fields": [
    ...     {"name": "kind", "type": {"type": "enum", "name": "K", "symbols": ["a", "b", "c"]}},
    ...     {"name": "note", "type": ["null", "string"]}, {"name": "tags", "type": {"type": "array", "items": "int"}}]})
    >>> for record in sample_records(parsed):
    ...     print(record)
    {'kind': 'a', 'note': None, 'tags': [0]}
    {'kind': 'b', 'note': 's1', 'tags': [1]}
    {'kind': 'c', 'note': None, 'tags': [2]}
    """
    named: dict[str, Any] = schema.get("__named_schemas", {}) if isinstance(schema, dict) else {}
    count = max(2, _widest_choice(schema, named, set()))
    return [_sample(schema, named, i, 0) for i in range(count)]


def resolution_problem(writer: Schema, reader: Schema) -> str | None:
    """Return why `reader` cannot read what `writer` writes, or None if every sample resolves."""
    for record in sample_records(writer):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, record)
        try:
            fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), writer, reader)
        except Exception as exc:  # fastavro reports a failed resolution with several exception types
            return f"{type(exc).__name__}: {exc}"
    return None


def _widest_choice(schema: Any, named: dict[str, Any], seen: set[str]) -> int:
    """Return the most branches of any union, or symbols of any enum, reachable from `schema`."""
    if isinstance(schema, list):
        return max([len(schema), *(_widest_choice(branch, named, seen) for branch in schema)])
    if isinstance(schema, str):
        if schema in _PRIMITIVES or schema in seen:
            return 0
        return _widest_choice(named[schema], named, seen | {schema})
    kind = schema["type"]
    if isinstance(kind, dict | list):
        return _widest_choice(kind, named, seen)
    if kind in ("record", "error"):
        seen = seen | {schema["name"]}
        return max([0, *(_widest_choice(field["type"], named, seen) for field in schema["fields"])])
    if kind == "enum":
        return len(schema["symbols"])
    if kind == "array":
        return _widest_choice(schema["items"], named, seen)
    if kind == "map":
        return _widest_choice(schema["values"], named, seen)
    return 0


def _sample(schema: Any, named: dict[str, Any], i: int, depth: int) -> Any:
    if isinstance(schema, list):
        if depth > _MAX_DEPTH and "null" in schema:
            return None
        return _sample(schema[i % len(schema)], named, i, depth + 1)
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return _PRIMITIVES[schema](i)
        return _sample(named[schema], named, i, depth + 1)
    kind = schema["type"]
    if isinstance(kind, dict | list):
        return _sample(kind, named, i, depth)
    if kind in ("record", "error"):
        return {field["name"]: _sample(field["type"], named, i, depth + 1) for field in schema["fields"]}
    if kind == "enum":
        return schema["symbols"][i % len(schema["symbols"])]
    if kind == "array":
        return [] if depth > _MAX_DEPTH else [_sample(schema["items"], named, i, depth + 1)]
    if kind == "map":
        return {} if depth > _MAX_DEPTH else {f"k{i}": _sample(schema["values"], named, i, depth + 1)}
    if kind == "fixed":
        return bytes([i % 256]) * schema["size"]
    return _PRIMITIVES[kind](i)
