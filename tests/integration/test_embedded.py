"""The embedded runtime: broker and Redis answer, topics are created with their partitions and configs."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from touchstream.embedded import raw_retention_hours_from_env, topic_configs
from touchstream.topics import ALL_TOPICS, SCORES

pytestmark = pytest.mark.integration


async def test_redis_answers(redis_client: aioredis.Redis) -> None:
    await redis_client.set("k", "v")
    assert await redis_client.get("k") == b"v"


async def test_topics_created_with_partitions(all_topics: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=all_topics)
    await admin.start()
    try:
        described = {t["topic"]: t for t in await admin.describe_topics([s.name for s in ALL_TOPICS])}
    finally:
        await admin.close()
    assert set(described) == {s.name for s in ALL_TOPICS}
    assert all(len(t["partitions"]) == 2 for t in described.values())


async def test_topics_carry_their_configs_and_scores_takes_tombstones(all_topics: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=all_topics)
    await admin.start()
    try:
        [response] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, s.name) for s in ALL_TOPICS])
    finally:
        await admin.close()
    found = {name: {entry[0]: entry[1] for entry in entries} for _, _, _, name, entries in response.resources}
    for spec in ALL_TOPICS:
        expected = topic_configs(spec, raw_retention_hours_from_env())
        assert {k: found[spec.name].get(k) for k in expected} == expected, spec.name
    assert found[SCORES.name]["cleanup.policy"] == "compact"

    # An erasure's tombstone: a null value, read back as None.
    key = b"c_tombstone-test"
    producer = AIOKafkaProducer(bootstrap_servers=all_topics, acks="all")
    await producer.start()
    try:
        meta = await producer.send_and_wait("scores", key=key, value=None)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=all_topics, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition("scores", meta.partition)
        consumer.assign([tp])
        consumer.seek(tp, meta.offset)
        record = await consumer.getone()
    finally:
        await consumer.stop()
    assert record.key == key and record.value is None
