"""The direct Kafka path: upstream producers write Confluent-framed Avro straight to touchpoints.raw.

A real identity worker (`python -m services.identity`) resolves the good record and sends every bad
one (undecodable, without a usable identifier, or stamped beyond the event-time tolerance) to
`deadletter` with the reason and the original bytes.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from tests.kafka_reading import collect
from touchstream import avro
from touchstream.embedded import ManagedProcess, free_port
from touchstream.topics import DEADLETTER, TOUCHPOINTS_RAW, TOUCHPOINTS_RESOLVED

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def identity_worker(all_topics: str, redis_url: str, tmp_path: Path, artifacts_dir: Path) -> Iterator[None]:
    web_port = free_port()
    env = {
        **os.environ,
        "TOUCHSTREAM_KAFKA_BOOTSTRAP": all_topics,
        "TOUCHSTREAM_REDIS_URL": redis_url,
        "TOUCHSTREAM_PARTITIONS": "2",
        "TOUCHSTREAM_PII_HASH_KEY": "kafka-path-test-key",
        "TOUCHSTREAM_STATE_DIR": str(tmp_path),
        "TOUCHSTREAM_IDENTITY_WEB_PORT": str(web_port),
        "PYTHONPATH": str(REPO),
    }
    log = open(artifacts_dir / "identity-kafka-path.log", "ab")  # noqa: SIM115
    try:
        process = subprocess.Popen([sys.executable, "-m", "services.identity"], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                   env=env, cwd=tmp_path)
    finally:
        log.close()
    worker = ManagedProcess("identity", process)
    try:
        deadline = time.monotonic() + 60
        while True:
            if not worker.alive():
                raise RuntimeError("identity exited; see test-artifacts/identity-kafka-path.log")
            try:
                if httpx.get(f"http://127.0.0.1:{web_port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("identity was not ready after 60 s")
            time.sleep(0.2)
        yield
    finally:
        worker.stop()


async def test_framed_avro_is_resolved_and_garbage_is_dead_lettered_with_its_bytes(
    identity_worker: None, all_topics: str
) -> None:
    run = uuid.uuid4().hex[:8]
    now = int(time.time() * 1000)
    good = avro.encode(TOUCHPOINTS_RAW.schema, {
        "message_id": f"{run}-good", "type": "track", "event": "Order Completed", "channel": "store_pos",
        "source": "pos-direct", "timestamp_ms": now - 1000, "received_at_ms": now,
        "identifiers": [{"type": "loyalty_card", "value": f"LC-{run}"}],
        "order": {"order_id": f"o-{run}", "amount": 19.9, "currency": "EUR", "items": []},
    })
    # The Confluent wire format an upstream producer writes: magic 0, 4-byte schema id, Avro body.
    assert good[:5] == struct.pack(">bI", 0, avro.SCHEMA_IDS["TouchpointEvent"])
    no_identifier = avro.encode(TOUCHPOINTS_RAW.schema, {
        "message_id": f"{run}-anon", "type": "track", "event": "x", "timestamp_ms": now, "received_at_ms": now})
    # One event stamped in 2099 would drag every event-time watermark downstream along with it.
    from_2099 = avro.encode(TOUCHPOINTS_RAW.schema, {
        "message_id": f"{run}-2099", "type": "track", "event": "x", "timestamp_ms": 4_086_000_000_000,
        "received_at_ms": now, "identifiers": [{"type": "loyalty_card", "value": f"LC-{run}-2099"}]})
    garbage = {
        "plain-json": (b'{"userId": "u1", "event": "x"}', "magic byte"),
        "wrong-schema-id": (struct.pack(">bI", 0, avro.SCHEMA_IDS["DeadLetter"]) + good[5:], "schema id 6"),
        "truncated": (good[:-3], "invalid TouchpointEvent body"),
        "trailing-bytes": (good + b"\x00\x01", "trailing bytes"),
        "huge-length": (good[:5] + b"\xfe\xff\xff\xff\x0f" + b"x" * 10, "invalid TouchpointEvent body"),
        "too-short": (b"\x00\x00", "shorter than the 5-byte Confluent header"),
        "no-identifier": (no_identifier, "no usable identifier"),
        "from-2099": (from_2099, "s after the time it was received; at most 300 s is accepted"),
    }
    producer = AIOKafkaProducer(bootstrap_servers=all_topics, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(TOUCHPOINTS_RAW.name, good, key=f"{run}-good".encode())
        for name, (value, _) in garbage.items():
            await producer.send_and_wait(TOUCHPOINTS_RAW.name, value, key=f"{run}-{name}".encode())
    finally:
        await producer.stop()

    [(_, resolved)] = await collect(all_topics, TOUCHPOINTS_RESOLVED.name, TOUCHPOINTS_RESOLVED.schema, 1,
                                    lambda _key, r: r["event"]["message_id"] == f"{run}-good")
    assert resolved["event"]["order"]["amount"] == 19.9 and resolved["event"]["source"] == "pos-direct"
    assert resolved["customer_id"]

    dead = await collect(all_topics, DEADLETTER.name, DEADLETTER.schema, len(garbage),
                         lambda _key, r: (r["key"] or b"").startswith(run.encode()))
    by_name = {r["key"].decode().removeprefix(f"{run}-"): r for _, r in dead}
    assert set(by_name) == set(garbage)
    for name, (value, reason) in garbage.items():
        letter = by_name[name]
        assert letter["original"] == value, name
        assert reason in letter["reason"], (name, letter["reason"])
        assert letter["stage"] == "identity" and letter["source"] == TOUCHPOINTS_RAW.name
