"""Admit a request's events in one Redis round trip: the source's rate limit, then its messageIds.

Both live in Redis so every ingest worker shares them. The rate limit is GCRA (generic cell
rate algorithm): one number per source, the theoretical arrival time of its next event, read
against Redis's own clock so workers with skewed clocks agree. All keys of one source share a
hash slot (`{source}`), so the scripts stay legal on Redis Cluster.

A messageId claim is provisional until the broker acknowledged the event: `SET NX PX` with the
request's own token (`p:<token>`) for the produce timeout plus a margin, made final (`1`, kept
`dedupe_ttl_s`) only after the ack. A worker that dies in between, or a release that fails,
leaves a claim that expires within seconds, so the client's retry is produced then instead of
being answered as a duplicate of an event that never reached the broker. While a claim is still
provisional, a request carrying its messageId is refused whole (`in_flight`): the first request
may yet fail, so answering "duplicate" could lose the event, and producing it again would
duplicate it. Confirm and release touch only the request's own claims.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import redis.asyncio as aioredis

RATE_PREFIX = "ts:in:rate:"
DEDUPE_PREFIX = "ts:in:msg:"
# A provisional claim's value starts so; a final one is "1" (as every claim was before claims were provisional).
PROVISIONAL = "p:"

_ADMIT = """
-- A claim another request holds provisionally: refuse the whole request, spending and claiming nothing.
for i = 2, #KEYS do
  local held = redis.call('GET', KEYS[i])
  if held and string.sub(held, 1, 2) == 'p:' then
    return 'P' .. redis.call('PTTL', KEYS[i])
  end
end
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
  claimed[i] = redis.call('SET', KEYS[i], ARGV[5], 'NX', 'PX', ARGV[4]) and '1' or '0'
end
return table.concat(claimed)
"""

# Make the request's claims (value ARGV[1]) final for ARGV[2] seconds. One that expired meanwhile is
# claimed again (the event is on the broker); one another request holds now is left to it.
_CONFIRM = """
local n = 0
for i = 1, #KEYS do
  local held = redis.call('GET', KEYS[i])
  if held == ARGV[1] or not held then
    redis.call('SET', KEYS[i], '1', 'EX', ARGV[2])
    n = n + 1
  end
end
return n
"""

# Drop the request's own claims (value ARGV[1]), never another request's.
_RELEASE = """
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
    n = n + 1
  end
end
return n
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
    """`in_flight`: another request holds a claim provisionally, wait `retry_after_s`. Not `allowed`:
    over the rate limit, wait `retry_after_s`. Else `fresh[i]` says whether event i is new, claimed
    provisionally under `token` (confirm or release with it)."""

    allowed: bool
    retry_after_s: int
    fresh: list[bool]
    token: str = ""
    in_flight: bool = False


class Admitter:
    def __init__(self, redis: aioredis.Redis, dedupe_ttl_s: int, provisional_ttl_ms: int) -> None:
        self.redis = redis
        self.dedupe_ttl_s = dedupe_ttl_s
        self.provisional_ttl_ms = provisional_ttl_ms
        self._admit = redis.register_script(_ADMIT)
        self._confirm = redis.register_script(_CONFIRM)
        self._release = redis.register_script(_RELEASE)

    async def admit(self, source: str, message_ids: list[str], events_per_s: float, burst_events: int) -> Admission:
        """Spend len(message_ids) of `source`'s allowance (0 events/s: no limit) and claim the ids provisionally."""
        interval_ms = 1000.0 / events_per_s if events_per_s > 0 else 0.0
        # A request larger than the burst could never pass; it costs a full burst instead.
        cost = min(len(message_ids), burst_events)
        token = PROVISIONAL + secrets.token_hex(8)
        reply = await self._admit(
            keys=[rate_key(source), *(dedupe_key(source, m) for m in message_ids)],
            args=[repr(interval_ms), repr(interval_ms * burst_events), cost, self.provisional_ttl_ms, token])
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        if text.startswith("P"):  # held provisionally for this many more milliseconds
            return Admission(False, max(1, math.ceil(int(text[1:]) / 1000)), [], in_flight=True)
        if text.startswith("W"):  # wait this many milliseconds
            return Admission(False, max(1, math.ceil(int(text[1:]) / 1000)), [])
        seen: set[str] = set()
        fresh = []
        for message_id, claimed in zip(message_ids, text[1:], strict=True):
            # The same messageId twice in one request: the second is a duplicate too.
            fresh.append(claimed == "1" and message_id not in seen)
            seen.add(message_id)
        return Admission(True, 0, fresh, token)

    async def confirm(self, source: str, token: str, message_ids: list[str]) -> None:
        """Make the claims final once the broker acknowledged their events: a retry is a duplicate from now on."""
        if message_ids:
            await self._confirm(keys=[dedupe_key(source, m) for m in message_ids], args=[token, self.dedupe_ttl_s])

    async def release(self, source: str, token: str, message_ids: list[str]) -> None:
        """Drop claims whose events the broker never acknowledged, so a retry is produced, not a duplicate."""
        if message_ids:
            await self._release(keys=[dedupe_key(source, m) for m in message_ids], args=[token])
