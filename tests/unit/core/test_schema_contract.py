"""The Avro contracts in schemas/: every version registered and unchanged, round-tripping and readable across versions.

A failure here names what to do: register a new file with a line in schemas/registry.txt, add a
new version instead of editing a registered one, or make a change compatible (schemas/README.md).
"""

from __future__ import annotations

import io
import itertools
import struct

import fastavro
import pytest
from fastavro.types import Schema

from touchstream import avro
from touchstream.avro_compat import resolution_problem, sample_records
from touchstream.topics import ALL_TOPICS

REGISTRY = avro.parse_registry((avro.SCHEMA_DIR / avro.REGISTRY_FILE).read_text())
CODEC = avro.default_codec()
# A version the one before it cannot read (a new enum symbol or union branch, a removed field
# without a default): consumers pinned to the older version break, so say why it is worth it.
FORWARD_INCOMPATIBLE: dict[tuple[str, int], str] = {
    ("RetentionAction", 2): "the `backfill` outcome (decisions about history: recorded, never delivered); the "
                            "consumers of `actions` (triggers' delivery, the console) are in this release",
}


def versions_of(name: str) -> list[avro.SchemaVersion]:
    return sorted((v for v in REGISTRY if v.name == name), key=lambda v: v.version)


SCHEMA_NAMES = sorted({v.name for v in REGISTRY})
ALL_PAIRS = [(old, new) for name in SCHEMA_NAMES for old, new in itertools.combinations(versions_of(name), 2)]
CONSECUTIVE = [(old, new) for old, new in ALL_PAIRS if new.version == old.version + 1]


def pair_id(pair: tuple[avro.SchemaVersion, avro.SchemaVersion]) -> str:
    old, new = pair
    return f"{old.name}-v{old.version}-v{new.version}"


def test_every_schema_file_is_registered_and_unchanged() -> None:
    on_disk = {path.name: avro.file_digest(path.read_bytes()) for path in avro.SCHEMA_DIR.glob("*.avsc")}
    registered = {v.file_name: v.sha256 for v in REGISTRY}
    next_id = max(v.schema_id for v in REGISTRY) + 1
    lines_to_add = [f"{next_id + n}  {name.split('.v')[0]}  {name.split('.v')[1].removesuffix('.avsc')}  "
                    f"{on_disk[name]}" for n, name in enumerate(sorted(set(on_disk) - set(registered)))]
    assert not lines_to_add, "register the new files: add these lines to schemas/registry.txt: " + str(lines_to_add)
    assert not set(registered) - set(on_disk), "a registered version's file is missing: ids on the wire need it"
    changed = sorted(name for name, digest in registered.items() if on_disk[name] != digest)
    assert not changed, f"{changed} changed after registration: add a new version instead (schemas/README.md)"


def test_every_topic_writes_the_newest_version_of_a_registered_schema() -> None:
    assert {topic.schema for topic in ALL_TOPICS} <= set(SCHEMA_NAMES)
    for topic in ALL_TOPICS:
        newest = versions_of(topic.schema)[-1]
        record = sample_records(CODEC.parsed(newest.schema_id))[0]
        assert avro.encode(topic.schema, record)[:5] == struct.pack(">bI", 0, newest.schema_id)
        assert avro.SCHEMA_IDS[topic.schema] == newest.schema_id


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda v: v.file_name)
def test_every_version_round_trips(entry: avro.SchemaVersion) -> None:
    codec = avro.load_codec(use_versions={entry.name: entry.version})
    for record in sample_records(codec.parsed(entry.schema_id)):
        data = codec.encode(entry.name, record)
        assert data[:5] == struct.pack(">bI", 0, entry.schema_id)
        assert codec.decode(entry.name, data) == record


@pytest.mark.parametrize("pair", ALL_PAIRS, ids=pair_id)
def test_every_newer_version_reads_every_older_one(pair: tuple[avro.SchemaVersion, avro.SchemaVersion]) -> None:
    # Every older one, not only the previous: a compacted topic keeps a customer's last record for years.
    old, new = pair
    problem = resolution_problem(CODEC.parsed(old.schema_id), CODEC.parsed(new.schema_id))
    assert problem is None, f"{new.file_name} cannot read {old.file_name}: {problem}"


@pytest.mark.parametrize("pair", CONSECUTIVE, ids=pair_id)
def test_each_version_reads_the_next_unless_declared(pair: tuple[avro.SchemaVersion, avro.SchemaVersion]) -> None:
    old, new = pair
    problem = resolution_problem(CODEC.parsed(new.schema_id), CODEC.parsed(old.schema_id))
    if (new.name, new.version) in FORWARD_INCOMPATIBLE:
        assert problem is not None, f"{new.file_name} is declared forward incompatible but {old.file_name} reads it"
    else:
        assert problem is None, (f"{old.file_name} cannot read {new.file_name}: {problem}; make the change "
                                 "forward compatible or declare it in FORWARD_INCOMPATIBLE with the reason")


def test_forward_incompatible_declarations_name_registered_versions() -> None:
    assert set(FORWARD_INCOMPATIBLE) <= {(new.name, new.version) for _, new in CONSECUTIVE}


@pytest.mark.parametrize("schema_id", sorted(avro.LEGACY_WRITERS))
def test_bodies_sharing_a_legacy_id_parse_under_exactly_one_of_its_versions(schema_id: int) -> None:
    # The codec tells the versions that wrote one id apart by which of them reads the body to its end.
    candidates = [CODEC.parsed(schema_id)] + [
        CODEC.parsed(v.schema_id) for v in REGISTRY if (v.name, v.version) in avro.LEGACY_WRITERS[schema_id]]
    assert len(candidates) == 1 + len(avro.LEGACY_WRITERS[schema_id])
    for written_with, writer in enumerate(candidates):
        for record in sample_records(writer):
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, writer, record)
            body = buf.getvalue()
            parses_whole = [n for n, candidate in enumerate(candidates) if _reads_exactly(body, candidate)]
            assert parses_whole == [written_with]


def _reads_exactly(body: bytes, writer: Schema) -> bool:
    stream = io.BytesIO(body)
    try:
        fastavro.schemaless_reader(stream, writer, None)
    except Exception:  # a body that is not this version's fails in several ways
        return False
    return stream.tell() == len(body)
