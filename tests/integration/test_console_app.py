"""The console worker on the real broker and Valkey: records on its topics become the read model and pages."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from services.console.store import ReadModelStore
from services.identity.admin import hash_admin_key
from touchstream import avro
from touchstream.embedded import ManagedProcess, free_port, spawn
from touchstream.topics import ACTION_DELIVERIES, ACTIONS, DEADLETTER, IDENTITY_MERGES, SCORES, TOUCHPOINTS_RESOLVED

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
KEY = "console-app-key"


@pytest.fixture
def worker(all_topics: str, redis_url: str, tmp_path: Path,
           artifacts_dir: Path) -> Iterator[tuple[ManagedProcess, str, int]]:
    port = free_port()
    env = {
        "PYTHONPATH": str(REPO),
        "TOUCHSTREAM_KAFKA_BOOTSTRAP": all_topics,
        "TOUCHSTREAM_REDIS_URL": redis_url,
        "TOUCHSTREAM_PARTITIONS": "2",
        "TOUCHSTREAM_STATE_DIR": str(tmp_path / "state"),
        "TOUCHSTREAM_CONSOLE_WEB_PORT": str(port),
        "TOUCHSTREAM_CONSOLE_ADMIN_KEYS": f'["{hash_admin_key(KEY)}"]',
        # Unique per test: the session broker holds other tests' records on the same topics.
        "TOUCHSTREAM_CONSOLE_KEY_PREFIX": f"t{uuid.uuid4().hex[:6]}:console:",
    }
    process = spawn("console", [sys.executable, "-m", "services.console"], artifacts_dir / "console-worker.log", env)
    yield process, env["TOUCHSTREAM_CONSOLE_KEY_PREFIX"], port
    process.stop()


def resolved(cid: str, message_id: str, t_ms: int, name: str, amount: float | None = None) -> dict[str, Any]:
    return {"customer_id": cid, "resolved_at_ms": t_ms, "event": {
        "message_id": message_id, "type": "track", "event": name, "channel": "store_pos", "source": "test",
        "timestamp_ms": t_ms, "received_at_ms": t_ms, "identifiers": [{"type": "email", "value": "ab" * 32}],
        "order": {"order_id": None, "amount": amount, "currency": "EUR", "items": []} if amount else None,
        "feedback": None, "consent": [], "properties_json": '{"note": "<script>x</script>"}'}}


async def wait_until(condition: Any, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.2)


async def test_records_on_every_topic_reach_the_read_model(worker: tuple[ManagedProcess, str, int], all_topics: str,
                                                          redis_url: str) -> None:
    process, prefix, port = worker
    run = uuid.uuid4().hex[:8]
    a, b = f"c_a{run}", f"c_b{run}"
    # Other tests feed this session broker with events of today, and the read model's clock (the newest
    # event time it has seen) follows them: a minute ago keeps the action's 7-day window open.
    t0 = int(time.time() * 1000) - 60_000
    records = [
        (TOUCHPOINTS_RESOLVED, a, resolved(a, f"m1-{run}", t0 + 1000, "Page Viewed")),
        (TOUCHPOINTS_RESOLVED, b, resolved(b, f"m2-{run}", t0 + 2000, "Order Completed", 30.0)),
        (SCORES, b, {"customer_id": b, "message_id": f"m2-{run}", "event_time_ms": t0 + 2000,
                     "received_at_ms": t0 + 2000,
                     "churn_risk": 0.75, "purchase_propensity": 0.25, "segment": "at_risk", "stage": "lapsing",
                     "reasons": [{"feature": "recency_days", "contribution": 0.6}], "features": {"recency_days": 3.0},
                     "model_version": "v-test"}),
        (ACTIONS, b, {"action_id": f"act-{run}", "rule_id": f"rule-{run}", "customer_id": b, "outcome": "fired",
                      "reason": None, "endpoint": "marketing", "payload_json": "{}", "event_time_ms": t0 + 2000,
                      "received_at_ms": t0 + 2000, "created_at_ms": t0 + 2001}),
        (ACTION_DELIVERIES, b, {"action_id": f"act-{run}", "rule_id": f"rule-{run}", "customer_id": b,
                                "endpoint": "marketing", "outcome": "delivered", "attempts": 1, "status": 200,
                                "reason": None, "event_time_ms": t0 + 2000, "received_at_ms": t0 + 2000,
                                "created_at_ms": t0 + 2001, "ended_at_ms": t0 + 2300}),
        (IDENTITY_MERGES, a, {"merge_id": f"g-{run}", "survivor_id": a, "merged_id": b, "kind": "merge",
                              "reason": "shared_identifier", "identifiers": [], "event_time_ms": t0 + 3000}),
        (DEADLETTER, "ingest", {"source": "http", "stage": "ingest", "reason": f"schema{run}: bad", "key": None,
                                "original": run.encode(), "failed_at_ms": 1}),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=all_topics)
    await producer.start()
    try:
        # Keyed by the merged customer so the merge lands after b's records on the same partition.
        for spec, key, record in records:
            await producer.send_and_wait(spec.name, avro.encode(spec.schema, record), key=key.encode())
        await producer.send_and_wait(SCORES.name, b"not avro", key=a.encode())
    finally:
        await producer.stop()

    client = aioredis.from_url(redis_url)
    store = ReadModelStore(client, prefix)
    try:
        async def merged_and_complete() -> bool:
            assert process.alive(), "console worker exited; see test-artifacts/console-worker.log"
            record = await store.customer(b)  # b's hash becomes a redirect once a holds what it had
            return (record.customer_id == a and len(record.timeline) == 2 and bool(record.actions)
                    and bool(record.merges) and bool(record.deliveries))

        await wait_until(merged_and_complete, 90, "the read model")
        record = await store.customer(b)
        assert record.customer_id == a
        assert [e.message_id for e in record.timeline] == [f"m2-{run}", f"m1-{run}"]
        assert record.latest_score is not None and record.latest_score.model_version == "v-test"
        assert [x.action_id for x in record.actions] == [f"act-{run}"]
        assert record.deliveries[f"act-{run}"].delivered and record.deliveries[f"act-{run}"].status == 200
        await wait_until(lambda: _has_dead_letter(store, run), 30, "the dead letter count")
    finally:
        await client.aclose()

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        assert (await http.get("/readyz")).status_code == 200
        outcomes = (await http.get(f"/v1/rules/rule-{run}/outcomes", headers={"Authorization": f"Bearer {KEY}"})).json()
        # Fired a minute ago: its 7-day window is still open.
        assert outcomes["fired"] == 1 and outcomes["outcome"]["treated_open"] == 1
        assert (outcomes["delivered"], outcomes["delivery_failed"]) == (1, 0)
        assert outcomes["outcome"]["treated"] == 0
        assert not outcomes["outcome"]["enough_data"]
        metrics = (await http.get("/metrics")).text
        assert f'touchstream_console_events_in_total{{topic="{SCORES.name}"}}' in metrics
        assert "touchstream_console_events_failed_total" in metrics


async def _has_dead_letter(store: ReadModelStore, run: str) -> bool:
    return any(reason == f"schema{run}" and n == 1 for _, reason, n in await store.dead_letters())

