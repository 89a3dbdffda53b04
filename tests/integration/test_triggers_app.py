"""The triggers worker end to end on the real broker and Valkey: scores in, signed webhooks out."""

from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import httpx
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.triggers.actions import action_id
from services.triggers.state_store import delivered_key, state_key
from tests.integration.test_triggers_delivery import SECRET, Receiver, receiver  # noqa: F401 (fixture)
from tests.kafka_reading import collect
from touchstream import avro
from touchstream.embedded import ManagedProcess, free_port, spawn
from touchstream.startup import EXIT_CONFIG
from touchstream.topics import ACTION_DELIVERIES, ACTIONS, DEADLETTER, SCORES

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

RULES = """
policy: {frequency_cap_per_day: 1}
rules:
  - id: churn-risk-high
    when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.6}
    action: {endpoint: marketing, template: {customer: "${customer_id}", risk: "${scores.churn_risk}"}}
    cooldown_hours: 24
  - id: everyone-held-out
    when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.6}
    action: {endpoint: marketing}
    holdout_percent: 100
  - id: paused-for-an-hour
    when:
      silence:
        start: {field: event.name, eq: Subscription Paused}
        stop: {field: event.name, eq: Subscription Resumed}
        hours: 1
    action: {endpoint: marketing, template: {customer: "${customer_id}", trigger: "${trigger}"}}
  - id: cap-a
    when: {event: {field: event.name, eq: Cap Test}}
    action: {endpoint: marketing}
  - id: cap-b
    when: {event: {field: event.name, eq: Cap Test}}
    action: {endpoint: marketing}
"""


@pytest.fixture
def worker(all_topics: str, redis_url: str, receiver: Receiver, tmp_path: Path,  # noqa: F811
           artifacts_dir: Path) -> Iterator[tuple[ManagedProcess, int]]:
    # The scores here are stamped in 1970 (and the silence tests need event times of their choosing): acted on
    # however old they are, as with the backfill horizon off.
    yield from triggers_worker(all_topics, redis_url, receiver, tmp_path, artifacts_dir, backfill_horizon_hours=0)


@pytest.fixture
def worker_with_horizon(all_topics: str, redis_url: str, receiver: Receiver, tmp_path: Path,  # noqa: F811
                        artifacts_dir: Path) -> Iterator[tuple[ManagedProcess, int]]:
    yield from triggers_worker(all_topics, redis_url, receiver, tmp_path, artifacts_dir, backfill_horizon_hours=24)


def triggers_worker(all_topics: str, redis_url: str, receiver: Receiver, tmp_path: Path,  # noqa: F811
                    artifacts_dir: Path, backfill_horizon_hours: float) -> Iterator[tuple[ManagedProcess, int]]:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES)
    web_port = free_port()
    env = {
        "PYTHONPATH": str(REPO),
        "TOUCHSTREAM_KAFKA_BOOTSTRAP": all_topics,
        "TOUCHSTREAM_REDIS_URL": redis_url,
        "TOUCHSTREAM_PARTITIONS": "2",
        "TOUCHSTREAM_STATE_DIR": str(tmp_path / "state"),
        "TOUCHSTREAM_TRIGGERS_WEB_PORT": str(web_port),
        "TOUCHSTREAM_TRIGGERS_RULES_FILE": str(rules_file),
        "TOUCHSTREAM_TRIGGERS_ENDPOINTS": json.dumps({"marketing": {"url": receiver.url, "secret": SECRET}}),
        "TOUCHSTREAM_TRIGGERS_ALLOW_NETWORKS": json.dumps(["127.0.0.0/8"]),
        "TOUCHSTREAM_TRIGGERS_TIMER_LATENESS_S": "0",
        "TOUCHSTREAM_TRIGGERS_BACKFILL_HORIZON_HOURS": str(backfill_horizon_hours),
    }
    process = spawn("triggers", [sys.executable, "-m", "services.triggers"], artifacts_dir / "triggers-worker.log", env)
    yield process, web_port
    process.stop()


def a_score_record(customer_id: str, risk: float, n: int, event_name: str = "Order Completed",
                   at_ms: int | None = None) -> dict[str, Any]:
    now_ms = int(time.time() * 1000)
    return {"customer_id": customer_id, "message_id": f"msg-{customer_id}-{n}",
            "event_time_ms": n * 1000 if at_ms is None else at_ms,
            "received_at_ms": now_ms, "churn_risk": risk, "purchase_propensity": 1 - risk, "segment": "at_risk",
            "stage": "lapsing", "reasons": [{"feature": "recency_days", "contribution": 0.9}], "features": {},
            "model_version": "test", "event_type": "track", "event_name": event_name, "consent": []}


async def wait_until(condition: Any, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what}")
        await asyncio.sleep(0.2)


async def webhook_delivered(process: ManagedProcess, receiver: Receiver, webhook_id: str,  # noqa: F811
                            what: str) -> None:
    """Wait up to 90 s for the receiver to get `webhook_id`; fail at once if the worker exited."""
    async def arrived() -> bool:
        assert process.alive(), "triggers worker exited; see test-artifacts/triggers-worker.log"
        return receiver.hits(webhook_id) > 0

    await wait_until(arrived, 90, what)


async def test_crossing_score_becomes_one_signed_webhook(worker: tuple[ManagedProcess, int], receiver: Receiver,  # noqa: F811
                                                         all_topics: str, redis_url: str) -> None:
    process, web_port = worker
    customer = f"cus_{uuid.uuid4().hex[:12]}"
    producer = AIOKafkaProducer(bootstrap_servers=all_topics)
    await producer.start()
    try:
        # Up through 0.7 (fires), still above (no new edge), then garbage that must reach the deadletter.
        for n, risk in enumerate([0.4, 0.82, 0.9]):
            await producer.send_and_wait(SCORES.name, avro.encode(SCORES.schema, a_score_record(customer, risk, n)),
                                         key=customer.encode())
        # Unique bytes: other tests on this session's broker dead-letter garbage of their own.
        await producer.send_and_wait(SCORES.name, f"not avro {customer}".encode(), key=customer.encode())
    finally:
        await producer.stop()

    expected_id = action_id("churn-risk-high", customer, f"msg-{customer}-1")

    await webhook_delivered(process, receiver, expected_id, "the webhook")
    _, payload = next((h, p) for h, p in receiver.verified if h["webhook-id"] == expected_id)
    assert payload["customer_id"] == customer and payload["rule_id"] == "churn-risk-high"
    assert payload["data"] == {"customer": customer, "risk": 0.82}

    redis = aioredis.from_url(redis_url)
    try:
        await wait_until(lambda: redis.exists(delivered_key(expected_id)), 10, "the delivered record")
        assert await redis.hgetall(state_key("churn-risk-high", customer)) == {
            b"armed": b"0", b"cooldown_until_ms": str(1000 + 24 * 3_600_000).encode()}
    finally:
        await redis.aclose()

    actions = await records_about(all_topics, ACTIONS.name, customer.encode(), want=2)
    outcomes = sorted((a["rule_id"], a["outcome"]) for a in map(lambda v: avro.decode(ACTIONS.schema, v), actions))
    assert outcomes == [("churn-risk-high", "fired"), ("everyone-held-out", "held_out")]
    assert receiver.hits(expected_id) == 1
    assert receiver.rejected == []
    # How the delivery ended, for the console: delivered at the first try, keyed by the customer.
    [(key, ended)] = await collect(all_topics, ACTION_DELIVERIES.name, ACTION_DELIVERIES.schema, 1,
                                   lambda _key, r: r["action_id"] == expected_id)
    assert key == customer.encode()
    assert (ended["outcome"], ended["attempts"], ended["status"], ended["rule_id"]) == (
        "delivered", 1, 204, "churn-risk-high")
    assert ended["received_at_ms"] <= ended["ended_at_ms"]

    dead = [avro.decode(DEADLETTER.schema, v) for v in await records_about(all_topics, DEADLETTER.name, None, want=1,
                                                                            original=f"not avro {customer}".encode())]
    assert dead[0]["stage"] == "triggers" and dead[0]["key"] == customer.encode()

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{web_port}") as client:
        assert (await client.get("/readyz")).status_code == 200
        metrics = (await client.get("/metrics")).text
    assert 'touchstream_triggers_event_to_webhook_seconds_count{rule="churn-risk-high"}' in metrics
    assert 'touchstream_triggers_actions_total{outcome="held_out",reason="holdout",rule="everyone-held-out"}' in metrics


async def test_scores_of_an_older_version_fire_and_an_unknown_schema_id_is_dead_lettered(
        worker: tuple[ManagedProcess, int], receiver: Receiver, all_topics: str) -> None:  # noqa: F811
    process, _ = worker
    customer = f"cus_{uuid.uuid4().hex[:12]}"
    v1 = avro.default_codec().version(SCORES.schema, 1)

    def as_written_before_ids_were_per_version(record: dict[str, Any]) -> bytes:
        # ScoreUpdate v1's body under id 4, as such records still lie on the compacted topic.
        body = io.BytesIO()
        fastavro.schemaless_writer(body, avro.default_codec().parsed(v1.schema_id), record)
        return struct.pack(">bI", 0, avro.SCHEMA_IDS[SCORES.schema]) + body.getvalue()

    from_a_newer_release = struct.pack(">bI", 0, 4711) + avro.encode(SCORES.schema,
                                                                     a_score_record(customer, 0.9, 9))[5:]
    producer = AIOKafkaProducer(bootstrap_servers=all_topics)
    await producer.start()
    try:
        for n, risk in enumerate([0.4, 0.82]):
            await producer.send_and_wait(SCORES.name, as_written_before_ids_were_per_version(
                a_score_record(customer, risk, n)), key=customer.encode())
        await producer.send_and_wait(SCORES.name, from_a_newer_release, key=customer.encode())
    finally:
        await producer.stop()

    expected_id = action_id("churn-risk-high", customer, f"msg-{customer}-1")

    await webhook_delivered(process, receiver, expected_id, "the webhook for a v1 score")
    [dead] = [avro.decode(DEADLETTER.schema, v) for v in await records_about(
        all_topics, DEADLETTER.name, None, want=1, original=from_a_newer_release)]
    assert dead["stage"] == "triggers" and dead["source"] == SCORES.name
    assert f"unknown schema id 4711 on topic {SCORES.name}" in dead["reason"]


async def records_about(bootstrap: str, topic: str, key: bytes | None, want: int, original: bytes | None = None,
                        within_s: float = 20) -> list[bytes]:
    """Read `topic` from the start; return the values whose key is `key` (or that wrap `original`)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    found: list[bytes] = []
    try:
        deadline = time.monotonic() + within_s
        while len(found) < want and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                for message in messages:
                    if message.value is None:
                        continue
                    wanted = original in message.value if original is not None else message.key == key
                    if wanted:
                        found.append(message.value)
    finally:
        await consumer.stop()
    return found


async def test_silence_timer_fires_when_the_event_time_watermark_passes(
        worker: tuple[ManagedProcess, int], receiver: Receiver, all_topics: str) -> None:  # noqa: F811
    process, web_port = worker
    paused, resumed, other = (f"cus_{uuid.uuid4().hex[:12]}" for _ in range(3))
    hour_ms = 3_600_000
    records = [
        (paused, a_score_record(paused, 0.1, 1, "Subscription Paused", at_ms=0)),
        (resumed, a_score_record(resumed, 0.1, 1, "Subscription Paused", at_ms=0)),
        (resumed, a_score_record(resumed, 0.1, 2, "Subscription Resumed", at_ms=hour_ms // 2)),
        # Someone else's later event moves the watermark past both deadlines.
        (other, a_score_record(other, 0.1, 1, "Page Viewed", at_ms=2 * hour_ms)),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=all_topics)
    await producer.start()
    try:
        for customer, record in records:
            await producer.send_and_wait(SCORES.name, avro.encode(SCORES.schema, record), key=customer.encode())
    finally:
        await producer.stop()

    expected_id = action_id("paused-for-an-hour", paused, f"silence@{hour_ms}:msg-{paused}-1")

    await webhook_delivered(process, receiver, expected_id, "the silence webhook")
    _, payload = next((h, p) for h, p in receiver.verified if h["webhook-id"] == expected_id)
    assert payload["data"] == {"customer": paused, "trigger": "silence"}
    assert not any(p.get("customer_id") == resumed for _, p in receiver.verified)  # its timer was stopped
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{web_port}") as client:
        metrics = (await client.get("/metrics")).text
    assert 'touchstream_triggers_timers_total{result="started",rule="paused-for-an-hour"} 2.0' in metrics
    assert 'touchstream_triggers_timers_total{result="stopped",rule="paused-for-an-hour"} 1.0' in metrics
    assert 'touchstream_triggers_timers_total{result="expired",rule="paused-for-an-hour"} 1.0' in metrics


async def test_frequency_cap_holds_across_rules_and_batches(
        worker: tuple[ManagedProcess, int], receiver: Receiver, all_topics: str) -> None:  # noqa: F811
    process, _ = worker
    customer = f"cus_{uuid.uuid4().hex[:12]}"
    producer = AIOKafkaProducer(bootstrap_servers=all_topics)
    await producer.start()

    async def send(n: int) -> None:
        record = a_score_record(customer, 0.1, n, "Cap Test", at_ms=10 * 3_600_000 + n)
        await producer.send_and_wait(SCORES.name, avro.encode(SCORES.schema, record), key=customer.encode())

    try:
        await send(1)
        first_id = action_id("cap-a", customer, f"msg-{customer}-1")

        async def first_arrived() -> bool:
            assert process.alive(), "triggers worker exited; see test-artifacts/triggers-worker.log"
            return receiver.hits(first_id) > 0

        await wait_until(first_arrived, 90, "the first capped webhook")
        await send(2)  # the same day, a later batch: the stored count stops both rules
    finally:
        await producer.stop()
    actions = [avro.decode(ACTIONS.schema, v) for v in await records_about(all_topics, ACTIONS.name,
                                                                           customer.encode(), want=4)]
    assert sorted((a["rule_id"], a["outcome"], a["reason"]) for a in actions) == [
        ("cap-a", "fired", None), ("cap-a", "suppressed", "frequency_cap"),
        ("cap-b", "suppressed", "frequency_cap"), ("cap-b", "suppressed", "frequency_cap")]
    assert not any(p.get("customer_id") == customer and p.get("rule_id") == "cap-b" for _, p in receiver.verified)


def start_triggers_with(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run `python -m services.triggers` with `env` on top of a broker-less base; it must refuse before connecting."""
    base = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "TOUCHSTREAM_STATE_DIR": str(tmp_path / "state"),
            "TOUCHSTREAM_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    return subprocess.run([sys.executable, "-m", "services.triggers"], env=base | env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize(
    ("env", "reason"),
    [({"TOUCHSTREAM_TRIGGERS_ENDPOINTS": json.dumps(
        {"marketing": {"url": "https://crm.example/hook", "secret": "whsec_AA=="}})},
      "TOUCHSTREAM_TRIGGERS_ENDPOINTS (marketing.secret): endpoint secret decodes to 1 bytes; use 24 to 64"),
     ({"TOUCHSTREAM_TRIGGERS_ENDPOINTS": json.dumps(
         {"marketing": {"url": "http://127.0.0.1:9/hook", "secret": SECRET}})},
      "endpoint 'marketing': 127.0.0.1 resolves to 127.0.0.1, a loopback address"),
     ({"TOUCHSTREAM_TRIGGERS_ENDPOINTS": json.dumps(
         {"marketing": {"url": "http://127.0.0.1:9/hook", "secret": SECRET, "allow_networks": ["127.0.0.0/8"]}}),
       "TOUCHSTREAM_ENVIRONMENT": "prod", "TOUCHSTREAM_PII_HASH_KEY": "a-real-secret"},
      "endpoint 'marketing': allow_networks: 127.0.0.0/8 holds loopback addresses; only globally routable networks")],
)
def test_a_worker_with_a_bad_webhook_setting_exits_with_the_reason_not_a_traceback(
        env: dict[str, str], reason: str, tmp_path: Path) -> None:
    finished = start_triggers_with(env, tmp_path)
    assert finished.returncode == EXIT_CONFIG, finished.stderr[-2000:]
    assert finished.stderr.startswith("triggers: refusing to start, bad configuration:\n")
    assert reason in finished.stderr
    assert "Traceback" not in finished.stderr
    assert "whsec_AA==" not in finished.stderr + finished.stdout

async def test_a_score_stamped_in_2099_fires_no_silence_timer_early(
        worker: tuple[ManagedProcess, int], receiver: Receiver, all_topics: str) -> None:  # noqa: F811
    process, web_port = worker
    paused, ahead, marker = (f"cus_{uuid.uuid4().hex[:12]}" for _ in range(3))
    now_ms = int(time.time() * 1000)
    records = [
        # A silence timer due in 50 minutes of event time...
        (paused, a_score_record(paused, 0.1, 1, "Subscription Paused", at_ms=now_ms - 10 * 60_000)),
        # ...someone's score stamped in 2099 (written straight to the topic, past any ingest check)...
        (ahead, a_score_record(ahead, 0.1, 1, "Page Viewed", at_ms=4_086_000_000_000)),
        # ...and a real event whose webhook says the two before it were handled.
        (marker, a_score_record(marker, 0.1, 1, "Cap Test", at_ms=now_ms)),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=all_topics)
    await producer.start()
    try:
        for customer, record in records:  # one partition: handled in this order
            await producer.send_and_wait(SCORES.name, avro.encode(SCORES.schema, record), key=customer.encode(),
                                         partition=0)
    finally:
        await producer.stop()

    marker_id = action_id("cap-a", marker, f"msg-{marker}-1")

    async def marker_arrived() -> bool:
        assert process.alive(), "triggers worker exited; see test-artifacts/triggers-worker.log"
        return receiver.hits(marker_id) > 0

    await wait_until(marker_arrived, 90, "the marker's webhook")
    await asyncio.sleep(2.0)  # a timer fired in the same batch would be on its way by now
    assert not any(p.get("customer_id") == paused for _, p in receiver.verified)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{web_port}") as client:
        metrics = (await client.get("/metrics")).text
    [watermark_s] = [float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith("touchstream_triggers_event_time_watermark_seconds ")]
    assert watermark_s <= time.time() + 300
    assert 'touchstream_triggers_timers_total{result="expired",rule="paused-for-an-hour"}' not in metrics


async def test_decisions_about_events_older_than_the_horizon_are_backfill_outcomes_never_delivered(
        worker_with_horizon: tuple[ManagedProcess, int], receiver: Receiver, all_topics: str) -> None:  # noqa: F811
    process, web_port = worker_with_horizon
    old, held, recent = (f"cus_{uuid.uuid4().hex[:12]}" for _ in range(3))
    now_ms = int(time.time() * 1000)
    two_days_ago = now_ms - 48 * 3_600_000
    records = [
        (old, a_score_record(old, 0.9, 1, at_ms=two_days_ago)),  # churn-risk-high would fire; cap-a too below
        (old, a_score_record(old, 0.1, 2, "Cap Test", at_ms=two_days_ago + 1)),
        (held, a_score_record(held, 0.9, 1, at_ms=two_days_ago)),
        (recent, a_score_record(recent, 0.9, 1, at_ms=now_ms - 60_000)),  # inside the horizon: acted on
    ]
    producer = AIOKafkaProducer(bootstrap_servers=all_topics)
    await producer.start()
    try:
        for customer, record in records:
            await producer.send_and_wait(SCORES.name, avro.encode(SCORES.schema, record), key=customer.encode(),
                                         partition=0)
    finally:
        await producer.stop()

    await webhook_delivered(process, receiver, action_id("churn-risk-high", recent, f"msg-{recent}-1"),
                            "the webhook about the recent score")
    mine = {old, held, recent}
    found = await collect(all_topics, ACTIONS.name, ACTIONS.schema, 8, lambda _k, r: r["customer_id"] in mine)
    outcomes = sorted((r["customer_id"], r["rule_id"], r["outcome"], r["reason"] or "") for _, r in found)
    assert outcomes == sorted([
        (old, "churn-risk-high", "backfill", "fired"),
        (old, "everyone-held-out", "backfill", "holdout"),  # history is no part of the hold-out experiment
        # State moves as if the history had been live: the day's cap was spent by the backfilled action.
        (old, "cap-a", "suppressed", "frequency_cap"), (old, "cap-b", "suppressed", "frequency_cap"),
        (held, "churn-risk-high", "backfill", "fired"), (held, "everyone-held-out", "backfill", "holdout"),
        (recent, "churn-risk-high", "fired", ""), (recent, "everyone-held-out", "held_out", "holdout"),
    ])
    await asyncio.sleep(2.0)  # a webhook about the old scores would be on its way by now
    assert not any(p.get("customer_id") in (old, held) for _, p in receiver.verified)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{web_port}") as client:
        metrics = (await client.get("/metrics")).text
    assert 'touchstream_triggers_actions_total{outcome="backfill",reason="fired",rule="churn-risk-high"} 2.0' \
        in metrics
