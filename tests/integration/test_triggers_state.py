"""Rule state, daily caps, silence timers and the watermark in real Valkey."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from services.triggers.crossing import CrossingState
from services.triggers.state_store import TIMERS_KEY, WATERMARK_KEY, RuleStateStore, cap_key, state_key

pytestmark = pytest.mark.integration


async def test_every_state_field_round_trips(redis_client: aioredis.Redis) -> None:
    store = RuleStateStore(redis_client, ttl_s=600)
    states = {("silent", "c1"): CrossingState(armed=True, cooldown_until_ms=7, last_value="", timer_due_ms=1_000,
                                              timer_snapshot='{"customer_id": "c1"}'),
              ("changed", "c1"): CrossingState(armed=False, last_value="at_risk")}
    await store.save(states, silence_rules=["silent"])
    assert await store.load(states) == states
    assert await redis_client.zscore(TIMERS_KEY, "silent\x1fc1") == 1_000
    assert await redis_client.zcard(TIMERS_KEY) == 1  # only silence rules are indexed


async def test_cleared_timer_leaves_the_index_and_the_hash(redis_client: aioredis.Redis) -> None:
    store = RuleStateStore(redis_client, ttl_s=600)
    await store.save({("silent", "c1"): CrossingState(timer_due_ms=1_000, timer_snapshot="{}")}, ["silent"])
    await store.save({("silent", "c1"): CrossingState()}, ["silent"])
    assert await redis_client.zcard(TIMERS_KEY) == 0
    assert b"timer_due_ms" not in await redis_client.hgetall(state_key("silent", "c1"))
    assert await store.load([("silent", "c1")]) == {("silent", "c1"): CrossingState()}


async def test_due_timers_are_read_by_watermark_and_stay_until_saved(redis_client: aioredis.Redis) -> None:
    store = RuleStateStore(redis_client, ttl_s=600)
    await store.save({("silent", f"c{n}"): CrossingState(timer_due_ms=n * 100, timer_snapshot="{}")
                      for n in range(1, 6)}, ["silent"])
    assert await store.due_timers(250) == [("silent", "c1"), ("silent", "c2")]
    assert await store.due_timers(250) == [("silent", "c1"), ("silent", "c2")]  # a crash would fire them again
    assert await store.due_timers(1_000, limit=3) == [("silent", "c1"), ("silent", "c2"), ("silent", "c3")]


async def test_watermark_only_moves_forward(redis_client: aioredis.Redis) -> None:
    store = RuleStateStore(redis_client, ttl_s=600)
    assert await store.raise_watermark(5_000, ceiling_ms=10**13) == 5_000
    assert await store.raise_watermark(4_000, ceiling_ms=10**13) == 5_000  # a late event does not pull it back
    assert await store.raise_watermark(9_000, ceiling_ms=10**13) == 9_000


async def test_watermark_stops_at_the_ceiling_and_one_stored_beyond_it_is_pulled_back(
        redis_client: aioredis.Redis) -> None:
    store = RuleStateStore(redis_client, ttl_s=600)
    assert await store.raise_watermark(4_086_000_000_000, ceiling_ms=1_800_000_000_000) == 1_800_000_000_000
    assert await redis_client.get(WATERMARK_KEY) == b"1800000000000"
    await redis_client.set(WATERMARK_KEY, 4_086_000_000_000)  # poisoned before the ceiling existed
    assert await store.raise_watermark(1_700_000_000_000, ceiling_ms=1_800_000_000_000) == 1_800_000_000_000
    assert await redis_client.get(WATERMARK_KEY) == b"1800000000000"


async def test_caps_are_written_as_absolute_counts_with_an_expiry(redis_client: aioredis.Redis) -> None:
    store = RuleStateStore(redis_client, ttl_s=600)
    await store.save_caps({("c1", "2026-11-25"): 2})
    await store.save_caps({("c1", "2026-11-25"): 2})  # a replayed batch writes the same number
    assert await store.load_caps([("c1", "2026-11-25"), ("c1", "2026-11-26")]) == {("c1", "2026-11-25"): 2}
    assert 0 < await redis_client.ttl(cap_key("c1", "2026-11-25")) <= 3 * 86_400
    await store.save_caps({("c1", "2026-11-25"): 1})  # a worker that saw fewer never lowers the count
    assert await store.load_caps([("c1", "2026-11-25")]) == {("c1", "2026-11-25"): 2}
