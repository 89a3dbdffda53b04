"""Reading a topic of the session broker from the start, as the integration tests check what a worker wrote."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from touchstream import avro


async def collect(bootstrap: str, topic: str, schema: str, wanted: int,
                  match: Callable[[bytes | None, dict[str, Any]], bool], wait_s: float = 60.0, partitions: int = 2
                  ) -> list[tuple[bytes | None, dict[str, Any]]]:
    """Read `topic` from the start until `wanted` records satisfy `match(key, record)` or `wait_s` passes.

    Records that are not `schema` (tombstones, the garbage other tests put on the shared broker on
    purpose) are passed over.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    found: list[tuple[bytes | None, dict[str, Any]]] = []
    try:
        deadline = time.monotonic() + wait_s
        while len(found) < wanted and time.monotonic() < deadline:
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
