"""The identity worker for real: `python -m services.identity` on the session Tansu broker and Valkey."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from touchstream import avro
from touchstream.embedded import ManagedProcess, free_port
from touchstream.topics import DEADLETTER, IDENTITY_MERGES, TOUCHPOINTS_RAW, TOUCHPOINTS_RESOLVED

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PII_KEY = "integration-test-key"


@pytest.fixture
def identity_worker(all_topics: str, redis_url: str, tmp_path: Path, artifacts_dir: Path) -> Iterator[int]:
    """Run one identity worker; yield its web port."""
    web_port = free_port()
    env = {
        **os.environ,
        "TOUCHSTREAM_KAFKA_BOOTSTRAP": all_topics,
        "TOUCHSTREAM_REDIS_URL": redis_url,
        "TOUCHSTREAM_PARTITIONS": "2",
        "TOUCHSTREAM_PII_HASH_KEY": PII_KEY,
        "TOUCHSTREAM_STATE_DIR": str(tmp_path),
        "TOUCHSTREAM_IDENTITY_WEB_PORT": str(web_port),
        "PYTHONPATH": str(REPO),
    }
    log = open(artifacts_dir / "identity-worker.log", "ab")  # noqa: SIM115
    try:
        # Faust writes its data directory into the working directory; keep it out of the repo.
        process = subprocess.Popen(
            [sys.executable, "-m", "services.identity"], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, env=env, cwd=tmp_path,
        )
    finally:
        log.close()
    worker = ManagedProcess("identity", process)
    try:
        wait_until_ready(worker, web_port)
        yield web_port
    finally:
        worker.stop()


def wait_until_ready(worker: ManagedProcess, web_port: int, wait_s: float = 60.0) -> None:
    """Return once /readyz answers 200 (partitions assigned, script loaded); the Tansu group join takes ~5 s."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not worker.alive():
            raise RuntimeError("the identity worker exited; see test-artifacts/identity-worker.log")
        try:
            if httpx.get(f"http://127.0.0.1:{web_port}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the identity worker was not ready after {wait_s}s")


def touchpoint(message_id: str, timestamp_ms: int, *identifiers: tuple[str, str]) -> bytes:
    return avro.encode(TOUCHPOINTS_RAW.schema, {
        "message_id": message_id, "type": "track", "event": "Order Completed", "timestamp_ms": timestamp_ms,
        "received_at_ms": timestamp_ms + 5, "identifiers": [{"type": k, "value": v} for k, v in identifiers],
    })


@pytest.fixture
async def producer(all_topics: str) -> AsyncIterator[AIOKafkaProducer]:
    kafka = AIOKafkaProducer(bootstrap_servers=all_topics, acks="all")
    await kafka.start()
    yield kafka
    await kafka.stop()


async def collect(bootstrap: str, topic: str, schema: str, wanted: int, match: Any, wait_s: float = 60.0
                  ) -> list[tuple[bytes | None, dict[str, Any]]]:
    """Read `topic` from the start until `wanted` records satisfy `match(key, record)`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    consumer.assign([TopicPartition(topic, p) for p in range(2)])
    found: list[tuple[bytes | None, dict[str, Any]]] = []
    try:
        deadline = time.monotonic() + wait_s
        while len(found) < wanted and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for message in records:
                    record = avro.decode(schema, message.value)
                    if match(message.key, record):
                        found.append((message.key, record))
    finally:
        await consumer.stop()
    return found


async def test_worker_resolves_links_and_dead_letters_real_events(
    identity_worker: int, producer: AIOKafkaProducer, all_topics: str
) -> None:
    run = uuid.uuid4().hex[:8]
    email, device = f"ann.{run}@example.org", f"dev-{run}"
    bad_key = f"garbage-{run}".encode()
    now = int(time.time() * 1000)
    events = [
        touchpoint(f"{run}-1", now - 3000, ("email", email)),
        touchpoint(f"{run}-2", now - 2000, ("device_id", device)),
        touchpoint(f"{run}-3", now - 1000, ("device_id", device), ("email", email.upper())),
    ]
    for n, event in enumerate(events):
        await producer.send_and_wait(TOUCHPOINTS_RAW.name, event, key=f"{run}-{n}".encode())
    await producer.send_and_wait(TOUCHPOINTS_RAW.name, b"not avro", key=bad_key)

    resolved = await collect(all_topics, TOUCHPOINTS_RESOLVED.name, TOUCHPOINTS_RESOLVED.schema, 3,
                             lambda _key, r: r["event"]["message_id"].startswith(run))
    dead = await collect(all_topics, DEADLETTER.name, DEADLETTER.schema, 1, lambda _key, r: r["key"] == bad_key)
    merges = await collect(all_topics, IDENTITY_MERGES.name, IDENTITY_MERGES.schema, 1,
                           lambda _key, r: (r["caused_by"] or "").startswith(run))

    by_message = {r["event"]["message_id"]: (key, r) for key, r in resolved}
    assert set(by_message) == {f"{run}-1", f"{run}-2", f"{run}-3"}
    first_customer = by_message[f"{run}-1"][1]["customer_id"]
    key, linking = by_message[f"{run}-3"]
    assert linking["customer_id"] == first_customer and key == first_customer.encode()
    assert all(email not in str(r) and device not in str(r) for _, r in resolved)
    assert linking["event"]["received_at_ms"] == linking["event"]["timestamp_ms"] + 5

    [(merge_key, merge)] = merges
    assert merge["survivor_id"] == first_customer and merge_key == first_customer.encode()
    assert merge["merged_id"] == by_message[f"{run}-2"][1]["customer_id"]

    [(_, dead_letter)] = dead
    assert dead_letter["stage"] == "identity" and dead_letter["original"] == b"not avro"
    assert dead_letter["reason"].startswith("undecodable")

    async with httpx.AsyncClient() as client:
        ready = await client.get(f"http://127.0.0.1:{identity_worker}/readyz")
        metrics = (await client.get(f"http://127.0.0.1:{identity_worker}/metrics")).text
    assert ready.status_code == 200
    assert "touchstream_identity_merges_total 1.0" in metrics
