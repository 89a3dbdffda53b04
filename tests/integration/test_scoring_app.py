"""The scoring worker as a process on the real broker and Valkey: resolved touchpoints in, scores out."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from touchstream import avro
from touchstream.embedded import free_port, spawn, wait_for_port
from touchstream.eventtime import DAY_MS
from touchstream.startup import EXIT_CONFIG
from touchstream.topics import DEADLETTER, SCORES, TOUCHPOINTS_RESOLVED

pytestmark = pytest.mark.integration


def resolved_record(customer_id: str, message_id: str, day: float, amount: float | None) -> dict[str, object]:
    t = int(day * DAY_MS)
    return {
        "customer_id": customer_id,
        "resolved_at_ms": t,
        "event": {
            "message_id": message_id, "type": "track", "event": "Order Completed", "channel": "web",
            "source": "test", "timestamp_ms": t, "received_at_ms": t + 1, "identifiers": [],
            "order": None if amount is None else {"order_id": None, "amount": amount, "currency": "USD", "items": []},
            "feedback": None, "consent": ["email"], "properties_json": None,
        },
    }


async def wait_ready(port: int) -> None:
    async with httpx.AsyncClient() as client:
        while True:
            try:
                if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)


async def test_worker_scores_resolved_touchpoints_and_dead_letters_garbage(
    all_topics: str, redis_url: str, artifacts_dir: Path, tmp_path: Path
) -> None:
    web_port = free_port()
    worker = spawn(
        "scoring",
        [sys.executable, "-m", "services.scoring"],
        artifacts_dir / "scoring-worker.log",
        env={
            "TOUCHSTREAM_KAFKA_BOOTSTRAP": all_topics,
            "TOUCHSTREAM_REDIS_URL": redis_url,
            "TOUCHSTREAM_PARTITIONS": "2",
            "TOUCHSTREAM_SCORING_WEB_PORT": str(web_port),
            "TOUCHSTREAM_SCORING_KEY_PREFIX": f"test-{uuid.uuid4().hex[:8]}",
            "TOUCHSTREAM_STATE_DIR": str(tmp_path),
        },
    )
    try:
        wait_for_port(web_port, timeout=30, process=worker)
        async with asyncio.timeout(60):
            await wait_ready(web_port)
        customer = f"cust-{uuid.uuid4().hex[:8]}"
        message_ids = [f"{customer}-m{n}" for n in range(3)]
        producer = AIOKafkaProducer(bootstrap_servers=all_topics)
        await producer.start()
        try:
            for n, (message_id, day) in enumerate(zip(message_ids, (1, 20, 45), strict=True)):
                record = resolved_record(customer, message_id, day, 10.0 * (n + 1))
                value = avro.encode(TOUCHPOINTS_RESOLVED.schema, record)
                await producer.send_and_wait(TOUCHPOINTS_RESOLVED.name, value, key=customer.encode())
            garbage_key = f"garbage-{customer}".encode()
            await producer.send_and_wait(TOUCHPOINTS_RESOLVED.name, b"not avro", key=garbage_key)
        finally:
            await producer.stop()

        consumer = AIOKafkaConsumer(
            SCORES.name, DEADLETTER.name, bootstrap_servers=all_topics, auto_offset_reset="earliest"
        )
        await consumer.start()
        scores: dict[str, dict[str, object]] = {}
        # Crossing checks: scoring re-scores a silent customer when a watched threshold may be crossed.
        checks: list[dict[str, object]] = []
        dead: list[dict[str, object]] = []
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (len(scores) < 3 or not dead):
                for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                    for record in records:
                        if tp.topic == SCORES.name and record.key == customer.encode():
                            update = avro.decode(SCORES.schema, record.value)
                            if str(update["message_id"]).startswith("rescore:"):
                                checks.append(update)
                            else:
                                scores[str(update["message_id"])] = update
                        elif tp.topic == DEADLETTER.name and record.key is not None:
                            letter = avro.decode(DEADLETTER.schema, record.value)
                            if letter["key"] == garbage_key:
                                dead.append(letter)
        finally:
            await consumer.stop()

        assert set(scores) == set(message_ids)
        assert all(check["event_type"] == "rescore" for check in checks)
        last = scores[message_ids[-1]]
        assert last["features"]["purchase_count"] == 3.0  # type: ignore[index]
        assert last["features"]["monetary_total"] == 60.0  # type: ignore[index]
        assert last["stage"] == "loyal" and last["consent"] == ["email"]
        assert last["received_at_ms"] == 45 * DAY_MS + 1
        assert str(last["model_version"]).startswith("logreg-v3-n")
        assert dead and dead[0]["stage"] == "scoring" and dead[0]["original"] == b"not avro"

        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"http://127.0.0.1:{web_port}/metrics")).text
        assert "touchstream_scoring_pending_examples" in metrics
        for gauge in ("roc_auc_ratio", "log_loss_nats", "brier_score_ratio", "calibration_error_ratio"):
            assert f"touchstream_scoring_prequential_{gauge} " in metrics
        assert f'touchstream_scoring_events_in_total{{topic="{TOUCHPOINTS_RESOLVED.name}"}}' in metrics
    finally:
        worker.stop()


@pytest.mark.parametrize(
    ("env", "reason"),
    [({"TOUCHSTREAM_ENVIRONMENT": "prod", "TOUCHSTREAM_PII_HASH_KEY": "a-real-secret"},
      "TOUCHSTREAM_SCORING_CHECKPOINT_KEY is the dev placeholder; set a real secret in prod"),
     ({"TOUCHSTREAM_SCORING_CHECKPOINT_KEY": "too-short"},
      "TOUCHSTREAM_SCORING_CHECKPOINT_KEY: must be at least 16 characters")],
)
def test_a_worker_with_a_bad_checkpoint_key_exits_with_the_reason_not_a_traceback(
        env: dict[str, str], reason: str, tmp_path: Path) -> None:
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
            "TOUCHSTREAM_STATE_DIR": str(tmp_path / "state"), "TOUCHSTREAM_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    finished = subprocess.run([sys.executable, "-m", "services.scoring"], env=base | env, capture_output=True,
                              text=True, timeout=120)
    assert finished.returncode == EXIT_CONFIG, finished.stderr[-2000:]
    assert finished.stderr.startswith("scoring: refusing to start, bad configuration:\n")
    assert reason in finished.stderr
    assert "Traceback" not in finished.stderr and "too-short" not in finished.stderr
