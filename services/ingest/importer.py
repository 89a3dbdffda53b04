"""`touchstream import FILE`: send history through ingest's `/v1/batch` as a source of its own.

The file is read row by row (services/ingest/backfill.py turns rows into events or refusals),
sent in batches within ingest's limits at a bounded rate, and after each batch ingest
acknowledged, a small state file records the next line to read and the counts so far: an
interrupted import run again goes on from there (a batch sent twice is answered as duplicates,
by messageId). A row ingest refuses is recorded with its line, field and reason and left out;
the rest of its batch is sent again. The final report lists every refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx

from services.ingest.backfill import (
    ColumnMapping,
    ImportState,
    Row,
    RowRefused,
    TokenBucket,
    batches,
    csv_rows,
    file_fingerprint,
    header_mapping,
    jsonl_rows,
    missing_columns,
    progress_line,
)

FORMATS = ("csv", "jsonl")
# Consecutive seconds of 429/503/connection errors after which the import stops (resumable).
DEFAULT_GIVE_UP_AFTER_S = 300.0
_FINGERPRINT_BYTES = 64 * 1024


class ImportStopped(Exception):
    """The import cannot go on; the message says why and what to do. Its state is saved: run it again."""


@dataclass(frozen=True)
class ImportOptions:
    url: str
    write_key: str
    file_format: str
    state_path: Path
    report_path: Path
    refusals_path: Path
    mapping: ColumnMapping | None = None
    batch_events: int = 500
    events_per_s: float = 200.0
    restart: bool = False
    give_up_after_s: float = DEFAULT_GIVE_UP_AFTER_S
    progress_every_s: float = 1.0


def default_paths(path: Path) -> dict[str, Path]:
    """Return where an import of `path` keeps its state, its refusals and its report: beside the file."""
    return {"state_path": path.with_name(path.name + ".import-state.json"),
            "refusals_path": path.with_name(path.name + ".import-refused.jsonl"),
            "report_path": path.with_name(path.name + ".import-report.json")}


def file_format_of(path: Path, given: str | None) -> str:
    """Return `given`, or the format the file's extension says."""
    if given:
        return given
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise ImportStopped(f"{path}: cannot tell the format from {suffix or 'no extension'!r}; pass --format csv|jsonl")


def count_lines(path: Path) -> int:
    """Return the number of lines of the file (the last one counts without its newline)."""
    lines, last = 0, b"\n"
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def _fingerprint(path: Path) -> str:
    with path.open("rb") as handle:
        return file_fingerprint(path.stat().st_size, handle.read(_FINGERPRINT_BYTES))


def _jsonl_lines(path: Path, first_line: int) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as handle:
        for line, text in enumerate(handle, start=1):
            if line >= first_line:
                yield line, text


def _csv_rows(path: Path, mapping: ColumnMapping | None, first_line: int) -> Iterator[Row | RowRefused]:
    # surrogateescape: a row that is not UTF-8 is refused on its own instead of ending the read.
    handle = path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(handle)
    headers = next(reader, None)
    if not headers:
        handle.close()
        raise ImportStopped(f"{path}: the CSV file has no header line")
    mapping = mapping or header_mapping(headers)
    missing = missing_columns(mapping, headers)
    if missing:
        handle.close()
        raise ImportStopped(f"{path}: the mapping names column(s) the header does not have: {', '.join(missing)}")

    def cells() -> Iterator[tuple[int, list[str]]]:
        # A quoted cell may span lines: a row's line is where it starts.
        with handle:
            starts = reader.line_num + 1
            for values in reader:
                line, starts = starts, reader.line_num + 1
                if line >= first_line and any(v.strip() for v in values):
                    yield line, values

    return csv_rows(cells(), headers, mapping)


@dataclass(frozen=True)
class BatchResult:
    accepted: int
    duplicates: int
    suppressed: int
    refused: list[RowRefused]


class BatchSender:
    """POST batches to ingest: retries 429/503 and lost connections, leaves out events ingest refuses."""

    def __init__(self, client: httpx.AsyncClient, options: ImportOptions) -> None:
        self.client = client
        self.options = options

    async def send(self, rows: list[Row]) -> BatchResult:
        """Send `rows` until ingest accepted every one it does not refuse; return what it said."""
        pending, refused = list(rows), []
        totals = [0, 0, 0]
        while pending:
            status, body = await self._post([row.event for row in pending])
            if status == 200:
                for index, key in enumerate(("accepted", "duplicates", "suppressed")):
                    totals[index] += int(body.get(key, 0))
                break
            errors = body.get("errors") if isinstance(body, dict) else None
            indexed = [e for e in errors or [] if isinstance(e, dict) and isinstance(e.get("index"), int)]
            if status in (400, 413) and indexed:
                # All-or-nothing: nothing of this request went in. Leave the bad events out, send the rest.
                bad = {e["index"] for e in indexed}
                refused += [RowRefused(pending[e["index"]].line, str(e.get("field")), str(e.get("reason")))
                            for e in indexed if e["index"] < len(pending)]
                pending = [row for index, row in enumerate(pending) if index not in bad]
                continue
            if status == 413 and len(pending) > 1:
                # The server's limits are below ours: halve the batch.
                half = len(pending) // 2
                for part in (pending[:half], pending[half:]):
                    result = await self.send(part)
                    totals = [totals[0] + result.accepted, totals[1] + result.duplicates,
                              totals[2] + result.suppressed]
                    refused += result.refused
                break
            message = body.get("message") or body.get("error") if isinstance(body, dict) else None
            if status == 401:
                raise ImportStopped("ingest refused the write key (401): pass the key of the import's source "
                                    "(`touchstream keys add backfill` prints a new one)")
            raise ImportStopped(f"ingest answered {status}: {str(message or body)[:300]}")
        return BatchResult(totals[0], totals[1], totals[2], refused)

    async def _post(self, events: list[dict[str, Any]]) -> tuple[int, Any]:
        """POST one batch; wait out 429, 503 and lost connections for up to give_up_after_s in a row."""
        waited = 0.0
        while True:
            try:
                response = await self.client.post(
                    f"{self.options.url.rstrip('/')}/v1/batch", json={"batch": events},
                    auth=(self.options.write_key, ""))
            except httpx.TransportError as exc:
                reason, wait_s = f"cannot reach ingest at {self.options.url}: {type(exc).__name__}", 1.0
            else:
                if response.status_code not in (429, 503):
                    try:
                        return response.status_code, response.json()
                    except ValueError:
                        return response.status_code, {"message": response.text[:300]}
                reason = f"ingest answered {response.status_code}"
                try:
                    wait_s = max(0.1, float(response.headers.get("retry-after", "1")))
                except ValueError:
                    wait_s = 1.0
            if waited >= self.options.give_up_after_s:
                raise ImportStopped(f"{reason} for {waited:.0f} s; stopped (run the same command again to resume)")
            await asyncio.sleep(wait_s)
            waited += wait_s


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def load_state(path: Path, options: ImportOptions) -> ImportState:
    """Return the saved state of this file's import, or a new one; refuse a state of another file."""
    fingerprint = _fingerprint(path)
    if options.restart:
        for stale in (options.state_path, options.refusals_path):
            stale.unlink(missing_ok=True)
    if not options.state_path.exists():
        return ImportState(str(path), fingerprint)
    try:
        state = ImportState.from_json(json.loads(options.state_path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:
        raise ImportStopped(f"{options.state_path}: unreadable import state ({exc}); --restart starts over") from None
    if state.fingerprint != fingerprint:
        raise ImportStopped(f"{options.state_path} belongs to another version of {path} (its size or first bytes "
                            "changed): --restart imports the file from its first line, or pass another --state")
    return state


def refusals_of(path: Path) -> list[dict[str, Any]]:
    """Return the refusals recorded so far, each once (a batch sent again after a crash records them again)."""
    if not path.exists():
        return []
    seen: dict[tuple[int, str, str], dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            seen.setdefault((item["line"], item["field"], item["reason"]), item)
    return sorted(seen.values(), key=lambda item: item["line"])


async def import_file(path: Path, options: ImportOptions, out: TextIO = sys.stderr) -> dict[str, Any]:
    """Import `path` (or go on with it) and return the report, also written to options.report_path."""
    state = load_state(path, options)
    if state.finished:
        print(f"{path}: already imported; the report is {options.report_path} (--restart imports it again)", file=out)
        return _report(path, state, options, count_lines(path))
    total_lines = count_lines(path)
    if options.file_format == "csv":
        rows: Iterator[Row | RowRefused] = _csv_rows(path, options.mapping, state.next_line)
    else:
        rows = jsonl_rows(_jsonl_lines(path, state.next_line))
    if state.next_line > 1:
        print(f"{path}: resuming at line {state.next_line:,} ({state.counts.accepted:,} accepted before)", file=out)
    bucket = TokenBucket(options.events_per_s, options.batch_events, time.monotonic())
    started, shown, sent_events = time.monotonic(), 0.0, 0
    async with httpx.AsyncClient(timeout=60.0) as client:
        sender = BatchSender(client, options)
        for to_send, refused_here in batches(rows, options.batch_events):
            if to_send:
                await asyncio.sleep(bucket.wait_s(len(to_send), time.monotonic()))
                result = await sender.send(to_send)
            else:
                result = BatchResult(0, 0, 0, [])
            refused = refused_here + result.refused
            _record(state, options, to_send, refused, result)
            sent_events += len(to_send)
            now = time.monotonic()
            if now - shown >= options.progress_every_s:
                shown = now
                print(progress_line(state.next_line - 1, total_lines, sent_events, now - started, state.counts),
                      file=out, flush=True)
    state.finished = True
    state.next_line = total_lines + 1
    _write_atomically(options.state_path, json.dumps(state.to_json()))
    print(progress_line(total_lines, total_lines, sent_events, time.monotonic() - started, state.counts), file=out)
    report = _report(path, state, options, total_lines)
    _write_atomically(options.report_path, json.dumps(report, indent=2))
    print(f"report: {options.report_path}", file=out)
    return report


def _record(state: ImportState, options: ImportOptions, sent: list[Row], refused: list[RowRefused],
            result: BatchResult) -> None:
    """Count an acknowledged batch and move the state past it (refusals first: they are never lost)."""
    if refused:
        with options.refusals_path.open("a", encoding="utf-8") as handle:
            for refusal in refused:
                handle.write(json.dumps(refusal.to_json()) + "\n")
    counts = state.counts
    counts.accepted += result.accepted
    counts.duplicates += result.duplicates
    counts.suppressed += result.suppressed
    counts.refused += len(refused)
    state.next_line = max([row.line for row in sent] + [r.line for r in refused]) + 1
    _write_atomically(options.state_path, json.dumps(state.to_json()))


def _report(path: Path, state: ImportState, options: ImportOptions, total_lines: int) -> dict[str, Any]:
    refusals = refusals_of(options.refusals_path)
    return {"file": str(path), "format": options.file_format, "lines": total_lines,
            **asdict(state.counts), "refused": len(refusals), "refusals": refusals}


def run_import(path: Path, options: ImportOptions, out: TextIO = sys.stderr) -> int:
    """Run an import to its end; return the exit code (0 done, 1 stopped, 130 interrupted: both resumable)."""
    try:
        report = asyncio.run(import_file(path, options, out))
    except ImportStopped as exc:
        print(f"touchstream import: {exc}", file=out)
        return 1
    except KeyboardInterrupt:
        with contextlib.suppress(OSError, ValueError, TypeError):
            state = ImportState.from_json(json.loads(options.state_path.read_text(encoding="utf-8")))
            print(f"\ninterrupted; lines before {state.next_line:,} are in. Run the same command again to resume.",
                  file=out)
        return 130
    print(f"done: {report['accepted']:,} accepted, {report['duplicates']:,} duplicates, "
          f"{report['suppressed']:,} suppressed, {report['refused']:,} refused", file=out)
    return 0

