"""`touchstream import`: rows become events or refusals with their line, batches stay within ingest's limits,
and the sender leaves out what ingest refuses and waits out what it cannot take yet."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.ingest.backfill import (
    MAX_BATCH_BYTES,
    Column,
    ColumnMapping,
    ImportCounts,
    ImportState,
    MappingError,
    Row,
    RowRefused,
    batches,
    csv_rows,
    header_mapping,
    jsonl_rows,
    parse_column_mapping,
    prepare_event,
)
from services.ingest.importer import BatchSender, ImportOptions, ImportStopped, count_lines

HISTORY = "2025-06-01T10:00:00Z"


def a_line(**fields: Any) -> bytes:
    return json.dumps({"userId": "u1", "event": "Order Completed", "timestamp": HISTORY, **fields}).encode()


def test_a_row_without_message_id_gets_one_from_its_content_the_same_on_every_run() -> None:
    first = prepare_event({"userId": "u1", "event": "Order Completed", "timestamp": HISTORY})
    again = prepare_event({"timestamp": HISTORY, "event": "Order Completed", "userId": "u1"})
    other = prepare_event({"userId": "u2", "event": "Order Completed", "timestamp": HISTORY})
    assert first["messageId"] == again["messageId"] != other["messageId"]
    assert prepare_event({"userId": "u1", "type": "identify", "timestamp": HISTORY, "messageId": "m-7"})[
        "messageId"] == "m-7"


def test_clock_skew_fields_are_dropped_so_history_keeps_its_time() -> None:
    event = prepare_event({"userId": "u1", "event": "E", "timestamp": HISTORY, "sentAt": "2026-12-01T00:00:00Z",
                           "receivedAt": "2026-12-01T00:00:01Z"})
    assert "sentAt" not in event and "receivedAt" not in event and event["timestamp"] == HISTORY


@pytest.mark.parametrize(("line", "field", "reason"), [
    (b'{"userId": "u1", "event": ', "(row)", "not valid JSON"),
    (b'[1, 2]', "(row)", "must be a JSON object"),
    (b'{"userId": "u1", "event": "E"}', "timestamp", "history needs the time it happened"),
    (b'{"userId": "u1", "timestamp": 1}', "type", "missing"),
    (b'{"userId": "u1", "type": "purchase", "timestamp": 1}', "type", "must be one of"),
])
def test_a_malformed_row_is_refused_with_its_line_and_the_rest_goes_on(line: bytes, field: str, reason: str) -> None:
    rows = list(jsonl_rows([(1, a_line(messageId="a")), (2, line), (3, b"  \n"), (4, a_line(messageId="b"))]))
    assert [type(r).__name__ for r in rows] == ["Row", "RowRefused", "Row"]
    refused = rows[1]
    assert isinstance(refused, RowRefused) and (refused.line, refused.field) == (2, field)
    assert refused.reason.startswith(reason)


def test_csv_columns_map_onto_event_fields_with_types() -> None:
    mapping = parse_column_mapping("""
columns:
  userId: Customer
  timestamp: Date
  properties.total: Amount:number
  properties.items: {column: Items, type: integer}
  email: E-mail
constants:
  event: Order Completed
  channel: store_pos
""")
    headers = ["Customer", "Date", "Amount", "Items", "E-mail"]
    rows = list(csv_rows([(2, ["c-1", HISTORY, "12.50", "3", ""]), (3, ["c-2", HISTORY, "twelve", "1", "x@y.z"]),
                          (4, ["c-3", HISTORY, "1", "1", "a@b.c", "extra"])], headers, mapping))
    first = rows[0]
    assert isinstance(first, Row)
    assert {k: v for k, v in first.event.items() if k != "messageId"} == {
        "event": "Order Completed", "channel": "store_pos", "type": "track", "userId": "c-1", "timestamp": HISTORY,
        "properties": {"total": 12.5, "items": 3}}
    assert rows[1] == RowRefused(3, "Amount", "'twelve' is not a number")
    assert rows[2] == RowRefused(4, "(row)", "has 6 cells, the header has 5 columns")


def test_without_a_mapping_each_header_names_its_field_and_type() -> None:
    mapping = header_mapping(["userId", "event", "timestamp:integer", "properties.total:number"])
    [row] = list(csv_rows([(2, ["u1", "Order Completed", "1700000000000", "5"])], list(mapping_headers(mapping)),
                          mapping))
    assert isinstance(row, Row)
    assert row.event["timestamp"] == 1_700_000_000_000 and row.event["properties"] == {"total": 5.0}


def mapping_headers(mapping: ColumnMapping) -> list[str]:
    return [column.column for column in mapping.columns.values()]


@pytest.mark.parametrize(("text", "message"), [
    ("columns: {userId: {column: c, type: float}}", "unknown type 'float'"),
    ("columns: {userId: {col: c}}", "use a column name"),
    ("rows: {}", "expected a mapping with 'columns'"),
    ("columns: [", "not valid YAML"),
])
def test_a_bad_mapping_says_where(text: str, message: str) -> None:
    with pytest.raises(MappingError, match=message):
        parse_column_mapping(text, "map.yaml")


def test_batches_stay_within_ingests_event_and_byte_limits() -> None:
    rows: list[Row | RowRefused] = [Row(n, {"n": n}, 200_000) for n in range(1, 6)]
    rows.insert(2, RowRefused(99, "(row)", "bad"))
    rows.append(Row(7, {}, MAX_BATCH_BYTES))
    grouped = [([r.line for r in sent], [r.line for r in refused]) for sent, refused in batches(rows)]
    # 200 KB events: two per request (the third would pass 500 KB less the margin); the huge one is refused.
    assert grouped == [([1, 2], [99]), ([3, 4], []), ([5], [7])]
    assert [len(sent) for sent, _ in batches([Row(n, {}, 10) for n in range(1, 1201)], max_events=500)] == [
        500, 500, 200]
    with pytest.raises(ValueError, match="max_batch_events"):
        list(batches([], max_events=2501))


def test_state_round_trips_through_json() -> None:
    state = ImportState("h.jsonl", "3:abc", next_line=42, counts=ImportCounts(accepted=40, refused=1))
    assert ImportState.from_json(json.loads(json.dumps(state.to_json()))) == state


def test_lines_are_counted_with_or_without_a_final_newline(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"1\n2\n3\n")
    (tmp_path / "b").write_bytes(b"1\n2\n3")
    assert count_lines(tmp_path / "a") == count_lines(tmp_path / "b") == 3


def options(tmp_path: Path, **overrides: Any) -> ImportOptions:
    values: dict[str, Any] = {"url": "http://ingest", "write_key": "k", "file_format": "jsonl",
                              "state_path": tmp_path / "s", "report_path": tmp_path / "r",
                              "refusals_path": tmp_path / "f", "give_up_after_s": 0.3}
    return ImportOptions(**{**values, **overrides})


def rows_of(*lines: int) -> list[Row]:
    return [Row(line, {"messageId": f"m{line}"}, 10) for line in lines]


async def test_the_sender_leaves_out_events_ingest_refuses_and_sends_the_rest_again(tmp_path: Path) -> None:
    bodies: list[list[str]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        ids = [e["messageId"] for e in json.loads(request.content)["batch"]]
        bodies.append(ids)
        if "m12" in ids:
            return httpx.Response(400, json={"success": False, "errors": [
                {"index": ids.index("m12"), "field": "properties.total", "reason": "must be a number"}]})
        return httpx.Response(200, json={"success": True, "accepted": len(ids) - 1, "duplicates": 1, "suppressed": 0})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        result = await BatchSender(client, options(tmp_path)).send(rows_of(11, 12, 13))
    assert bodies == [["m11", "m12", "m13"], ["m11", "m13"]]
    assert (result.accepted, result.duplicates) == (1, 1)
    assert result.refused == [RowRefused(12, "properties.total", "must be a number")]


async def test_the_sender_waits_out_429_and_503_then_gives_up_resumably(tmp_path: Path) -> None:
    answers = iter([httpx.Response(429, headers={"Retry-After": "0.1"}), httpx.Response(503),
                    httpx.Response(200, json={"accepted": 1})])

    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda _r: next(answers))) as client:
        result = await BatchSender(client, options(tmp_path, give_up_after_s=5)).send(rows_of(1))
    assert result.accepted == 1

    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda _r: httpx.Response(503))) as client:
        with pytest.raises(ImportStopped, match="run the same command again to resume"):
            await BatchSender(client, options(tmp_path)).send(rows_of(1))


async def test_a_refused_write_key_stops_the_import_saying_what_to_do(tmp_path: Path) -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda _r: httpx.Response(401, json={}))) as client:
        with pytest.raises(ImportStopped, match="keys add backfill"):
            await BatchSender(client, options(tmp_path)).send(rows_of(1))


async def test_a_server_with_smaller_limits_gets_halved_batches(tmp_path: Path) -> None:
    sizes: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        batch = json.loads(request.content)["batch"]
        sizes.append(len(batch))
        if len(batch) > 2:
            return httpx.Response(413, json={"message": "batch has too many events (max_batch_events)"})
        return httpx.Response(200, json={"accepted": len(batch)})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        result = await BatchSender(client, options(tmp_path)).send(rows_of(1, 2, 3, 4, 5))
    assert result.accepted == 5 and sizes == [5, 2, 3, 1, 2]


def test_a_column_type_in_a_mapping_reads_as_a_column() -> None:
    assert parse_column_mapping("columns: {userId: 'id:integer'}").columns["userId"] == Column("id", "integer")
