"""The embedded runtime: broker and Redis answer, topics are created with their partitions."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient

from touchstream.topics import ALL_TOPICS

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
