"""`touchstream import`: history as Segment-shaped events, read from a file row by row. Pure: no I/O.

A row becomes one event for ingest's `/v1/batch`, or a refusal naming its line, field and reason
(the rest of the file goes in). Rows come from JSON Lines (one Segment-shaped event per line) or
CSV (columns mapped onto event fields). Each event gets a `messageId` derived from its content
when it has none, so sending a row twice is a duplicate ingest drops, and an interrupted import
resumes where its state says it stopped.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import yaml

# Ingest's own limits (IngestSettings: max_batch_events, max_batch_bytes). The JSON of an event is
# larger than the Avro record ingest measures against max_event_bytes, so batches keep a margin.
MAX_BATCH_EVENTS = 2500
MAX_BATCH_BYTES = 500 * 1024
BATCH_BYTES_MARGIN = 20 * 1024
COLUMN_TYPES = ("string", "number", "integer", "boolean", "json")
# Fields a client sets for the clock-skew correction: on history it would move every event to
# the time of the import (timestamp + (receivedAt - sentAt)).
CLOCK_SKEW_FIELDS = ("sentAt", "receivedAt")
EVENT_TYPES = ("track", "identify", "page", "screen", "group", "alias")


@dataclass(frozen=True)
class RowRefused:
    """A row that does not go in: where it is, which field, why."""

    line: int
    field: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class RowError(ValueError):
    """A problem with one row; the importer records it as a RowRefused."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Row:
    """One event ready for ingest, and the line of the file it came from."""

    line: int
    event: dict[str, Any]
    size: int  # bytes of its JSON in a request


def message_id_for(event: Mapping[str, Any]) -> str:
    """Return a messageId derived from the event's content: the same row gives the same id on every run.

    >>> message_id_for({"userId": "u1", "event": "Order Completed"}) == message_id_for(
    ...     {"event": "Order Completed", "userId": "u1"})
    True
    >>> message_id_for({"userId": "u1"})[:4]
    'imp-'
    """
    canonical = orjson.dumps(event, option=orjson.OPT_SORT_KEYS, default=str)
    return "imp-" + hashlib.sha256(canonical).hexdigest()[:40]


def prepare_event(raw: Any) -> dict[str, Any]:
    """Return the event to send for one row's Segment-shaped object, or raise RowError.

    History needs its own time: a row without `timestamp` (or `originalTimestamp`) is refused, since
    ingest would stamp it with the time of the import. `sentAt`/`receivedAt` are dropped (see
    CLOCK_SKEW_FIELDS). `type` defaults to track for a row with an `event`, else it is required.

    >>> prepare_event({"userId": "u1", "event": "Order Completed", "timestamp": "2026-01-02T10:00:00Z",
    ...                "sentAt": "2026-01-02T10:00:01Z"})["type"]
    'track'
    >>> prepare_event({"userId": "u1", "event": "Order Completed"})
    Traceback (most recent call last):
    ...
    services.ingest.backfill.RowError: timestamp: history needs the time it happened (timestamp or \
originalTimestamp); without one ingest would stamp it with the time of the import
    """
    if not isinstance(raw, dict):
        raise RowError("(row)", "must be a JSON object (one Segment-shaped event)")
    event = {key: value for key, value in raw.items() if key not in CLOCK_SKEW_FIELDS}
    if event.get("type") is None:
        if event.get("event") is None:
            raise RowError("type", f"missing; one of {', '.join(EVENT_TYPES)} (track is assumed only with an event)")
        event["type"] = "track"
    if event["type"] not in EVENT_TYPES:
        raise RowError("type", f"must be one of {', '.join(EVENT_TYPES)}, got {str(event['type'])[:40]!r}")
    if event.get("timestamp") is None and event.get("originalTimestamp") is None:
        raise RowError("timestamp", "history needs the time it happened (timestamp or originalTimestamp); "
                                    "without one ingest would stamp it with the time of the import")
    if event.get("messageId") is None:
        event["messageId"] = message_id_for(event)
    return event


def encoded_size(event: Mapping[str, Any]) -> int:
    """Return how many bytes the event adds to a request body (its JSON plus a separator)."""
    return len(orjson.dumps(event, default=str)) + 1


def jsonl_rows(lines: Iterable[tuple[int, bytes]]) -> Iterator[Row | RowRefused]:
    """Turn (line number, line) pairs of a JSON Lines file into rows; blank lines are skipped.

    >>> [type(r).__name__ for r in jsonl_rows([(1, b'{"userId": "u", "event": "E", "timestamp": 1}'),
    ...                                        (2, b''), (3, b'{"userId": ')])]
    ['Row', 'RowRefused']
    """
    for line, text in lines:
        if not text.strip():
            continue
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            yield RowRefused(line, "(row)", f"not valid JSON: {str(exc)[:200]}")
            continue
        yield _row(line, lambda raw=raw: raw)


def _row(line: int, build: Any) -> Row | RowRefused:
    try:
        event = prepare_event(build())
    except RowError as exc:
        return RowRefused(line, exc.field, exc.reason)
    return Row(line, event, encoded_size(event))


@dataclass(frozen=True)
class Column:
    """Where an event field's value comes from in a CSV row, and what type it is read as."""

    column: str
    type: str = "string"


@dataclass(frozen=True)
class ColumnMapping:
    """CSV columns -> event fields (dotted paths such as `properties.total`), plus constant fields."""

    columns: Mapping[str, Column] = field(default_factory=dict)
    constants: Mapping[str, Any] = field(default_factory=dict)


class MappingError(ValueError):
    """A column mapping that cannot be used; the message says where."""


def _column(spec: Any, where: str) -> Column:
    """Read `Column` or `Column:type` (or {column, type}) into a Column."""
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"column", "type"}
        if unknown or not isinstance(spec.get("column"), str):
            raise MappingError(f"{where}: use a column name, 'name:type', or {{column: name, type: ...}}")
        name, kind = spec["column"], spec.get("type", "string")
    elif isinstance(spec, str):
        name, _, kind = spec.rpartition(":") if spec.rpartition(":")[2] in COLUMN_TYPES else (spec, "", "string")
    else:
        raise MappingError(f"{where}: use a column name, 'name:type', or {{column: name, type: ...}}")
    if kind not in COLUMN_TYPES:
        raise MappingError(f"{where}: unknown type {kind!r}; use one of {', '.join(COLUMN_TYPES)}")
    if not name.strip():
        raise MappingError(f"{where}: the column name is empty")
    return Column(name.strip(), kind)


def parse_column_mapping(text: str, source: str = "mapping") -> ColumnMapping:
    """Parse a column mapping file: `columns` (event field -> column) and `constants` (event field -> value).

    >>> m = parse_column_mapping('''
    ... columns:
    ...   userId: customer
    ...   timestamp: ordered_at
    ...   properties.total: amount:number
    ... constants: {event: Order Completed}
    ... ''')
    >>> m.columns["properties.total"], m.constants
    (Column(column='amount', type='number'), {'event': 'Order Completed'})
    """
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MappingError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(document, Mapping) or set(document) - {"columns", "constants"}:
        raise MappingError(f"{source}: expected a mapping with 'columns' (and optionally 'constants')")
    columns = document.get("columns") or {}
    constants = document.get("constants") or {}
    if not isinstance(columns, Mapping) or not isinstance(constants, Mapping):
        raise MappingError(f"{source}: 'columns' and 'constants' map event fields (e.g. properties.total) to "
                           "columns and values")
    return ColumnMapping({str(path): _column(spec, f"{source}: columns.{path}") for path, spec in columns.items()},
                         {str(path): value for path, value in constants.items()})


def header_mapping(headers: Iterable[str]) -> ColumnMapping:
    """Without a mapping file, each CSV header names its event field, optionally with a type.

    >>> header_mapping(["userId", "properties.total:number"]).columns["properties.total"]
    Column(column='properties.total:number', type='number')
    """
    mapping = {}
    for header in headers:
        name, _, kind = header.rpartition(":") if header.rpartition(":")[2] in COLUMN_TYPES else (header, "", "")
        mapping[name.strip()] = Column(header, kind or "string")
    return ColumnMapping(mapping)


def missing_columns(mapping: ColumnMapping, headers: Iterable[str]) -> list[str]:
    """Return the mapped columns the CSV header does not have."""
    present = set(headers)
    return sorted({c.column for c in mapping.columns.values()} - present)


def _typed(value: str, kind: str, column: str) -> Any:
    text = value.strip()
    try:
        if kind == "number":
            number = float(text)
            if not math.isfinite(number):
                raise ValueError
            return number
        if kind == "integer":
            return int(text)
        if kind == "boolean":
            if text.lower() in ("true", "yes", "1"):
                return True
            if text.lower() in ("false", "no", "0"):
                return False
            raise ValueError
        if kind == "json":
            return orjson.loads(text)
    except (ValueError, orjson.JSONDecodeError):
        raise RowError(column, f"{text[:40]!r} is not {'an' if kind == 'integer' else 'a'} {kind}") from None
    return value


def _place(event: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    target = event
    for part in parents:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise RowError(path, f"{part!r} is both a value and an object in the mapping")
        target = child
    target[leaf] = value


def csv_event(cells: Mapping[str, str | None], mapping: ColumnMapping) -> dict[str, Any]:
    """Build the event of one CSV row; an empty cell leaves its field out.

    >>> csv_event({"customer": "u1", "amount": "12.50", "note": ""}, ColumnMapping(
    ...     {"userId": Column("customer"), "properties.total": Column("amount", "number"),
    ...      "properties.note": Column("note")}, {"event": "Order Completed"}))
    {'event': 'Order Completed', 'userId': 'u1', 'properties': {'total': 12.5}}
    """
    event: dict[str, Any] = {}
    for path, value in mapping.constants.items():
        _place(event, path, value)
    for path, column in mapping.columns.items():
        cell = cells.get(column.column)
        if cell is None or not cell.strip():
            continue
        _place(event, path, _typed(cell, column.type, column.column))
    return event


def csv_rows(rows: Iterable[tuple[int, list[str]]], headers: list[str],
             mapping: ColumnMapping) -> Iterator[Row | RowRefused]:
    """Turn (line number, cells) pairs of a CSV file (read with errors="surrogateescape") into rows.

    >>> not_utf8 = "u" + chr(0xDCFF)  # what surrogateescape makes of a byte that is not UTF-8
    >>> [r.reason for r in csv_rows([(2, ["u1", "x", "y"]), (3, [not_utf8])], ["userId"], header_mapping(["userId"]))]
    ['has 3 cells, the header has 1 columns', 'is not valid UTF-8']
    """
    for line, values in rows:
        if len(values) > len(headers):
            yield RowRefused(line, "(row)", f"has {len(values)} cells, the header has {len(headers)} columns")
        elif any(_not_utf8(value) for value in values):
            yield RowRefused(line, "(row)", "is not valid UTF-8")
        else:
            cells = dict(zip(headers, values, strict=False))
            yield _row(line, lambda cells=cells: csv_event(cells, mapping))


def _not_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def batches(rows: Iterable[Row | RowRefused], max_events: int = 500,
            max_bytes: int = MAX_BATCH_BYTES - BATCH_BYTES_MARGIN) -> Iterator[tuple[list[Row], list[RowRefused]]]:
    """Group rows into requests within ingest's limits; yield (rows to send, rows refused on the way).

    A batch ends at `max_events` events or before `max_bytes` would be passed. A row too large for
    any request is refused here.

    >>> rows = [Row(n, {}, 100) for n in range(1, 6)]
    >>> [[r.line for r in sent] for sent, _ in batches(rows, max_events=2)]
    [[1, 2], [3, 4], [5]]
    """
    if not 1 <= max_events <= MAX_BATCH_EVENTS:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH_EVENTS} events (ingest's max_batch_events)")
    pending: list[Row] = []
    refused: list[RowRefused] = []
    size = 0
    for row in rows:
        if isinstance(row, RowRefused):
            refused.append(row)
            continue
        if row.size > max_bytes:
            refused.append(RowRefused(row.line, "(row)", f"is {row.size} bytes as JSON; a request holds at most "
                                                         f"{max_bytes} (max_batch_bytes)"))
            continue
        if pending and (len(pending) >= max_events or size + row.size > max_bytes):
            yield pending, refused
            pending, refused, size = [], [], 0
        pending.append(row)
        size += row.size
    if pending or refused:
        yield pending, refused


@dataclass
class ImportCounts:
    """What an import did so far; kept in its state file across interruptions."""

    accepted: int = 0
    duplicates: int = 0
    suppressed: int = 0
    refused: int = 0


@dataclass
class ImportState:
    """Where an import stopped: the next line to read, counts so far, and the file it belongs to."""

    file: str
    fingerprint: str
    next_line: int = 1
    counts: ImportCounts = field(default_factory=ImportCounts)
    finished: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImportState:
        values = dict(data)
        values["counts"] = ImportCounts(**values.get("counts", {}))
        return cls(**values)


def file_fingerprint(size: int, head: bytes) -> str:
    """Return what identifies a file's contents for resuming: its size and the digest of its first bytes.

    >>> file_fingerprint(3, b"abc")
    '3:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'
    """
    return f"{size}:{hashlib.sha256(head).hexdigest()}"


def progress_line(lines_done: int, lines_total: int, events: int, elapsed_s: float, counts: ImportCounts) -> str:
    """Return the one-line progress report: lines, events/s, ETA, and the counts.

    >>> progress_line(250, 1000, 240, 2.0, ImportCounts(accepted=230, duplicates=10, refused=10))
    'line 250/1,000 (25%)  120 events/s  ETA 6s  accepted 230  duplicates 10  refused 10'
    """
    rate = events / elapsed_s if elapsed_s > 0 else 0.0
    share = lines_done / lines_total if lines_total else 1.0
    remaining_s = (lines_total - lines_done) * (elapsed_s / lines_done) if lines_done and elapsed_s > 0 else None
    eta = "?" if remaining_s is None else _duration(remaining_s)
    return (f"line {lines_done:,}/{lines_total:,} ({share:.0%})  {rate:,.0f} events/s  ETA {eta}  "
            f"accepted {counts.accepted:,}  duplicates {counts.duplicates:,}  refused {counts.refused:,}")


def _duration(seconds: float) -> str:
    """
    >>> _duration(42.4), _duration(3725)
    ('42s', '1h02m')
    """
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class TokenBucket:
    """Events/s allowed to leave, with bursts of `burst`; the caller passes the clock.

    >>> bucket = TokenBucket(rate=100, burst=100, now=0.0)
    >>> bucket.wait_s(100, now=0.0), bucket.wait_s(50, now=0.0)
    (0.0, 0.5)
    """

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def wait_s(self, events: int, now: float) -> float:
        """Spend `events`; return how long to wait before sending them (0 when there were tokens)."""
        if self.rate <= 0:
            return 0.0
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= events
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
