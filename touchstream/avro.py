"""Avro codec: versioned schemas from `schemas/`, Confluent wire format on every topic.

The contracts are written once, in the repository's `schemas/`; `touchstream/schemas` links to it, so
they ship as package data of `touchstream` and load from beside this module both in an editable install
(the link resolves to the checkout) and in a wheel (where setuptools copied the files in).

Confluent framing (magic byte 0, 4-byte big-endian schema id, Avro body) lets upstream
producers that already speak it write straight to `touchpoints.raw`. Without a schema
registry the ids are fixed in `schemas/registry.txt`, one per version of each schema
(`schemas/<Name>.v<N>.avsc`), and never reused. A record is written with its schema's newest
version; a reader looks the writer's version up by the id in the record and resolves it
against its own (Avro schema resolution), so old records on a compacted topic stay readable.
The rules for adding a version are in `schemas/README.md`.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.types import Schema

from touchstream.topics import ALL_TOPICS

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
REGISTRY_FILE = "registry.txt"
MAGIC_BYTE = 0
_HEADER = struct.Struct(">bI")
_MAX_SCHEMA_ID = 2**31 - 1  # Confluent ids are signed 32-bit

# Before every version had its own id, ScoreUpdate changed twice under id 4. Records from then still
# lie on the compacted `scores` topic with id 4 and a v1 or v2 body. Each version only appended
# fields, so a body parses completely under exactly one of them (tests/unit/core/test_schema_contract.py
# checks that); the registered version of the id is tried first, these only when it fails.
# From now on an id has one writer schema: never add to this.
LEGACY_WRITERS: dict[int, tuple[tuple[str, int], ...]] = {4: (("ScoreUpdate", 2), ("ScoreUpdate", 1))}


class DecodeError(ValueError):
    """Bytes that are not a valid record of the expected schema."""


class UnknownSchemaId(DecodeError):
    """A record whose schema id this reader does not know: a newer release or a foreign producer wrote it."""

    def __init__(self, schema_id: int, schema_name: str, known_ids: Iterable[int]) -> None:
        self.schema_id = schema_id
        topics = ", ".join(spec.name for spec in ALL_TOPICS if spec.schema == schema_name) or "no topic"
        known = ", ".join(str(i) for i in sorted(known_ids))
        super().__init__(f"unknown schema id {schema_id} on topic {topics}: this reader knows {schema_name} "
                         f"as ids {known} (a newer release wrote it? upgrade readers before writers)")


@dataclass(frozen=True)
class SchemaVersion:
    """One registered version of a schema: the id it travels under and the digest of its file."""

    schema_id: int
    name: str
    version: int
    sha256: str

    @property
    def file_name(self) -> str:
        return f"{self.name}.v{self.version}.avsc"


def parse_registry(text: str) -> tuple[SchemaVersion, ...]:
    """Return the versions listed in a registry file, in registration order; ValueError if it is inconsistent.

    >>> text = "# id schema version sha256\\n9 ScoreUpdate 2 " + "b" * 64 + "\\n4 ScoreUpdate 1 " + "a" * 64
    >>> [(v.schema_id, v.name, v.version) for v in parse_registry(text)]
    [(9, 'ScoreUpdate', 2), (4, 'ScoreUpdate', 1)]
    """
    versions: list[SchemaVersion] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 4 or not (fields[0].isdigit() and fields[2].isdigit()):
            raise ValueError(f"registry line {number}: expected 'id schema version sha256', got {line!r}")
        schema_id, name, version, digest = int(fields[0]), fields[1], int(fields[2]), fields[3].lower()
        if not 0 < schema_id <= _MAX_SCHEMA_ID or version < 1:
            raise ValueError(f"registry line {number}: id must be 1..{_MAX_SCHEMA_ID} and version at least 1")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"registry line {number}: {digest!r} is not a sha256 hex digest")
        for seen in versions:
            if seen.schema_id == schema_id or (seen.name, seen.version) == (name, version):
                raise ValueError(f"registry line {number}: id {schema_id} or {name} v{version} is registered twice")
        versions.append(SchemaVersion(schema_id, name, version, digest))
    for name in {v.name for v in versions}:
        numbers = sorted(v.version for v in versions if v.name == name)
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"registry: {name} has versions {numbers}, expected 1..{len(numbers)} without gaps")
    return tuple(versions)


def newest_versions(versions: Iterable[SchemaVersion]) -> dict[str, SchemaVersion]:
    """Return each schema's highest registered version."""
    newest: dict[str, SchemaVersion] = {}
    for entry in versions:
        if entry.name not in newest or newest[entry.name].version < entry.version:
            newest[entry.name] = entry
    return newest


def file_digest(data: bytes) -> str:
    """Return the sha256 hex digest the registry records for a schema file's bytes."""
    return hashlib.sha256(data).hexdigest()


def _parse_versions(versions: tuple[SchemaVersion, ...], sources: Mapping[int, Any]) -> dict[int, Schema]:
    """Parse every version; a reference to another schema's named type means its newest version registered above.

    Registration order pins references: a version keeps seeing the types that existed when it was
    added, so a new version of one schema never changes what an older version of another means.
    """
    newest_types: dict[str, tuple[int, dict[str, Any]]] = {}  # schema -> (version, named types it defines)
    parsed: dict[int, Schema] = {}
    for entry in versions:
        # Each version gets its own dict: fastavro keeps it inside the parsed schema.
        context: dict[str, Any] = {}
        for name, (_, types) in newest_types.items():
            if name != entry.name:
                context.update(types)
        inherited = set(context)
        parsed[entry.schema_id] = fastavro.parse_schema(sources[entry.schema_id], named_schemas=context)
        own = {key: value for key, value in context.items() if key not in inherited}
        if entry.name not in newest_types or newest_types[entry.name][0] < entry.version:
            newest_types[entry.name] = (entry.version, own)
    return parsed


class Codec:
    """Encode and decode Confluent-framed Avro with a fixed set of registered schema versions.

    `use_versions` pins a schema to an older version: the codec then writes and reads it as that
    version, as a release that predates the newer ones did (tests model rolling deploys with it).
    """

    def __init__(self, versions: Iterable[SchemaVersion], sources: Mapping[int, Any],
                 use_versions: Mapping[str, int] | None = None) -> None:
        self.versions = tuple(versions)
        self._parsed = _parse_versions(self.versions, sources)
        self._by_id = {v.schema_id: v for v in self.versions}
        self._by_name_version = by_name_version = {(v.name, v.version): v for v in self.versions}
        self.current = newest_versions(self.versions)
        for name, version in (use_versions or {}).items():
            self.current[name] = by_name_version[(name, version)]
        # What encode and decode need per schema name in one lookup: the hot path is one dict get.
        self._use = {name: (v, _HEADER.pack(MAGIC_BYTE, v.schema_id), self._parsed[v.schema_id])
                     for name, v in self.current.items()}
        # Only where the id still means that schema: a codec built over other versions (tests) has no legacy.
        self._legacy = {
            schema_id: tuple(by_name_version[w] for w in writers if w in by_name_version)
            for schema_id, writers in LEGACY_WRITERS.items()
            if schema_id in self._by_id and all(name == self._by_id[schema_id].name for name, _ in writers)
        }

    def version(self, name: str, number: int) -> SchemaVersion:
        """Return the registered version `number` of schema `name` (KeyError if there is none)."""
        return self._by_name_version[(name, number)]

    def parsed(self, schema_id: int) -> Schema:
        """Return the parsed schema registered under `schema_id`."""
        return self._parsed[schema_id]

    def schema(self, name: str) -> Schema:
        """Return the parsed version of `name` this codec writes and reads."""
        return self._use[name][2]

    def encode(self, schema_name: str, record: dict[str, Any]) -> bytes:
        """Encode `record` with the schema's current version; raises ValueError naming the bad field."""
        _, header, parsed = self._use[schema_name]
        buf = io.BytesIO()
        buf.write(header)
        try:
            fastavro.schemaless_writer(buf, parsed, record, strict_allow_default=True)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{schema_name}: {exc}") from exc
        return buf.getvalue()

    def decode(self, schema_name: str, data: bytes) -> dict[str, Any]:
        """Decode a record of any known version of `schema_name` into its current version, or raise DecodeError."""
        if len(data) < _HEADER.size:
            raise DecodeError(f"record of {len(data)} bytes is shorter than the 5-byte Confluent header")
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC_BYTE:
            raise DecodeError(f"magic byte is {magic}, expected {MAGIC_BYTE}")
        reader, _, reader_schema = self._use[schema_name]
        resolve_to: Schema | None
        if schema_id == reader.schema_id:
            writer, resolve_to = reader, None  # today's records: no resolution, the cost of a plain read
        else:
            found = self._by_id.get(schema_id)
            if found is None:
                raise UnknownSchemaId(schema_id, schema_name,
                                      (v.schema_id for v in self.versions if v.name == schema_name))
            if found.name != schema_name:
                raise DecodeError(f"schema id {schema_id} is not {schema_name}: it is {found.name} v{found.version}")
            writer, resolve_to = found, reader_schema
        try:
            return self._read_body(data, writer, resolve_to)
        except DecodeError:
            for legacy in self._legacy.get(schema_id, ()):
                try:
                    return self._read_body(data, legacy, reader_schema)
                except DecodeError:
                    continue
            raise

    def _read_body(self, data: bytes, writer: SchemaVersion, reader: Schema | None) -> dict[str, Any]:
        body = io.BytesIO(data)
        body.seek(_HEADER.size)
        try:
            record = fastavro.schemaless_reader(body, self._parsed[writer.schema_id], reader)
        except Exception as exc:  # fastavro raises many types on corrupt input
            raise DecodeError(f"invalid {writer.name} body (v{writer.version}, schema id {writer.schema_id}): "
                              f"{type(exc).__name__}: {exc}") from exc
        if body.tell() != len(data):
            raise DecodeError(f"{len(data) - body.tell()} trailing bytes after the {writer.name} record")
        assert isinstance(record, dict)
        return record


def load_codec(schema_dir: Path = SCHEMA_DIR, use_versions: Mapping[str, int] | None = None) -> Codec:
    """Build a codec from a schemas folder: its registry and every version file the registry lists."""
    versions = parse_registry((schema_dir / REGISTRY_FILE).read_text())
    sources = {v.schema_id: json.loads((schema_dir / v.file_name).read_text()) for v in versions}
    return Codec(versions, sources, use_versions)


@lru_cache(maxsize=1)
def default_codec() -> Codec:
    """Return the codec of this release's schemas, parsed once."""
    return load_codec()


# The id each schema is written with today, for code that frames bytes by hand (tests, upstream examples).
SCHEMA_IDS: dict[str, int] = {
    name: entry.schema_id
    for name, entry in newest_versions(parse_registry((SCHEMA_DIR / REGISTRY_FILE).read_text())).items()
}


def schema(name: str) -> Schema:
    """Return the parsed current version of the Avro schema called `name`."""
    return default_codec().schema(name)


def encode(schema_name: str, record: dict[str, Any]) -> bytes:
    """Encode `record` in Confluent wire format with the schema's newest version; ValueError names the bad field."""
    return default_codec().encode(schema_name, record)


def decode(schema_name: str, data: bytes) -> dict[str, Any]:
    """Decode Confluent-framed Avro bytes of any known version of `schema_name`, or raise DecodeError."""
    return default_codec().decode(schema_name, data)


def validation_errors(schema_name: str, record: dict[str, Any]) -> list[str]:
    """Return human-readable reasons `record` does not fit `schema_name` (empty if it does)."""
    from fastavro.validation import ValidationError, validate

    try:
        validate(record, schema(schema_name), raise_errors=True, strict=True)
    except ValidationError as exc:
        return [str(e) for e in exc.errors] or [str(exc)]
    return []
