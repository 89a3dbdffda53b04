"""Scoring's and triggers' stores forget an erased customer on a real Valkey, and nobody else; what they
record as erased stays erased for a worker that starts afresh."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.scoring.features import silent_path
from services.scoring.state import CustomerState
from services.scoring.store import RedisScoringStore, StateChanges
from services.triggers.crossing import CrossingState
from services.triggers.erasure import forget_customers
from services.triggers.state_store import (
    ERASED_KEY,
    DeliveryQueue,
    RuleStateStore,
    cap_key,
    customer_keys_key,
    state_key,
    timer_member,
)
from touchstream.privacy import ErasedCustomers, erased_token

pytestmark = pytest.mark.integration


async def test_scoring_forgets_states_paths_waiting_examples_and_schedules(redis_client: aioredis.Redis) -> None:
    store = RedisScoringStore(redis_client, "t:scoring")
    changes = StateChanges(states={"c_ann": CustomerState(purchase_count=1), "c_bob": CustomerState()})
    changes.add_due(0, "c_ann", 1, 100)
    changes.add_due(1, "c_old", 2, 200)  # a merged-away id's members stay in its own partition
    changes.add_due(0, "c_bob", 3, 300)
    changes.schedule_tick(0, "c_ann", 50)
    changes.schedule_tick(1, "c_bob", 60)
    changes.schedule_silent(0, "c_ann", 70, silent_path(CustomerState(purchase_count=1)))
    changes.schedule_silent(1, "c_bob", 80, silent_path(CustomerState()))
    await store.save(changes)

    assert await store.forget(["c_ann", "c_old"], range(2)) == 6
    states, _ = await store.load(["c_ann", "c_bob"])
    assert set(states) == {"c_bob"}
    assert set(await store.load_paths(["c_ann", "c_bob"])) == {"c_bob"}
    assert await store.due_members(0, 1000) == ["c_bob|3"] and await store.due_members(1, 1000) == []
    assert await store.due_ticks({0: 1000, 1: 1000}) == {0: [], 1: [("c_bob", 60)]}
    assert await store.due_silent({0: 1000, 1: 1000}) == {0: [], 1: [("c_bob", 80)]}
    assert await store.forget(["c_ann", "c_old"], range(2)) == 0  # idempotent


async def test_triggers_forgets_rule_states_caps_timers_and_queued_actions(redis_client: aioredis.Redis) -> None:
    states, queue = RuleStateStore(redis_client, 3600), DeliveryQueue(redis_client)
    await states.save({("r1", "c_ann"): CrossingState(timer_due_ms=5, timer_snapshot="{}"),
                       ("r1", "c_bob"): CrossingState(), ("r2", "c_ann"): CrossingState()}, ["r1"])
    await states.save_caps({("c_ann", "2026-11-25"): 2, ("c_bob", "2026-11-25"): 1})

    await queue.enqueue("marketing", {"a1": queued("a1", "c_ann"), "a2": queued("a2", "c_bob"),
                                      "a3": queued("a3", "c_old")})

    erased = ErasedCustomers(redis_client, ERASED_KEY, 3600)
    deleted, dropped = await forget_customers(redis_client, queue, erased, ["c_ann", "c_old"], ["r1", "r2"],
                                              ["marketing"])
    assert (deleted, dropped) == (3, 2)
    assert await ErasedCustomers(redis_client, ERASED_KEY, 3600).among(["c_ann", "c_bob", "c_old"]) == {
        "c_ann", "c_old"}
    assert set(await states.load([("r1", "c_ann"), ("r2", "c_ann"), ("r1", "c_bob")])) == {("r1", "c_bob")}
    assert await redis_client.exists(cap_key("c_ann", "2026-11-25")) == 0
    assert await redis_client.exists(cap_key("c_bob", "2026-11-25")) == 1
    assert await redis_client.zscore("triggers:timers:{triggers}:due", timer_member(("r1", "c_ann"))) is None
    assert [a for a, _ in await queue.all_queued("marketing")] == ["a2"]


async def test_triggers_erasure_finds_a_customers_keys_through_its_index_without_scanning(
        redis_client: aioredis.Redis) -> None:
    states = RuleStateStore(redis_client, 3600)
    # Keys of a rule no longer in the rule file, and caps of days long past, are found too.
    await states.save({("r_gone", "c_ann"): CrossingState(), ("r1", "c_ann"): CrossingState(),
                       ("r1", "c_bob"): CrossingState()})
    await states.save_caps({("c_ann", "1997-01-01"): 1, ("c_ann", "2026-11-25"): 2, ("c_bob", "2026-11-25"): 1})
    assert await redis_client.smembers(customer_keys_key("c_ann")) == {
        b"s:r_gone", b"s:r1", b"c:1997-01-01", b"c:2026-11-25"}
    assert await redis_client.object("encoding", customer_keys_key("c_ann")) == b"listpack"
    assert await redis_client.ttl(customer_keys_key("c_ann")) > 3 * 86_400 - 60  # outlives the caps it names

    def scans(stats: dict[str, Any]) -> int:
        return int(stats.get("cmdstat_scan", {}).get("calls", 0))

    before = scans(await redis_client.info("commandstats"))
    erased = ErasedCustomers(redis_client, ERASED_KEY, 3600)
    deleted, _ = await forget_customers(redis_client, DeliveryQueue(redis_client), erased, ["c_ann"], ["r1"], [])
    assert deleted == 4
    assert scans(await redis_client.info("commandstats")) == before  # the keyspace was never scanned
    assert await redis_client.exists(customer_keys_key("c_ann")) == 0
    assert sorted(k.decode() for k in await redis_client.keys("triggers:*{c_*")) == sorted([
        state_key("r1", "c_bob"), cap_key("c_bob", "2026-11-25"), customer_keys_key("c_bob")])
    # An index naming full keys (as indexes did before 2026-12) still leads to them.
    await redis_client.hset(cap_key("c_idx", "2026-11-25"), "n", "1")
    await redis_client.sadd(customer_keys_key("c_idx"), cap_key("c_idx", "2026-11-25"))
    assert (await forget_customers(redis_client, DeliveryQueue(redis_client), erased, ["c_idx"], [], []))[0] == 1
    # A state written before the index existed (an older release) is still found, for every current rule.
    await redis_client.hset(state_key("r1", "c_old"), "armed", "1")
    assert (await forget_customers(redis_client, DeliveryQueue(redis_client), erased, ["c_old"], ["r1"], []))[0] == 1


def queued(action_id: str, cid: str) -> tuple[str, int]:
    return json.dumps({"action": {"action_id": action_id, "customer_id": cid}, "attempts": 1}), 10


async def test_a_retry_is_not_written_back_for_an_action_that_left_the_queue_while_in_flight(
        redis_client: aioredis.Redis) -> None:
    queue = DeliveryQueue(redis_client)
    await queue.enqueue("marketing", {"a1": queued("a1", "c_ann"), "a2": queued("a2", "c_bob")})
    claimed = dict(await queue.claim("marketing", now_ms=100, limit=10, lease_until_ms=1_000))
    await queue.remove_many("marketing", ["a1"])  # the erasure, while both requests are on the wire
    await queue.reschedule("marketing", "a1", claimed["a1"], 2_000)
    await queue.reschedule("marketing", "a2", claimed["a2"], 2_000)
    assert [a for a, _ in await queue.all_queued("marketing")] == ["a2"]
    assert await queue.pending("marketing") == 1 and await queue.next_due_ms("marketing") == 2_000


async def test_the_erased_set_keeps_one_way_tokens_for_its_ttl(redis_client: aioredis.Redis) -> None:
    erased = ErasedCustomers(redis_client, "t:erased", ttl_s=3600)
    await erased.add(["c_ann", "c_old", "c_ann"])
    assert await erased.among(["c_bob", "c_ann", "c_old"]) == {"c_ann", "c_old"}
    members = {m.decode() for m in await redis_client.zrange("t:erased", 0, -1)}
    assert members == {erased_token("c_ann"), erased_token("c_old")}
    assert 3500 < await redis_client.ttl("t:erased") <= 3600
    # An entry older than the TTL goes with the next erasure; newer ones stay.
    await redis_client.zadd("t:erased", {erased_token("c_gone"): 1})
    await erased.add(["c_new"])
    assert await erased.among(["c_gone", "c_ann", "c_new"]) == {"c_ann", "c_new"}
