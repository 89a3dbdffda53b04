"""`touchstream import` against a live ingest (`python -m services.ingest`, real broker and Valkey): history goes in
as its own source, bad rows are reported by line and skipped, an interrupted import resumes, nothing twice."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.ingest.backfill import parse_column_mapping
from services.ingest.importer import ImportOptions, default_paths, run_import
from tests.kafka_reading import collect
from tests.stacks import REPO, running_ingest_for
from touchstream.topics import TOUCHPOINTS_RAW

pytestmark = pytest.mark.integration
WRITE_KEY = "backfill-test-key"


@pytest.fixture
def live_ingest(all_topics: str, redis_url: str, artifacts_dir: Path) -> Iterator[str]:
    with running_ingest_for(all_topics, redis_url, {"backfill": WRITE_KEY}, artifacts_dir / "ingest-import.log") as url:
        yield url


def history_line(run: str, n: int, **fields: object) -> str:
    event = {"userId": f"{run}-u{n % 7}", "event": "Order Completed",
             "timestamp": f"2025-03-{1 + n % 28:02d}T10:00:00Z", "properties": {"total": 10 + n, "currency": "EUR"},
             "sentAt": "2026-12-01T00:00:00Z", **fields}
    return json.dumps(event)


async def raw_events_of(bootstrap: str, run: str, wanted: int) -> list[dict[str, object]]:
    found = await collect(bootstrap, TOUCHPOINTS_RAW.name, TOUCHPOINTS_RAW.schema, wanted,
                          lambda _k, r: any(str(i["value"]).startswith(run) for i in r["identifiers"]), wait_s=30)
    return [record for _, record in found]


def test_an_interrupted_import_resumes_and_every_row_goes_in_once(
        live_ingest: str, all_topics: str, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    lines = [history_line(run, n) for n in range(300)]
    lines[40] = '{"userId": "broken'  # line 41
    lines[120] = history_line(run, 120, properties={"total": "a lot"})  # line 121: ingest refuses it
    lines[200] = lines[199]  # line 201: the same event again
    history = tmp_path / "history.jsonl"
    history.write_text("\n".join(lines) + "\n")
    state_path = default_paths(history)["state_path"]
    command = [sys.executable, "-m", "touchstream_cli", "import", str(history), "--url", live_ingest,
               "--batch-size", "10"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOUCHSTREAM_IMPORT_WRITE_KEY": WRITE_KEY}

    first = subprocess.Popen([*command, "--rate", "40"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.monotonic() + 60
    while not (state_path.exists() and json.loads(state_path.read_text())["next_line"] > 60):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.05)
    first.send_signal(signal.SIGINT)
    output, _ = first.communicate(timeout=30)
    assert first.returncode == 130, output
    stopped_at = json.loads(state_path.read_text())["next_line"]
    assert 60 < stopped_at < 300 and f"lines before {stopped_at:,} are in" in output
    assert "events/s" in output and "ETA" in output

    second = subprocess.run([*command, "--rate", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert f"resuming at line {stopped_at:,}" in second.stderr
    report = json.loads(default_paths(history)["report_path"].read_text())
    assert report["lines"] == 300
    assert report["accepted"] == 297  # 300 less the broken row, the refused one and the repeat
    # A batch in flight at the interrupt may have been acknowledged and sent again: duplicates, never twice in.
    assert 1 <= report["duplicates"] <= 11
    assert [(r["line"], r["field"]) for r in report["refusals"]] == [(41, "(row)"), (121, "properties.total")]
    assert report["refused"] == 2

    events = asyncio.run(raw_events_of(all_topics, run, 297))
    assert len(events) == 297 and len({e["message_id"] for e in events}) == 297
    assert {e["source"] for e in events} == {"backfill"}
    # History keeps its own time: sentAt (years after it) did not move it to the import's.
    assert max(int(str(e["timestamp_ms"])) for e in events) < 1_743_552_000_000  # 2025-04-02

    third = subprocess.run([*command, "--rate", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert third.returncode == 0 and "already imported" in third.stderr


def test_a_csv_with_a_column_mapping_goes_in_as_orders(live_ingest: str, all_topics: str, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    history = tmp_path / "orders.csv"
    history.write_text(
        "Customer,Ordered,Amount,Note\n"
        f"{run}-a,2024-05-01T09:00:00Z,19.90,\"first order,\nwith a line break\"\n"
        f"{run}-b,2024-05-02T09:00:00Z,twenty,\n"
        f"{run}-a,,5,\n"
        f"{run}-b,2024-05-03T09:00:00Z,7.5,\n")
    mapping = tmp_path / "orders.columns.yaml"
    mapping.write_text("columns:\n  userId: Customer\n  timestamp: Ordered\n  properties.total: Amount:number\n"
                       "  properties.note: Note\nconstants:\n  event: Order Completed\n  channel: store_pos\n")
    out = io.StringIO()
    code = run_import(history, ImportOptions(
        url=live_ingest, write_key=WRITE_KEY, file_format="csv", events_per_s=0, **default_paths(history),
        mapping=parse_column_mapping(mapping.read_text())), out)
    assert code == 0, out.getvalue()
    report = json.loads(default_paths(history)["report_path"].read_text())
    assert (report["accepted"], report["refused"]) == (2, 2)
    # Line numbers are where a row starts in the file, a quoted line break included.
    assert [(r["line"], r["field"], r["reason"]) for r in report["refusals"]] == [
        (4, "Amount", "'twenty' is not a number"),
        (5, "timestamp", "history needs the time it happened (timestamp or originalTimestamp); without one "
                         "ingest would stamp it with the time of the import")]
    events = asyncio.run(raw_events_of(all_topics, run, 2))
    assert sorted((e["order"]["amount"], e["channel"]) for e in events) == [(7.5, "store_pos"), (19.9, "store_pos")]
