"""Redis adapter: rule states, caps, timers, the ledger of delivered action ids, the delivery queue.

Key layout (the `{customer_id}` hash tag keeps one customer's keys in one Redis Cluster slot):
  triggers:state:{<customer_id>}:<rule_id>  hash armed=0|1, cooldown_until_ms, last_value,
                                            timer_due_ms, timer_snapshot (JSON score)
  triggers:cap:{<customer_id>}:<local day>  fired actions that day (frequency cap)
  triggers:keys:{<customer_id>}             set: the customer's state and cap keys (an erasure deletes these,
                                            never scanning the keyspace), as `s:<rule_id>` and `c:<local day>`
                                            (`index_member`; full key names before 2026-12, still read);
                                            outlives each key it names
  triggers:timers:{triggers}:due            sorted set: silence timers by event-time deadline
  triggers:watermark:{triggers}             the event-time watermark (epoch ms)
  triggers:delivered:<action_id>            string: epoch ms of the receiver's 2xx
  triggers:queue:{<endpoint>}:...           delivery queue, see DeliveryQueue
  triggers:erased:{triggers}                erased customers' tokens (touchstream.privacy.ErasedCustomers):
                                            their scores are not evaluated, their actions never queued nor sent
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.typing import EncodableT, FieldT

from services.triggers.crossing import CrossingState, StateKey
from touchstream.eventtime import DAY_S


def state_key(rule_id: str, customer_id: str) -> str:
    """Return the Redis key of one rule's state for one customer.

    >>> state_key("churn-risk-high", "cus_1")
    'triggers:state:{cus_1}:churn-risk-high'
    """
    return f"triggers:state:{{{customer_id}}}:{rule_id}"


def customer_keys_key(customer_id: str) -> str:
    """Return the Redis key of the set naming every state and cap key of one customer (same hash slot).

    >>> customer_keys_key("cus_1")
    'triggers:keys:{cus_1}'
    """
    return f"triggers:keys:{{{customer_id}}}"


def index_member(key: str) -> str:
    """Return how the customer's key index names a state or cap key: short, so the set stays a listpack.

    >>> index_member(state_key("churn-risk-high", "cus_1")), index_member(cap_key("cus_1", "2026-11-25"))
    ('s:churn-risk-high', 'c:2026-11-25')
    """
    kind, _, rest = key.partition(":{")
    return ("s:" if kind == "triggers:state" else "c:") + rest.partition("}:")[2]


def indexed_key(customer_id: str, member: str) -> str:
    """Return the key an index member names (`index_member`), or the member itself: a full key name,
    as indexes held them before.

    >>> indexed_key("cus_1", "s:churn-risk-high"), indexed_key("cus_1", "triggers:cap:{cus_1}:2026-11-25")
    ('triggers:state:{cus_1}:churn-risk-high', 'triggers:cap:{cus_1}:2026-11-25')
    """
    if member.startswith("s:"):
        return state_key(member[2:], customer_id)
    if member.startswith("c:"):
        return cap_key(customer_id, member[2:])
    return member


# A day's fired-action count is kept this long (the frequency cap needs the customer's local day only).
CAP_TTL_S = 3 * DAY_S


def delivered_key(action_id: str) -> str:
    return f"triggers:delivered:{action_id}"


TIMERS_KEY = "triggers:timers:{triggers}:due"
WATERMARK_KEY = "triggers:watermark:{triggers}"
ERASED_KEY = "triggers:erased:{triggers}"

# Raise the stored watermark to ARGV[1] if that is later, but never past the ceiling ARGV[2]
# (pulling back one stored beyond it); return the stored value.
_RAISE_WATERMARK = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local ceiling = tonumber(ARGV[2])
local candidate, text = tonumber(ARGV[1]), ARGV[1]
if candidate > ceiling then candidate, text = ceiling, ARGV[2] end
if current > ceiling then
  redis.call('SET', KEYS[1], ARGV[2])
  current = ceiling
end
if candidate > current then
  redis.call('SET', KEYS[1], text)
  return candidate
end
return current
"""

# Set a day's count to ARGV[1] unless it is already higher; keep it ARGV[2] seconds.
_RAISE_CAP = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
return current
"""


def cap_key(customer_id: str, day: str) -> str:
    """Return the Redis key of a customer's fired-action count on one local day.

    >>> cap_key("cus_1", "2026-11-25")
    'triggers:cap:{cus_1}:2026-11-25'
    """
    return f"triggers:cap:{{{customer_id}}}:{day}"


def timer_member(key: StateKey) -> str:
    return f"{key[0]}\x1f{key[1]}"


class RuleStates(Protocol):
    """What deciding on scores needs of its state: `RuleStateStore` in Redis; an in-memory fake in unit tests."""

    async def load(self, keys: Iterable[StateKey]) -> dict[StateKey, CrossingState]: ...

    async def save(self, states: Mapping[StateKey, CrossingState], silence_rules: Iterable[str] = ()) -> None: ...

    async def load_caps(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]: ...

    async def save_caps(self, counts: Mapping[tuple[str, str], int]) -> None: ...

    async def raise_watermark(self, event_time_ms: int, ceiling_ms: int) -> int: ...

    async def due_timers(self, watermark_ms: int, limit: int = 1000) -> list[StateKey]: ...


class RuleStateStore:
    """Load and save a batch's rule states (one pipeline each), daily caps, silence timers, the watermark.

    Silence timers are indexed in one sorted set by event-time deadline (member
    `<rule_id>\\x1f<customer_id>`); the deadline and the starting score live in the rule state.
    """

    def __init__(self, redis: aioredis.Redis, ttl_s: int) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        # Renewed on every write to any key it names, so it outlives all of them.
        self._index_ttl_s = max(ttl_s, CAP_TTL_S)
        self._raise_watermark = redis.register_script(_RAISE_WATERMARK)
        self._raise_cap = redis.register_script(_RAISE_CAP)

    async def load(self, keys: Iterable[StateKey]) -> dict[StateKey, CrossingState]:
        """Return the stored states of `keys`; keys never seen are left out."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for rule_id, customer_id in keys:
                pipe.hgetall(state_key(rule_id, customer_id))
            replies = await pipe.execute()
        return {key: _state_from_hash(reply) for key, reply in zip(keys, replies, strict=True) if reply}

    async def save(self, states: Mapping[StateKey, CrossingState], silence_rules: Iterable[str] = ()) -> None:
        """Write `states`, each with the state TTL renewed; keep the timer index of `silence_rules` in step."""
        if not states:
            return
        silence = set(silence_rules)
        async with self._redis.pipeline(transaction=False) as pipe:
            for (rule_id, customer_id), state in states.items():
                key = state_key(rule_id, customer_id)
                pipe.delete(key)
                pipe.hset(key, mapping=_hash_from_state(state))
                pipe.expire(key, self._ttl_s)
                self._index_in(pipe, customer_id, key)
                if rule_id in silence:
                    member = timer_member((rule_id, customer_id))
                    if state.timer_due_ms:
                        pipe.zadd(TIMERS_KEY, {member: state.timer_due_ms})
                    else:
                        pipe.zrem(TIMERS_KEY, member)
            await pipe.execute()

    async def load_caps(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Return the fired-action counts of (customer, local day) `keys` that have one."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for customer_id, day in keys:
                pipe.get(cap_key(customer_id, day))
            replies = await pipe.execute()
        return {key: int(reply) for key, reply in zip(keys, replies, strict=True) if reply is not None}

    async def save_caps(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Write absolute counts (not increments), so a replayed batch writes the same numbers again;
        never lower a stored count (another worker's timer may have counted for the same day)."""
        if not counts:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for (customer_id, day), count in counts.items():
                await self._raise_cap(keys=[cap_key(customer_id, day)], args=[count, CAP_TTL_S], client=pipe)
                self._index_in(pipe, customer_id, cap_key(customer_id, day))
            await pipe.execute()

    def _index_in(self, pipe: Pipeline, customer_id: str, key: str) -> None:
        index = customer_keys_key(customer_id)
        pipe.sadd(index, index_member(key))
        pipe.expire(index, self._index_ttl_s)

    async def raise_watermark(self, event_time_ms: int, ceiling_ms: int) -> int:
        """Move the shared event-time watermark forward to `event_time_ms` if later, never past
        `ceiling_ms` (the wall clock plus the event-time tolerance); return it."""
        return int(await self._raise_watermark(keys=[WATERMARK_KEY], args=[event_time_ms, ceiling_ms]))

    async def due_timers(self, watermark_ms: int, limit: int = 1000) -> list[StateKey]:
        """Return the keys of timers due at or before `watermark_ms`.

        They stay in the index until the fired state is saved (which removes them), so a crash
        in between fires them again -- with the same action id, which delivery drops.
        """
        members = await self._redis.zrangebyscore(TIMERS_KEY, "-inf", watermark_ms, start=0, num=limit)
        keys = []
        for member in members:
            text = member.decode() if isinstance(member, bytes) else str(member)
            rule_id, _, customer_id = text.partition("\x1f")
            keys.append((rule_id, customer_id))
        return keys


def _hash_from_state(state: CrossingState) -> dict[FieldT, EncodableT]:
    fields: dict[FieldT, EncodableT] = {"armed": int(state.armed), "cooldown_until_ms": state.cooldown_until_ms}
    if state.last_value:
        fields["last_value"] = state.last_value
    if state.timer_due_ms:
        fields["timer_due_ms"] = state.timer_due_ms
        fields["timer_snapshot"] = state.timer_snapshot
    return fields


def _state_from_hash(reply: Mapping[bytes, bytes]) -> CrossingState:
    return CrossingState(
        armed=reply.get(b"armed", b"1") == b"1",
        cooldown_until_ms=int(reply.get(b"cooldown_until_ms", b"0")),
        last_value=reply.get(b"last_value", b"").decode(),
        timer_due_ms=int(reply.get(b"timer_due_ms", b"0")),
        timer_snapshot=reply.get(b"timer_snapshot", b"").decode(),
    )


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

    def mark_delivered_in(self, pipe: Pipeline, action_id: str, acknowledged_at_ms: int) -> None:
        """Queue the ledger write on someone else's pipeline."""
        pipe.set(delivered_key(action_id), acknowledged_at_ms, ex=self._ttl_s)


def queue_keys(endpoint: str) -> tuple[str, str]:
    """Return the due-time sorted set and the action hash of an endpoint's delivery queue.

    >>> queue_keys("marketing")
    ('triggers:queue:{marketing}:due', 'triggers:queue:{marketing}:actions')
    """
    return f"triggers:queue:{{{endpoint}}}:due", f"triggers:queue:{{{endpoint}}}:actions"


def disabled_key(endpoint: str) -> str:
    return f"triggers:endpoint:{{{endpoint}}}:disabled"


# Take up to ARGV[2] actions due at or before ARGV[1] and lease them until ARGV[3]: their due
# time moves to the lease end, so a worker that dies mid-request leaves them to be tried again.
# What a claim took is kept under its id (KEYS[3]) until the lease ends: a claim Redis carried out
# just before it went away, its answer lost, is asked again under the same id and hands back the
# same actions, where they would otherwise sit leased to nobody until the lease ran out. KEYS[4], the
# worker's previous claim (answered), is forgotten: its actions are in the worker's hands.
_CLAIM = """
redis.call('DEL', KEYS[4])
local out = {}
local taken = redis.call('LRANGE', KEYS[3], 0, -1)
if #taken > 0 then
  for _, id in ipairs(taken) do
    local state = redis.call('HGET', KEYS[2], id)
    if state then
      out[#out + 1] = id
      out[#out + 1] = state
    end
  end
  return out
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[3], id)
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[2], id) or ''
end
if #ids > 0 then
  redis.call('RPUSH', KEYS[3], unpack(ids))
  redis.call('PEXPIRE', KEYS[3], math.max(1, tonumber(ARGV[3]) - tonumber(ARGV[1])))
end
return out
"""


def claim_key(endpoint: str, claim_id: str) -> str:
    """Return the key keeping what claim `claim_id` took from `endpoint`'s queue (same slot as the queue).

    >>> claim_key("marketing", "7f3a")
    'triggers:queue:{marketing}:claim:7f3a'
    """
    return f"triggers:queue:{{{endpoint}}}:claim:{claim_id}"


# Write a retry back (state ARGV[2], due ARGV[3]) only while the action is still queued: an erasure
# or a completion may have removed it while its request was in flight.
_RESCHEDULE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""


class DeliveryQueue:
    """Pending webhook deliveries per endpoint, persisted in Redis so a restart loses nothing.

    Key layout (the `{endpoint}` hash tag keeps each endpoint's keys in one Cluster slot):
      triggers:queue:{<endpoint>}:due      sorted set action_id -> due epoch ms
      triggers:queue:{<endpoint>}:actions  hash action_id -> JSON {action, attempts, last_error}
      triggers:queue:{<endpoint>}:claim:<id>  list of the action ids claim <id> leased, until its lease ends
                                               (or the worker's next claim): a claim asked again after its
                                               answer was lost hands them back
      triggers:endpoint:{<endpoint>}:disabled  JSON {at_ms, reason} once the receiver said 410; deleting it
                                               re-enables the endpoint on every worker at its next scan
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._claim = redis.register_script(_CLAIM)
        self._reschedule = redis.register_script(_RESCHEDULE)

    async def enqueue(self, endpoint: str, entries: Mapping[str, tuple[str, int]]) -> int:
        """Add `entries` (action_id -> (state JSON, due ms)) unless already queued; return how many were new."""
        if not entries:
            return 0
        due_key, actions_key = queue_keys(endpoint)
        async with self._redis.pipeline(transaction=True) as pipe:
            for action_id, (state_json, _) in entries.items():
                pipe.hsetnx(actions_key, action_id, state_json)
            for action_id, (_, due_ms) in entries.items():
                pipe.zadd(due_key, {action_id: due_ms}, nx=True)
            replies = await pipe.execute()
        return sum(replies[: len(entries)])

    async def claim(self, endpoint: str, now_ms: int, limit: int, lease_until_ms: int, *,
                    acknowledged: Mapping[str, Sequence[tuple[str, int]]] | None = None,
                    ledger: DeliveryLedger | None = None, claim_id: str | None = None,
                    previous_claim_id: str | None = None) -> list[tuple[str, str]]:
        """Lease up to `limit` due actions; return (action_id, state JSON) pairs.

        With `acknowledged` and `ledger`, first record those 2xx answers as `complete_many`
        does, in the same round trip. A claim asked again under the same `claim_id` (its answer
        was lost) returns what it took the first time; `previous_claim_id`, the caller's last
        answered claim, is forgotten. Without `claim_id`, a fresh one.
        """
        if limit <= 0:
            return []
        keys = [*queue_keys(endpoint), claim_key(endpoint, claim_id or uuid.uuid4().hex),
                claim_key(endpoint, previous_claim_id or "none")]
        if acknowledged and ledger is not None and any(acknowledged.values()):
            async with self._redis.pipeline(transaction=False) as pipe:
                self._complete_in(pipe, acknowledged, ledger)
                await self._claim(keys=keys, args=[now_ms, limit, lease_until_ms], client=pipe)
                flat = (await pipe.execute())[-1]
        else:
            flat = await self._claim(keys=keys, args=[now_ms, limit, lease_until_ms])
        pairs = []
        for n in range(0, len(flat), 2):
            pairs.append((_text(flat[n]), _text(flat[n + 1])))
        return pairs

    async def release(self, endpoint: str, action_ids: Sequence[str], due_ms: int) -> None:
        """End the lease of claimed actions still queued: due at `due_ms` again (those gone stay gone)."""
        if action_ids:
            await self._redis.zadd(queue_keys(endpoint)[0], dict.fromkeys(action_ids, due_ms), xx=True)

    async def reschedule(self, endpoint: str, action_id: str, state_json: str, due_ms: int) -> bool:
        """Queue the action's next try at `due_ms`, unless it left the queue meanwhile; say whether it was."""
        written = await self._reschedule(keys=list(queue_keys(endpoint)), args=[action_id, state_json, due_ms])
        return bool(written)

    async def complete(self, endpoint: str, action_id: str, ledger: DeliveryLedger, acknowledged_at_ms: int) -> None:
        """Record the receiver's 2xx in the ledger and drop the action from the queue, in one round trip."""
        await self.complete_many({endpoint: [(action_id, acknowledged_at_ms)]}, ledger)

    async def complete_many(self, done: Mapping[str, Sequence[tuple[str, int]]], ledger: DeliveryLedger) -> None:
        """Record receivers' 2xx answers (endpoint -> [(action_id, acknowledged at ms)]) in the ledger and
        drop those actions from their queues, all in one round trip.

        Ledger first: a crash in between leaves an action queued, and the next claim finds it
        acknowledged instead of sending it again.
        """
        if not any(done.values()):
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            self._complete_in(pipe, done, ledger)
            await pipe.execute()

    @staticmethod
    def _complete_in(pipe: Pipeline, done: Mapping[str, Sequence[tuple[str, int]]], ledger: DeliveryLedger) -> None:
        for items in done.values():
            for action_id, acknowledged_at_ms in items:
                ledger.mark_delivered_in(pipe, action_id, acknowledged_at_ms)
        for endpoint, items in done.items():
            if items:
                due_key, actions_key = queue_keys(endpoint)
                action_ids = [action_id for action_id, _ in items]
                pipe.zrem(due_key, *action_ids)
                pipe.hdel(actions_key, *action_ids)

    async def remove(self, endpoint: str, action_id: str) -> None:
        due_key, actions_key = queue_keys(endpoint)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(due_key, action_id)
            pipe.hdel(actions_key, action_id)
            await pipe.execute()

    async def all_queued(self, endpoint: str) -> list[tuple[str, str]]:
        """Return every queued (action_id, state JSON) of `endpoint` (used when it is disabled)."""
        everything = await self._redis.hgetall(queue_keys(endpoint)[1])
        return [(_text(k), _text(v)) for k, v in everything.items()]

    async def remove_many(self, endpoint: str, action_ids: Iterable[str]) -> None:
        action_ids = list(action_ids)
        if not action_ids:
            return
        due_key, actions_key = queue_keys(endpoint)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(due_key, *action_ids)
            pipe.hdel(actions_key, *action_ids)
            await pipe.execute()

    async def pending(self, endpoint: str) -> int:
        return int(await self._redis.zcard(queue_keys(endpoint)[0]))

    async def next_due_ms(self, endpoint: str) -> int | None:
        first = await self._redis.zrange(queue_keys(endpoint)[0], 0, 0, withscores=True)
        return int(first[0][1]) if first else None

    async def disable(self, endpoint: str, state_json: str) -> None:
        await self._redis.set(disabled_key(endpoint), state_json)

    async def enable(self, endpoint: str) -> bool:
        """Lift a 410's disabling of `endpoint` (workers see it at their next scan); return whether it was disabled."""
        return bool(await self._redis.delete(disabled_key(endpoint)))

    async def disabled(self, endpoints: Iterable[str]) -> dict[str, str]:
        """Return the disabled ones of `endpoints`, with why (JSON)."""
        endpoints = list(endpoints)
        if not endpoints:
            return {}
        # One GET per key rather than MGET: on Redis Cluster the keys live in different slots.
        async with self._redis.pipeline(transaction=False) as pipe:
            for endpoint in endpoints:
                pipe.get(disabled_key(endpoint))
            replies = await pipe.execute()
        return {e: _text(r) for e, r in zip(endpoints, replies, strict=True) if r is not None}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
