"""Admit a request's events in one Redis round trip: the source's rate limit, then its messageIds.

Both live in Redis so every ingest worker shares them. The rate limit is GCRA (generic cell
rate algorithm): one number per source, the theoretical arrival time of its next event, read
against Redis's own clock so workers with skewed clocks agree. All keys of one source share a
hash slot (`{source}`), so the scripts stay legal on Redis Cluster.

A messageId claim is provisional until the broker acknowledged the event: `SET NX PX` with the
request's own token (`p:<token>`) for the produce timeout plus a margin, made final only after the
ack. A worker that dies in between, or a release that fails, leaves a claim that expires within
seconds, so the client's retry is produced then instead of being answered as a duplicate of an
event that never reached the broker. While a claim is still provisional, a request carrying its
messageId is refused whole (`in_flight`): the first request may yet fail, so answering "duplicate"
could lose the event, and producing it again would duplicate it. Confirm and release touch only
the request's own claims.

A final claim is not a key per messageId (~90-120 bytes each, most of it the key's own overhead)
but 8 bytes: the messageId's 64-bit BLAKE2b digest, a member of one of SEEN_SHARDS sets of the
time bucket (Redis's clock) it was confirmed in. A bucket's sets expire as a whole, `dedupe_ttl_s`
after the bucket ends, and a look-up reads every bucket that can still hold an id confirmed within
`dedupe_ttl_s`: an id is remembered at least `dedupe_ttl_s`, at most one bucket longer. Sets of
integers are Redis intsets (8 bytes a member, binary search) up to `set-max-intset-entries` (512)
members, then hash tables (~40 bytes a member); SEEN_SHARDS sets per bucket keep ~30,000 ids per
bucket per source in intsets. Two messageIds of a source with the same digest within the window
would make the second a false duplicate: with n ids remembered, a chance of n / 2^64 per event
(one in 10^11 at 170 million a day); finding such a pair on purpose costs ~2^32 digests and only
ever affects the source's own events.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass

import redis.asyncio as aioredis

RATE_PREFIX = "ts:in:rate:"
CLAIM_PREFIX = "ts:in:msg:"
SEEN_PREFIX = "ts:in:seen:"
# A provisional claim's value starts so. "1" is a final claim of the layout before SEEN_PREFIX (a key
# per messageId, kept dedupe_ttl_s): still read as a duplicate, so an upgrade forgets nothing.
PROVISIONAL = "p:"
SEEN_SHARDS = 64
# Buckets per dedupe_ttl_s: a look-up reads this many buckets plus the current one (a SISMEMBER
# each); more buckets forget sooner after the TTL but cost more reads.
BUCKETS_PER_TTL = 4

# Reads a messageId's buckets: the sets of its shard in the current bucket and the BUCKETS_PER_TTL
# before it (ARGV: bucket width s, buckets back). Built from the source's prefix in the script (one
# hash slot, `{source}`), since which buckets exist follows Redis's clock.
_SEEN_PRELUDE = """
local seen_prefix, width, back = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now_s = tonumber(clock[1])
local bucket = math.floor(now_s / width)
local function seen(digest, shard)
  for b = bucket - back, bucket do
    if redis.call('SISMEMBER', seen_prefix .. b .. ':' .. shard, digest) == 1 then return true end
  end
  return false
end
local function remember(digest, shard, ttl)
  local key = seen_prefix .. bucket .. ':' .. shard
  if redis.call('SADD', key, digest) == 1 then
    redis.call('EXPIREAT', key, (bucket + 1) * width + ttl)
  end
end
"""

# KEYS: seen prefix, rate key, then a claim key per id. ARGV: bucket width, buckets back, interval ms,
# burst ms, cost, provisional ms, token, then digest and shard per id.
_ADMIT = _SEEN_PRELUDE + """
-- A claim another request holds provisionally: refuse the whole request, spending and claiming nothing.
for i = 3, #KEYS do
  local held = redis.call('GET', KEYS[i])
  if held and string.sub(held, 1, 2) == 'p:' then
    return 'P' .. redis.call('PTTL', KEYS[i])
  end
end
local interval = tonumber(ARGV[3])
if interval > 0 then
  local now = now_s * 1000 + math.floor(tonumber(clock[2]) / 1000)
  local tat = tonumber(redis.call('GET', KEYS[2]) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval * tonumber(ARGV[5])
  local allowed_at = new_tat - tonumber(ARGV[4])
  if allowed_at > now then
    return 'W' .. math.ceil(allowed_at - now)
  end
  redis.call('SET', KEYS[2], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1000)
end
-- One string ("A" then 1 = new, 0 = duplicate, per id) parses far faster than an array reply.
local claimed = {'A'}
for i = 3, #KEYS do
  local digest, shard = ARGV[8 + 2 * (i - 3)], ARGV[9 + 2 * (i - 3)]
  local fresh = not seen(digest, shard) and redis.call('SET', KEYS[i], ARGV[7], 'NX', 'PX', ARGV[6])
  claimed[#claimed + 1] = fresh and '1' or '0'
end
return table.concat(claimed)
"""

# Make the request's claims (value ARGV[3]) final: remember their digests (ARGV[5..], digest and
# shard per id) for ARGV[4] seconds and drop the claim keys. One that expired meanwhile is remembered
# too (the event is on the broker); one another request holds now is left to it.
_CONFIRM = _SEEN_PRELUDE + """
local n = 0
for i = 2, #KEYS do
  local held = redis.call('GET', KEYS[i])
  if held == ARGV[3] or not held then
    remember(ARGV[5 + 2 * (i - 2)], ARGV[6 + 2 * (i - 2)], tonumber(ARGV[4]))
    if held then redis.call('DEL', KEYS[i]) end
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


def claim_key(source: str, message_id: str) -> str:
    """Return the Redis key of `message_id`'s provisional claim for `source`.

    >>> claim_key("shop", "m-1")
    'ts:in:msg:{shop}:m-1'
    """
    return f"{CLAIM_PREFIX}{{{source}}}:{message_id}"


def seen_prefix(source: str) -> str:
    """Return the prefix of `source`'s remembered-digest sets (`<prefix><bucket>:<shard>`).

    >>> seen_prefix("shop")
    'ts:in:seen:{shop}:'
    """
    return f"{SEEN_PREFIX}{{{source}}}:"


def message_digest(message_id: str) -> tuple[str, int]:
    """Return (the messageId's 64-bit digest as a signed decimal, its shard): what a final claim keeps.

    A decimal string, because Lua's numbers are doubles: Redis parses it into the intset exactly.

    >>> message_digest("m-1")
    ('-3280072976497272011', 53)
    """
    digest = int.from_bytes(hashlib.blake2b(message_id.encode(), digest_size=8).digest(), "big", signed=True)
    return str(digest), digest % SEEN_SHARDS


def bucket_width_s(dedupe_ttl_s: int) -> int:
    """Return the width of a remembered-digest bucket: BUCKETS_PER_TTL of them span `dedupe_ttl_s`.

    >>> bucket_width_s(86_400)
    21600
    """
    return max(1, math.ceil(dedupe_ttl_s / BUCKETS_PER_TTL))


def _digest_args(message_ids: list[str]) -> list[str | int]:
    args: list[str | int] = []
    for message_id in message_ids:
        args.extend(message_digest(message_id))
    return args


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
        self._width_s = bucket_width_s(dedupe_ttl_s)
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
            keys=[seen_prefix(source), rate_key(source), *(claim_key(source, m) for m in message_ids)],
            args=[self._width_s, BUCKETS_PER_TTL, repr(interval_ms), repr(interval_ms * burst_events), cost,
                  self.provisional_ttl_ms, token, *_digest_args(message_ids)])
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
            await self._confirm(keys=[seen_prefix(source), *(claim_key(source, m) for m in message_ids)],
                                args=[self._width_s, BUCKETS_PER_TTL, token, self.dedupe_ttl_s,
                                      *_digest_args(message_ids)])

    async def release(self, source: str, token: str, message_ids: list[str]) -> None:
        """Drop claims whose events the broker never acknowledged, so a retry is produced, not a duplicate."""
        if message_ids:
            await self._release(keys=[claim_key(source, m) for m in message_ids], args=[token])
