"""The stream kernel on fakes of the producer: decode once, dead-letter what cannot be read or handled,
isolate a poison record, wait out a failing dependency, send only what a successful attempt produced."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry
from redis.exceptions import ResponseError

from touchstream import avro
from touchstream.metrics import ServiceMetrics
from touchstream.settings import CoreSettings
from touchstream.streams import Consumes, Outbox, Readiness, Record, StreamKernel
from touchstream.topics import CUSTOMER_DELETIONS, DEADLETTER, SCORES


class FakeProducer:
    """Acknowledges every record at once (or fails the next `fail_next` sends); keeps what it acknowledged."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []
        self.fail_next = 0

    async def send(self, topic: str, value: bytes | None, key: bytes | None) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail_next:
            self.fail_next -= 1
            from aiokafka.errors import KafkaTimeoutError

            future.set_exception(KafkaTimeoutError())
        else:
            self.sent.append((topic, key, value))
            future.set_result(None)
        return future

    def on(self, topic: str) -> list[tuple[bytes | None, bytes | None]]:
        return [(key, value) for t, key, value in self.sent if t == topic]


def deletion(customer_id: str) -> bytes:
    return avro.encode(CUSTOMER_DELETIONS.schema, {"deletion_id": f"d-{customer_id}", "customer_id": customer_id,
                                                   "merged_ids": [], "requested_at_ms": 1})


def message(topic: str, offset: int, value: bytes | None, key: bytes = b"k") -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic, 0, offset, 0, 0, key, value, None, len(key), len(value or b""), [])


def kernel_with(*inputs: Consumes, registry: CollectorRegistry | None = None) -> tuple[StreamKernel, FakeProducer]:
    metrics = ServiceMetrics("kerneltest", registry or CollectorRegistry())
    kernel = StreamKernel("kerneltest", CoreSettings(), inputs, metrics, Readiness(), max_attempts=2,
                          retry_backoff_s=0.001)
    producer = FakeProducer()
    kernel.producer = producer  # type: ignore[assignment]
    return kernel, producer


def batch_of(topic: str, *values: bytes | None) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
    return {TopicPartition(topic, 0): [message(topic, i, v) for i, v in enumerate(values)]}


def dead_letters(producer: FakeProducer) -> list[dict[str, Any]]:
    return [avro.decode(DEADLETTER.schema, value) for _, value in producer.on(DEADLETTER.name) if value]


async def test_records_are_decoded_once_and_the_undecodable_are_dead_lettered() -> None:
    handed: list[Record] = []

    async def handle(records: list[Record], outbox: Outbox) -> None:
        handed.extend(records)

    kernel, producer = kernel_with(Consumes((CUSTOMER_DELETIONS,), handle))
    await kernel.handle_batch(batch_of(CUSTOMER_DELETIONS.name, deletion("c_1"), b"not avro", None, deletion("c_2")))
    assert [r.value["customer_id"] for r in handed if r.value] == ["c_1", "c_2"]  # the tombstone passed over
    [letter] = dead_letters(producer)
    assert letter["source"] == CUSTOMER_DELETIONS.name and letter["stage"] == "kerneltest"
    assert letter["reason"].startswith("undecodable") and letter["original"] == b"not avro"


async def test_tombstones_reach_a_handler_that_asks_for_them() -> None:
    handed: list[Record] = []

    async def handle(records: list[Record], outbox: Outbox) -> None:
        handed.extend(records)

    kernel, _ = kernel_with(Consumes((SCORES,), handle, tombstones=True))
    await kernel.handle_batch(batch_of(SCORES.name, None))
    assert [(r.value, r.raw) for r in handed] == [(None, None)]


async def test_a_poison_record_is_isolated_and_dead_lettered_and_the_rest_handled_once() -> None:
    handled: Counter[str] = Counter()

    async def handle(records: list[Record], outbox: Outbox) -> None:
        ids = [r.value["customer_id"] for r in records if r.value]
        await outbox.send(SCORES, "out", b"x")  # sent only if this attempt succeeds
        if "c_bad" in ids:
            raise OverflowError("year 10000 is out of range")
        handled.update(ids)

    registry = CollectorRegistry()
    kernel, producer = kernel_with(Consumes((CUSTOMER_DELETIONS,), handle), registry=registry)
    await kernel.handle_batch(batch_of(CUSTOMER_DELETIONS.name, deletion("c_1"), deletion("c_bad"), deletion("c_2")))
    assert handled == Counter({"c_1": 1, "c_2": 1})
    [letter] = dead_letters(producer)
    assert letter["reason"] == "handler failed: OverflowError: year 10000 is out of range"
    assert avro.decode(CUSTOMER_DELETIONS.schema, letter["original"])["customer_id"] == "c_bad"
    assert len(producer.on(SCORES.name)) == 2  # the two successful single-record attempts, nothing from failures
    assert kernel.readiness.ok
    assert registry.get_sample_value("touchstream_kerneltest_stage_failures_total",
                                     {"topic": CUSTOMER_DELETIONS.name, "error": "OverflowError"}) == 3


async def test_a_dependency_failing_every_record_is_waited_out_visibly_not_dead_lettered() -> None:
    calls = 0
    seen_unready: list[str] = []

    async def handle(records: list[Record], outbox: Outbox) -> None:
        nonlocal calls
        calls += 1
        if calls <= 6:
            if not kernel.readiness.ok:
                seen_unready.append(kernel.readiness.reason())
            raise ResponseError("OOM command not allowed when used memory > 'maxmemory'")

    kernel, producer = kernel_with(Consumes((CUSTOMER_DELETIONS,), handle))
    await kernel.handle_batch(batch_of(CUSTOMER_DELETIONS.name, deletion("c_1"), deletion("c_2")))
    assert dead_letters(producer) == []
    assert seen_unready and "Redis refuses every record" in seen_unready[0] and "OOM" in seen_unready[0]
    assert kernel.readiness.ok  # passed in the end


async def test_a_stage_that_must_not_produce_counts_its_failures_instead() -> None:
    async def handle(records: list[Record], outbox: Outbox) -> None:
        raise ValueError("cannot")

    registry = CollectorRegistry()
    kernel, producer = kernel_with(Consumes((CUSTOMER_DELETIONS,), handle, dead_letters=False), registry=registry)
    await kernel.handle_batch(batch_of(CUSTOMER_DELETIONS.name, deletion("c_1"), b"garbage"))
    assert producer.sent == []
    assert registry.get_sample_value("touchstream_kerneltest_events_failed_total",
                                     {"reason": "customers.deletions handler failed"}) == 1
    assert registry.get_sample_value("touchstream_kerneltest_events_failed_total",
                                     {"reason": "customers.deletions undecodable"}) == 1


async def test_a_broker_that_does_not_acknowledge_gets_the_records_again() -> None:
    async def handle(records: list[Record], outbox: Outbox) -> None:
        await outbox.send(SCORES, "c_1", b"score")

    kernel, producer = kernel_with(Consumes((CUSTOMER_DELETIONS,), handle))
    producer.fail_next = 2
    await kernel.handle_batch(batch_of(CUSTOMER_DELETIONS.name, deletion("c_1")))
    assert producer.on(SCORES.name) == [(b"c_1", b"score")]
    assert kernel.readiness.ok


def test_readiness_names_what_it_waits_for() -> None:
    readiness = Readiness("partitions_assigned", "script_loaded")
    assert not readiness.ok and readiness.reason() == "waiting for: partitions_assigned, script_loaded"
    readiness.done("partitions_assigned")
    readiness.done("script_loaded")
    assert readiness.ok and readiness.reason() == "ready"


@pytest.mark.parametrize("error", [ConnectionError, ResponseError])
def test_only_connection_type_redis_errors_are_transient(error: type[Exception]) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from touchstream.streams import transient_redis_error

    assert transient_redis_error(RedisConnectionError("x"))
    assert not transient_redis_error(ResponseError("WRONGTYPE Operation against a key holding the wrong kind"))
    assert transient_redis_error(error("x")) is (error is ConnectionError)


class FakeConsumer:
    """Hands out, on each `getmany`, the records that `arrive` put there since the last call."""

    def __init__(self) -> None:
        self.arrived: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {}
        self.calls: list[int] = []

    def arrive(self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        for tp, messages in batch.items():
            self.arrived.setdefault(tp, []).extend(messages)

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Any]]:
        self.calls.append(max_records or 0)
        arrived, self.arrived = self.arrived, {}
        return arrived


def lingering_kernel(**settings: Any) -> tuple[StreamKernel, FakeConsumer]:
    metrics = ServiceMetrics("kerneltest", CollectorRegistry())
    kernel = StreamKernel("kerneltest", CoreSettings(**settings), (), metrics, Readiness())
    consumer = FakeConsumer()
    kernel.consumer = consumer  # type: ignore[assignment]
    return kernel, consumer


async def test_a_small_batch_takes_in_the_records_that_arrive_while_it_lingers() -> None:
    kernel, consumer = lingering_kernel(batch_size=10, linger_below=4, batch_within_s=0.05)
    tp = TopicPartition(SCORES.name, 0)
    first = {tp: [message(SCORES.name, 0, b"a")]}

    async def later_arrivals() -> None:
        await asyncio.sleep(0.01)
        consumer.arrive({tp: [message(SCORES.name, 1, b"b"), message(SCORES.name, 2, b"c")]})

    arrivals = asyncio.create_task(later_arrivals())
    batch = await kernel._lingered(first)
    await arrivals
    assert [m.offset for m in batch[tp]] == [0, 1, 2]
    assert consumer.calls == [9]  # asked only for the room left in the batch


async def test_a_batch_of_linger_below_or_more_is_handled_without_waiting() -> None:
    kernel, consumer = lingering_kernel(batch_size=10, linger_below=2, batch_within_s=5.0)
    tp = TopicPartition(SCORES.name, 0)
    batch = await asyncio.wait_for(kernel._lingered({tp: [message(SCORES.name, i, b"x") for i in range(2)]}), 1.0)
    assert len(batch[tp]) == 2 and consumer.calls == []
    off, consumer = lingering_kernel(batch_size=10, linger_below=0, batch_within_s=5.0)
    batch = await asyncio.wait_for(off._lingered({tp: [message(SCORES.name, 0, b"x")]}), 1.0)
    assert len(batch[tp]) == 1 and consumer.calls == []


class CommittingConsumer:
    """Takes commits, refusing them while `refuse` is set (a rebalance took the partitions away)."""

    def __init__(self) -> None:
        self.commits: list[dict[TopicPartition, int]] = []
        self.refuse = False

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.refuse:
            from aiokafka.errors import CommitFailedError

            raise CommitFailedError("rebalanced")
        self.commits.append(dict(offsets))


async def test_after_commit_steps_see_each_commit_the_broker_took_and_none_it_refused() -> None:
    async def handle(records: list[Record], outbox: Outbox) -> None:
        pass

    kernel, _ = kernel_with(Consumes((CUSTOMER_DELETIONS,), handle))
    consumer = CommittingConsumer()
    kernel.consumer = consumer  # type: ignore[assignment]
    seen: list[dict[TopicPartition, int]] = []

    async def forget(offsets: Any) -> None:
        seen.append(dict(offsets))

    async def failing(offsets: Any) -> None:
        raise ConnectionError("Redis went away")

    kernel.after_commit.extend([failing, forget])  # a failing step is logged; the next still runs
    tp = TopicPartition(CUSTOMER_DELETIONS.name, 0)
    await kernel.handle_batch(batch_of(CUSTOMER_DELETIONS.name, deletion("c_1"), deletion("c_2")))
    consumer.refuse = True
    await kernel.handle_batch({tp: [message(CUSTOMER_DELETIONS.name, 2, deletion("c_3"))]})
    assert consumer.commits == [{tp: 2}]
    assert seen == [{tp: 2}]  # the refused commit's records come again: what was kept for them stays
