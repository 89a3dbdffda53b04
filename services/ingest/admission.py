"""Admit a request's events in one Redis round trip: the source's rate limit, then its messageIds.

Both live in Redis so every ingest worker shares them. The rate limit is GCRA (generic cell
rate algorithm): one number per source, the theoretical arrival time of its next event, read
against Redis's own clock so workers with skewed clocks agree. If the request fits, each
messageId is claimed with `SET NX EX` (first claim wins; a claimed id is a duplicate). All keys
of one source share a hash slot (`{source}`), so the script stays legal on Redis Cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis.asyncio as aioredis

RATE_PREFIX = "ts:in:rate:"
DEDUPE_PREFIX = "ts:in:msg:"

_ADMIT = """
local interval = tonumber(ARGV[1])
if interval > 0 then
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  local tat = tonumber(redis.call('GET', KEYS[1]) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval * tonumber(ARGV[3])
  local allowed_at = new_tat - tonumber(ARGV[2])
  if allowed_at > now then
    return 'W' .. math.ceil(allowed_at - now)
  end
  redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1000)
end
-- One string ("A" then 1 = new, 0 = duplicate, per id) parses far faster than an array reply.
local claimed = {'A'}
for i = 2, #KEYS do
  claimed[i] = redis.call('SET', KEYS[i], '1', 'NX', 'EX', ARGV[4]) and '1' or '0'
end
return table.concat(claimed)
"""


def rate_key(source: str) -> str:
    return f"{RATE_PREFIX}{{{source}}}"


def dedupe_key(source: str, message_id: str) -> str:
    """Return the Redis key remembering `message_id` for `source`.

    >>> dedupe_key("shop", "m-1")
    'ts:in:msg:{shop}:m-1'
    """
    return f"{DEDUPE_PREFIX}{{{source}}}:{message_id}"


@dataclass(frozen=True)
class Admission:
    """`allowed` false: wait `retry_after_s`. Else `fresh[i]` says whether event i is new."""

    allowed: bool
    retry_after_s: int
    fresh: list[bool]


class Admitter:
    def __init__(self, redis: aioredis.Redis, dedupe_ttl_s: int) -> None:
        self.redis = redis
        self.dedupe_ttl_s = dedupe_ttl_s
        self._admit = redis.register_script(_ADMIT)

    async def admit(self, source: str, message_ids: list[str], events_per_s: float, burst_events: int) -> Admission:
        """Spend len(message_ids) of `source`'s allowance (0 events/s: no limit) and claim the ids."""
        interval_ms = 1000.0 / events_per_s if events_per_s > 0 else 0.0
        # A request larger than the burst could never pass; it costs a full burst instead.
        cost = min(len(message_ids), burst_events)
        reply = await self._admit(
            keys=[rate_key(source), *(dedupe_key(source, m) for m in message_ids)],
            args=[repr(interval_ms), repr(interval_ms * burst_events), cost, self.dedupe_ttl_s])
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        if text.startswith("W"):  # wait this many milliseconds
            return Admission(False, max(1, math.ceil(int(text[1:]) / 1000)), [])
        seen: set[str] = set()
        fresh = []
        for message_id, claimed in zip(message_ids, text[1:], strict=True):
            # The same messageId twice in one request: the second is a duplicate too.
            fresh.append(claimed == "1" and message_id not in seen)
            seen.add(message_id)
        return Admission(True, 0, fresh)

    async def release(self, source: str, message_ids: list[str]) -> None:
        """Forget claims whose events the broker never acknowledged, so a retry is not a duplicate."""
        if message_ids:
            await self.redis.delete(*[dedupe_key(source, m) for m in message_ids])
