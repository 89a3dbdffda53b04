"""The identity worker for real: `python -m services.identity` on the session Tansu broker and Valkey."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.identity.admin import hash_admin_key
from services.identity.domain import GraphLayout, new_customer_id, prepare_identifiers
from services.identity.settings import IdentitySettings
from tests.identity_models import ANN, ANN_MOVED, ANN_TYPO, NEAR_CERTAINTY, store_fitted_model
from tests.kafka_reading import collect
from touchstream import avro
from touchstream.embedded import ManagedProcess, free_port
from touchstream.identifiers import DEFAULT_BLOCKLIST
from touchstream.metrics import consumer_lag_messages, metric_name
from touchstream.replay import sum_metric
from touchstream.topics import (
    CUSTOMER_DELETIONS,
    DEADLETTER,
    IDENTITY_MERGES,
    SCORES,
    TOUCHPOINTS_RAW,
    TOUCHPOINTS_RESOLVED,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PII_KEY = "integration-test-key"


ADMIN_KEY = "integration-admin-key"


def spawn_identity_worker(
    bootstrap: str, redis_url: str, state_dir: Path, artifacts_dir: Path, extra_env: dict[str, str] | None = None
) -> tuple[ManagedProcess, int]:
    """Start `python -m services.identity` (not yet ready); return it and its web port."""
    web_port = free_port()
    state_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "TOUCHSTREAM_KAFKA_BOOTSTRAP": bootstrap,
        "TOUCHSTREAM_REDIS_URL": redis_url,
        "TOUCHSTREAM_PARTITIONS": "2",
        "TOUCHSTREAM_PII_HASH_KEY": PII_KEY,
        "TOUCHSTREAM_STATE_DIR": str(state_dir),
        "TOUCHSTREAM_IDENTITY_WEB_PORT": str(web_port),
        "TOUCHSTREAM_IDENTITY_ADMIN_KEYS": json.dumps([hash_admin_key(ADMIN_KEY)]),
        "PYTHONPATH": str(REPO),
        **(extra_env or {}),
    }
    log = open(artifacts_dir / "identity-worker.log", "ab")  # noqa: SIM115
    try:
        # Faust writes its data directory into the working directory; keep it out of the repo.
        process = subprocess.Popen(
            [sys.executable, "-m", "services.identity"], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, env=env, cwd=state_dir,
        )
    finally:
        log.close()
    return ManagedProcess("identity", process), web_port


@pytest.fixture
def identity_worker(all_topics: str, redis_url: str, tmp_path: Path, artifacts_dir: Path) -> Iterator[int]:
    """Run one identity worker; yield its web port."""
    worker, web_port = spawn_identity_worker(all_topics, redis_url, tmp_path, artifacts_dir)
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


MERGES_TOTAL = metric_name("identity", "merges", "total")


def merges_once_caught_up(web_port: int, partitions: int = 2, wait_s: float = 60.0) -> float:
    """The worker's merge count once it has handled everything on touchpoints.raw: the session broker's topic
    holds what earlier tests of this process produced after their own workers stopped, and a new worker of the
    same group resolves those first."""
    deadline = time.monotonic() + wait_s
    while True:
        text = httpx.get(f"http://127.0.0.1:{web_port}/metrics", timeout=10).text
        lags = [sum_metric(text, consumer_lag_messages("identity"), topic=TOUCHPOINTS_RAW.name, partition=str(p))
                for p in range(partitions)]
        fetched = text.count(f'{consumer_lag_messages("identity")}{{') >= partitions
        if fetched and not any(lags):
            return sum_metric(text, MERGES_TOTAL)
        assert time.monotonic() < deadline, f"the worker did not catch up with touchpoints.raw: lags {lags}"
        time.sleep(0.2)


async def test_worker_resolves_links_and_dead_letters_real_events(
    identity_worker: int, producer: AIOKafkaProducer, all_topics: str
) -> None:
    merges_before = await asyncio.to_thread(merges_once_caught_up, identity_worker)
    run = uuid.uuid4().hex[:8]
    email, device = f"ann.{run}@example.org", f"dev-{run}"
    bad_key = f"garbage-{run}".encode()
    now = int(time.time() * 1000)
    events = [
        touchpoint(f"{run}-1", now - 3000, ("email", email)),
        touchpoint(f"{run}-2", now - 2000, ("device_id", device)),
        touchpoint(f"{run}-3", now - 1000, ("device_id", device), ("email", email.upper())),
    ]
    # One key, one partition: the merge below exists only if event 3 comes after event 2 (in the
    # other order event 3 attaches the device first and event 2 needs no merge).
    for event in events:
        await producer.send_and_wait(TOUCHPOINTS_RAW.name, event, key=run.encode())
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
    assert sum_metric(metrics, MERGES_TOTAL) == merges_before + 1


async def test_customer_api_looks_up_by_an_identifier_in_the_body_and_splits_a_customer(
    identity_worker: int, producer: AIOKafkaProducer, all_topics: str
) -> None:
    run = uuid.uuid4().hex[:8]
    email, device, phone = f"bo.{run}@example.org", f"dev-{run}", f"+1415555{int(run, 16) % 10000:04d}"
    now = int(time.time() * 1000)
    await producer.send_and_wait(TOUCHPOINTS_RAW.name, touchpoint(f"{run}-1", now - 2000, ("email", email),
                                                                 ("device_id", device)), key=f"{run}-1".encode())
    await producer.send_and_wait(TOUCHPOINTS_RAW.name, touchpoint(f"{run}-2", now - 1000, ("device_id", device),
                                                                 ("phone", phone)), key=f"{run}-2".encode())
    await collect(all_topics, TOUCHPOINTS_RESOLVED.name, TOUCHPOINTS_RESOLVED.schema, 2,
                  lambda _key, r: r["event"]["message_id"].startswith(run))
    base = f"http://127.0.0.1:{identity_worker}/v1/customers"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}

    def by(kind: str, value: str) -> dict[str, object]:
        return {"identifier": {"type": kind, "value": value}}

    async with httpx.AsyncClient(timeout=10) as client:
        anonymous = await client.post(f"{base}/lookup", json=by("email", email))
        wrong = await client.post(f"{base}/lookup", json=by("email", email), headers={"Authorization": "Bearer x"})
        found = await client.post(f"{base}/lookup", json=by("email", f" {email.upper()}"), headers=admin)
        customer = found.json()
        # A clear identifier in the query string is refused, pointing to the look-up that keeps it out of URLs.
        in_url = await client.get(base, params={"identifier": f"email:{email}"}, headers=admin)
        unusable = await client.post(f"{base}/lookup", json=by("email", "not-an-address"), headers=admin)
        extra = await client.post(f"{base}/lookup", json={**by("email", email), "mode": "x"}, headers=admin)
        not_json = await client.post(f"{base}/lookup", content=b"email:" + email.encode(), headers=admin)
        nobody = await client.post(f"{base}/lookup", json=by("email", f"nobody.{run}@example.org"), headers=admin)
        basic = await client.get(f"{base}/{customer['customer_id']}", auth=("ops", ADMIN_KEY))
        split = await client.post(f"{base}/{customer['customer_id']}/unmerge", headers=admin,
                                  json={"identifiers": [{"type": "phone", "value": phone}], "request_id": run})
        retried = await client.post(f"{base}/{customer['customer_id']}/unmerge", headers=admin,
                                    json={"identifiers": [{"type": "phone", "value": phone}], "request_id": run})
        by_phone = await client.post(f"{base}/lookup", json=by("phone", phone), headers=admin)
        after = await client.get(f"{base}/{customer['customer_id']}", headers=admin)
        unknown = await client.get(f"{base}/c_nobody", headers=admin)

    assert (anonymous.status_code, wrong.status_code, found.status_code, basic.status_code) == (401, 401, 200, 200)
    assert basic.json() == customer
    assert sorted(i["type"] for i in customer["identities"]) == ["device_id", "email", "phone"]
    assert email not in found.text and phone not in found.text and device not in found.text
    assert in_url.status_code == 400 and in_url.json()["field"] == "identifier"
    assert "POST /v1/customers/lookup" in in_url.json()["reason"] and email not in in_url.text
    assert (unusable.status_code, unusable.json()["field"]) == (400, "identifier.value")
    assert (extra.status_code, extra.json()["field"]) == (400, "mode")
    assert (not_json.status_code, not_json.json()["field"]) == (400, "(body)")
    assert nobody.status_code == 404
    assert customer["first_seen_ms"] == now - 2000 and customer["last_seen_ms"] == now - 1000
    # Named after the earliest event's most stable identifier, whichever partition was read first.
    hashed = prepare_identifiers([{"type": "email", "value": email}, {"type": "device_id", "value": device}],
                                 PII_KEY.encode(), "US", DEFAULT_BLOCKLIST).hashed
    assert customer["customer_id"] == new_customer_id(hashed)
    assert split.status_code == 200 and retried.json() == split.json()
    new_id = split.json()["new_customer_id"]
    assert by_phone.json()["customer_id"] == new_id
    assert sorted(i["type"] for i in after.json()["identities"]) == ["device_id", "email"]
    assert after.json()["merges"][-1]["kind"] == "unmerge"
    assert unknown.status_code == 404

    # The split is announced once downstream, and new events with the phone go to the new customer.
    await producer.send_and_wait(TOUCHPOINTS_RAW.name, touchpoint(f"{run}-3", now, ("phone", phone)),
                                 key=f"{run}-3".encode())
    merges = await collect(all_topics, IDENTITY_MERGES.name, IDENTITY_MERGES.schema, 2,
                           lambda _key, r: r["caused_by"] == f"unmerge:{run}", wait_s=5)
    [resolved] = [r for _, r in await collect(all_topics, TOUCHPOINTS_RESOLVED.name, TOUCHPOINTS_RESOLVED.schema, 1,
                                              lambda _key, r: r["event"]["message_id"] == f"{run}-3")]
    assert len(merges) == 2  # the retry re-announces the same merge_id (at-least-once, idempotent by id)
    assert {r["merge_id"] for _, r in merges} == {split.json()["merge_id"]}
    [(key, record)] = merges[:1]
    assert (record["kind"], record["reason"], record["survivor_id"], record["merged_id"]) == (
        "unmerge", "operator", customer["customer_id"], new_id)
    assert key == customer["customer_id"].encode()
    assert resolved["customer_id"] == new_id


async def test_customer_api_erases_a_customer_once_and_later_events_are_dropped(
    identity_worker: int, producer: AIOKafkaProducer, all_topics: str
) -> None:
    run = uuid.uuid4().hex[:8]
    email, phone = f"cy.{run}@example.org", f"+1415555{int(run, 16) % 10000:04d}"
    now = int(time.time() * 1000)
    # One key, one partition: the merge asserted below exists only if event 3 comes after 1 and 2.
    await producer.send_and_wait(TOUCHPOINTS_RAW.name, touchpoint(f"{run}-1", now - 2000, ("email", email)),
                                 key=run.encode())
    await producer.send_and_wait(TOUCHPOINTS_RAW.name, touchpoint(f"{run}-2", now - 1000, ("phone", phone)),
                                 key=run.encode())
    await producer.send_and_wait(TOUCHPOINTS_RAW.name, touchpoint(f"{run}-3", now, ("email", email), ("phone", phone)),
                                 key=run.encode())
    await collect(all_topics, TOUCHPOINTS_RESOLVED.name, TOUCHPOINTS_RESOLVED.schema, 3,
                  lambda _key, r: r["event"]["message_id"].startswith(run))
    base = f"http://127.0.0.1:{identity_worker}/v1/customers"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}

    async with httpx.AsyncClient(timeout=30) as client:
        customer = (await client.post(f"{base}/lookup", json={"identifier": {"type": "email", "value": email}},
                                      headers=admin)).json()
        [merged_id] = [m["merged_id"] for m in customer["merges"] if m["kind"] == "merge"]
        anonymous = await client.delete(f"{base}/{merged_id}")
        too_long = await client.delete(f"{base}/{'x' * 201}", headers=admin)
        no_body = await client.post(f"{base}/delete", headers=admin, content=b"{")
        both = await client.post(f"{base}/delete", headers=admin,
                                 json={"customer_id": merged_id, "identifier": f"email:{'0' * 64}"})
        bad_id = await client.post(f"{base}/delete", headers=admin, json={"identifier": {"type": "email"}})
        erased = await client.delete(f"{base}/{merged_id}", headers=admin, params={"request_id": run})
        again = await client.delete(f"{base}/{customer['customer_id']}", headers=admin, params={"request_id": run})
        lookup = await client.post(f"{base}/lookup", json={"identifier": {"type": "phone", "value": phone}},
                                   headers=admin)

    assert anonymous.status_code == 401
    assert (too_long.status_code, too_long.json()["field"]) == (400, "customer_id")
    assert (no_body.status_code, no_body.json()["field"]) == (400, "(body)")
    assert (both.status_code, both.json()["field"]) == (400, "identifier")
    assert (bad_id.status_code, bad_id.json()["field"]) == (400, "identifier.value")
    assert erased.status_code == 200, erased.text
    body = erased.json()
    assert body["deleted"] and body["customer_id"] == customer["customer_id"] and body["merged_ids"] == [merged_id]
    assert again.status_code == 404 and not again.json()["deleted"]
    assert again.json()["deletion_id"] == body["deletion_id"]
    assert lookup.status_code == 404

    [(key, deletion)] = await collect(all_topics, CUSTOMER_DELETIONS.name, CUSTOMER_DELETIONS.schema, 1,
                                      lambda _key, r: r["deletion_id"] == body["deletion_id"])
    assert key == customer["customer_id"].encode() and deletion["merged_ids"] == [merged_id]
    consumer = AIOKafkaConsumer(bootstrap_servers=all_topics, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    consumer.assign([TopicPartition(SCORES.name, p) for p in range(2)])
    tombstones: set[bytes] = set()
    try:
        deadline = time.monotonic() + 20
        while len(tombstones) < 2 and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                tombstones |= {m.key for m in records if m.value is None and m.key is not None}
    finally:
        await consumer.stop()
    assert {customer["customer_id"].encode(), merged_id.encode()} <= tombstones

    # An upstream producer writing straight to Kafka: dropped by identity, counted, nothing resolved.
    await producer.send_and_wait(TOUCHPOINTS_RAW.name, touchpoint(f"{run}-4", now + 1000, ("device_id", run),
                                                                 ("phone", phone)), key=f"{run}-4".encode())
    deadline = time.monotonic() + 30
    metrics = ""
    while time.monotonic() < deadline and "touchstream_identity_events_suppressed_total 1.0" not in metrics:
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"http://127.0.0.1:{identity_worker}/metrics")).text
        await asyncio.sleep(0.3)
    assert "touchstream_identity_events_suppressed_total 1.0" in metrics
    assert "touchstream_identity_customers_deleted_total 1.0" in metrics
    assert not await collect(all_topics, TOUCHPOINTS_RESOLVED.name, TOUCHPOINTS_RESOLVED.schema, 1,
                             lambda _key, r: r["event"]["message_id"] == f"{run}-4", wait_s=3)


def identify(message_id: str, timestamp_ms: int, identifier: tuple[str, str], traits: dict[str, object]) -> bytes:
    return avro.encode(TOUCHPOINTS_RAW.schema, {
        "message_id": message_id, "type": "identify", "timestamp_ms": timestamp_ms, "received_at_ms": timestamp_ms,
        "identifiers": [{"type": identifier[0], "value": identifier[1]}],
        "properties_json": json.dumps({"traits": traits})})


@pytest.fixture
def matching_worker(all_topics: str, redis_url: str, tmp_path: Path, artifacts_dir: Path) -> Iterator[int]:
    """Run one identity worker with matching on, over a graph holding a fitted model; yield its web port."""

    async def store_model() -> None:
        client = aioredis.from_url(redis_url)
        await store_fitted_model(client, GraphLayout(IdentitySettings().graph_key_prefix))
        await client.aclose()

    asyncio.run(store_model())
    matching = {"enabled": True, "match_probability": NEAR_CERTAINTY}
    worker, web_port = spawn_identity_worker(all_topics, redis_url, tmp_path, artifacts_dir,
                                             {"TOUCHSTREAM_IDENTITY_MATCHING": json.dumps(matching)})
    try:
        wait_until_ready(worker, web_port)
        yield web_port
    finally:
        worker.stop()


async def test_matching_links_a_typo_and_shows_a_possible_match_for_review(
    matching_worker: int, producer: AIOKafkaProducer, all_topics: str
) -> None:
    run = uuid.uuid4().hex[:8]
    now = int(time.time() * 1000)
    for n, (identifier, traits) in enumerate(((("crm_id", f"A-{run}"), ANN), (("pos_id", f"B-{run}"), ANN_TYPO),
                                               (("pos_id", f"C-{run}"), ANN_MOVED))):
        # One key, one partition: each record is matched against the ones before it.
        await producer.send_and_wait(TOUCHPOINTS_RAW.name, identify(f"{run}-{n}", now + n, identifier, traits),
                                     key=run.encode())
    resolved = {r["event"]["message_id"]: r["customer_id"] for _, r in await collect(
        all_topics, TOUCHPOINTS_RESOLVED.name, TOUCHPOINTS_RESOLVED.schema, 3,
        lambda _key, r: r["event"]["message_id"].startswith(run))}
    ann, moved_id = resolved[f"{run}-0"], resolved[f"{run}-2"]
    base = f"http://127.0.0.1:{matching_worker}"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}

    async with httpx.AsyncClient(timeout=10) as client:
        anonymous = await client.get(f"{base}/v1/matching/review")
        review = (await client.get(f"{base}/v1/matching/review", headers=admin)).json()
        customer = (await client.get(f"{base}/v1/customers/{ann}", headers=admin)).json()
        model = (await client.get(f"{base}/v1/matching/model", headers=admin)).json()
        metrics = (await client.get(f"{base}/metrics")).text

    assert resolved[f"{run}-1"] == ann != moved_id
    assert anonymous.status_code == 401
    [entry] = review["possible_matches"]
    assert entry["live_customer_ids"] == [moved_id, ann] and 0.05 <= entry["probability"] < NEAR_CERTAINTY
    assert [m["customer_id"] for m in customer["possible_matches"]] == [moved_id]
    assert [m["reason"] for m in customer["merges"]] == ["probabilistic"]
    assert model["model"]["converged"] and model["records"] == 3 and model["pairs"] >= 2
    assert model["model"]["fields"]["surname"]["exact"]["weight_bits"] > 0
    assert "touchstream_identity_possible_matches_total 1.0" in metrics
    assert "touchstream_identity_probabilistic_merges_total 1.0" in metrics


def test_the_customer_api_locks_out_an_address_that_sends_wrong_admin_keys(
        all_topics: str, redis_url: str, tmp_path: Path, artifacts_dir: Path) -> None:
    worker, web_port = spawn_identity_worker(all_topics, redis_url, tmp_path, artifacts_dir, {
        "TOUCHSTREAM_IDENTITY_ADMIN_MAX_FAILURES": "3", "TOUCHSTREAM_IDENTITY_ADMIN_FAILURE_WINDOW_S": "120",
        # Loopback is the proxy here, so each X-Forwarded-For address is a client of its own.
        "TOUCHSTREAM_IDENTITY_TRUSTED_PROXIES": '["127.0.0.0/8"]'})
    try:
        wait_until_ready(worker, web_port)
        url = f"http://127.0.0.1:{web_port}/v1/customers/c_nobody"

        def get(key: str | None, client: str) -> httpx.Response:
            headers = {"X-Forwarded-For": client, **({"Authorization": f"Bearer {key}"} if key else {})}
            return httpx.get(url, headers=headers, timeout=10)

        # Requests without a key guess nothing: refused, never counted.
        assert [get(None, "203.0.113.9").status_code for _ in range(5)] == [401] * 5
        assert [get("wrong", "203.0.113.9").status_code for _ in range(3)] == [401] * 3
        locked = get(ADMIN_KEY, "203.0.113.9")  # even the right key, once locked out
        assert locked.status_code == 429 and 0 < int(locked.headers["Retry-After"]) <= 120
        assert get(ADMIN_KEY, "198.51.100.7").status_code == 404  # another client is not held up
        metrics = httpx.get(f"http://127.0.0.1:{web_port}/metrics", timeout=10).text
        assert 'touchstream_identity_admin_auth_refused_total{reason="bad_key"} 3.0' in metrics
        assert 'touchstream_identity_admin_auth_refused_total{reason="locked_out"} 1.0' in metrics
    finally:
        worker.stop()
