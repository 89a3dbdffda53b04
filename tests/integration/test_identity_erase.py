"""Erasure in the identity graph against a real Valkey: suppress, delete, sweep, and drop later events."""

from __future__ import annotations

import dataclasses

import pytest
import redis.asyncio as aioredis

from services.identity.domain import GraphLayout, GraphRules, ResolutionRequest, answer_slot
from services.identity.graph import IdentityGraph
from tests.identity_graphs import loaded_graph, request
from touchstream.identifiers import STRONG_TYPES, Identifier
from touchstream.privacy import SuppressionList, suppression_token

pytestmark = pytest.mark.integration

LAYOUT = GraphLayout("test:identity:{graph}:")
RULES = GraphRules(STRONG_TYPES, {"user_id": 1, "wechat_unionid": 1}, 5, 3)
EMAIL = Identifier("email", "aa11")
PHONE = Identifier("phone", "cc33")
USER = Identifier("user_id", "ee55")
OTHER = Identifier("email", "ff66")
TABLET = Identifier("device_id", "dd44")


def read_from(offset: int, event: ResolutionRequest) -> ResolutionRequest:
    return dataclasses.replace(event, answer_slot=answer_slot("raw", 0, offset))


@pytest.fixture
async def graph(redis_client: aioredis.Redis) -> IdentityGraph:
    return await loaded_graph(redis_client, LAYOUT, RULES)


async def dump(client: aioredis.Redis) -> str:
    parts = []
    async for key in client.scan_iter():
        kind = (await client.type(key)).decode()
        value = {"string": client.get, "hash": client.hgetall, "set": client.smembers,
                 "list": lambda k: client.lrange(k, 0, -1), "zset": lambda k: client.zrange(k, 0, -1)}[kind](key)
        parts.append(f"{key!r} {await value!r}")
    return "\n".join(parts)


async def test_erasure_suppresses_deletes_and_sweeps(graph: IdentityGraph, redis_client: aioredis.Redis) -> None:
    [first] = await graph.resolve([request("m1", 1000, EMAIL)])
    # m2-m4 were read from a partition and not committed yet: their answers are fields of its hash.
    [second] = await graph.resolve([read_from(1, request("m2", 2000, PHONE))])
    [linked] = await graph.resolve([read_from(2, request("m3", 3000, USER, EMAIL, PHONE))])
    [other] = await graph.resolve([read_from(3, request("m4", 4000, OTHER, TABLET))])
    await graph.resolve([request("m5", 5000, EMAIL)])
    assert [m.merged_id for m in linked.merges] == [second.customer_id]
    ann = first.customer_id

    plan = await graph.erase("erase:d1", 6000, second.customer_id, "plan")  # found through the merged id
    assert plan.found and plan.customer_id == ann and plan.merged_ids == (second.customer_id,)
    assert set(plan.identifiers) == {EMAIL, PHONE, USER} and plan.suppressed == 3
    assert await redis_client.hget(LAYOUT.customer_key(ann), "status") == b"active"  # plan deletes nothing

    erased = await graph.erase("erase:d1", 6000, ann, "erase")
    assert erased.customer_ids == plan.customer_ids
    swept = await graph.sweep(list(erased.customer_ids), list(erased.identifiers))
    assert swept >= 4  # the answers of m1, m2, m3, m5 name the customer

    text = await dump(redis_client)
    for needle in (ann, second.customer_id, EMAIL.value, PHONE.value, USER.value):
        assert needle not in text, needle
    tokens = {m.decode() for m in await redis_client.smembers(f"{LAYOUT.prefix}suppressed")}
    assert tokens == {suppression_token(i) for i in (EMAIL, PHONE, USER)}  # Lua's sha1hex == Python's
    assert OTHER.value in text and other.customer_id in text  # the other customer is intact
    assert await redis_client.hkeys(f"{LAYOUT.prefix}answers:raw:0") == [b"3"]  # and its answer

    # Later events carrying any erased identifier are dropped and remembered nowhere.
    [again] = await graph.resolve([request("m6", 7000, Identifier("device_id", "new"), PHONE)])
    assert again.suppressed and again.customer_id == ""
    assert await redis_client.exists(LAYOUT.event_key("m6")) == 0
    [fresh] = await graph.resolve([request("m7", 7000, Identifier("email", "zz99"))])
    assert not fresh.suppressed and fresh.created

    # Idempotent: a second erasure finds nothing.
    assert not (await graph.erase("erase:d2", 8000, ann, "erase")).found
    assert not (await graph.erase("erase:d2", 8000, "c_never", "plan")).found


async def test_ingest_sees_the_list_identity_writes(graph: IdentityGraph, redis_client: aioredis.Redis) -> None:
    suppression = SuppressionList(redis_client, f"{LAYOUT.prefix}suppressed", refresh_s=0)
    await suppression.refresh()
    assert not suppression.active
    [first] = await graph.resolve([request("m1", 1000, EMAIL, PHONE)])
    await graph.erase("erase:d1", 2000, first.customer_id, "erase")
    await suppression.refresh()
    assert suppression.active
    email, phone, other = suppression_token(EMAIL), suppression_token(PHONE), suppression_token(OTHER)
    assert await suppression.suppressed([[other], [other, phone], []]) == [False, True, False]
    remote = SuppressionList(redis_client, f"{LAYOUT.prefix}suppressed", refresh_s=0, max_cached=1)
    await remote.refresh()
    assert await remote.suppressed([[email], [other], []]) == [True, False, False]
