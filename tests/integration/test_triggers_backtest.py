"""`touchstream rules backtest` reading the `scores` topic of a real broker from its start, and saving it for later."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from services.triggers.backtest import backtest
from services.triggers.rules import parse_rule_file
from services.triggers.score_history import read_score_file, read_scores_topic
from touchstream import avro
from touchstream.eventtime import DAY_MS
from touchstream.topics import SCORES
from touchstream_cli.cli import main

pytestmark = pytest.mark.integration

START_MS = 1_767_225_600_000  # 2026-01-01


async def produce_scores(bootstrap: str, records: list[dict[str, object]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for record in records:
            await producer.send_and_wait(SCORES.name, avro.encode(SCORES.schema, record),
                                         key=str(record["customer_id"]).encode())
        # A tombstone (an erasure) is no score.
        await producer.send_and_wait(SCORES.name, None, key=b"erased-customer")
    finally:
        await producer.stop()


def a_score_record(customer: str, day: int, name: str) -> dict[str, object]:
    return {"customer_id": customer, "message_id": f"{customer}-{day}", "event_time_ms": START_MS + day * DAY_MS,
            "received_at_ms": START_MS + day * DAY_MS, "churn_risk": 0.2, "purchase_propensity": 0.8,
            "segment": "loyal", "stage": "active", "model_version": "test", "event_name": name}


def test_the_scores_topic_is_read_from_its_start_and_saved_for_later_backtests(
        all_topics: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = uuid.uuid4().hex[:8]
    name = f"Backtest Probe {run}"
    records = [a_score_record(f"{run}-{n}", day, name) for n in range(3) for day in (n, n + 7)]
    asyncio.run(produce_scores(all_topics, records))
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"rules:\n  - id: probe\n    when: {{event: {{field: event.name, eq: {name}}}}}\n"
                     "    action: {endpoint: marketing}\n    cooldown_hours: 72\n")
    events = tmp_path / "events.yaml"
    events.write_text(f"events:\n  {name}: known\n")

    history = asyncio.run(read_scores_topic(all_topics))
    mine = [s for s in history.scores if s.customer_id.startswith(run)]
    assert sorted(s.message_id for s in mine) == sorted(str(r["message_id"]) for r in records)
    report = backtest(parse_rule_file(rules.read_text()), mine, bucket="week").to_json()
    # Each customer's second score is a week later, past the 72 h cooldown: all six fire.
    assert report["rules"][0]["fired"] == 6 and report["rules"][0]["customers"] == 3
    assert report["rules"][0]["fired_by_period"] == {"2026-W01": 3, "2026-W02": 3}

    saved = tmp_path / "scores.jsonl"
    assert main(["rules", "backtest", str(rules), "--events", str(events), "--bootstrap", all_topics,
                 "--save-scores", str(saved), "--json"]) == 0
    from_topic = json.loads(capsys.readouterr().out)
    assert from_topic["rules"][0]["fired"] == 6  # no other test's scores carry this event name
    assert from_topic["source"] == f"the scores topic on {all_topics}"
    assert main(["rules", "backtest", str(rules), "--events", str(events), "--scores", str(saved), "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    # The shared broker's topic may also hold other tests' unreadable records; the saved file holds
    # only what was read, so it has none, and says the same otherwise.
    assert from_file["unreadable_records"] == 0
    differing = {"source", "unreadable_records"}
    assert {k: v for k, v in from_file.items() if k not in differing} == {
        k: v for k, v in from_topic.items() if k not in differing}
    assert len([s for s in read_score_file(saved).scores if s.customer_id.startswith(run)]) == 6
