"""Merge protection in the graph's Lua scripts against a real Valkey: type limits, shared identifiers,
strong ids, operator splits, probabilistic merges and renaming after the earliest event."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from services.identity.domain import GraphLayout, GraphRefused, GraphRules, new_customer_id
from services.identity.graph import IdentityGraph
from tests.identity_graphs import loaded_graph, request
from touchstream.identifiers import STRONG_TYPES, Identifier

pytestmark = pytest.mark.integration

LAYOUT = GraphLayout("test:protect:{graph}:")
RULES = GraphRules(STRONG_TYPES, {"user_id": 1, "wechat_unionid": 1, "phone": 2}, 5, 3)
TABLET = Identifier("device_id", "tablet")


def email(n: int) -> Identifier:
    return Identifier("email", f"e{n:03d}")


def user(n: int) -> Identifier:
    return Identifier("user_id", f"u{n:03d}")


@pytest.fixture
async def graph(redis_client: aioredis.Redis) -> IdentityGraph:
    return await loaded_graph(redis_client, LAYOUT, RULES)


async def owner(client: aioredis.Redis, identifier: Identifier) -> str | None:
    value = await client.hget(LAYOUT.identifier_key(f"{identifier.type}:{identifier.value}"), "owner")
    return value.decode() if value is not None else None


async def members(client: aioredis.Redis, customer_id: str) -> set[str]:
    return {m.decode() for m in await client.smembers(LAYOUT.members_key(customer_id))}


async def test_an_identifier_beyond_its_type_limit_is_left_off_and_reported(
    graph: IdentityGraph, redis_client: aioredis.Redis
) -> None:
    [first] = await graph.resolve([request("m0", 1000, *(email(n) for n in range(5)))])

    [sixth] = await graph.resolve([request("m1", 2000, email(0), email(5))])

    assert sixth.customer_id == first.customer_id
    assert [(r.customer_id, r.reason, r.identifiers) for r in sixth.refused] == [("", "type_limit", (email(5),))]
    assert await owner(redis_client, email(5)) is None
    assert len(await members(redis_client, first.customer_id)) == 5


async def test_limits_are_per_type_and_configurable(graph: IdentityGraph, redis_client: aioredis.Redis) -> None:
    phones = [Identifier("phone", f"p{n}") for n in range(3)]

    [answer] = await graph.resolve([request("m0", 1000, email(0), *phones)])

    # phone is limited to 2 in RULES; the third one stays out, the e-mail (limit 5) goes in.
    assert [r.reason for r in answer.refused] == ["type_limit"]
    assert await members(redis_client, answer.customer_id) == {"email:e000", "phone:p0", "phone:p1"}


async def test_a_merge_that_would_exceed_a_limit_is_refused(graph: IdentityGraph, redis_client: aioredis.Redis) -> None:
    [ann] = await graph.resolve([request("m0", 1000, email(0), email(1), email(2))])
    [bob] = await graph.resolve([request("m1", 2000, email(3), email(4), email(5))])

    [link] = await graph.resolve([request("m2", 3000, email(2), email(3))])

    assert link.customer_id == ann.customer_id and not link.merges
    assert [(r.customer_id, r.reason) for r in link.refused] == [(bob.customer_id, "type_limit")]
    assert await owner(redis_client, email(3)) == bob.customer_id


async def test_a_device_seen_with_more_than_n_customers_stops_matching(
    graph: IdentityGraph, redis_client: aioredis.Redis
) -> None:
    first = (await graph.resolve([request("m1", 1000, user(1), TABLET)]))[0].customer_id
    # Three more signed-in customers on the store's tablet: each merge is refused (strong ids differ).
    for n in (2, 3, 4):
        [answer] = await graph.resolve([request(f"m{n}", 1000 + n, user(n), TABLET)])
        assert [(r.customer_id, r.reason) for r in answer.refused] == [(first, "conflicting_strong_id")]
    assert await redis_client.hget(LAYOUT.identifier_key("device_id:tablet"), "shared") == b"1"

    # An anonymous shopper typing an e-mail on it is no longer glued to the tablet's first customer.
    [walk_in] = await graph.resolve([request("m9", 9000, TABLET, email(9))])

    assert walk_in.created and walk_in.customer_id != first
    assert [(r.customer_id, r.reason) for r in walk_in.refused] == [(first, "shared_identifier")]
    assert await owner(redis_client, email(9)) == walk_in.customer_id
    assert "email:e009" not in await members(redis_client, first)


async def test_a_device_below_the_threshold_keeps_matching(graph: IdentityGraph, redis_client: aioredis.Redis) -> None:
    first = (await graph.resolve([request("m1", 1000, user(1), TABLET)]))[0].customer_id
    for n in (2, 3):
        await graph.resolve([request(f"m{n}", 1000 + n, user(n), TABLET)])

    [walk_in] = await graph.resolve([request("m9", 9000, TABLET, email(9))])

    assert walk_in.customer_id == first and not walk_in.refused
    assert await redis_client.hget(LAYOUT.identifier_key("device_id:tablet"), "shared") is None


async def test_merged_customer_ids_count_once_towards_the_shared_threshold(
    graph: IdentityGraph, redis_client: aioredis.Redis
) -> None:
    union = [Identifier("wechat_unionid", f"w{n}") for n in range(3)]
    await graph.resolve([request("a", 1000, user(1), union[1], email(1)), request("x", 1100, user(2), email(2)),
                         request("y", 1200, union[2], email(3)), request("z", 1300, user(3), email(4))])
    # e001 is refused against x (user ids differ) and y (union ids differ): seen with 3 customers.
    await graph.resolve([request("ax", 2000, email(1), email(2)), request("ay", 2100, email(1), email(3))])
    # x and y are one person after all (no strong id in common to conflict)...
    [xy] = await graph.resolve([request("xy", 2200, email(2), email(3))])
    assert len(xy.merges) == 1
    # ...so a fourth refusal makes 4 customer ids but 3 live customers: still not shared.
    [az] = await graph.resolve([request("az", 2300, email(1), email(4))])

    assert [r.reason for r in az.refused] == ["conflicting_strong_id"]
    assert await redis_client.scard(LAYOUT.identifier_key("email:e001") + ":customers") == 3
    assert await redis_client.hget(LAYOUT.identifier_key("email:e001"), "shared") is None


async def test_an_operator_split_is_not_merged_back(graph: IdentityGraph, redis_client: aioredis.Redis) -> None:
    [ann] = await graph.resolve([request("m1", 1000, email(1), TABLET, email(2))])

    split = await graph.unmerge("op-1", 5000, ann.customer_id, [email(2)], "operator")
    [again] = await graph.resolve([request("m2", 6000, email(1), email(2))])

    [record] = split.merges
    assert (record.kind, record.survivor_id, record.reason) == ("unmerge", ann.customer_id, "operator")
    assert record.merged_id == new_customer_id([email(2)])
    assert await owner(redis_client, email(2)) == record.merged_id
    assert await members(redis_client, ann.customer_id) == {"email:e001", "device_id:tablet"}
    # Both started at 1000, so the survivor is the smaller id; either way the other one is refused.
    [refusal] = again.refused
    assert not again.merges and refusal.reason == "operator_split"
    assert {again.customer_id, refusal.customer_id} == {ann.customer_id, record.merged_id}
    # The new customer's first seen comes from its identifiers' own, not from the split.
    assert await redis_client.hget(LAYOUT.customer_key(record.merged_id), "first_seen_ms") == b"1000"


async def test_an_unmerge_replays_and_refuses_what_it_cannot_do(graph: IdentityGraph) -> None:
    [ann] = await graph.resolve([request("m1", 1000, email(1), email(2))])

    first = await graph.unmerge("op-1", 5000, ann.customer_id, [email(2)], "operator")
    again = await graph.unmerge("op-1", 5000, ann.customer_id, [email(2)], "operator")

    assert again.replayed and again.merges == first.merges
    with pytest.raises(GraphRefused, match="not_a_member"):
        await graph.unmerge("op-2", 5000, ann.customer_id, [email(7)], "operator")
    with pytest.raises(GraphRefused, match="must_leave_identifiers"):
        await graph.unmerge("op-3", 5000, ann.customer_id, [email(1)], "operator")
    with pytest.raises(GraphRefused, match="unknown_customer"):
        await graph.unmerge("op-4", 5000, "c_nobody", [email(1)], "operator")


async def test_a_probabilistic_merge_keeps_the_older_customer_and_its_score(
    graph: IdentityGraph, redis_client: aioredis.Redis
) -> None:
    [old] = await graph.resolve([request("m1", 1000, email(1))])
    [new] = await graph.resolve([request("m2", 2000, email(2))])

    merged = await graph.merge_customers("m2:match", 2000, (new.customer_id, old.customer_id), "probabilistic", 17.5)

    [merge] = merged.merges
    assert (merge.survivor_id, merge.merged_id, merge.reason, merge.score) == (
        old.customer_id, new.customer_id, "probabilistic", 17.5)
    assert await owner(redis_client, email(2)) == old.customer_id


async def test_a_probabilistic_merge_respects_strong_ids(graph: IdentityGraph) -> None:
    [ann] = await graph.resolve([request("m1", 1000, user(1))])
    [bob] = await graph.resolve([request("m2", 2000, user(2))])

    refused = await graph.merge_customers("m2:match", 2000, (bob.customer_id, ann.customer_id), "probabilistic", 30.0)

    assert not refused.merges
    assert [(r.customer_id, r.reason) for r in refused.refused] == [(ann.customer_id, "conflicting_strong_id")]


async def test_a_late_event_older_than_the_customer_renames_it_as_in_event_time_order(
    graph: IdentityGraph, redis_client: aioredis.Redis
) -> None:
    late = request("late", 1000, email(0), email(1))
    [live] = await graph.resolve([request("m1", 5000, email(1))])

    [renamed] = await graph.resolve([late])

    assert renamed.customer_id == late.new_customer_id != live.customer_id
    [rename] = renamed.merges
    assert (rename.merged_id, rename.reason) == (live.customer_id, "earlier_event")
    assert await owner(redis_client, email(1)) == late.new_customer_id
    assert await redis_client.hget(LAYOUT.customer_key(late.new_customer_id), "first_seen_ms") == b"1000"
