"""The identity graph's Lua scripts: resolve an event, merge two customers, split identifiers off one, erase one;
and the person index's: exchange a chunk of records (find candidates, index them), finish a batch, forget a customer.

Each script runs atomically in Redis, so two workers touching the same identifiers can
never interleave inside one update. The four graph scripts share one prelude (key names, merge, rules).

Key layout (see `domain.GraphLayout`), every key under one prefix with a hash tag:

- ``ident:<type>:<hmac>``            hash: owner (customer id), first_ms, last_ms, shared ("1" once the
                                     identifier stopped being used for matching)
- ``ident:<type>:<hmac>:customers``  set of customer ids the identifier was seen with in events whose
                                     merge was refused (the shared-identifier count)
- ``customer:<id>``                  hash: first_seen_ms, last_seen_ms, created_by, status (active|merged),
                                     and for a merged customer merged_into, merge_id, merged_at_ms
- ``customer:<id>:identifiers``      set of ``<type>:<hmac>`` the customer owns (gone once merged)
- ``customer:<id>:merges``           list of JSON history entries (merges, splits), newest last
- ``customer:<id>:apart``            customers an operator split off this one: never merged back
- ``answers:<topic>:<partition>``    hash: offset -> the JSON answer given for the event at that offset of
                                     touchpoints.raw, so a redelivery gets the very same answer; fields are
                                     dropped once their offsets are committed (`ANSWERS_FORGET_SCRIPT`), the
                                     hash expires `event_ttl_s` after its last write as a backstop
- ``event:<op id>``                  the JSON answer given for an operation without a record (an API split
                                     or erasure, matching's merges), kept `event_ttl_s`
- ``suppressed``                     set of suppression tokens, sha1("suppress:<type>:<hmac>"), of the
                                     identifiers of erased customers: events carrying one are dropped
- ``suppressed:version``             counter raised on every erasure (ingest reloads its copy on a change)

Probabilistic matching (only written when matching is on; `graph.PersonIndex`):

- ``match:person:<id>``              the attributes of the records the customer was created with or
                                     carried: JSON arrays, one per line (clear personal data; never emitted)
- ``match:blocks:<hex digit>``       hash: blocking key digest (keyed BLAKE2b, so no personal data in
                                     names) -> the customer ids sharing it, space-separated, or "*" once
                                     more than the largest block compared share it; sharded by the digest's
                                     first hex digit
- ``match:model``                    JSON: the fitted Fellegi-Sunter model in use and the last fit tried
- ``match:records``, ``match:pairs`` counters: records matched and candidate pairs compared
- ``match:patterns:<chunk>``         hash: comparison pattern -> pairs, per chunk of records (EM's window)
- ``match:pending``                  list of JSON: pairs compared before any model was usable, decided
                                     (and dropped) by the first usable fit
- ``match:possible:<id>``            hash: other customer id -> JSON of a possible match (review band)
- ``match:review``                   list of the latest possible matches, newest first (JSON)

ARGV of every script: prefix, rules (JSON), op id, time_ms, ttl_s, then the script's own.
Rules: {"strong": [types], "limits": {type: n}, "default_limit": n, "shared_max": n}.
"""

from __future__ import annotations

import hashlib

PRELUDE = r"""
local prefix, rules, op_id, now_s, ttl = ARGV[1], cjson.decode(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local now = tonumber(now_s)
local strong = {}
for _, kind in ipairs(rules["strong"]) do strong[kind] = true end

local function ckey(id) return prefix .. "customer:" .. id end
local function mkey(id) return prefix .. "customer:" .. id .. ":identifiers" end
local function hkey(id) return prefix .. "customer:" .. id .. ":merges" end
local function akey(id) return prefix .. "customer:" .. id .. ":apart" end
local function ikey(ref) return prefix .. "ident:" .. ref end
local function wkey(ref) return prefix .. "ident:" .. ref .. ":customers" end
local function kind_of(ref) return string.match(ref, "^(.*):[^:]*$") end
local function limit_of(kind) return tonumber(rules["limits"][kind] or rules["default_limit"]) end

-- Where an operation's answer is kept, so a redelivery gets the very same answer and makes no second
-- merge. An event read from touchpoints.raw names its record ("<topic>:<partition>:<offset>", the
-- resolve script's slot): the answer is a field (the offset) of its partition's hash, dropped once the
-- offset is committed (`ANSWERS_FORGET_SCRIPT`), when no redelivery can ask for it. Any other operation
-- (the API's splits and erasures, matching's merges, callers without a record) keeps a key, `ttl` long.
local slot_hash, slot_offset = nil, nil
local function set_slot(slot)
  slot_hash, slot_offset = nil, nil
  if slot and slot ~= "" then
    local partition, offset = string.match(slot, "^(.*):([^:]*)$")
    slot_hash, slot_offset = prefix .. "answers:" .. partition, offset
  end
end

local function stored_answer()
  if slot_hash then
    local kept = redis.call("HGET", slot_hash, slot_offset)
    if kept then
      local answer = cjson.decode(kept)
      -- The same offset of another event (the topic recreated): not this event's answer.
      if answer["op"] == op_id then
        answer["op"] = nil
        return answer
      end
    end
  end
  -- Also where a record's answer was kept before answers were kept per partition.
  local done = redis.call("GET", prefix .. "event:" .. op_id)
  if done then return cjson.decode(done) end
  return nil
end

local function replayed()
  local answer = stored_answer()
  if not answer then return nil end
  answer["replayed"] = true
  return cjson.encode(answer)
end

local function remember(answer)
  local text = cjson.encode(answer)
  -- Kept without what a replay reads back as its default (false, empty lists): the most common
  -- answer, an event of a known customer, halves.
  local kept = {}
  for name, value in pairs(answer) do
    if value ~= false and not (type(value) == "table" and next(value) == nil) then kept[name] = value end
  end
  if slot_hash then
    kept["op"] = op_id
    redis.call("HSET", slot_hash, slot_offset, cjson.encode(kept))
    -- A backstop only: a partition whose offsets are never committed again keeps its last answers ttl.
    redis.call("EXPIRE", slot_hash, ttl)
  else
    redis.call("SET", prefix .. "event:" .. op_id, cjson.encode(kept), "EX", ttl)
  end
  return text
end

-- A merged customer points at its survivor; follow the chain to the live customer.
local function current_id(id)
  for _ = 1, 64 do
    local into = redis.call("HGET", ckey(id), "merged_into")
    if not into then return id end
    id = into
  end
  return id
end

local function seen_key(id)
  local f = redis.call("HMGET", ckey(id), "first_seen_ms")
  return tonumber(f[1]) or now
end

-- (first_seen, id) orders customers: the oldest survives, ties broken by id.
local function older(a, b)
  local fa, fb = seen_key(a), seen_key(b)
  if fa ~= fb then return fa < fb end
  return a < b
end

local function profile(id)
  local strongs, counts = {}, {}
  for _, ref in ipairs(redis.call("SMEMBERS", mkey(id))) do
    local kind = kind_of(ref)
    counts[kind] = (counts[kind] or 0) + 1
    if strong[kind] then
      strongs[kind] = strongs[kind] or {}
      strongs[kind][ref] = true
    end
  end
  return strongs, counts
end

local function apart_from(id, others)
  for _, other in ipairs(redis.call("SMEMBERS", akey(id))) do
    if others[current_id(other)] then return true end
  end
  return false
end

-- Why the customers in `group` (a set, with their strong ids and counts) may not take `id`, or nil.
local function refusal(id, group, group_strong, group_counts)
  local strongs, counts = profile(id)
  for kind, refs in pairs(strongs) do
    for ref in pairs(refs) do
      if group_strong[kind] and group_strong[kind] ~= ref then return "conflicting_strong_id" end
    end
  end
  for kind, n in pairs(counts) do
    if (group_counts[kind] or 0) + n > limit_of(kind) then return "type_limit" end
  end
  if apart_from(id, group) then return "operator_split" end
  for other in pairs(group) do
    if apart_from(other, {[id] = true}) then return "operator_split" end
  end
  return nil
end

local function absorb(id, group, group_strong, group_counts)
  local strongs, counts = profile(id)
  group[id] = true
  for kind, refs in pairs(strongs) do
    for ref in pairs(refs) do group_strong[kind] = group_strong[kind] or ref end
  end
  for kind, n in pairs(counts) do group_counts[kind] = (group_counts[kind] or 0) + n end
end

local function history(id, entry)
  redis.call("RPUSH", hkey(id), cjson.encode(entry))
  redis.call("LTRIM", hkey(id), -200, -1)
end

-- A customer id is free when nobody has it or it belongs to a customer merged away.
local function claim_id(candidate, salt)
  local status = redis.call("HGET", ckey(candidate), "status")
  if not status or status == "merged" then return candidate end
  return "c_" .. string.sub(redis.sha1hex(candidate .. "|" .. salt), 1, 24)
end

local function start_customer(id, first_s, last_s)
  redis.call("DEL", ckey(id))
  redis.call("HSET", ckey(id), "first_seen_ms", first_s, "last_seen_ms", last_s, "created_by", op_id,
             "status", "active")
end

local function stretch(id, first, last)
  local cur = redis.call("HMGET", ckey(id), "first_seen_ms", "last_seen_ms")
  local f, l = tonumber(cur[1]), tonumber(cur[2])
  if first and (not f or first < f) then redis.call("HSET", ckey(id), "first_seen_ms", string.format("%d", first)) end
  if last and (not l or last > l) then redis.call("HSET", ckey(id), "last_seen_ms", string.format("%d", last)) end
end

-- Move everything `merged` owns into `survivor`; `merged` stays as a pointer.
local function merge_into(survivor, merged, reason, score, linking)
  local merge_id = "m_" .. string.sub(redis.sha1hex(survivor .. "|" .. merged .. "|" .. op_id), 1, 24)
  for _, ref in ipairs(redis.call("SMEMBERS", mkey(merged))) do
    redis.call("HSET", ikey(ref), "owner", survivor)
    redis.call("SADD", mkey(survivor), ref)
  end
  redis.call("DEL", mkey(merged))
  for _, other in ipairs(redis.call("SMEMBERS", akey(merged))) do redis.call("SADD", akey(survivor), other) end
  redis.call("DEL", akey(merged))
  local seen = redis.call("HMGET", ckey(merged), "first_seen_ms", "last_seen_ms")
  stretch(survivor, tonumber(seen[1]), tonumber(seen[2]))
  for _, entry in ipairs(redis.call("LRANGE", hkey(merged), 0, -1)) do redis.call("RPUSH", hkey(survivor), entry) end
  redis.call("DEL", hkey(merged))
  local entry = {merge_id = merge_id, kind = "merge", survivor_id = survivor, merged_id = merged,
                 reason = reason, score = score, at_ms = now, caused_by = op_id}
  history(survivor, entry)
  redis.call("HSET", ckey(merged), "status", "merged", "merged_into", survivor, "merge_id", merge_id,
             "merged_at_ms", now_s)
  return {merge_id = merge_id, merged_id = merged, survivor_id = survivor, reason = reason, score = score,
          identifiers = linking or {}}
end

-- An identifier seen with more than `shared_max` distinct live customers stops matching.
local function note_seen_with(ref, ids)
  if strong[kind_of(ref)] then return end
  for _, id in ipairs(ids) do redis.call("SADD", wkey(ref), id) end
  if redis.call("SCARD", wkey(ref)) <= rules["shared_max"] then return end
  local live, n = {}, 0
  for _, id in ipairs(redis.call("SMEMBERS", wkey(ref))) do
    local cur = current_id(id)
    if not live[cur] then live[cur] = true; n = n + 1 end
  end
  redis.call("DEL", wkey(ref))
  for id in pairs(live) do redis.call("SADD", wkey(ref), id) end
  if n > rules["shared_max"] then redis.call("HSET", ikey(ref), "shared", "1") end
end
"""

# KEYS: ident:<ref> of each event identifier, in the order of ARGV[7..].
# ARGV[6] the event's record ("<topic>:<partition>:<offset>", or "" for none: see set_slot);
# ARGV[7] new customer id candidate (from the event's most stable identifier); refs...
RESOLVE_BODY = r"""
set_slot(ARGV[6])
local again = replayed()
if again then return again end
-- An identifier of an erased customer: drop the event, remember nothing about it.
if redis.call("EXISTS", prefix .. "suppressed") == 1 then
  for i = 8, #ARGV do
    if redis.call("SISMEMBER", prefix .. "suppressed", redis.sha1hex("suppress:" .. ARGV[i])) == 1 then
      return cjson.encode({customer_id = "", created = false, replayed = false, suppressed = true})
    end
  end
end
local candidate = ARGV[7]
local refs = {}
for i = 8, #ARGV do refs[#refs + 1] = ARGV[i] end

local owners, owner_of, linked, shared, refused = {}, {}, {}, {}, {}
for i, ref in ipairs(refs) do
  local row = redis.call("HMGET", KEYS[i], "owner", "shared")
  if row[2] == "1" then
    shared[ref] = row[1] and current_id(row[1]) or true
  elseif row[1] then
    local owner = row[1]
    owner_of[ref] = owner
    if not linked[owner] then
      linked[owner] = {}
      owners[#owners + 1] = owner
    end
    table.insert(linked[owner], ref)
  end
end
table.sort(owners, older)

-- The event's own strong ids come first: the first value of each strong type wins.
local group, group_strong, group_counts = {}, {}, {}
for _, ref in ipairs(refs) do
  local kind = kind_of(ref)
  if strong[kind] and not group_strong[kind] then group_strong[kind] = ref end
end

local accepted, refused_ids = {}, {}
for _, id in ipairs(owners) do
  local why = refusal(id, group, group_strong, group_counts)
  if why then
    refused[#refused + 1] = {customer_id = id, reason = why, identifiers = linked[id]}
    refused_ids[#refused_ids + 1] = id
  else
    absorb(id, group, group_strong, group_counts)
    accepted[#accepted + 1] = id
  end
end

local created, merges = false, {}
local survivor = accepted[1]
if not survivor then
  survivor = claim_id(candidate, op_id)
  start_customer(survivor, now_s, now_s)
  created = true
end
for i = 2, #accepted do
  merges[#merges + 1] = merge_into(survivor, accepted[i], "shared_identifier", nil, linked[accepted[i]])
end

-- Names follow the earliest event: an event older than the customer renames it after its own
-- candidate, so the final id does not depend on the order the events arrived in.
if not created and candidate ~= survivor then
  local first = seen_key(survivor)
  if now < first or (now == first and candidate < survivor) then
    local status = redis.call("HGET", ckey(candidate), "status")
    if not status or status == "merged" then
      local seen = redis.call("HMGET", ckey(survivor), "first_seen_ms", "last_seen_ms")
      start_customer(candidate, seen[1], seen[2])
      merges[#merges + 1] = merge_into(candidate, survivor, "earlier_event", nil, {})
      survivor = candidate
    end
  end
end

for i, ref in ipairs(refs) do
  local kind = kind_of(ref)
  if shared[ref] then
    if shared[ref] ~= true and shared[ref] ~= survivor then
      refused[#refused + 1] = {customer_id = shared[ref], reason = "shared_identifier", identifiers = {ref}}
    end
  elseif not owner_of[ref] then
    -- A second, different strong id of the event stays out of the graph, as does one beyond the limit.
    if strong[kind] and group_strong[kind] ~= ref then
      refused[#refused + 1] = {customer_id = "", reason = "conflicting_strong_id", identifiers = {ref}}
    elseif (group_counts[kind] or 0) >= limit_of(kind) then
      refused[#refused + 1] = {customer_id = "", reason = "type_limit", identifiers = {ref}}
    else
      group_counts[kind] = (group_counts[kind] or 0) + 1
      redis.call("HSET", KEYS[i], "owner", survivor, "first_ms", now_s, "last_ms", now_s)
      redis.call("SADD", mkey(survivor), ref)
    end
  end
  if not shared[ref] and redis.call("HGET", KEYS[i], "owner") == survivor then
    local seen = redis.call("HMGET", KEYS[i], "first_ms", "last_ms")
    if now < tonumber(seen[1]) then redis.call("HSET", KEYS[i], "first_ms", now_s) end
    if now > tonumber(seen[2]) then redis.call("HSET", KEYS[i], "last_ms", now_s) end
  end
end
stretch(survivor, now, now)

if #refused_ids > 0 then
  local ids = {survivor}
  for _, id in ipairs(refused_ids) do ids[#ids + 1] = id end
  for ref in pairs(owner_of) do note_seen_with(ref, ids) end
end

return remember({customer_id = survivor, created = created, replayed = false, merges = merges, refused = refused})
"""

# ARGV[6], ARGV[7]: the two customers; ARGV[8] reason; ARGV[9] score.
MERGE_BODY = r"""
local again = replayed()
if again then return again end
local a, b = current_id(ARGV[6]), current_id(ARGV[7])
local reason, score = ARGV[8], tonumber(ARGV[9])
if a == b then
  return remember({customer_id = a, created = false, replayed = false, merges = {}, refused = {}})
end
local survivor, merged = a, b
if older(b, a) then survivor, merged = b, a end
local group, group_strong, group_counts = {}, {}, {}
absorb(survivor, group, group_strong, group_counts)
local why = refusal(merged, group, group_strong, group_counts)
if why then
  return remember({customer_id = a, created = false, replayed = false, merges = {},
                   refused = {{customer_id = b, reason = why, identifiers = {}}}})
end
local merge = merge_into(survivor, merged, reason, score, {})
return remember({customer_id = survivor, created = false, replayed = false, merges = {merge}, refused = {}})
"""

# ARGV[6] customer; ARGV[7] new customer id candidate; ARGV[8] reason; refs to split off...
UNMERGE_BODY = r"""
local again = replayed()
if again then return again end
local from = current_id(ARGV[6])
if redis.call("HGET", ckey(from), "status") ~= "active" then
  return remember({error = "unknown_customer"})
end
local refs = {}
for i = 9, #ARGV do
  if redis.call("SISMEMBER", mkey(from), ARGV[i]) == 0 then
    return remember({error = "not_a_member", identifier = ARGV[i]})
  end
  refs[#refs + 1] = ARGV[i]
end
if #refs == 0 or #refs >= redis.call("SCARD", mkey(from)) then
  return remember({error = "must_leave_identifiers"})
end
local new_id = claim_id(ARGV[7], op_id)
local first, last
for _, ref in ipairs(refs) do
  local seen = redis.call("HMGET", ikey(ref), "first_ms", "last_ms")
  local f, l = tonumber(seen[1]), tonumber(seen[2])
  if f and (not first or f < first) then first = f end
  if l and (not last or l > last) then last = l end
end
start_customer(new_id, string.format("%d", first or now), string.format("%d", last or now))
for _, ref in ipairs(refs) do
  redis.call("SREM", mkey(from), ref)
  redis.call("SADD", mkey(new_id), ref)
  redis.call("HSET", ikey(ref), "owner", new_id)
end
redis.call("SADD", akey(from), new_id)
redis.call("SADD", akey(new_id), from)
local merge_id = "u_" .. string.sub(redis.sha1hex(from .. "|" .. new_id .. "|" .. op_id), 1, 24)
local entry = {merge_id = merge_id, kind = "unmerge", survivor_id = from, merged_id = new_id, reason = ARGV[8],
               at_ms = now, caused_by = op_id, identifiers = refs}
history(from, entry)
history(new_id, entry)
return remember({customer_id = from, created = true, replayed = false, refused = {},
                 merges = {{merge_id = merge_id, kind = "unmerge", survivor_id = from, merged_id = new_id,
                            reason = ARGV[8], identifiers = refs}}})
"""

# ARGV[6] customer (any id it ever had); ARGV[7] mode: "plan" puts the customer's identifiers on the
# suppression list and answers what an erasure takes; "erase" does that too, then deletes every graph
# entry of the customer and of the ids merged into it. Shared identifiers (used by many people) are
# deleted but never suppressed. Answers {found = false} for an unknown (or already erased) customer.
ERASE_BODY = r"""
local live = current_id(ARGV[6])
if redis.call("HGET", ckey(live), "status") ~= "active" then
  return cjson.encode({found = false})
end
local ids, merged_ids, seen = {live}, {}, {[live] = true}
-- Merges move the merged customer's history into the survivor's, so the live customer's history
-- names every id merged into it; an id reused since for a new customer is not current_id'd to it.
for _, text in ipairs(redis.call("LRANGE", hkey(live), 0, -1)) do
  local ok, entry = pcall(cjson.decode, text)
  if ok and type(entry) == "table" and entry["kind"] == "merge" then
    local m = entry["merged_id"]
    if type(m) == "string" and not seen[m] and redis.call("HGET", ckey(m), "status") == "merged"
        and current_id(m) == live then
      seen[m] = true
      ids[#ids + 1] = m
      merged_ids[#merged_ids + 1] = m
    end
  end
end
local refs = redis.call("SMEMBERS", mkey(live))
local suppressed = 0
for _, ref in ipairs(refs) do
  if redis.call("HGET", ikey(ref), "shared") ~= "1" then
    redis.call("SADD", prefix .. "suppressed", redis.sha1hex("suppress:" .. ref))
    suppressed = suppressed + 1
  end
end
redis.call("INCR", prefix .. "suppressed:version")
if ARGV[7] == "erase" then
  for _, ref in ipairs(refs) do redis.call("DEL", ikey(ref), wkey(ref)) end
  for _, id in ipairs(ids) do
    for _, other in ipairs(redis.call("SMEMBERS", akey(id))) do
      -- An operator split: the other customer stays, but forgets this one.
      redis.call("SREM", akey(other), id)
      local kept, changed = {}, false
      for _, text in ipairs(redis.call("LRANGE", hkey(other), 0, -1)) do
        if string.find(text, id, 1, true) then changed = true else kept[#kept + 1] = text end
      end
      if changed then
        redis.call("DEL", hkey(other))
        if #kept > 0 then redis.call("RPUSH", hkey(other), unpack(kept)) end
      end
    end
    -- person:<id> is where matching kept attributes before match:person:<id>; still erased.
    redis.call("DEL", ckey(id), mkey(id), hkey(id), akey(id), prefix .. "person:" .. id,
               prefix .. "match:person:" .. id, prefix .. "match:possible:" .. id)
  end
end
return cjson.encode({found = true, customer_id = live, merged_ids = merged_ids, identifiers = refs,
                     suppressed = suppressed})
"""

# The person index keeps few, large keys so that a batch costs a handful of Redis calls
# rather than a few per record: blocks are fields of 16 hashes (by the digest's first hex
# digit), a block's value its customer ids separated by spaces; a customer's records are
# one string, the records' JSON arrays separated by newlines (JSON never holds a raw one).
MATCH_PRELUDE = r"""
local prefix = ARGV[1]
local max_block = tonumber(ARGV[2])
local cursor = 2
local function take()
  cursor = cursor + 1
  return ARGV[cursor]
end
-- Lua's unpack takes at most ~8000 values: call with many arguments in chunks.
local function call_chunked(command, key, items, per_item)
  local answers, chunk = {}, math.floor(4000 / per_item) * per_item
  for first = 1, #items, chunk do
    local last = math.min(first + chunk - 1, #items)
    local part = key and redis.call(command, key, unpack(items, first, last))
                      or redis.call(command, unpack(items, first, last))
    if type(part) == "table" then
      for _, value in ipairs(part) do answers[#answers + 1] = value end
    end
  end
  return answers
end
local bucket_keys = {}
local function bucket_key(digest)
  local digit = string.sub(digest, 1, 1)
  local key = bucket_keys[digit]
  if not key then
    key = prefix .. "match:blocks:" .. digit
    bucket_keys[digit] = key
  end
  return key
end
-- Current values of the blocks named by `digests` (a set), as digest -> value or false.
local function read_blocks(digests)
  local by_bucket, values = {}, {}
  for digest in pairs(digests) do
    local key = bucket_key(digest)
    local names = by_bucket[key]
    if not names then
      names = {}
      by_bucket[key] = names
    end
    names[#names + 1] = digest
  end
  for key, names in pairs(by_bucket) do
    local found = call_chunked("HMGET", key, names, 1)
    for n, digest in ipairs(names) do values[digest] = found[n] end
  end
  return values, by_bucket
end
-- A block that grew past max_block members is replaced by FULL: it is never compared again, and
-- its ids are no use to keep.
local FULL = "*"
"""

# KEYS[1]: match:model (it routes the call on Redis Cluster; every key shares its hash tag).
# Runs right after the resolve script calls of the same records, so it reads their answers:
# ARGV[1] prefix, [2] largest block compared, [3] most records kept per customer, then per
# record: its event's op id, its record JSON, the number of its blocking key digests, the digests.
# For each record whose event created its customer (no identifier anchored it), finds the stored
# records sharing a block; then indexes every record under its customer (a suppressed event has
# no answer and is skipped). Candidates are read before any record of the call is indexed.
# Answers the model state JSON (or nil), the records and pairs counters, the pending pairs' count,
# and one string: per
# record (separated by ASCII RS, \30) its fields separated by ASCII US (\31): customer id ("" if
# skipped), 1 if created else 0, then per candidate the customer it lives on now and its records
# (JSON arrays, one per line). JSON escapes control characters, so neither separator occurs in it.
MATCH_EXCHANGE_SCRIPT = MATCH_PRELUDE + r"""
local max_records = tonumber(ARGV[3])
cursor = 3
local state = redis.call("MGET", KEYS[1], prefix .. "match:records", prefix .. "match:pairs")
local waiting = redis.call("LLEN", prefix .. "match:pending")
local records, digests = {}, {}
while cursor < #ARGV do
  local op_id, slot, record, n = take(), take(), take(), tonumber(take())
  local own = {}
  for _ = 1, n do
    local digest = take()
    own[#own + 1] = digest
    digests[digest] = true
  end
  -- The event's answer, just written by the resolve call before this one (see the prelude's set_slot).
  local answer = nil
  if slot ~= "" then
    local partition, offset = string.match(slot, "^(.*):([^:]*)$")
    answer = redis.call("HGET", prefix .. "answers:" .. partition, offset)
  end
  if not answer then answer = redis.call("GET", prefix .. "event:" .. op_id) end
  local entry = {record = record, digests = own, id = "", created = false}
  if answer then
    entry.id = string.match(answer, '"customer_id":"([^"]*)"') or ""
    entry.created = string.find(answer, '"created":true', 1, true) ~= nil
  end
  records[#records + 1] = entry
end

local values, by_bucket = read_blocks(digests)
local ids_of, none = {}, {}
local function ids(digest)
  local found = ids_of[digest]
  if found then return found end
  local value = values[digest]
  -- A key shared by more than max_block customers says too little to compare them all.
  if not value or value == FULL then
    found = none
  elseif not string.find(value, " ", 1, true) then
    found = {value}  -- most blocks hold one customer
  else
    found = {}
    for id in string.gmatch(value, "%S+") do found[#found + 1] = id end
  end
  ids_of[digest] = found
  return found
end
local wanted, person_list = {}, {}
local function want(id)
  if not wanted[id] then
    wanted[id] = true
    person_list[#person_list + 1] = prefix .. "match:person:" .. id
  end
end
for _, entry in ipairs(records) do
  entry.candidates = {}
  if entry.created then
    local seen = {}
    for _, digest in ipairs(entry.digests) do
      for _, id in ipairs(ids(digest)) do
        if not seen[id] and id ~= entry.id then
          seen[id] = true
          entry.candidates[#entry.candidates + 1] = id
          want(id)
        end
      end
    end
  end
  if entry.id ~= "" then want(entry.id) end
end

-- Index: each record's customer joins its blocks, its record joins the customer's records.
local changed = {}
for _, entry in ipairs(records) do
  if entry.id ~= "" then
    for _, digest in ipairs(entry.digests) do
      local value = values[digest]
      if not value then
        values[digest] = entry.id
        changed[digest] = true
      elseif value ~= FULL and not string.find(value, entry.id, 1, true) then
        local _, spaces = string.gsub(value, " ", " ")
        values[digest] = spaces + 1 >= max_block and FULL or (value .. " " .. entry.id)
        changed[digest] = true
      end
    end
  end
end
for key, names in pairs(by_bucket) do
  local to_set = {}
  for _, digest in ipairs(names) do
    if changed[digest] then
      to_set[#to_set + 1] = digest
      to_set[#to_set + 1] = values[digest]
    end
  end
  if #to_set > 0 then call_chunked("HSET", key, to_set, 2) end
end

local before, blobs = {}, {}
local found = call_chunked("MGET", nil, person_list, 1)
for n, key in ipairs(person_list) do
  before[key] = found[n]
  blobs[key] = found[n]
end
local person_changed = {}
for _, entry in ipairs(records) do
  if entry.id ~= "" then
    local key = prefix .. "match:person:" .. entry.id
    local blob = blobs[key]
    if not blob then
      blobs[key] = entry.record
      person_changed[key] = true
    elseif not string.find(blob, entry.record, 1, true) then
      local _, lines = string.gsub(blob, "\n", "")
      if lines + 1 < max_records then
        blobs[key] = blob .. "\n" .. entry.record
        person_changed[key] = true
      end
    end
  end
end
local to_set = {}
for key in pairs(person_changed) do
  to_set[#to_set + 1] = key
  to_set[#to_set + 1] = blobs[key]
end
if #to_set > 0 then call_chunked("MSET", nil, to_set, 2) end

-- Candidates are named by the customer they live on now (merges since they were indexed).
local live_of = {}
local function live(id)
  local found = live_of[id]
  if found then return found end
  found = id
  for _ = 1, 64 do
    local into = redis.call("HGET", prefix .. "customer:" .. found, "merged_into")
    if not into then break end
    found = into
  end
  live_of[id] = found
  return found
end
-- One string, not nested arrays: the client reads a bulk string at once and splits it in C.
local parts = {}
for _, entry in ipairs(records) do
  local fields = {entry.id, entry.created and "1" or "0"}
  for _, id in ipairs(entry.candidates) do
    local blob = before[prefix .. "match:person:" .. id]
    if blob then
      fields[#fields + 1] = live(id)
      fields[#fields + 1] = blob
    end
  end
  parts[#parts + 1] = table.concat(fields, "\31")
end
return {state[1], tonumber(state[2] or "0"), tonumber(state[3] or "0"), waiting, table.concat(parts, "\30")}
"""

# KEYS[1]: match:model. What a batch's matching leaves once decided: ARGV[1] prefix, [2] review
# list length, [3] pattern chunk, [4] records matched, [5] pairs compared, [6] most pending pairs
# kept, [7] "1" to drop the pending pairs first (they were just decided), [8] the model state
# JSON to store ("" to leave it), then three sections, each led by its count:
#   patterns:  pattern, count
#   possible:  customer id, other customer id, entry JSON
#   pending:   pair JSON (compared while no model was usable, decided by the first usable one)
MATCH_FINISH_SCRIPT = r"""
local prefix, review_length = ARGV[1], tonumber(ARGV[2])
local cursor = 8
local function take()
  cursor = cursor + 1
  return ARGV[cursor]
end
local pending = prefix .. "match:pending"
if ARGV[7] == "1" then redis.call("DEL", pending) end
if ARGV[8] ~= "" then redis.call("SET", KEYS[1], ARGV[8]) end
local patterns = prefix .. "match:patterns:" .. ARGV[3]
for _ = 1, tonumber(take()) do
  local pattern, count = take(), take()
  redis.call("HINCRBY", patterns, pattern, count)
end
for _ = 1, tonumber(take()) do
  local id, other, entry = take(), take(), take()
  redis.call("HSET", prefix .. "match:possible:" .. id, other, entry)
  redis.call("HSET", prefix .. "match:possible:" .. other, id, entry)
  redis.call("LPUSH", prefix .. "match:review", entry)
end
redis.call("LTRIM", prefix .. "match:review", 0, review_length - 1)
local waiting = tonumber(take())
if waiting > 0 then
  for _ = 1, waiting do redis.call("RPUSH", pending, take()) end
  redis.call("LTRIM", pending, -tonumber(ARGV[6]), -1)
end
redis.call("INCRBY", prefix .. "match:pairs", ARGV[5])
return redis.call("INCRBY", prefix .. "match:records", ARGV[4])
"""

# KEYS[1]: a match:blocks:<hex digit> hash. ARGV[1] the number of customer ids, the ids, then the
# fields (block digests) to take them out of. Reads each block again, so a member the index
# script added meanwhile is kept. Answers the number of blocks changed.
MATCH_FORGET_SCRIPT = r"""
local gone = {}
local n = tonumber(ARGV[1])
for i = 2, n + 1 do gone[ARGV[i]] = true end
local changed = 0
for i = n + 2, #ARGV do
  local value = redis.call("HGET", KEYS[1], ARGV[i])
  if value then
    local kept = {}
    for id in string.gmatch(value, "%S+") do
      if not gone[id] then kept[#kept + 1] = id end
    end
    if #kept == 0 then
      redis.call("HDEL", KEYS[1], ARGV[i])
      changed = changed + 1
    elseif #kept < select(2, string.gsub(value, " ", "")) + 1 then
      redis.call("HSET", KEYS[1], ARGV[i], table.concat(kept, " "))
      changed = changed + 1
    end
  end
end
return changed
"""

# Drop the answers of committed records. KEYS[1] routes the call (the graph's hash slot). ARGV[1] prefix,
# then per partition "<topic>:<partition>" and its committed offset: every answer below it goes (a
# worker killed between its commit and this call left some; the next call takes them too).
ANSWERS_FORGET_SCRIPT = r"""
local prefix, n = ARGV[1], 0
for i = 2, #ARGV, 2 do
  local key, committed = prefix .. "answers:" .. ARGV[i], tonumber(ARGV[i + 1])
  local gone = {}
  for _, offset in ipairs(redis.call("HKEYS", key)) do
    if tonumber(offset) < committed then gone[#gone + 1] = offset end
  end
  for j = 1, #gone, 1000 do redis.call("HDEL", key, unpack(gone, j, math.min(j + 999, #gone))) end
  n = n + #gone
end
return n
"""

RESOLVE_SCRIPT = PRELUDE + RESOLVE_BODY
MERGE_SCRIPT = PRELUDE + MERGE_BODY
UNMERGE_SCRIPT = PRELUDE + UNMERGE_BODY
ERASE_SCRIPT = PRELUDE + ERASE_BODY


def script_for_many(body: str) -> str:
    """Return a script running `body` (after the prelude) once per operation of a call, in order.

    Each operation runs exactly as the one-operation script would, with its own KEYS and ARGV:
    one call and one answer for a chunk of operations instead of one per operation. KEYS: every
    operation's keys, in order. ARGV[1] prefix, [2] rules, [3] and [4] unused, [5] ttl_s, then per
    operation: op id, time_ms, its number of KEYS, its number of own ARGV (those after the five
    common ones), its own ARGV. Answers the operations' answers (JSON) separated by ASCII RS (\\30).
    """
    return PRELUDE + """
local function run_one(KEYS, ARGV)
""" + body + r"""
end
local answers = {}
local key_at, cursor = 0, 5
while cursor < #ARGV do
  local operation, time_ms = ARGV[cursor + 1], ARGV[cursor + 2]
  local key_count, arg_count = tonumber(ARGV[cursor + 3]), tonumber(ARGV[cursor + 4])
  local keys, argv = {}, {prefix, ARGV[2], operation, time_ms, ttl}
  for i = 1, key_count do keys[i] = KEYS[key_at + i] end
  for i = 1, arg_count do argv[5 + i] = ARGV[cursor + 4 + i] end
  key_at = key_at + key_count
  cursor = cursor + 4 + arg_count
  -- The prelude's functions read the operation's id and time from these.
  op_id, now_s, now = operation, time_ms, tonumber(time_ms)
  answers[#answers + 1] = run_one(keys, argv)
end
return table.concat(answers, "\30")
"""


# The matching path resolves a chunk's events, and makes a chunk's merges, in one call each.
RESOLVE_MANY_SCRIPT = script_for_many(RESOLVE_BODY)
MERGE_MANY_SCRIPT = script_for_many(MERGE_BODY)


def script_sha(script: str) -> str:
    """Return the SHA1 Redis names a script by."""
    return hashlib.sha1(script.encode()).hexdigest()
