"""Ingest over HTTP against the real broker and Redis: durable accept, refusal with reasons, dedupe."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from starlette.testclient import TestClient

from services.ingest.app import build_app
from services.ingest.settings import IngestSettings, hash_write_key
from touchstream import avro
from touchstream.settings import CoreSettings
from touchstream.topics import TOUCHPOINTS_RAW

pytestmark = pytest.mark.integration
WRITE_KEY = "test-key"


@pytest.fixture
def ingest(all_topics: str, redis_url: str) -> Iterator[TestClient]:
    core = CoreSettings(kafka_bootstrap=all_topics, redis_url=redis_url, partitions=2)
    settings = IngestSettings(write_keys={"shop": hash_write_key(WRITE_KEY)}, max_batch_events=3)
    with TestClient(build_app(core, settings)) as client:
        yield client


async def read_raw_events(bootstrap: str, message_ids: set[str], wait_s: float = 10.0) -> list[dict[str, object]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(TOUCHPOINTS_RAW.name, p) for p in range(2)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        found: list[dict[str, object]] = []
        deadline = asyncio.get_running_loop().time() + wait_s
        while asyncio.get_running_loop().time() < deadline and len(found) < len(message_ids):
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    try:
                        event = avro.decode(TOUCHPOINTS_RAW.schema, record.value)
                    except avro.DecodeError:
                        continue  # other tests write garbage to this topic on purpose
                    if event["message_id"] in message_ids:
                        found.append(event)
        return found
    finally:
        await consumer.stop()


def test_accepted_events_are_on_the_raw_topic_once(ingest: TestClient, all_topics: str) -> None:
    ids = [f"m-{uuid.uuid4().hex}" for _ in range(2)]
    batch = {"batch": [
        {"type": "track", "event": "Order Completed", "userId": "u1", "messageId": ids[0],
         "properties": {"total": 20.0}},
        {"type": "identify", "userId": "u1", "messageId": ids[1], "traits": {"email": "u1@example.com"}},
    ]}
    first = ingest.post("/v1/batch", json=batch, auth=(WRITE_KEY, ""))
    assert first.status_code == 200, first.text
    assert first.json() == {"success": True, "accepted": 2, "duplicates": 0}
    again = ingest.post("/v1/batch", json=batch, auth=(WRITE_KEY, ""))
    assert again.json() == {"success": True, "accepted": 0, "duplicates": 2}

    events = asyncio.run(read_raw_events(all_topics, set(ids)))
    assert sorted(e["message_id"] for e in events) == sorted(ids)
    order = next(e for e in events if e["message_id"] == ids[0])
    assert order["source"] == "shop" and order["order"]["amount"] == 20.0  # type: ignore[index]


def test_invalid_event_refuses_the_whole_batch_with_index_and_field(ingest: TestClient, all_topics: str) -> None:
    good_id = f"m-{uuid.uuid4().hex}"
    response = ingest.post("/v1/batch", auth=(WRITE_KEY, ""), json={"batch": [
        {"type": "track", "event": "Viewed", "userId": "u2", "messageId": good_id},
        {"type": "track", "event": "Viewed", "messageId": "m-x"},
    ]})
    assert response.status_code == 400
    assert response.json()["errors"] == [
        {"index": 1, "field": "userId", "reason": "an event needs userId, anonymousId or another identifier"}]
    # Nothing from a refused batch was claimed: the same good event is accepted when resent alone.
    resent = ingest.post("/v1/track", auth=(WRITE_KEY, ""),
                         json={"event": "Viewed", "userId": "u2", "messageId": good_id})
    assert resent.json()["accepted"] == 1


def test_auth_and_limits(ingest: TestClient) -> None:
    event = {"event": "Viewed", "userId": "u3"}
    assert ingest.post("/v1/track", json=event).status_code == 401
    assert ingest.post("/v1/track", json=event, auth=("wrong", "")).status_code == 401
    too_many = ingest.post("/v1/batch", auth=(WRITE_KEY, ""), json={"batch": [event] * 4})
    assert too_many.status_code == 413 and "max_batch_events" in too_many.json()["error"]
    huge = ingest.post("/v1/track", auth=(WRITE_KEY, ""), json={**event, "properties": {"x": "a" * 40_000}})
    assert huge.status_code == 413
    assert ingest.post("/v1/track", auth=(WRITE_KEY, ""), content=b"{not json").status_code == 400
    assert ingest.post("/v1/launch", auth=(WRITE_KEY, ""), json=event).status_code == 404
