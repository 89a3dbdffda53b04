"""Generated bad input: malformed HTTP requests and malformed Kafka records.

`make test` sends 2,000 of each; `make test-chaos` sets TOUCHSTREAM_FUZZ_COUNT=10000.

No 5xx, no crash, every refusal carries a reason, and the good events sent among them all
arrive. Requests go to the real ingest app (real broker and Redis); records go straight to
`touchpoints.raw` and through a real identity worker.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from services.ingest.app import build_app
from services.ingest.settings import IngestSettings, hash_write_key
from touchstream import avro
from touchstream.embedded import free_port
from touchstream.settings import CoreSettings
from touchstream.topics import DEADLETTER, TOUCHPOINTS_RAW, TOUCHPOINTS_RESOLVED

pytestmark = pytest.mark.integration
WRITE_KEY = "fuzz-key"
GOOD_EVERY = 50
FUZZ_COUNT = int(os.environ.get("TOUCHSTREAM_FUZZ_COUNT", "2000"))

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
segment_keys = st.sampled_from(["type", "userId", "anonymousId", "messageId", "event", "name", "timestamp",
                                "properties", "traits", "context", "order", "complaint", "feedback", "consent",
                                "channel", "identifiers", "email", "phone", "previousId", "batch"])
segment_like = st.dictionaries(segment_keys, json_values, max_size=8)
bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    segment_like.map(lambda v: json.dumps(v).encode()),
    st.lists(segment_like, max_size=5).map(lambda b: json.dumps({"batch": b}).encode()),
    st.binary(max_size=200),
)
paths = st.sampled_from(["/v1/track", "/v1/identify", "/v1/page", "/v1/screen", "/v1/group", "/v1/alias",
                         "/v1/batch", "/v1/nope"])


@pytest.fixture
def ingest_client(all_topics: str, redis_url: str) -> Iterator[TestClient]:
    core = CoreSettings(kafka_bootstrap=all_topics, redis_url=redis_url, partitions=2)
    settings_ = IngestSettings(write_keys={"fuzz": hash_write_key(WRITE_KEY)})
    with TestClient(build_app(core, settings_), raise_server_exceptions=False) as client:
        yield client


def test_malformed_requests_get_reasons_never_5xx_and_the_good_events_among_them_arrive(
        ingest_client: TestClient, all_topics: str) -> None:
    good_ids: list[str] = []
    requests = 0

    @settings(max_examples=FUZZ_COUNT, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(path=paths, body=bodies, gzip_header=st.booleans())
    def one_request(path: str, body: bytes, gzip_header: bool) -> None:
        nonlocal requests
        requests += 1
        headers = {"content-type": "application/json"}
        if gzip_header:
            headers["content-encoding"] = "gzip"
        response = ingest_client.post(path, content=body, headers=headers, auth=(WRITE_KEY, ""))
        assert response.status_code < 500, (path, body[:200], response.text[:500])
        payload = response.json()
        if response.status_code >= 400:
            assert payload["error"], payload
            for error in payload.get("errors", []):
                assert error["field"] and error["reason"], payload
        if requests % GOOD_EVERY == 0:
            message_id = f"good-{uuid.uuid4().hex}"
            good = ingest_client.post("/v1/track", auth=(WRITE_KEY, ""),
                                      json={"event": "Viewed", "userId": "fuzz-user", "messageId": message_id})
            assert good.status_code == 200, good.text
            good_ids.append(message_id)

    one_request()
    assert requests >= FUZZ_COUNT and len(good_ids) >= FUZZ_COUNT // GOOD_EVERY
    found = asyncio.run(read_message_ids(all_topics, TOUCHPOINTS_RAW.name, TOUCHPOINTS_RAW.schema,
                                         set(good_ids), wait_s=30))
    assert found == set(good_ids)


async def read_message_ids(bootstrap: str, topic: str, schema: str, wanted: set[str], wait_s: float,
                           nested: bool = False) -> set[str]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    found: set[str] = set()
    try:
        partitions = [TopicPartition(topic, p) for p in range(2)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not wanted <= found:
            for records in (await consumer.getmany(timeout_ms=300, max_records=5000)).values():
                for record in records:
                    try:
                        value = avro.decode(schema, record.value)
                    except avro.DecodeError:
                        continue
                    found.add(value["event"]["message_id"] if nested else value["message_id"])
    finally:
        await consumer.stop()
    return found & wanted


def malformed_records(good: bytes, count: int, rng: random.Random) -> list[bytes]:
    """Bytes that look more and more like a TouchpointEvent without being one."""
    records = []
    for n in range(count):
        kind = n % 5
        if kind == 0:
            records.append(rng.randbytes(rng.randint(0, 64)))
        elif kind == 1:
            records.append(good[: rng.randint(0, len(good) - 1)])
        elif kind == 2:
            records.append(bytes([0]) + rng.randint(2, 99).to_bytes(4, "big") + good[5:])
        elif kind == 3:
            flipped = bytearray(good)
            flipped[rng.randint(5, len(good) - 1)] ^= 1 << rng.randint(0, 7)
            records.append(bytes(flipped))
        else:
            records.append(good + rng.randbytes(rng.randint(1, 8)))
    return records


def test_malformed_kafka_records_go_to_deadletter_and_good_ones_resolve(
        all_topics: str, redis_url: str, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    rng = random.Random(run)

    def event(n: int) -> dict[str, Any]:
        return {"message_id": f"{run}-good-{n}", "type": "track", "event": "Viewed", "timestamp_ms": 1,
                "received_at_ms": 1, "identifiers": [{"type": "user_id", "value": f"{run}-{n}"}]}

    template = avro.encode(TOUCHPOINTS_RAW.schema, event(0))
    bad = malformed_records(template, FUZZ_COUNT, rng)
    good_ids = {f"{run}-good-{n}" for n in range(1, FUZZ_COUNT // 100 + 1)}

    async def produce() -> int:
        producer = AIOKafkaProducer(bootstrap_servers=all_topics, acks="all", linger_ms=5)
        await producer.start()
        still_valid = 0
        try:
            futures = []
            for n, value in enumerate(bad):
                try:
                    # A bit flip can land in a string and still decode: that record is valid input.
                    avro.decode(TOUCHPOINTS_RAW.schema, value)
                    still_valid += 1
                except avro.DecodeError:
                    pass
                futures.append(await producer.send(TOUCHPOINTS_RAW.name, value, key=f"{run}-bad-{n}".encode()))
                if n % 100 == 0:
                    futures.append(await producer.send(TOUCHPOINTS_RAW.name,
                                                       avro.encode(TOUCHPOINTS_RAW.schema, event(n // 100 + 1))))
            await asyncio.gather(*futures)
        finally:
            await producer.stop()
        return still_valid

    still_valid = asyncio.run(produce())
    web_port = free_port()
    env = {**os.environ, "TOUCHSTREAM_KAFKA_BOOTSTRAP": all_topics, "TOUCHSTREAM_PARTITIONS": "2",
           "TOUCHSTREAM_REDIS_URL": redis_url,
           "TOUCHSTREAM_STATE_DIR": str(tmp_path), "TOUCHSTREAM_IDENTITY_WEB_PORT": str(web_port)}
    log = open(tmp_path / "identity.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen([sys.executable, "-m", "services.identity"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        resolved = asyncio.run(read_message_ids(all_topics, TOUCHPOINTS_RESOLVED.name, TOUCHPOINTS_RESOLVED.schema,
                                                good_ids, wait_s=180, nested=True))
        assert resolved == good_ids
        assert worker.poll() is None, "identity worker crashed on bad input"
        dead = asyncio.run(count_dead_letters(all_topics, f"{run}-bad-".encode(), FUZZ_COUNT - still_valid))
        assert dead["count"] == FUZZ_COUNT - still_valid
        assert dead["without_reason"] == 0 and dead["without_original"] == 0
        assert httpx.get(f"http://127.0.0.1:{web_port}/healthz").status_code == 200
    finally:
        worker.terminate()
        worker.wait(30)
        log.close()


async def count_dead_letters(bootstrap: str, key_prefix: bytes, wanted: int, wait_s: float = 120) -> dict[str, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    counts = {"count": 0, "without_reason": 0, "without_original": 0}
    try:
        partitions = [TopicPartition(DEADLETTER.name, p) for p in range(2)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and counts["count"] < wanted:
            for records in (await consumer.getmany(timeout_ms=300, max_records=5000)).values():
                for record in records:
                    letter = avro.decode(DEADLETTER.schema, record.value)
                    if (letter["key"] or b"").startswith(key_prefix):
                        counts["count"] += 1
                        counts["without_reason"] += not letter["reason"]
                        counts["without_original"] += letter["original"] is None
    finally:
        await consumer.stop()
    return counts
