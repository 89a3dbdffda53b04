"""Redis adapter: per (rule, customer) crossing state and the ledger of delivered action ids.

Key layout (the `{customer_id}` hash tag keeps one customer's rule states in one Redis
Cluster slot, so a later per-customer frequency cap can read them in one script):
  triggers:state:{<customer_id>}:<rule_id>  hash armed=0|1, cooldown_until_ms=<epoch ms>
  triggers:delivered:<action_id>            string: epoch ms of the receiver's 2xx
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import redis.asyncio as aioredis

from services.triggers.crossing import CrossingState, StateKey


def state_key(rule_id: str, customer_id: str) -> str:
    """Return the Redis key of one rule's state for one customer.

    >>> state_key("churn-risk-high", "cus_1")
    'triggers:state:{cus_1}:churn-risk-high'
    """
    return f"triggers:state:{{{customer_id}}}:{rule_id}"


def delivered_key(action_id: str) -> str:
    return f"triggers:delivered:{action_id}"


class RuleStateStore:
    """Load and save a batch's crossing states with one pipeline each."""

    def __init__(self, redis: aioredis.Redis, ttl_s: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s

    async def load(self, keys: Iterable[StateKey]) -> dict[StateKey, CrossingState]:
        """Return the stored states of `keys`; keys never seen are left out."""
        keys = list(keys)
        if not keys:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for rule_id, customer_id in keys:
                pipe.hgetall(state_key(rule_id, customer_id))
            replies = await pipe.execute()
        return {
            key: CrossingState(armed=reply[b"armed"] == b"1", cooldown_until_ms=int(reply[b"cooldown_until_ms"]))
            for key, reply in zip(keys, replies, strict=True)
            if reply
        }

    async def save(self, states: Mapping[StateKey, CrossingState]) -> None:
        """Write `states`, each with the state TTL renewed."""
        if not states:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for (rule_id, customer_id), state in states.items():
                key = state_key(rule_id, customer_id)
                pipe.hset(key, mapping={"armed": int(state.armed), "cooldown_until_ms": state.cooldown_until_ms})
                pipe.expire(key, self._ttl_s)
            await pipe.execute()


class DeliveryLedger:
    """Remember which actions a receiver acknowledged, so a replay never sends them again."""

    def __init__(self, redis: aioredis.Redis, ttl_s: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s

    async def delivered(self, action_ids: Iterable[str]) -> set[str]:
        """Return those of `action_ids` already acknowledged."""
        action_ids = list(action_ids)
        if not action_ids:
            return set()
        async with self._redis.pipeline(transaction=False) as pipe:
            for action_id in action_ids:
                pipe.exists(delivered_key(action_id))
            replies = await pipe.execute()
        return {action_id for action_id, found in zip(action_ids, replies, strict=True) if found}

    async def mark_delivered(self, action_id: str, acknowledged_at_ms: int) -> None:
        await self._redis.set(delivered_key(action_id), acknowledged_at_ms, ex=self._ttl_s)
