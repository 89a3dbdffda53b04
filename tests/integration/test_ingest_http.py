"""Ingest over HTTP against the real broker and Redis: durable accept, refusal with reasons, dedupe, odd input."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition
from starlette.applications import Starlette
from starlette.testclient import TestClient

from services.ingest.app import build_app
from services.ingest.settings import IngestSettings, hash_write_key
from tests.kafka_reading import collect
from touchstream import avro
from touchstream.embedded import free_port
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
    assert first.json() == {"success": True, "accepted": 2, "duplicates": 0, "suppressed": 0}
    again = ingest.post("/v1/batch", json=batch, auth=(WRITE_KEY, ""))
    assert again.json() == {"success": True, "accepted": 0, "duplicates": 2, "suppressed": 0}

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


def test_gzip_bodies_and_their_limits(ingest: TestClient, all_topics: str) -> None:
    message_id = f"m-{uuid.uuid4().hex}"
    body = json.dumps({"event": "Viewed", "userId": "u4", "messageId": message_id}).encode()
    zipped = ingest.post("/v1/track", auth=(WRITE_KEY, ""), content=gzip.compress(body),
                         headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert zipped.status_code == 200, zipped.text
    assert [e["message_id"] for e in asyncio.run(read_raw_events(all_topics, {message_id}))] == [message_id]
    # 1 MB of zeros compresses to ~1 KB; the decompressed size is what counts.
    bomb = gzip.compress(b'{"event": "x", "userId": "u", "p": "' + b"0" * 1_000_000 + b'"}')
    assert len(bomb) < 32 * 1024
    refused = ingest.post("/v1/track", auth=(WRITE_KEY, ""), content=bomb, headers={"Content-Encoding": "gzip"})
    assert refused.status_code == 413 and "max_event_bytes" in refused.json()["error"]
    broken = ingest.post("/v1/track", auth=(WRITE_KEY, ""), content=b"\x1f\x8b not gzip",
                         headers={"Content-Encoding": "gzip"})
    assert broken.status_code == 400 and broken.json()["errors"][0]["field"] == "Content-Encoding"
    assert ingest.post("/v1/track", auth=(WRITE_KEY, ""), content=body,
                       headers={"Content-Encoding": "br"}).status_code == 400


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"event": "x", "userId": "u", "properties": {"n": NaN}}', "(body)"),
        (b'{"event": "x", "userId": "u", "properties": {"n": 1e999}}', "(body)"),
        (b'{"event": "x", "userId": "u", "p": ' + b"[" * 5000 + b"]" * 5000 + b"}", "(body)"),
        (b'{"event": "x", "userId": "u", "n": ' + b"9" * 5000 + b"}", "(body)"),
        (b'"just a string"', "(event)"),
        (b"[1, 2]", "(event)"),
        (b'{"event": "x", "userId": "\\ud800"}', "(body)"),
        (b'{"event": "x", "userId": "u", "timestamp": "+275760-09-13T00:00:00Z"}', "timestamp"),
        (b'{"event": "x", "userId": "u", "timestamp": 1e300}', "timestamp"),
        (b"\xff\xfe", "(body)"),
    ],
)
def test_odd_bodies_get_a_400_naming_the_field(ingest: TestClient, body: bytes, field: str) -> None:
    response = ingest.post("/v1/track", auth=(WRITE_KEY, ""), content=body)
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["field"] == field


def test_batch_sent_at_corrects_clock_skew(ingest: TestClient, all_topics: str) -> None:
    message_id = f"m-{uuid.uuid4().hex}"
    # The sender's clock is one hour ahead of ours: its timestamp and sentAt both are.
    ahead = datetime.now(UTC) + timedelta(hours=1)
    response = ingest.post("/v1/batch", auth=(WRITE_KEY, ""), json={
        "sentAt": ahead.isoformat(),
        "batch": [{"type": "track", "event": "Viewed", "userId": "u5", "messageId": message_id,
                   "timestamp": (ahead - timedelta(seconds=30)).isoformat()}]})
    assert response.status_code == 200, response.text
    [event] = asyncio.run(read_raw_events(all_topics, {message_id}))
    skew = event["received_at_ms"] - event["timestamp_ms"]  # type: ignore[operator]
    assert 29_000 <= skew <= 31_000


def test_write_key_in_the_body_and_openapi_document(ingest: TestClient) -> None:
    event = {"type": "track", "event": "Viewed", "userId": "u6"}
    assert ingest.post("/v1/batch", json={"batch": [event], "writeKey": WRITE_KEY}).status_code == 200
    assert ingest.post("/v1/batch", json={"batch": [event], "writeKey": "nope"}).status_code == 401
    document = ingest.get("/openapi.json")
    assert document.status_code == 200
    assert document.json() == yaml.safe_load((avro.SCHEMA_DIR / "openapi.yaml").read_text())
    assert ingest.get("/no/such/path").json()["success"] is False


def test_redis_down_is_a_503_with_retry_after(all_topics: str) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    core = CoreSettings(kafka_bootstrap=all_topics, redis_url=dead_redis, partitions=2)
    settings = IngestSettings(write_keys={"shop": hash_write_key(WRITE_KEY)})
    with TestClient(build_app(core, settings)) as client:
        response = client.post("/v1/track", auth=(WRITE_KEY, ""), json={"event": "Viewed", "userId": "u7"})
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1" and response.json()["retry"] is True
        assert client.get("/readyz").status_code == 503


def test_an_oversized_event_in_a_batch_is_a_413_naming_its_index(ingest: TestClient) -> None:
    small = {"type": "track", "event": "Viewed", "userId": "u8"}
    big = {**small, "properties": {"blob": "x" * 40_000}}
    response = ingest.post("/v1/batch", auth=(WRITE_KEY, ""), json={"batch": [small, big]})
    assert response.status_code == 413, response.text
    [error] = response.json()["errors"]
    assert error["index"] == 1 and "max_event_bytes" in error["reason"]


def test_no_broker_ack_in_time_is_a_503_and_the_retry_is_not_a_duplicate(all_topics: str, redis_url: str) -> None:
    core = CoreSettings(kafka_bootstrap=all_topics, redis_url=redis_url, partitions=2)
    hasty = IngestSettings(write_keys={"shop": hash_write_key(WRITE_KEY)}, produce_timeout_s=1e-6)
    patient = IngestSettings(write_keys={"shop": hash_write_key(WRITE_KEY)})
    event = {"event": "Viewed", "userId": "u9", "messageId": f"m-{uuid.uuid4().hex}"}
    with TestClient(build_app(core, hasty)) as client:
        response = client.post("/v1/track", auth=(WRITE_KEY, ""), json=event)
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "1" and response.json()["retry"] is True
    with TestClient(build_app(core, patient)) as client:
        assert client.post("/v1/track", auth=(WRITE_KEY, ""), json=event).json() == {
            "success": True, "accepted": 1, "duplicates": 0, "suppressed": 0}


def test_a_bad_batch_sent_at_is_refused_once_for_the_batch(ingest: TestClient) -> None:
    event = {"type": "track", "event": "x", "userId": "u", "timestamp": 1_700_000_000_000}
    response = ingest.post("/v1/batch", auth=(WRITE_KEY, ""), json={"sentAt": "yesterday", "batch": [event]})
    assert response.status_code == 400
    assert response.json()["errors"] == [{"index": None, "field": "sentAt",
                                          "reason": "'yesterday' is not an ISO 8601 timestamp"}]


def test_a_write_key_in_the_header_is_checked_before_the_body_is_read(ingest: TestClient) -> None:
    bomb = gzip.compress(b'{"event": "x", "userId": "u", "p": "' + b"0" * 1_000_000 + b'"}')
    oversized = b'{"batch": [' + b" " * 600_000 + b"]}"
    for path, body, headers in [("/v1/track", b"{not json", {}), ("/v1/batch", oversized, {}),
                                ("/v1/track", bomb, {"Content-Encoding": "gzip"})]:
        refused = ingest.post(path, auth=("wrong", ""), content=body, headers=headers)
        # Not the 400 or 413 its body would earn: nothing about a bad key's body is worth reading.
        assert refused.status_code == 401, (path, refused.text)
        assert refused.json()["code"] == "unauthorized"
        accepted_key = ingest.post(path, auth=(WRITE_KEY, ""), content=body, headers=headers)
        assert accepted_key.status_code in (400, 413), accepted_key.text


def client_behind(app: Starlette, peer: str) -> TestClient:
    return TestClient(app, client=(peer, 50000))


def test_failed_authentications_lock_a_client_address_out_with_retry_after(all_topics: str, redis_url: str) -> None:
    core = CoreSettings(kafka_bootstrap=all_topics, redis_url=redis_url, partitions=2)
    # The test client's peer is the ingress every upstream system comes through.
    settings = IngestSettings(write_keys={"shop": hash_write_key(WRITE_KEY)}, auth_max_failures=3,
                              auth_failure_window_s=60, trusted_proxies=["10.9.0.0/16"])
    run = uuid.uuid4().int
    guesser, neighbour = f"198.18.{run % 250}.{run // 250 % 250}", f"198.19.{run % 250}.{run // 250 % 250}"
    event = {"event": "Viewed", "userId": "u10"}
    # Two workers on one Redis: the failures counted on one lock the address out on the other.
    with client_behind(build_app(core, settings), "10.9.0.1") as first, \
            client_behind(build_app(core, settings), "10.9.0.2") as second:
        as_guesser, as_neighbour = {"X-Forwarded-For": guesser}, {"X-Forwarded-For": neighbour}
        assert first.post("/v1/track", json=event, auth=("guess-1", ""), headers=as_guesser).status_code == 401
        assert second.post("/v1/track", json=event, headers=as_guesser).status_code == 401  # no key at all
        assert first.post("/v1/track", json={**event, "writeKey": "guess-3"}, headers=as_guesser).status_code == 401
        locked = second.post("/v1/track", json=event, auth=(WRITE_KEY, ""), headers=as_guesser)
        assert locked.status_code == 429, locked.text  # even the right key, so a lucky guess shows nothing
        assert 0 < int(locked.headers["Retry-After"]) <= 60
        assert locked.json()["code"] == "rate_limited" and "failed authentications" in locked.json()["message"]
        # Another client behind the same proxies is not locked out by the guesser.
        assert first.post("/v1/track", json=event, auth=(WRITE_KEY, ""), headers=as_neighbour).status_code == 200
        # Each worker counts what it refused.
        assert 'touchstream_ingest_auth_refused_total{reason="bad_key"} 2.0' in first.get("/metrics").text
        second_metrics = second.get("/metrics").text
        assert 'touchstream_ingest_auth_refused_total{reason="bad_key"} 1.0' in second_metrics
        assert 'touchstream_ingest_auth_refused_total{reason="locked_out"} 1.0' in second_metrics


def test_x_forwarded_for_is_not_believed_from_an_untrusted_peer(all_topics: str, redis_url: str) -> None:
    core = CoreSettings(kafka_bootstrap=all_topics, redis_url=redis_url, partitions=2)
    settings = IngestSettings(write_keys={"shop": hash_write_key(WRITE_KEY)}, auth_max_failures=2,
                              trusted_proxies=["10.9.0.0/16"])
    run = uuid.uuid4().int
    peer = f"198.51.{run % 250}.{run // 250 % 250}"
    with client_behind(build_app(core, settings), peer) as client:
        for n in range(2):
            claimed = {"X-Forwarded-For": f"203.0.113.{n}"}
            assert client.post("/v1/track", json={"event": "x"}, auth=("guess", ""), headers=claimed).status_code == 401
        # Both failures counted on the peer itself: a made-up header does not escape the lockout.
        response = client.post("/v1/track", json={"event": "Viewed", "userId": "u11"}, auth=(WRITE_KEY, ""),
                               headers={"X-Forwarded-For": "203.0.113.99"})
        assert response.status_code == 429


def test_raw_records_are_keyed_by_the_keyed_hash_of_the_first_strong_identifier(all_topics: str,
                                                                                  redis_url: str) -> None:
    pii_key = "raw-key-test-secret"
    core = CoreSettings(kafka_bootstrap=all_topics, redis_url=redis_url, partitions=2, pii_hash_key=pii_key)
    settings = IngestSettings(write_keys={"shop": hash_write_key(WRITE_KEY)})
    run = uuid.uuid4().hex
    email = f"ann.{run}@example.com"
    events = [{"type": "track", "event": "Viewed", "email": email, "messageId": f"{run}-1"},
              {"type": "track", "event": "Viewed", "email": email, "device_id": f"d-{run}", "messageId": f"{run}-2"},
              {"type": "track", "event": "Viewed", "anonymousId": f"a-{run}", "messageId": f"{run}-3"}]
    with TestClient(build_app(core, settings)) as client:
        response = client.post("/v1/batch", auth=(WRITE_KEY, ""), json={"batch": events})
        assert response.status_code == 200, response.text
    found = asyncio.run(collect(all_topics, TOUCHPOINTS_RAW.name, TOUCHPOINTS_RAW.schema, 3,
                                lambda _key, record: record["message_id"].startswith(run), wait_s=15))
    keys = {record["message_id"]: key for key, record in found}
    expected = hmac.new(pii_key.encode(), f"email:{email}".encode(), hashlib.sha256).hexdigest().encode()
    # Not sha256("email:<clear>"), which a list of e-mails reverses (and deadletter would keep for good).
    assert keys[f"{run}-1"] == expected != hashlib.sha256(f"email:{email}".encode()).hexdigest().encode()
    assert keys[f"{run}-2"] == expected  # same first strong identifier, same key, same partition
    assert keys[f"{run}-3"] == hmac.new(pii_key.encode(), f"anonymous_id:a-{run}".encode(),
                                        hashlib.sha256).hexdigest().encode()
    assert all(email.encode() not in key and run.encode() not in key for key in keys.values())

def test_an_event_stamped_in_2099_is_refused_naming_the_field_and_the_rest_resent_is_accepted(
        ingest: TestClient, all_topics: str) -> None:
    now = datetime.now(UTC)
    good_id, future_id = f"m-{uuid.uuid4().hex}", f"m-{uuid.uuid4().hex}"
    good = {"type": "track", "event": "Viewed", "userId": "u10", "messageId": good_id,
            "timestamp": (now - timedelta(minutes=1)).isoformat()}
    future = {"type": "track", "event": "Viewed", "userId": "u11", "messageId": future_id,
              "timestamp": "2099-06-01T00:00:00Z"}
    response = ingest.post("/v1/batch", auth=(WRITE_KEY, ""), json={"batch": [good, future]})
    assert response.status_code == 400, response.text
    [error] = response.json()["errors"]
    assert (error["index"], error["field"]) == (1, "timestamp")
    assert "at most 300 s is accepted (event_time_tolerance_s)" in error["reason"]
    single = ingest.post("/v1/track", auth=(WRITE_KEY, ""), json=future)
    assert single.status_code == 400 and single.json()["errors"][0]["field"] == "timestamp", single.text
    # Nothing of the refused batch was claimed or produced: the good event alone goes through now.
    resent = ingest.post("/v1/batch", auth=(WRITE_KEY, ""), json={"batch": [good]})
    assert resent.json() == {"success": True, "accepted": 1, "duplicates": 0, "suppressed": 0}
    events = asyncio.run(read_raw_events(all_topics, {good_id, future_id}, wait_s=5))
    assert [e["message_id"] for e in events] == [good_id]
