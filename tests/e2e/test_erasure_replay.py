"""An erasure sticks when every worker reads the event logs again (whole local stack, every service in
its own process).

A customer (two at first, then merged) is scored, acted on and read-modelled next to another one,
then erased. Every stream worker is stopped, the consumer groups of scoring, triggers and
the console are rewound to the start of the topics that still hold the erased customer's records
(`touchpoints.resolved`, `identity.merges`, `scores`, `actions`, `deadletter`; not
`customers.deletions`, which a lagging worker would not read again either), and the workers are
started again and read everything. No Redis key or value names the erased customer afterwards, and
no webhook goes out about it; the other customer is untouched.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

from services.identity.domain import identifier_ref, lookup_identifier
from tests.e2e.test_privacy import (
    ADMIN,
    RULES,
    customer_of,
    deliveries,
    metric,
    read_model,
    redis_dump,
    send,
    wait_until,
)
from tests.stacks import running_stack
from touchstream.identifiers import DEFAULT_BLOCKLIST
from touchstream.settings import CoreSettings
from touchstream.topics import (
    ACTIONS,
    CUSTOMER_DELETIONS,
    DEADLETTER,
    IDENTITY_MERGES,
    SCORES,
    TOUCHPOINTS_RESOLVED,
    TopicSpec,
    prefixed,
)
from touchstream_cli import local

pytestmark = pytest.mark.integration

# Each consumer group and what it is rewound on: every topic it reads but customers.deletions, which
# stays at its end.
REWOUND: dict[str, tuple[TopicSpec, ...]] = {
    "scoring": (TOUCHPOINTS_RESOLVED, IDENTITY_MERGES),
    "triggers": (SCORES, ACTIONS),
    "console": (TOUCHPOINTS_RESOLVED, IDENTITY_MERGES, SCORES, ACTIONS, DEADLETTER),
}
WORKERS = ("identity", "scoring", "triggers", "console")


@pytest.fixture
def stack(tmp_path: Path, kafka_bootstrap: str) -> Iterator[local.StackState]:
    with running_stack(tmp_path, RULES, "e2e-erasure-replay-logs",
                       shared_broker=kafka_bootstrap) as state:
        yield state


class EveryPartitionToEveryMember(AbstractPartitionAssignor):
    """An assignor under the name the stream kernel's consumers join with (aiokafka's range assignor), so
    joining their group is not refused while the killed members are still in it; every member gets every
    partition (only the rewinding consumer is alive)."""

    name = "range"
    version = 0

    @classmethod
    def assign(cls, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
               ) -> dict[str, ConsumerProtocolMemberAssignment]:
        topics = {t for metadata in members.values() for t in metadata.subscription}
        everything = sorted((t, sorted(cluster.partitions_for_topic(t) or ())) for t in topics)
        return {member: ConsumerProtocolMemberAssignment(cls.version, everything, b"") for member in members}

    @classmethod
    def metadata(cls, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(cls.version, list(topics), b"")

    @classmethod
    def on_assignment(cls, assignment: ConsumerProtocolMemberAssignment) -> None:
        pass


async def rewind(bootstrap: str, group: str, topics: tuple[str, ...], partitions: int, within_s: float) -> None:
    """Commit the first offset of every partition of `topics` for `group`, whose workers are stopped, and
    the end of customers.deletions: the erasure stays handled, only the records before it come again.

    As a member of the group: the broker refuses commits from outside it.
    """
    kept = {TopicPartition(CUSTOMER_DELETIONS.name, p) for p in range(partitions)}
    rewound = {TopicPartition(t, p) for t in topics for p in range(partitions)}
    consumer = AIOKafkaConsumer(*topics, CUSTOMER_DELETIONS.name, bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                partition_assignment_strategy=(EveryPartitionToEveryMember,))
    await consumer.start()
    try:
        deadline = time.monotonic() + within_s
        while consumer.assignment() != rewound | kept:
            assert time.monotonic() < deadline, f"{group} never handed over {(rewound | kept) - consumer.assignment()}"
            await consumer.getmany(timeout_ms=500)
        consumer.pause(*rewound)
        idle = 0
        while idle < 3:  # read customers.deletions to its end (a worker may not have committed its last record)
            idle = 0 if await consumer.getmany(*kept, timeout_ms=500) else idle + 1
        ends = {tp: await consumer.position(tp) for tp in kept}
        await consumer.commit({**await consumer.beginning_offsets(list(rewound)), **ends})
    finally:
        await consumer.stop()


async def records_on(bootstrap: str, topic: str, partitions: int) -> int:
    """How many records (tombstones included) `topic` holds: read from the start to each partition's end offset."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    count = 0
    try:
        assigned = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(assigned)
        ends = await consumer.end_offsets(assigned)
        # Counted, not taken as end minus start: a compacted topic may have fewer records than offsets.
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            batch = await consumer.getmany(timeout_ms=1000)
            count += sum(1 for records in batch.values() for record in records if record.offset < ends[
                TopicPartition(record.topic, record.partition)])
    finally:
        await consumer.stop()
    return count


def read_again(stack: local.StackState, service: str) -> None:
    """Wait until `service`'s new worker has consumed every record of the topics it was rewound on."""
    totals = {topic: asyncio.run(records_on(stack.kafka_bootstrap, topic, stack.partitions))
              for topic in (spec.name for spec in REWOUND[service])}

    def behind() -> dict[str, tuple[float, int]]:
        read = {topic: metric(stack, service, f"touchstream_{service}_events_in_total", topic=topic)
                for topic in totals}
        return {topic: (read[topic], total) for topic, total in totals.items() if read[topic] < total}

    wait_until(f"{service} read its topics again", lambda: not behind(), timeout=120)


def test_an_erased_customer_stays_erased_when_every_worker_reads_the_topics_again(stack: local.StackState) -> None:
    tag = uuid.uuid4().hex[:8]
    user, email, phone = f"user-{tag}", f"ann-{tag}@example.com", f"+1415555{int(tag, 16) % 10_000:04d}"
    other_email = f"bob-{tag}@example.com"
    day = "2026-11-0{}T10:00:00Z"
    send(stack, "track", {"email": email, "event": "Page Viewed", "timestamp": day.format(1)})
    send(stack, "track", {"phone": phone, "event": "Page Viewed", "timestamp": day.format(2)})
    send(stack, "identify", {"userId": user, "traits": {"email": email, "phone": phone}, "timestamp": day.format(3)})
    send(stack, "track", {"userId": user, "event": "Order Completed", "timestamp": day.format(4),
                          "order": {"amount": 42.0, "currency": "EUR"}})
    send(stack, "track", {"email": other_email, "event": "Order Completed", "timestamp": day.format(4),
                          "order": {"amount": 9.0}})
    ann = wait_until("ann resolved into one customer", lambda: (
        (c := customer_of(stack, "email", email)) and len(c["identities"]) == 3 and c))
    bob_id = wait_until("bob resolved", lambda: customer_of(stack, "email", other_email))["customer_id"]
    ann_id = ann["customer_id"]
    ann_ids = {ann_id} | {m["merged_id"] for m in ann["merges"] if m["kind"] == "merge"}
    assert len(ann_ids) > 1, ann["merges"]
    wait_until("both acted on", lambda: {ann_id, bob_id} <= {d["body"]["customer_id"] for d in deliveries(stack)})
    wait_until("both read-modelled", lambda: all(
        asyncio.run(read_model(stack.redis_url, cid)).actions for cid in (ann_id, bob_id)))

    erased = httpx.post(f"{stack.url('identity')}/v1/customers/delete", headers=ADMIN, timeout=30,
                        json={"identifier": {"type": "email", "value": email}})
    assert erased.status_code == 200 and erased.json()["customer_id"] == ann_id, erased.text
    wait_until("customer.deleted webhook", lambda: any(
        d["body"].get("type") == "customer.deleted" for d in deliveries(stack)))

    key = CoreSettings().pii_hash_key.get_secret_value().encode()
    hashed = [lookup_identifier(k, v, key, "US", DEFAULT_BLOCKLIST) for k, v in
              (("user_id", user), ("email", email), ("phone", phone))]
    needles = [user, email, phone, *ann_ids, *(h.value for h in hashed), *(identifier_ref(h) for h in hashed)]

    def traces() -> list[str]:
        dump = asyncio.run(redis_dump(stack.redis_url))
        return [n for n in needles if n in dump]

    wait_until("no trace of the erased customer", lambda: not traces(), timeout=60)
    sent_before = httpx.get(f"{stack.url('receiver')}/stats", timeout=10).json()["requests"]

    run_dir = Path(stack.run_dir)
    local.stop_components(run_dir, WORKERS)

    async def rewind_every_group() -> None:
        # At once: each group hands its partitions over as its rebalance completes.
        await asyncio.gather(*(rewind(stack.kafka_bootstrap, prefixed(f"touchstream-{service}"),
                                      tuple(spec.name for spec in specs), stack.partitions,
                                      within_s=60) for service, specs in REWOUND.items()))

    asyncio.run(rewind_every_group())
    local.start_components(run_dir, WORKERS)
    for service in REWOUND:  # in pipeline order: scoring's replay adds scores that triggers then reads
        read_again(stack, service)
    time.sleep(3.0)  # what the last batches queued for delivery goes out meanwhile

    assert traces() == [], "the erased customer came back in Redis"
    assert not asyncio.run(read_model(stack.redis_url, ann_id)).known
    assert httpx.get(f"{stack.url('receiver')}/stats", timeout=10).json()["requests"] == sent_before
    assert asyncio.run(read_model(stack.redis_url, bob_id)).actions
    assert metric(stack, "scoring", "touchstream_scoring_events_erased_total") > 0
