"""The identity graph's Lua script against a real Valkey: create, attach, merge into the oldest, replay."""

from __future__ import annotations

import dataclasses

import pytest
import redis.asyncio as aioredis

from services.identity.domain import GraphLayout, GraphRules, ResolutionRequest, answer_slot, new_customer_id
from services.identity.graph import IdentityGraph, run_commands
from tests.identity_graphs import loaded_graph, request
from touchstream.identifiers import STRONG_TYPES, Identifier

pytestmark = pytest.mark.integration

LAYOUT = GraphLayout("test:identity:{graph}:")
RULES = GraphRules(STRONG_TYPES, {"user_id": 1, "wechat_unionid": 1}, 5, 3)
EMAIL_A = Identifier("email", "aa11")
EMAIL_B = Identifier("email", "bb22")
PHONE_A = Identifier("phone", "cc33")
DEVICE = Identifier("device_id", "dd44")


@pytest.fixture
async def graph(redis_client: aioredis.Redis) -> IdentityGraph:
    return await loaded_graph(redis_client, LAYOUT, RULES)


async def owner(redis_client: aioredis.Redis, identifier: Identifier) -> str | None:
    value = await redis_client.hget(LAYOUT.identifier_key(f"{identifier.type}:{identifier.value}"), "owner")
    return value.decode() if value is not None else None


async def test_unknown_identifiers_create_a_customer_with_the_derived_id(
    graph: IdentityGraph, redis_client: aioredis.Redis
) -> None:
    [resolution] = await graph.resolve([request("m1", 1000, EMAIL_A, PHONE_A)])

    assert resolution.created and not resolution.merges
    assert resolution.customer_id == new_customer_id([EMAIL_A, PHONE_A])
    assert await owner(redis_client, PHONE_A) == resolution.customer_id
    assert await redis_client.hget(LAYOUT.customer_key(resolution.customer_id), "first_seen_ms") == b"1000"


async def test_a_known_identifier_attaches_the_new_ones(graph: IdentityGraph, redis_client: aioredis.Redis) -> None:
    [first] = await graph.resolve([request("m1", 1000, EMAIL_A)])
    [second] = await graph.resolve([request("m2", 2000, EMAIL_A, DEVICE)])

    assert second.customer_id == first.customer_id and not second.created
    assert await owner(redis_client, DEVICE) == first.customer_id
    members = await redis_client.smembers(LAYOUT.members_key(first.customer_id))
    assert members == {b"email:aa11", b"device_id:dd44"}
    assert await redis_client.hget(LAYOUT.customer_key(first.customer_id), "last_seen_ms") == b"2000"


async def test_an_event_linking_two_customers_merges_them_into_the_oldest(
    graph: IdentityGraph, redis_client: aioredis.Redis
) -> None:
    # The younger customer is created first in processing order: "oldest" means event time.
    [younger] = await graph.resolve([request("m1", 5000, EMAIL_B)])
    [older] = await graph.resolve([request("m2", 1000, EMAIL_A)])

    [linking] = await graph.resolve([request("m3", 6000, EMAIL_A, EMAIL_B, DEVICE)])

    assert linking.customer_id == older.customer_id
    [merge] = linking.merges
    assert (merge.survivor_id, merge.merged_id) == (older.customer_id, younger.customer_id)
    assert merge.linking_identifiers == (EMAIL_B,)
    assert merge.merge_id.startswith("m_")
    for identifier in (EMAIL_A, EMAIL_B, DEVICE):
        assert await owner(redis_client, identifier) == older.customer_id
    merged = await redis_client.hgetall(LAYOUT.customer_key(younger.customer_id))
    assert merged[b"status"] == b"merged" and merged[b"merged_into"] == older.customer_id.encode()
    assert not await redis_client.exists(LAYOUT.members_key(younger.customer_id))


async def test_an_event_s_answer_is_kept_without_its_defaults_and_replays_whole(
    graph: IdentityGraph, redis_client: aioredis.Redis
) -> None:
    [created] = await graph.resolve([request("n1", 1000, EMAIL_A)])
    [known] = await graph.resolve([request("n2", 2000, EMAIL_A)])

    assert created.created and not known.created
    kept = await redis_client.get(LAYOUT.event_key("n2"))
    # Only the customer: false flags and empty lists are what a replay reads back by default.
    assert kept == b'{"customer_id":"' + known.customer_id.encode() + b'"}'
    [created_again, known_again] = await graph.resolve([request("n1", 1000, EMAIL_A), request("n2", 2000, EMAIL_A)])
    assert created_again.replayed and known_again.replayed
    assert (created_again.customer_id, created_again.created, created_again.merges, created_again.refused) == (
        created.customer_id, True, (), ())
    assert (known_again.customer_id, known_again.created, known_again.merges, known_again.refused) == (
        known.customer_id, False, (), ())


async def test_replaying_an_event_gives_the_same_answer_and_no_new_merge(
    graph: IdentityGraph, redis_client: aioredis.Redis
) -> None:
    await graph.resolve([request("m1", 1000, EMAIL_A), request("m2", 2000, EMAIL_B)])
    linking = request("m3", 3000, EMAIL_A, EMAIL_B)
    [first] = await graph.resolve([linking])
    graph_before = {key: await redis_client.dump(key) for key in await redis_client.keys("*") if b"event:" not in key}

    [again] = await graph.resolve([linking])

    assert again.replayed and not first.replayed
    assert (again.customer_id, again.merges, again.created) == (first.customer_id, first.merges, first.created)
    graph_after = {key: await redis_client.dump(key) for key in await redis_client.keys("*") if b"event:" not in key}
    assert graph_after == graph_before


async def test_a_records_answer_is_kept_per_partition_until_its_offset_is_committed(
    graph: IdentityGraph, redis_client: aioredis.Redis
) -> None:
    def read_from(offset: int, event: ResolutionRequest) -> ResolutionRequest:
        return dataclasses.replace(event, answer_slot=answer_slot("raw", 1, offset))

    await graph.resolve([read_from(10, request("m1", 1000, EMAIL_A)), read_from(11, request("m2", 2000, EMAIL_B))])
    linking = read_from(12, request("m3", 3000, EMAIL_A, EMAIL_B))
    [first] = await graph.resolve([linking])
    answers = LAYOUT.prefix + "answers:raw:1"
    assert sorted(await redis_client.hkeys(answers)) == [b"10", b"11", b"12"]
    assert await redis_client.keys(f"{LAYOUT.prefix}event:*") == []
    graph_before = {key: await redis_client.dump(key) for key in await redis_client.keys("*")}

    # Redelivered before its offset was committed (the worker died after the script): the same answer,
    # merge included, so the merge the first run made is announced again; the graph is left as it was.
    [again] = await graph.resolve([linking])
    assert again.replayed and not first.replayed and first.merges
    assert (again.customer_id, again.merges, again.created) == (first.customer_id, first.merges, first.created)
    assert {key: await redis_client.dump(key) for key in await redis_client.keys("*")} == graph_before
    # Another event at the same offset (a recreated topic) is not answered from the kept one.
    [other] = await graph.resolve([read_from(12, request("m9", 4000, PHONE_A))])
    assert not other.replayed and other.created

    # Offsets below 12 committed: their answers go, the one at 12 stays for a redelivery.
    assert await graph.forget_answers({"raw:1": 12, "raw:0": 5}) == 2
    assert await redis_client.hkeys(answers) == [b"12"]
    assert await graph.forget_answers({"raw:1": 13}) == 1
    assert not await redis_client.exists(answers)
    # Read again after its commit (a duplicate of the record further on): resolved anew, to the same customer,
    # with no merge left to make.
    [anew] = await graph.resolve([linking])
    assert (anew.replayed, anew.customer_id, anew.merges) == (False, first.customer_id, ())


async def test_two_different_user_ids_never_merge(graph: IdentityGraph, redis_client: aioredis.Redis) -> None:
    ann = await graph.resolve([request("m1", 1000, Identifier("user_id", "u1"), EMAIL_A)])
    bob = await graph.resolve([request("m2", 2000, Identifier("user_id", "u2"), EMAIL_B)])

    [shared_tablet] = await graph.resolve([request("m3", 3000, EMAIL_A, EMAIL_B, DEVICE)])

    assert shared_tablet.customer_id == ann[0].customer_id
    assert not shared_tablet.merges
    assert [(r.customer_id, r.reason) for r in shared_tablet.refused] == [(bob[0].customer_id, "conflicting_strong_id")]
    assert await owner(redis_client, EMAIL_B) == bob[0].customer_id


async def test_a_strong_id_conflicting_with_the_only_match_starts_a_new_customer(graph: IdentityGraph) -> None:
    [ann] = await graph.resolve([request("m1", 1000, Identifier("user_id", "u1"), EMAIL_A)])

    [other] = await graph.resolve([request("m2", 2000, Identifier("user_id", "u2"), EMAIL_A)])

    assert other.created and other.customer_id != ann.customer_id
    assert [r.customer_id for r in other.refused] == [ann.customer_id]


async def test_a_batch_is_resolved_in_order_and_reloads_a_flushed_script(
    graph: IdentityGraph, redis_client: aioredis.Redis
) -> None:
    await redis_client.script_flush()

    first, second = await graph.resolve([request("m1", 1000, EMAIL_A), request("m2", 2000, EMAIL_A, PHONE_A)])

    assert first.created and not second.created
    assert second.customer_id == first.customer_id


async def test_events_resolved_in_one_call_answer_as_one_call_each(redis_client: aioredis.Redis) -> None:
    """The matching path resolves a chunk of events in one script call: same answers, same graph."""
    user_1, user_2 = Identifier("user_id", "u1"), Identifier("user_id", "u2")
    events = [request("m1", 1000, EMAIL_A), request("m2", 2000, PHONE_A, DEVICE),
              request("m3", 3000, DEVICE, EMAIL_A), request("m4", 500, EMAIL_B, PHONE_A),
              request("m5", 4000, user_1, EMAIL_B), request("m6", 4500, user_2, EMAIL_A), request("m2", 2000, PHONE_A)]
    one_by_one = await loaded_graph(redis_client, GraphLayout("test:each:{graph}:"), RULES)
    together = await loaded_graph(redis_client, GraphLayout("test:chunk:{graph}:"), RULES)

    each = await one_by_one.resolve(events)
    [answer] = await run_commands(redis_client, [together.resolve_many_command(events)])
    chunked = together.parse_many_answer(answer)

    assert chunked == each
    assert any(r.merges for r in each) and any(r.refused for r in each) and each[-1].replayed
    assert sorted(k.replace(b"chunk", b"each") for k in await redis_client.keys("test:chunk:*")) == sorted(
        await redis_client.keys("test:each:*"))


async def test_merges_made_in_one_call_answer_as_one_call_each(redis_client: aioredis.Redis) -> None:
    people = [request(f"p{n}", 1000 + n, *ids) for n, ids in enumerate(
        [(EMAIL_A,), (EMAIL_B,), (PHONE_A, Identifier("user_id", "u1")), (DEVICE, Identifier("user_id", "u2"))])]
    answers = []
    for name in ("each", "chunk"):
        graph = await loaded_graph(redis_client, GraphLayout(f"test:{name}:{{graph}}:"), RULES)
        a, b, c, d = (r.customer_id for r in await graph.resolve(people))
        merges = [("x1", 2000, (b, a), "probabilistic", 12.5), ("x2", 2001, (c, b), "probabilistic", 9.0),
                  ("x3", 2002, (d, a), "probabilistic", 20.0), ("x1", 2000, (b, a), "probabilistic", 12.5)]
        if name == "each":
            answers.append([await graph.merge_customers(*merge) for merge in merges])
        else:
            [answer] = await run_commands(redis_client, [graph.merge_many_command(merges)])
            answers.append(graph.parse_many_answer(answer))

    each, chunked = answers
    assert chunked == each
    assert [len(r.merges) for r in each] == [1, 1, 0, 1] and each[3].replayed
    assert [r.reason for r in each[2].refused] == ["conflicting_strong_id"]
