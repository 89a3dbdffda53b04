"""Erasure and consent through the whole local stack (real Apache Kafka, Valkey, every service in its own process).

Deletion: a customer known by e-mail, phone and user id (first as two customers that then merge)
is scored, acted on and read-modelled; another customer shares the stack. Erasing the first by
e-mail leaves no trace of its identifiers (clear or hashed) nor of its customer ids in any Redis
key or value, in the latest value per key of the compacted `scores` topic, or in any service's
/metrics; the other customer is untouched. Once the broker has compacted `scores` (its segment
settings made small here), no record on it, latest or not, holds a value for the erased
customer: the tombstones really erase. A new event carrying the erased e-mail is dropped at
ingest (counted), one produced straight to Kafka is dropped by identity (counted), and marketing
gets a signed `customer.deleted` webhook.

Consent: the customer's consent is the latest it stated, on any event: given on identify, it lets
a rule that requires it fire on a later event that carries none; withdrawn, the rule is suppressed.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from services.console.entries import CustomerView
from services.console.store import ReadModelStore
from services.identity.domain import identifier_ref, lookup_identifier
from services.ingest.producer import record_key
from services.ingest.segment import to_touchpoint
from tests.stacks import running_stack
from touchstream import avro
from touchstream.identifiers import DEFAULT_BLOCKLIST
from touchstream.settings import CoreSettings
from touchstream.topics import SCORES, TOUCHPOINTS_RAW
from touchstream_cli import local

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": "Bearer dev-admin-key"}
RULES = """
rules:
  - id: e2e-risk
    when: {score: churn_risk, crosses_above: 0.1, rearm_below: 0.05}
    action:
      endpoint: marketing
      template: {kind: retention_offer, churn_risk: "${scores.churn_risk}"}
    cooldown_hours: 24
  - id: consent-probe
    when:
      event: {field: event.name, eq: Consent Probe}
    consent: email
    action:
      endpoint: marketing
      template: {kind: newsletter}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str) -> Iterator[local.StackState]:
    with running_stack(tmp_path_factory.mktemp("stack"), RULES, "e2e-privacy-logs",
                       shared_broker=kafka_bootstrap) as state:
        yield state


def send(stack: local.StackState, call: str, body: dict[str, Any]) -> dict[str, Any]:
    body = {"messageId": f"m-{uuid.uuid4().hex}", **body}
    response = httpx.post(f"{stack.url('ingest')}/v1/{call}", auth=(stack.write_key, ""), json=body, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def wait_until(what: str, check: Callable[[], Any], timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


def deliveries(stack: local.StackState) -> list[dict[str, Any]]:
    return httpx.get(f"{stack.url('receiver')}/deliveries", params={"limit": 10_000}, timeout=5).json()  # type: ignore[no-any-return]


def customer_of(stack: local.StackState, kind: str, value: str) -> dict[str, Any] | None:
    response = httpx.post(f"{stack.url('identity')}/v1/customers/lookup",
                          json={"identifier": {"type": kind, "value": value}}, headers=ADMIN, timeout=5)
    return response.json() if response.status_code == 200 else None


def metric(stack: local.StackState, service: str, name: str, **labels: str) -> float:
    """Return one sample of a service's /metrics (0 when absent), matching labels in any order."""
    total = 0.0
    for line in httpx.get(f"{stack.url(service)}/metrics", timeout=5).text.splitlines():
        found = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if found and found.group(1) == name:
            sample = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', found.group(2) or ""))
            if sample == labels:
                total += float(found.group(3))
    return total


async def read_model(url: str, customer_id: str) -> CustomerView:
    client = aioredis.from_url(url)
    try:
        return await ReadModelStore(client).customer(customer_id)
    finally:
        await client.aclose()


async def redis_dump(url: str) -> str:
    """Every key and value of the stack's Redis, as one text."""
    client = aioredis.from_url(url)
    parts: list[str] = []
    try:
        async for key in client.scan_iter(count=1000):
            kind = (await client.type(key)).decode()
            if kind == "string":
                value: Any = await client.get(key)
            elif kind == "hash":
                value = await client.hgetall(key)
            elif kind == "set":
                value = await client.smembers(key)
            elif kind == "zset":
                value = await client.zrange(key, 0, -1, withscores=True)
            elif kind == "list":
                value = await client.lrange(key, 0, -1)
            else:
                value = kind
            parts.append(f"{key!r} {value!r}")
    finally:
        await client.aclose()
    return "\n".join(parts)


async def scores_records(bootstrap: str) -> list[tuple[bytes, bytes | None]]:
    """Every (key, value) record on `scores` that the broker still holds, oldest first per partition."""
    consumer = AIOKafkaConsumer(SCORES.name, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                group_id=None, enable_auto_commit=False)
    await consumer.start()
    found: list[tuple[bytes, bytes | None]] = []
    try:
        idle = 0
        while idle < 3:
            batch = await consumer.getmany(timeout_ms=1000)
            idle = 0 if batch else idle + 1
            for records in batch.values():
                found += [(record.key, record.value) for record in records]
    finally:
        await consumer.stop()
    return found


async def latest_scores(bootstrap: str) -> dict[bytes, bytes | None]:
    """The latest value per key on `scores`, as a compacted topic's reader sees it."""
    return dict(await scores_records(bootstrap))


async def compact_scores_soon(bootstrap: str) -> None:
    """Make the broker's cleaner compact `scores` within seconds: tiny segments, any dirt is enough."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, SCORES.name, configs={
            "cleanup.policy": "compact", "segment.ms": "200", "min.cleanable.dirty.ratio": "0.001",
            "min.compaction.lag.ms": "0"})])
    finally:
        await admin.close()


async def roll_scores_segments(bootstrap: str) -> None:
    """Append a tombstone of an unused key to every partition of `scores`, so each active segment
    (never compacted) rolls over once older than segment.ms; consumers skip tombstones."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for partition in await producer.partitions_for(SCORES.name):
            await producer.send_and_wait(SCORES.name, key=b"c_segment-roll", value=None, partition=partition)
    finally:
        await producer.stop()


async def produce_raw(bootstrap: str, record: dict[str, Any]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(TOUCHPOINTS_RAW.name, avro.encode(TOUCHPOINTS_RAW.schema, record),
                                     key=record_key(record, CoreSettings().pii_hash_key.get_secret_value().encode()))
    finally:
        await producer.stop()


def test_erased_customer_leaves_no_trace(stack: local.StackState) -> None:
    tag = uuid.uuid4().hex[:8]
    user, email, phone = f"user-{tag}", f"ann-{tag}@example.com", f"+1415555{int(tag, 16) % 10_000:04d}"
    other_user, other_email = f"bob-{tag}", f"bob-{tag}@example.com"
    day = "2026-11-0{}T10:00:00Z"
    # Two customers first (e-mail only, phone only), then one event linking both to the user id: a merge.
    send(stack, "track", {"email": email, "event": "Page Viewed", "timestamp": day.format(1)})
    send(stack, "track", {"phone": phone, "event": "Page Viewed", "timestamp": day.format(2)})
    send(stack, "identify", {"userId": user, "traits": {"email": email, "phone": phone},
                             "consent": ["email"], "timestamp": day.format(3)})
    send(stack, "track", {"userId": user, "event": "Order Completed", "timestamp": day.format(4),
                          "order": {"amount": 42.0, "currency": "EUR"}})
    send(stack, "track", {"userId": other_user, "email": other_email, "event": "Order Completed",
                          "timestamp": day.format(4), "order": {"amount": 9.0}})

    ann = wait_until("ann resolved into one customer", lambda: (
        (c := customer_of(stack, "email", email)) and len(c["identities"]) == 3 and c))
    bob = wait_until("bob resolved", lambda: customer_of(stack, "email", other_email))
    ann_id, bob_id = ann["customer_id"], bob["customer_id"]
    merged_ids = {m["merged_id"] for m in ann["merges"] if m["kind"] == "merge"}
    assert merged_ids, ann["merges"]
    wait_until("both acted on", lambda: {ann_id, bob_id} <= {d["body"]["customer_id"] for d in deliveries(stack)})
    def read_model_has(cid: str) -> bool:
        record = asyncio.run(read_model(stack.redis_url, cid))
        return bool(record.timeline and record.scores and record.actions)

    wait_until("both read-modelled", lambda: read_model_has(ann_id) and read_model_has(bob_id))

    # Refusals name the field; no key, no entry.
    url = f"{stack.url('identity')}/v1/customers"
    assert httpx.post(f"{url}/delete", json={"identifier": {"type": "email", "value": email}}).status_code == 401
    bad = httpx.post(f"{url}/delete", headers=ADMIN, json={"identifier": {"type": "email", "value": "nope"}})
    assert bad.status_code == 400 and bad.json()["field"] == "identifier.value", bad.text
    bad = httpx.post(f"{url}/delete", headers=ADMIN, json={"who": email})
    assert bad.status_code == 400 and bad.json()["field"] == "who", bad.text
    assert httpx.delete(f"{url}/c_unknown", headers=ADMIN).status_code == 404

    erased = httpx.post(f"{url}/delete", headers=ADMIN, json={"identifier": {"type": "email", "value": email}},
                        timeout=30)
    assert erased.status_code == 200, erased.text
    answer = erased.json()
    assert answer["deleted"] is True and answer["customer_id"] == ann_id
    assert set(answer["merged_ids"]) == merged_ids and answer["identifiers_suppressed"] == 3
    again = httpx.post(f"{url}/delete", headers=ADMIN, json={"identifier": {"type": "email", "value": email}})
    assert again.status_code == 404 and again.json()["deleted"] is False
    assert httpx.delete(f"{url}/{ann_id}", headers=ADMIN).status_code == 404

    notice = wait_until("customer.deleted webhook", lambda: next(
        (d for d in deliveries(stack) if d["body"].get("type") == "customer.deleted"), None))
    assert notice["body"]["data"]["customer_id"] == ann_id
    assert set(notice["body"]["data"]["merged_ids"]) == merged_ids
    assert notice["webhook_id"] == notice["body"]["action_id"]
    assert httpx.get(f"{stack.url('receiver')}/stats").json()["rejected_signatures"] == 0

    key = CoreSettings().pii_hash_key.get_secret_value().encode()
    hashed = [lookup_identifier(k, v, key, "US", DEFAULT_BLOCKLIST) for k, v in
              (("user_id", user), ("email", email), ("phone", phone))]
    needles = [user, email, phone, ann_id, *merged_ids, *(h.value for h in hashed),
               *(identifier_ref(h) for h in hashed)]

    def traces() -> list[str]:
        found = []
        dump = asyncio.run(redis_dump(stack.redis_url))
        found += [f"redis: {n}" for n in needles if n in dump]
        for service in ("ingest", "identity", "scoring", "triggers", "console"):
            text = httpx.get(f"{stack.url(service)}/metrics", timeout=5).text
            found += [f"{service} /metrics: {n}" for n in needles if n in text]
        latest = asyncio.run(latest_scores(stack.kafka_bootstrap))
        live = b"".join(v for v in latest.values() if v is not None)
        found += [f"scores: {n}" for n in needles if n.encode() in live]
        found += [f"scores key {k!r} not tombstoned" for k in latest
                  if k.decode() in {ann_id, *merged_ids} and latest[k] is not None]
        return found

    remaining: list[str] = []

    def clean() -> bool:
        remaining[:] = traces()
        return not remaining

    try:
        wait_until("no trace of the erased customer", clean, timeout=60)
    except AssertionError:
        raise AssertionError(f"traces left: {remaining}") from None
    assert not asyncio.run(read_model(stack.redis_url, ann_id)).known

    # Compaction is real: once the cleaner ran, no record left on `scores` carries a value for the
    # erased customer, not only the latest one per key.
    erased_keys = {cid.encode() for cid in (ann_id, *merged_ids)}
    asyncio.run(compact_scores_soon(stack.kafka_bootstrap))

    def compacted_away() -> bool:
        asyncio.run(roll_scores_segments(stack.kafka_bootstrap))
        history = asyncio.run(scores_records(stack.kafka_bootstrap))
        return not [key for key, value in history if key in erased_keys and value is not None]

    wait_until("the erased customer's score values compacted away", compacted_away, timeout=90)

    # The other customer is intact.
    assert customer_of(stack, "email", other_email)["customer_id"] == bob_id  # type: ignore[index]
    assert read_model_has(bob_id)
    latest = asyncio.run(latest_scores(stack.kafka_bootstrap))
    assert latest.get(bob_id.encode()) is not None

    # Later events carrying an erased identifier are dropped: at ingest, and by identity for Kafka producers.
    time.sleep(1.0)  # ingest looks for new erasures every 0.5 s
    before = metric(stack, "ingest", "touchstream_ingest_events_suppressed_total")
    answer = send(stack, "track", {"email": email.upper(), "event": "Page Viewed", "timestamp": day.format(5)})
    assert answer == {"success": True, "accepted": 0, "duplicates": 0, "suppressed": 1}
    assert metric(stack, "ingest", "touchstream_ingest_events_suppressed_total") == before + 1
    record = to_touchpoint({"phone": phone, "event": "Page Viewed", "messageId": f"m-{tag}-kafka"}, "track",
                           "direct", int(time.time() * 1000))
    asyncio.run(produce_raw(stack.kafka_bootstrap, record))
    wait_until("identity drops the direct Kafka event", lambda: metric(
        stack, "identity", "touchstream_identity_events_suppressed_total") >= 1)
    assert customer_of(stack, "phone", phone) is None
    assert clean(), remaining


def test_consent_is_the_customers_latest_statement(stack: local.StackState) -> None:
    user = f"carol-{uuid.uuid4().hex[:8]}"
    send(stack, "identify", {"userId": user, "consent": ["email"], "timestamp": "2026-11-10T10:00:00Z"})
    send(stack, "track", {"userId": user, "event": "Consent Probe", "timestamp": "2026-11-10T11:00:00Z"})
    carol = wait_until("carol resolved", lambda: customer_of(stack, "user_id", user))

    def probes() -> list[dict[str, Any]]:
        return [d for d in deliveries(stack)
                if d["body"].get("rule_id") == "consent-probe" and d["body"]["customer_id"] == carol["customer_id"]]

    wait_until("the rule requiring consent fires on an event without it", probes)

    suppressed = {"rule": "consent-probe", "outcome": "suppressed", "reason": "consent"}
    before = metric(stack, "triggers", "touchstream_triggers_actions_total", **suppressed)
    send(stack, "identify", {"userId": user, "consent": [], "timestamp": "2026-11-10T12:00:00Z"})
    send(stack, "track", {"userId": user, "event": "Consent Probe", "timestamp": "2026-11-10T13:00:00Z"})
    wait_until("withdrawn consent suppresses the rule", lambda: metric(
        stack, "triggers", "touchstream_triggers_actions_total", **suppressed) > before)
    assert len(probes()) == 1
