"""The console read model forgets an erased customer (customers.deletions) on a real Valkey."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from services.console.readmodel import ActionTaken, CustomerDeleted, CustomersMerged, ScoreUpdated, TouchpointSeen
from services.console.store import ReadModelStore
from touchstream.privacy import DELETED_RULE_ID

pytestmark = pytest.mark.integration


def touch(cid: str, n: int) -> TouchpointSeen:
    return TouchpointSeen(cid, f"m-{cid}-{n}", n * 1000, "track", "Order Completed", "web", "test", 5.0, "EUR",
                          None, None, {}, ("email",))


def score(cid: str, n: int) -> ScoreUpdated:
    return ScoreUpdated(cid, f"m-{cid}-{n}", n * 1000, 0.7, 0.3, "loyal", "active", "v1", (), {})


def action(cid: str, rule: str, n: int) -> ActionTaken:
    return ActionTaken(f"a-{rule}-{cid}-{n}", rule, cid, "fired", None, "marketing", n * 1000, n * 1000 + 5)


async def dump(client: aioredis.Redis) -> str:
    parts = []
    async for key in client.scan_iter():
        kind = (await client.type(key)).decode()
        value = {"string": client.get, "hash": client.hgetall, "set": client.smembers,
                 "list": lambda k: client.lrange(k, 0, -1),
                 "zset": lambda k: client.zrange(k, 0, -1, withscores=True)}[kind](key)
        parts.append(f"{key!r} {await value!r}")
    return "\n".join(parts)


async def test_a_deletion_forgets_every_id_and_drops_what_arrives_after(redis_client: aioredis.Redis) -> None:
    store = ReadModelStore(redis_client)
    await store.apply([touch("c_old", 1), score("c_old", 1), touch("c_ann", 2), score("c_ann", 2),
                       action("c_ann", "r1", 2), touch("c_bob", 3), score("c_bob", 3), action("c_bob", "r1", 3)])
    await store.apply([CustomersMerged("m1", "c_ann", "c_old", "merge", "shared_identifier", 4000)])
    await store.apply([CustomerDeleted("del_1", ("c_ann", "c_old"))])
    # In flight when the erasure landed (scored before, consumed after), and the deletion notice itself.
    await store.apply([touch("c_ann", 5), score("c_old", 5), action("c_ann", DELETED_RULE_ID, 6),
                       touch("c_bob", 6)])

    text = await dump(redis_client)
    assert "c_ann" not in text and "c_old" not in text and DELETED_RULE_ID not in text
    assert not (await store.customer("c_ann")).known
    bob = await store.customer("c_bob")
    assert len(bob.timeline) == 2 and bob.actions and await store.customer_count() == 1
    assert await store.segments() == {("loyal", "active"): 1}
    await store.apply([CustomerDeleted("del_1", ("c_ann", "c_old"))])  # replayed: nothing changes
    assert (await store.customer("c_bob")).known


async def test_a_restarted_worker_reading_the_topics_again_does_not_write_an_erased_customer_back(
        redis_client: aioredis.Redis) -> None:
    history = [touch("c_old", 1), score("c_old", 1), touch("c_ann", 2), score("c_ann", 2), action("c_ann", "r1", 2),
               CustomersMerged("m1", "c_ann", "c_old", "merge", "shared_identifier", 4000), touch("c_bob", 3)]
    await ReadModelStore(redis_client).apply(history)
    await ReadModelStore(redis_client).apply([CustomerDeleted("del_1", ("c_ann", "c_old"))])

    restarted = ReadModelStore(redis_client)  # a new process, its consumer group reset to the start
    await restarted.apply(history)
    text = await dump(redis_client)
    assert "c_ann" not in text and "c_old" not in text
    assert not (await restarted.customer("c_ann")).known and (await restarted.customer("c_bob")).known
