"""Reading a topic of the session broker from the start, as the integration tests check what a worker wrote."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from touchstream import avro


async def collect(bootstrap: str, topic: str, schema: str, wanted: int,
                  match: Callable[[bytes | None, dict[str, Any]], bool], wait_s: float = 60.0, partitions: int = 2,
                  stop_at_end: bool = False) -> list[tuple[bytes | None, dict[str, Any]]]:
    """Read `topic` from the start until `wanted` records satisfy `match(key, record)` or `wait_s` passes;
    with `stop_at_end`, also once it has read everything the topic held when the call began (to count what an
    acknowledged produce wrote, rather than wait `wait_s` for a record that never comes).

    Records that are not `schema` (tombstones, the garbage other tests put on the shared broker on
    purpose) are passed over.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    assigned = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(assigned)
    found: list[tuple[bytes | None, dict[str, Any]]] = []
    try:
        ends = await consumer.end_offsets(assigned) if stop_at_end else {}

        async def at_end() -> bool:
            return bool(ends) and all([await consumer.position(tp) >= end for tp, end in ends.items()])

        deadline = time.monotonic() + wait_s
        while len(found) < wanted and time.monotonic() < deadline and not await at_end():
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for message in records:
                    if message.value is None:
                        continue
                    try:
                        record = avro.decode(schema, message.value)
                    except avro.DecodeError:
                        continue
                    if match(message.key, record):
                        found.append((message.key, record))
    finally:
        await consumer.stop()
    return found
