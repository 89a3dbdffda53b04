"""Avro codec: schemas from `schemas/`, Confluent wire format on every topic.

The contracts are written once, in the repository's `schemas/`; `touchstream/schemas` links to it, so
they ship as package data of `touchstream` and load from beside this module both in an editable install
(the link resolves to the checkout) and in a wheel (where setuptools copied the files in).

Confluent framing (magic byte 0, 4-byte big-endian schema id, Avro body) lets upstream
producers that already speak it write straight to `touchpoints.raw`. Without a schema
registry the ids are fixed here, one per schema, and never reused.
"""

from __future__ import annotations

import io
import json
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.types import Schema

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"

# Order matters: a schema may only reference named types parsed before it.
SCHEMA_IDS: dict[str, int] = {
    "TouchpointEvent": 1,
    "ResolvedTouchpoint": 2,
    "IdentityMerge": 3,
    "ScoreUpdate": 4,
    "RetentionAction": 5,
    "DeadLetter": 6,
    "CustomerDeletion": 7,
}
MAGIC_BYTE = 0
_HEADER = struct.Struct(">bI")


class DecodeError(ValueError):
    """Bytes that are not a valid record of the expected schema."""


@lru_cache(maxsize=1)
def _parsed_schemas() -> dict[str, Schema]:
    named: dict[str, Any] = {}
    parsed: dict[str, Schema] = {}
    for name in SCHEMA_IDS:
        raw = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())
        parsed[name] = fastavro.parse_schema(raw, named_schemas=named)
    return parsed


def schema(name: str) -> Schema:
    """Return the parsed Avro schema called `name`."""
    return _parsed_schemas()[name]


def encode(schema_name: str, record: dict[str, Any]) -> bytes:
    """Encode `record` in Confluent wire format; raises ValueError naming the bad field."""
    buf = io.BytesIO()
    buf.write(_HEADER.pack(MAGIC_BYTE, SCHEMA_IDS[schema_name]))
    try:
        fastavro.schemaless_writer(buf, schema(schema_name), record, strict_allow_default=True)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{schema_name}: {exc}") from exc
    return buf.getvalue()


def decode(schema_name: str, data: bytes) -> dict[str, Any]:
    """Decode Confluent-framed Avro bytes of `schema_name`, or raise DecodeError with the reason."""
    if len(data) < _HEADER.size:
        raise DecodeError(f"record of {len(data)} bytes is shorter than the 5-byte Confluent header")
    magic, schema_id = _HEADER.unpack_from(data)
    if magic != MAGIC_BYTE:
        raise DecodeError(f"magic byte is {magic}, expected {MAGIC_BYTE}")
    expected = SCHEMA_IDS[schema_name]
    if schema_id != expected:
        raise DecodeError(f"schema id {schema_id} is not {schema_name} (id {expected})")
    body = io.BytesIO(data)
    body.seek(_HEADER.size)
    try:
        record = fastavro.schemaless_reader(body, schema(schema_name), None)
    except Exception as exc:  # fastavro raises many types on corrupt input
        raise DecodeError(f"invalid {schema_name} body: {type(exc).__name__}: {exc}") from exc
    if body.tell() != len(data):
        raise DecodeError(f"{len(data) - body.tell()} trailing bytes after the {schema_name} record")
    assert isinstance(record, dict)
    return record


def validation_errors(schema_name: str, record: dict[str, Any]) -> list[str]:
    """Return human-readable reasons `record` does not fit `schema_name` (empty if it does)."""
    from fastavro.validation import ValidationError, validate

    try:
        validate(record, schema(schema_name), raise_errors=True, strict=True)
    except ValidationError as exc:
        return [str(e) for e in exc.errors] or [str(exc)]
    return []
