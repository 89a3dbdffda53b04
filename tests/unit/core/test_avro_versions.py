"""Schema versions in the codec: old records read into today's version, ids looked up, unknown ids refused loudly."""

from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import fastavro
import pytest

from touchstream import avro
from touchstream.avro_compat import resolution_problem
from touchstream.topics import SCORES

# A score as scoring writes it today (ScoreUpdate v3).
SCORE: dict[str, Any] = {
    "customer_id": "c-1", "message_id": "m-1", "event_time_ms": 1_000, "received_at_ms": 1_100,
    "churn_risk": 0.25, "purchase_propensity": 0.75, "segment": "loyal", "stage": "active",
    "reasons": [{"feature": "recency_days", "contribution": -0.5}], "features": {"recency_days": 3.0},
    "model_version": "logreg-1", "event_type": "track", "event_name": "Order Completed",
    "consent": ["marketing_email"], "channel": "app", "time_zone": "Europe/Berlin",
}
ADDED_IN = {"channel": 2, "time_zone": 3}  # ScoreUpdate fields and the version that added them


def as_version(record: dict[str, Any], version: int) -> dict[str, Any]:
    return {k: v for k, v in record.items() if ADDED_IN.get(k, 1) <= version}


def framed(schema_id: int, writer: Any, record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    buf.write(struct.pack(">bI", 0, schema_id))
    fastavro.schemaless_writer(buf, writer, record)
    return buf.getvalue()


@pytest.mark.parametrize("version", [1, 2])
def test_a_score_written_before_ids_were_per_version_decodes_with_todays_reader(version: int) -> None:
    # As it lies on the compacted topic: id 4 (the only ScoreUpdate id then) and an older body.
    old_writer = avro.default_codec().parsed(avro.default_codec().version("ScoreUpdate", version).schema_id)
    data = framed(avro.SCHEMA_IDS["ScoreUpdate"], old_writer, as_version(SCORE, version))
    decoded = avro.decode(SCORES.schema, data)
    defaults = {"channel": None, "time_zone": None}
    assert decoded == {**SCORE, **{k: defaults[k] for k, added in ADDED_IN.items() if added > version}}


@pytest.mark.parametrize("version", [1, 2])
def test_a_score_written_with_an_older_version_under_its_own_id_decodes_with_todays_reader(version: int) -> None:
    old_release = avro.load_codec(use_versions={"ScoreUpdate": version})
    data = old_release.encode("ScoreUpdate", as_version(SCORE, version))
    assert data[1:5] == avro.default_codec().version("ScoreUpdate", version).schema_id.to_bytes(4, "big")
    assert avro.decode("ScoreUpdate", data)["customer_id"] == "c-1"
    assert avro.decode("ScoreUpdate", data)["time_zone"] is None


@pytest.mark.parametrize("version", [1, 2])
def test_todays_score_decodes_with_an_older_reader(version: int) -> None:
    older_reader = avro.load_codec(use_versions={"ScoreUpdate": version})
    assert older_reader.decode("ScoreUpdate", avro.encode("ScoreUpdate", SCORE)) == as_version(SCORE, version)


def test_a_corrupt_score_under_the_legacy_id_reports_todays_version() -> None:
    data = avro.encode("ScoreUpdate", SCORE)
    with pytest.raises(avro.DecodeError, match=r"invalid ScoreUpdate body \(v3, schema id 4\)"):
        avro.decode("ScoreUpdate", data[:-3])
    with pytest.raises(avro.DecodeError, match="trailing bytes"):
        avro.decode("ScoreUpdate", data + b"\x00\x02")


def test_an_unknown_schema_id_names_the_id_and_the_topic() -> None:
    data = avro.encode("ScoreUpdate", SCORE)
    with pytest.raises(avro.UnknownSchemaId, match=r"unknown schema id 4711 on topic scores") as raised:
        avro.decode("ScoreUpdate", struct.pack(">bI", 0, 4711) + data[5:])
    assert isinstance(raised.value, avro.DecodeError)  # the stages dead-letter every DecodeError
    assert raised.value.schema_id == 4711


def test_the_id_of_another_schema_is_refused_with_both_names() -> None:
    data = avro.encode("DeadLetter", {"source": "s", "stage": "x", "reason": "r", "original": b"", "failed_at_ms": 1})
    with pytest.raises(avro.DecodeError, match="schema id 6 is not ScoreUpdate: it is DeadLetter v1"):
        avro.decode("ScoreUpdate", data)


def test_a_new_version_is_one_file_and_one_registry_line(tmp_path: Path) -> None:
    for path in avro.SCHEMA_DIR.iterdir():
        if path.suffix in (".avsc", ".txt"):
            shutil.copy2(path, tmp_path / path.name)
    source = json.loads((tmp_path / "ScoreUpdate.v3.avsc").read_text())
    source["fields"].append({"name": "predicted_value", "type": ["null", "double"], "default": None})
    v4 = json.dumps(source, indent=2).encode()
    (tmp_path / "ScoreUpdate.v4.avsc").write_bytes(v4)
    with (tmp_path / avro.REGISTRY_FILE).open("a") as registry:
        registry.write(f"4242  ScoreUpdate  4  {avro.file_digest(v4)}\n")
    next_release, this_release = avro.load_codec(tmp_path), avro.default_codec()

    written = next_release.encode("ScoreUpdate", {**SCORE, "predicted_value": 120.0})
    assert written[1:5] == (4242).to_bytes(4, "big")
    assert next_release.decode("ScoreUpdate", avro.encode("ScoreUpdate", SCORE)) == {**SCORE, "predicted_value": None}
    # A reader still on this release cannot know v4's fields: it refuses the record, naming it.
    with pytest.raises(avro.UnknownSchemaId, match="unknown schema id 4242 on topic scores"):
        this_release.decode("ScoreUpdate", written)
    assert resolution_problem(next_release.parsed(4242), this_release.schema("ScoreUpdate")) is None


def test_a_reference_to_another_schema_means_its_version_registered_before() -> None:
    identifier = {"type": "record", "name": "Identifier", "namespace": "t",
                  "fields": [{"name": "value", "type": "string"}]}
    identifier_v2 = {**identifier, "fields": [*identifier["fields"], {"name": "kind", "type": "string", "default": ""}]}
    holder = {"type": "record", "name": "Holder", "namespace": "t", "fields": [{"name": "id", "type": "t.Identifier"}]}
    digest = "0" * 64
    versions = [avro.SchemaVersion(1, "Identifier", 1, digest), avro.SchemaVersion(2, "Holder", 1, digest),
                avro.SchemaVersion(3, "Identifier", 2, digest), avro.SchemaVersion(4, "Holder", 2, digest)]
    codec = avro.Codec(versions, {1: identifier, 2: holder, 3: identifier_v2, 4: holder})

    def field_names_of_id(schema_id: int) -> list[str]:
        return [f["name"] for f in codec.parsed(schema_id)["__named_schemas"]["t.Identifier"]["fields"]]

    assert field_names_of_id(2) == ["value"]
    assert field_names_of_id(4) == ["value", "kind"]


@pytest.mark.parametrize(("registry", "reason"), [
    ("1 A 1 " + "a" * 64 + "\n1 B 1 " + "b" * 64, "registered twice"),
    ("1 A 1 " + "a" * 64 + "\n2 A 1 " + "b" * 64, "registered twice"),
    ("1 A 1 " + "a" * 64 + "\n2 A 3 " + "b" * 64, r"versions \[1, 3\]"),
    ("1 A 1 abc", "not a sha256"),
    ("1 A " + "a" * 64, "expected 'id schema version sha256'"),
    ("0 A 1 " + "a" * 64, "id must be"),
])
def test_an_inconsistent_registry_is_refused(registry: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        avro.parse_registry(registry)


RECORD = {"type": "record", "name": "R", "fields": [
    {"name": "id", "type": "string"},
    {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["a", "b"]}},
    {"name": "note", "type": ["null", "string"], "default": None},
]}


def changed(fields: list[dict[str, Any]]) -> dict[str, Any]:
    return {**RECORD, "fields": fields}


@pytest.mark.parametrize(("writer", "reader", "compatible"), [
    (RECORD, changed([*RECORD["fields"], {"name": "extra", "type": ["null", "long"], "default": None}]), True),
    (changed([*RECORD["fields"], {"name": "extra", "type": "long", "default": 0}]), RECORD, True),
    (RECORD, changed([*RECORD["fields"], {"name": "extra", "type": "long"}]), False),  # new field without default
    (RECORD, changed([RECORD["fields"][0], {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["a"]}},
                      RECORD["fields"][2]]), False),  # reader lost an enum symbol
    (RECORD, changed([*RECORD["fields"][:2], {"name": "note", "type": "null", "default": None}]),
     False),  # reader lost a union branch
    (RECORD, changed([{"name": "id", "type": "long"}, *RECORD["fields"][1:]]), False),  # type changed
])
def test_resolution_problem_finds_incompatible_changes(writer: dict[str, Any], reader: dict[str, Any],
                                                       compatible: bool) -> None:
    problem = resolution_problem(fastavro.parse_schema(writer), fastavro.parse_schema(reader))
    assert (problem is None) == compatible, problem
