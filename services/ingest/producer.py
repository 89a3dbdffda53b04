"""Ingest's producer to `touchpoints.raw`: the record key, the partitioner, one record batch per partition
per request, and the idempotent, `acks=all` producer itself."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from touchstream.identifiers import KEY_PRIORITY, raw_topic_key
from touchstream.settings import CoreSettings
from touchstream.topics import TOUCHPOINTS_RAW


def record_key(record: dict[str, Any], hash_key: bytes) -> bytes:
    """Return the raw topic's key: the keyed hash of the most stable identifier, else of the messageId.

    The rule is `touchstream.identifiers.partition_key`'s, read straight off the record's
    dicts (building Identifier objects per event showed up in profiles).
    """
    by_type = {i["type"]: i["value"] for i in record["identifiers"]}
    text = next((f"{kind}:{by_type[kind]}" for kind in KEY_PRIORITY if kind in by_type), record["message_id"])
    return raw_topic_key(text, hash_key)


class CachedPartitioner:
    """Kafka's default partitioner (murmur2 of the key), remembering recent keys.

    aiokafka's murmur2 is pure Python (~20 µs a key, the largest single cost per event in
    profiles); customers send many events, so most keys repeat.
    """

    def __init__(self, size: int = 100_000) -> None:
        self._size = size
        self._hashes: dict[bytes, int] = {}

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return random.choice(available or all_partitions)
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= self._size:
                self._hashes.clear()
            hashed = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return all_partitions[hashed % len(all_partitions)]


class TouchpointProducer:
    """Produces a request's encoded events to `touchpoints.raw` and waits for the broker's acks."""

    def __init__(self, core: CoreSettings) -> None:
        self.partitioner = CachedPartitioner()
        self.producer = AIOKafkaProducer(
            bootstrap_servers=core.kafka_bootstrap,
            acks="all",
            enable_idempotence=core.idempotent_producer,
            linger_ms=2,
            # Room for a whole request's records per partition in one batch (the default is 16 KB).
            max_batch_size=256 * 1024,
            partitioner=self.partitioner,
        )

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    async def fetch_metadata(self) -> Any:
        """Ask the broker for the cluster's metadata (a round trip, not the producer's cached view)."""
        return await self.producer.client.fetch_all_metadata()

    async def produce(self, encoded: list[tuple[str, bytes, bytes]]) -> None:
        """Send (messageId, key, value) records; return once the broker acknowledged every one."""
        # One record batch per partition and request instead of one send() per record: a
        # request's events leave together anyway, and send() costs more than the encoding.
        if not encoded:
            return
        topic = TOUCHPOINTS_RAW.name
        partitions = sorted(await self.producer.partitions_for(topic))
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        for _, key, value in encoded:
            by_partition.setdefault(self.partitioner(key, partitions, partitions), []).append((key, value))
        futures = []
        for partition, records in by_partition.items():
            batch = self.producer.create_batch()
            for key, value in records:
                if batch.append(key=key, value=value, timestamp=None) is None:  # batch full: send it
                    batch.close()
                    futures.append(await self.producer.send_batch(batch, topic, partition=partition))
                    batch = self.producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            batch.close()
            futures.append(await self.producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*futures)
