"""The identity graph in Redis: one Lua script resolves one event atomically; a batch is one pipeline.

Key layout (see `domain.GraphLayout`), every key under one prefix with a hash tag:

- ``ident:<type>:<hmac>``            string, the customer_id owning this hashed identifier
- ``customer:<id>``                  hash: first_seen_ms, last_seen_ms, created_by, status (active|merged),
                                     and for a merged customer merged_into, merge_id, merged_at_ms
- ``customer:<id>:identifiers``      set of ``<type>:<hmac>`` the customer owns (gone once merged)
- ``event:<message_id>``             the JSON answer given for that event, kept `event_ttl_s` so a
                                     redelivered event gets the very same answer (no second merge)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from services.identity.domain import GraphLayout, Resolution, ResolutionRequest, parse_resolution, script_call

# KEYS: ident:<ref> of each event identifier, in ARGV order.
# ARGV: prefix, message_id, event_time_ms, new_customer_id, event_ttl_s, strong types (comma-separated), refs...
# Survivor rule: the oldest customer by first_seen_ms (event time), ties broken by id, so the
# answer does not depend on which worker created which customer first. Customers holding a
# strong identifier (user_id, wechat_unionid) different from the event's or the group's are
# refused, not merged.
RESOLVE_SCRIPT = """
local prefix, message_id, event_time_s = ARGV[1], ARGV[2], ARGV[3]
local event_time = tonumber(event_time_s)
local candidate, ttl = ARGV[4], ARGV[5]
local strong = {}
for kind in string.gmatch(ARGV[6], "[^,]+") do strong[kind] = true end

local event_key = prefix .. "event:" .. message_id
local done = redis.call("GET", event_key)
if done then
  local answer = cjson.decode(done)
  answer["replayed"] = true
  return cjson.encode(answer)
end

local function customer_key(id) return prefix .. "customer:" .. id end
local function members_key(id) return prefix .. "customer:" .. id .. ":identifiers" end
local function kind_of(ref) return string.match(ref, "^(.*):[^:]*$") end

local refs = {}
for i = 7, #ARGV do refs[#refs + 1] = ARGV[i] end

local owners, owner_of, linked = {}, {}, {}
for i, ref in ipairs(refs) do
  local owner = redis.call("GET", KEYS[i])
  if owner then
    owner_of[ref] = owner
    if not linked[owner] then
      linked[owner] = {}
      owners[#owners + 1] = owner
    end
    table.insert(linked[owner], ref)
  end
end

local first_seen = {}
for _, id in ipairs(owners) do
  first_seen[id] = tonumber(redis.call("HGET", customer_key(id), "first_seen_ms")) or 0
end
table.sort(owners, function(a, b)
  if first_seen[a] ~= first_seen[b] then return first_seen[a] < first_seen[b] end
  return a < b
end)

-- The event's own strong ids come first: the first value of each strong type wins.
local group_strong = {}
for _, ref in ipairs(refs) do
  local kind = kind_of(ref)
  if strong[kind] and not group_strong[kind] then group_strong[kind] = ref end
end

local accepted, refused = {}, {}
for _, id in ipairs(owners) do
  local own_strong, conflict = {}, false
  for _, ref in ipairs(redis.call("SMEMBERS", members_key(id))) do
    local kind = kind_of(ref)
    if strong[kind] then
      if group_strong[kind] and group_strong[kind] ~= ref then conflict = true end
      own_strong[kind] = ref
    end
  end
  if conflict then
    refused[#refused + 1] = {customer_id = id, reason = "conflicting_strong_id"}
  else
    for kind, ref in pairs(own_strong) do group_strong[kind] = ref end
    accepted[#accepted + 1] = id
  end
end

local created = false
local survivor = accepted[1]
if not survivor then
  survivor = candidate
  -- The candidate id can be taken when its identifier sits with a refused or merged customer.
  if redis.call("EXISTS", customer_key(survivor)) == 1 then
    survivor = "c_" .. string.sub(redis.sha1hex(candidate .. "|" .. message_id), 1, 24)
  end
  redis.call("HSET", customer_key(survivor), "first_seen_ms", event_time_s, "last_seen_ms", event_time_s,
             "created_by", message_id, "status", "active")
  created = true
end

local merges = {}
for i = 2, #accepted do
  local merged = accepted[i]
  local merge_id = "m_" .. string.sub(redis.sha1hex(survivor .. "|" .. merged .. "|" .. message_id), 1, 24)
  for _, ref in ipairs(redis.call("SMEMBERS", members_key(merged))) do
    redis.call("SET", prefix .. "ident:" .. ref, survivor)
    redis.call("SADD", members_key(survivor), ref)
  end
  redis.call("DEL", members_key(merged))
  redis.call("HSET", customer_key(merged), "status", "merged", "merged_into", survivor,
             "merge_id", merge_id, "merged_at_ms", event_time_s)
  merges[#merges + 1] = {merge_id = merge_id, merged_id = merged, identifiers = linked[merged]}
end

for i, ref in ipairs(refs) do
  local kind = kind_of(ref)
  -- A second, different strong id on one event stays out of the graph.
  if not owner_of[ref] and not (strong[kind] and group_strong[kind] ~= ref) then
    redis.call("SET", KEYS[i], survivor)
    redis.call("SADD", members_key(survivor), ref)
  end
end

local survivor_key = customer_key(survivor)
local first = tonumber(redis.call("HGET", survivor_key, "first_seen_ms"))
if not first or event_time < first then redis.call("HSET", survivor_key, "first_seen_ms", event_time_s) end
local last = tonumber(redis.call("HGET", survivor_key, "last_seen_ms"))
if not last or event_time > last then redis.call("HSET", survivor_key, "last_seen_ms", event_time_s) end

local answer = cjson.encode({customer_id = survivor, created = created, replayed = false,
                             merges = merges, refused = refused})
redis.call("SET", event_key, answer, "EX", ttl)
return answer
"""
RESOLVE_SCRIPT_SHA = hashlib.sha1(RESOLVE_SCRIPT.encode()).hexdigest()


class IdentityGraph:
    """Resolve events against the identity graph, a whole batch per Redis round trip."""

    def __init__(
        self, client: aioredis.Redis, layout: GraphLayout, strong_types: Iterable[str], event_ttl_s: int
    ) -> None:
        self._client = client
        self.layout = layout
        self._strong_types = frozenset(strong_types)
        self._event_ttl_s = event_ttl_s

    async def load_script(self) -> None:
        """Register the resolve script so batches can call it by its SHA."""
        await self._client.script_load(RESOLVE_SCRIPT)

    async def resolve(self, requests: Sequence[ResolutionRequest]) -> list[Resolution]:
        """Resolve each request in order; the answers are in the same order."""
        if not requests:
            return []
        answers = await self._evalsha_all(requests)
        if any(isinstance(a, NoScriptError) for a in answers):
            # Redis restarted or flushed its scripts. Rerunning the whole batch is safe:
            # events that did run answer again from their event key.
            await self.load_script()
            answers = await self._evalsha_all(requests)
        resolutions = []
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
            if not isinstance(answer, str | bytes):
                raise TypeError(f"resolve script answered {type(answer).__name__}, expected JSON text")
            resolutions.append(parse_resolution(answer))
        return resolutions

    async def _evalsha_all(self, requests: Sequence[ResolutionRequest]) -> list[object]:
        async with self._client.pipeline(transaction=False) as pipe:
            for request in requests:
                keys, args = script_call(request, self.layout, self._strong_types, self._event_ttl_s)
                pipe.evalsha(RESOLVE_SCRIPT_SHA, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))
