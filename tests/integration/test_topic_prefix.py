"""Two deployments with different TOUCHSTREAM_TOPIC_PREFIX on one real broker: each stream kernel reads
its own topics only, in its own consumer group, though both run the same service name."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import CollectorRegistry

from touchstream import avro
from touchstream.embedded import create_topics
from touchstream.metrics import ServiceMetrics
from touchstream.settings import CoreSettings
from touchstream.streams import Consumes, Outbox, Readiness, Record, StreamKernel
from touchstream.topics import CUSTOMER_DELETIONS, TOPIC_PREFIX_SETTING

pytestmark = pytest.mark.integration
PER_STACK = 20


def deletion(customer_id: str) -> bytes:
    return avro.encode(CUSTOMER_DELETIONS.schema, {"deletion_id": f"d-{customer_id}", "customer_id": customer_id,
                                                   "merged_ids": [], "requested_at_ms": 1})


async def produce(bootstrap: str, topic: str, customer_ids: list[str]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for customer_id in customer_ids:
            await producer.send(topic, deletion(customer_id), key=customer_id.encode())
        await producer.flush()
    finally:
        await producer.stop()


def collecting_kernel(bootstrap: str, seen: set[str]) -> StreamKernel:
    """A kernel of service `prefixtest` (built under the current prefix) that notes every customer id it is handed."""

    async def note(records: list[Record], outbox: Outbox) -> None:
        seen.update(r.value["customer_id"] for r in records if r.value)

    core = CoreSettings(kafka_bootstrap=bootstrap, partitions=2)
    return StreamKernel("prefixtest", core, [Consumes((CUSTOMER_DELETIONS,), note)],
                        ServiceMetrics("prefixtest", CollectorRegistry()), Readiness())


async def until(condition: Callable[[], bool], timeout_s: float, what: Callable[[], str]) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached within {timeout_s}s: {what()}")
        await asyncio.sleep(0.1)


async def consumer_groups(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {group[0] for group in await admin.list_consumer_groups()}
    finally:
        await admin.close()


def test_two_prefixed_stacks_on_one_broker_do_not_see_each_others_records(
        kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run = uuid.uuid4().hex[:8]
    prefixes = {"a": f"a{run}.", "b": f"b{run}-"}
    sent = {stack: [f"c_{stack}{i}" for i in range(PER_STACK)] for stack in prefixes}
    seen: dict[str, set[str]] = {stack: set() for stack in prefixes}
    kernels: dict[str, StreamKernel] = {}
    for stack, prefix in prefixes.items():
        asyncio.run(create_topics(kafka_bootstrap, 2, [CUSTOMER_DELETIONS], topic_prefix=prefix))
        asyncio.run(produce(kafka_bootstrap, CUSTOMER_DELETIONS.name_with(prefix), sent[stack]))
        # A kernel takes its topic and group names from the environment it is built in.
        monkeypatch.setenv(TOPIC_PREFIX_SETTING, prefix)
        kernels[stack] = collecting_kernel(kafka_bootstrap, seen[stack])

    async def run_both(check: Callable[[], Awaitable[None]]) -> None:
        tasks = [asyncio.create_task(kernel.run()) for kernel in kernels.values()]
        try:
            await check()
        finally:
            for kernel in kernels.values():
                await kernel.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def check() -> None:
        await until(lambda: all(len(seen[s]) >= PER_STACK for s in prefixes), 60, lambda: repr(seen))
        # Records of the other stack would have come in the same fetches; give stragglers a moment all the same.
        await asyncio.sleep(1.0)

    asyncio.run(run_both(check))
    assert seen == {stack: set(ids) for stack, ids in sent.items()}
    assert {k.group_id for k in kernels.values()} == {f"{p}touchstream-prefixtest" for p in prefixes.values()}
    assert {f"{p}touchstream-prefixtest" for p in prefixes.values()} <= asyncio.run(consumer_groups(kafka_bootstrap))
