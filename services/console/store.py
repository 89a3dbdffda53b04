"""The console's read model in Redis: written per batch from the topics, read by the pages.

Key layout (prefix `ts:console:` by default):

    c:{<customer id>}        one hash per customer, its fields in entries.py; expires after
                             TOUCHSTREAM_CONSOLE_CUSTOMER_TTL_DAYS without a record about it. A merged-away
                             id's hash keeps only `into` (the survivor), so late records follow the merge.
    customers                set of the customer ids seen (the count on the overview)
    merged_into              hash merged-away id -> survivor (an erasure finds every id merged into a customer)
    mentions                 hash id -> customers whose split entries (m:) name it, for an erasure to clear
    clock                    sorted set, "event_time" -> the newest event time applied (closes attribution windows),
                             at most the wall clock plus the event-time tolerance
    erased                   erased customers' tokens (touchstream.privacy.ErasedCustomers): records about them
                             (in flight during the erasure, or read again) never stay in the read model
    {seg}                    hash customer id -> "event time|segment|stage" of its newest explained score
    {seg}:counts             hash "segment|stage" -> customers (the overview never scans customers)
    {seg}:flow:<day>         hash "from>to" -> changes that day (event-time days since 1970), kept FLOW_KEEP_DAYS;
                             {seg}:days lists the newest days seen
    {val}                    hash customer id -> "event time|value tier|predicted value in cents" of its newest score
                             with a predicted value
    {val}:counts, :cents     hashes value tier -> customers, -> their predicted value in cents (integers: sums
                             that never drift)
    rules                    set of rule ids seen; rule:{<rule id>} set of the customers with an action of it
                             (each customer's tally of the rule is in its own hash); rules:version counts
                             the batches that touched a tally (the live rules page's change marker)
    dl:<stage>:<reason>      set of dead-letter digests (the count); dlreasons lists those keys
    backtest                 the latest rule backtest report sent to the console (backtests.BacktestResult, JSON)
    pipeline:minutes         hash epoch minute -> the pipeline's sample of that minute (charts.PipelineSample),
                             the last HISTORY_MINUTES: a ring buffer, written by the sampler every few seconds

Every write is idempotent (entries keyed by message, action or merge id; tallies and counts only
move when an entry is new or newer), so a batch handled twice changes nothing. A batch is one round
trip: a script call per customer (all its records at once, in its own hash slot, so Redis Cluster
works) and one command per shared key. Only records for an id merged away meanwhile take another.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from services.console.backtests import BacktestResult
from services.console.charts import HISTORY_MINUTES, PipelineSample
from services.console.entries import (
    ACTIONS_CAP,
    PURCHASES_CAP,
    SCORE_HISTORY_CAP,
    TALLY_DAYS_KEPT,
    TIMELINE_CAP,
    CustomerView,
    ValueEstimate,
    ValueTier,
    action_value,
    as_text,
    customer_view,
    delivery_value,
    latest_score_values,
    parse_rule_tally,
    purchase_times,
    score_point_value,
    sum_tallies,
    tally_day_field,
    tally_field,
    touchpoint_value,
    value_estimate,
    value_field,
    value_tier_entry,
)
from services.console.readmodel import (
    ActionTaken,
    CustomerDeleted,
    CustomersMerged,
    DeadLettered,
    DeliveryEnded,
    ScoreUpdated,
    TouchpointSeen,
    converted_within,
    follow_merges,
)
from touchstream.eventtime import DAY_MS, DAY_S, DEFAULT_EVENT_TIME_TOLERANCE_S, event_time_ceiling_ms
from touchstream.privacy import DEFAULT_ERASED_TTL_S, DELETED_RULE_ID, ErasedCustomers, erased_token

Update = TouchpointSeen | ScoreUpdated | ActionTaken | CustomersMerged | DeadLettered | CustomerDeleted | DeliveryEnded
# The overview shows the flow of the last 30 days; a day's counts outlive it a little.
FLOW_KEEP_DAYS = 35
DEFAULT_CUSTOMER_TTL_S = 400 * DAY_S
# A capped list is trimmed back to its cap once it is this much over: a trim reads the hash, so not on every add.
TRIM_SLACK = 20
MAX_MERGE_HOPS = 64
_COUNTERS = (b"into", b"n:t", b"n:s", b"n:a", b"v")

# Shared by the scripts below; runs on one customer's hash, KEYS[1]. ARGV starts with the TTL, the trim
# slack, the purchase cap, the caps of touchpoints, score points and actions, and the days a tally keeps.
_PRELUDE = """
local key = KEYS[1]
local ttl, slack, purchase_cap = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local caps = {t = tonumber(ARGV[4]), s = tonumber(ARGV[5]), a = tonumber(ARGV[6])}
local days_kept = tonumber(ARGV[7])
local added = {t = 0, s = 0, a = 0}
local changed = false
local tallies = {}
local purchases = nil

local function time_of(value) return tonumber(string.match(value, '^%[(%-?%d+)')) end

local function tally(rule)
  local found = tallies[rule]
  if found then return found end
  found = {}
  local text = redis.call('HGET', key, 'r:' .. rule)
  if text then for name, value in string.gmatch(text, '([^;=]+)=([^;]*)') do found[name] = value end end
  tallies[rule] = found
  return found
end
local function bump(counts, name, by) counts[name] = tostring((tonumber(counts[name]) or 0) + by) end
local function earliest(counts, name, at)
  if not counts[name] or tonumber(at) < tonumber(counts[name]) then counts[name] = at end
end

local function add_entry(kind, id, value)
  if redis.call('HSETNX', key, kind .. ':' .. id, value) == 0 then return false end
  added[kind] = added[kind] + 1
  changed = true
  return true
end
local function set_channel(channel, at)
  local seen = redis.call('HGET', key, 'ch:' .. channel)
  if not seen or tonumber(seen) < tonumber(at) then redis.call('HSET', key, 'ch:' .. channel, at) end
end
local function add_purchase(at)
  if not purchases then
    purchases = {}
    local text = redis.call('HGET', key, 'pu')
    if text then for seen in string.gmatch(text, '[^,]+') do purchases[seen] = true end end
  end
  purchases[at] = true
end
-- The newest explained score's segment, model and reasons; an older one arriving late changes nothing.
local function set_latest(seg, model, why)
  local current = redis.call('HGET', key, 'seg')
  if current and time_of(current) > time_of(seg) then return end
  if current ~= seg then changed = true end
  local fields, stale = {'seg', seg, 'mv', model}, {}
  for n, reason in ipairs(why) do fields[#fields + 1] = 'why:' .. (n - 1); fields[#fields + 1] = reason end
  -- A customer's first explained score has no older reasons to drop.
  if current then for n = #why, 9 do stale[#stale + 1] = 'why:' .. n end end
  redis.call('HSET', key, unpack(fields))
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
end
-- The newest predicted value ([time, ...]); an older one arriving late changes nothing.
local function set_value(value)
  local current = redis.call('HGET', key, 'val')
  if current and time_of(current) > time_of(value) then return end
  if current ~= value then
    changed = true
    redis.call('HSET', key, 'val', value)
  end
end
-- How an action's delivery ended; counted once per action (a replay repeats the same outcome).
local function set_delivery(id, value, rule)
  local current = redis.call('HGET', key, 'd:' .. id)
  local outcome = string.sub(value, 2, 2)
  if current and string.sub(current, 2, 2) == outcome then return end
  local counts = tally(rule)
  if current then bump(counts, string.sub(current, 2, 2) == '1' and 'd' or 'x', -1) end
  bump(counts, outcome == '1' and 'd' or 'x', 1)
  redis.call('HSET', key, 'd:' .. id, value)
  changed = true
end

local function trim(kind)
  local everything = redis.call('HGETALL', key)
  local entries = {}
  local prefix = kind .. ':'
  for n = 1, #everything, 2 do
    if string.sub(everything[n], 1, #prefix) == prefix then
      entries[#entries + 1] = {time_of(everything[n + 1]), everything[n]}
    end
  end
  table.sort(entries, function(x, y) if x[1] ~= y[1] then return x[1] < y[1] end return x[2] < y[2] end)
  local drop = math.max(0, #entries - caps[kind])
  local gone = {}
  for n = 1, drop do gone[#gone + 1] = entries[n][2] end
  if kind == 'a' then
    -- A dropped action's delivery goes with it, and so does one whose action is gone already.
    local kept = {}
    for n = drop + 1, #entries do kept[string.sub(entries[n][2], 3)] = true end
    for n = 1, #everything, 2 do
      local name = everything[n]
      if string.sub(name, 1, 2) == 'd:' and not kept[string.sub(name, 3)] then gone[#gone + 1] = name end
    end
  end
  if #gone > 0 then redis.call('HDEL', key, unpack(gone)) end
  redis.call('HSET', key, 'n:' .. kind, #entries - drop)
end

-- Trim, write the purchases and tallies touched, bump the change counter, refresh the TTL.
local function finish()
  for kind, n in pairs(added) do
    if n > 0 and redis.call('HINCRBY', key, 'n:' .. kind, n) > caps[kind] + slack then trim(kind) end
  end
  if purchases then
    local times = {}
    for at in pairs(purchases) do times[#times + 1] = at end
    table.sort(times, function(x, y) return tonumber(x) < tonumber(y) end)
    local kept = {}
    for n = math.max(1, #times - purchase_cap + 1), #times do kept[#kept + 1] = times[n] end
    redis.call('HSET', key, 'pu', table.concat(kept, ','))
  end
  for rule, counts in pairs(tallies) do
    -- Per-day parts (@<day><outcome>) older than days_kept before the newest one go.
    local newest = nil
    for name in pairs(counts) do
      local day = tonumber(string.match(name, '^@(%-?%d+)'))
      if day and (not newest or day > newest) then newest = day end
    end
    local names = {}
    for name in pairs(counts) do
      local day = tonumber(string.match(name, '^@(%-?%d+)'))
      if not day or day >= newest - days_kept then names[#names + 1] = name end
    end
    table.sort(names)
    local parts = {}
    for _, name in ipairs(names) do parts[#parts + 1] = name .. '=' .. counts[name] end
    redis.call('HSET', key, 'r:' .. rule, table.concat(parts, ';'))
  end
  if changed then redis.call('HINCRBY', key, 'v', 1) end
  redis.call('EXPIRE', key, ttl)
  return false
end
"""

# Apply one batch's records about one customer. After the seven settings, ops follow, each a letter and
# its arguments:
#   T id time value purchase(0|1) channel     a touchpoint
#   S id point seg model n why1..whyn          a score point; seg '' for one without a segment
#   A id time value rule tally-field group day-field
#                                              an action; group T (treated), H (hold-out) or ''; day-field its
#                                              per-day tally counter (@<day><outcome>)
#   D id value rule                            how an action's delivery ended
#   V value                                    a score's predicted value (the `val` field, event time first)
#   M merge-id entry                           a merge or split involving the customer
# A merged-away id answers with its survivor and changes nothing: the caller sends the ops there.
_APPLY = _PRELUDE + """
local into = redis.call('HGET', key, 'into')
if into then return into end
local i = 8
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'T' then
    add_entry('t', ARGV[i + 1], ARGV[i + 3])
    set_channel(ARGV[i + 5], ARGV[i + 2])
    if ARGV[i + 4] == '1' then add_purchase(ARGV[i + 2]) end
    i = i + 6
  elseif op == 'S' then
    local n = tonumber(ARGV[i + 5])
    add_entry('s', ARGV[i + 1], ARGV[i + 2])
    if ARGV[i + 3] ~= '' then
      local why = {}
      for r = 1, n do why[r] = ARGV[i + 5 + r] end
      set_latest(ARGV[i + 3], ARGV[i + 4], why)
    end
    i = i + 6 + n
  elseif op == 'A' then
    if add_entry('a', ARGV[i + 1], ARGV[i + 3]) then
      local counts = tally(ARGV[i + 4])
      bump(counts, ARGV[i + 5], 1)
      if ARGV[i + 6] ~= '' then earliest(counts, ARGV[i + 6], ARGV[i + 2]) end
      bump(counts, ARGV[i + 7], 1)
    end
    i = i + 8
  elseif op == 'D' then
    set_delivery(ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  elseif op == 'V' then
    set_value(ARGV[i + 1])
    i = i + 2
  elseif op == 'M' then
    if redis.call('HSETNX', key, 'm:' .. ARGV[i + 1], ARGV[i + 2]) == 1 then changed = true end
    i = i + 3
  else
    return redis.error_reply('read model: unknown op ' .. tostring(op))
  end
end
return finish()
"""

# Take a merged customer's fields (ARGV[10]..: name, value pairs) into the survivor's hash, once per merge
# id (ARGV[8], its entry ARGV[9]): entries the survivor lacks, the newer segment, channels and purchases,
# tallies added up (per-day counts too). A replay finds the merge entry and changes nothing.
_ABSORB = _PRELUDE + """
local into = redis.call('HGET', key, 'into')
if into then return into end
if redis.call('HSETNX', key, 'm:' .. ARGV[8], ARGV[9]) == 0 then return false end
changed = true
local seg, model, why = nil, '', {}
for n = 10, #ARGV, 2 do
  local name, value = ARGV[n], ARGV[n + 1]
  local kind, rest = string.match(name, '^(%a+):(.*)$')
  if kind == 't' or kind == 's' or kind == 'a' then add_entry(kind, rest, value)
  elseif kind == 'd' or kind == 'm' then redis.call('HSETNX', key, name, value)
  elseif kind == 'ch' then set_channel(rest, value)
  elseif kind == 'why' then why[tonumber(rest) + 1] = value
  elseif kind == 'r' then
    local counts = tally(rest)
    for part, count in string.gmatch(value, '([^;=]+)=([^;]*)') do
      if part == 'T' or part == 'H' then earliest(counts, part, count) else bump(counts, part, tonumber(count)) end
    end
  elseif name == 'seg' then seg = value
  elseif name == 'mv' then model = value
  elseif name == 'val' then set_value(value)
  elseif name == 'pu' then for at in string.gmatch(value, '[^,]+') do add_purchase(at) end
  end
end
if seg then set_latest(seg, model, why) end
return finish()
"""

# A merged-away customer's hash becomes a redirect to the survivor (ARGV[1]), with the customer TTL (ARGV[2]).
_MARK_MERGED = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'into', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# Keeps KEYS[1], a hash customer -> "event time|value", at each customer's newest value: ARGV from `first`
# holds (customer, event time, value, ...) records of `step` items; an empty value drops the customer. A value
# older than the one kept changes nothing, and `on_change(old, new, n)` (old false for a first value, new nil
# for a drop; n the record's ARGV index) is called only when the kept value changes: a replay is harmless.
_NEWEST_PER_CUSTOMER = """
local function keep_newest(first, step, on_change)
  local customers, current = {}, {}
  for n = first, #ARGV, step do customers[#customers + 1] = ARGV[n] end
  if #customers == 0 then return end
  local found = redis.call('HMGET', KEYS[1], unpack(customers))
  for n, customer in ipairs(customers) do current[customer] = found[n] end
  local writes, gone = {}, {}
  for n = first, #ARGV, step do
    local customer, at, value = ARGV[n], ARGV[n + 1], ARGV[n + 2]
    local stored = current[customer]
    local old, newer = false, true
    if stored then
      local t, v = string.match(stored, '^(%d+)|(.*)$')
      old, newer = v, tonumber(t) <= tonumber(at)
    end
    if value == '' then
      if old then
        on_change(old, nil, n)
        gone[#gone + 1] = customer
        current[customer] = false
      end
    elseif newer then
      current[customer] = at .. '|' .. value
      writes[#writes + 1] = customer
      writes[#writes + 1] = current[customer]
      if old ~= value then on_change(old, value, n) end
    end
  end
  if #writes > 0 then redis.call('HSET', KEYS[1], unpack(writes)) end
  if #gone > 0 then redis.call('HDEL', KEYS[1], unpack(gone)) end
end
"""

# Segment counts (all keys in the {seg} slot): KEYS[1] customer -> "time|segment|stage", KEYS[2] counts,
# KEYS[3] the days seen, KEYS[4..] flow keys of days. ARGV: flow TTL, days kept, then (customer, event time,
# "segment|stage", flow key index, day) quintuples; an empty value drops the customer.
_SET_SEGMENTS = _NEWEST_PER_CUSTOMER + """
-- Counted up here and written once per value, flow change and day.
local counts, flows, days = {}, {}, {}
local function count(value, by) counts[value] = (counts[value] or 0) + by end
keep_newest(3, 5, function(old, value, n)
  if old then count(old, -1) end
  if not value then return end
  count(value, 1)
  local flow = KEYS[tonumber(ARGV[n + 3])]
  flows[flow] = flows[flow] or {}
  local change = (old or '') .. '>' .. value
  flows[flow][change] = (flows[flow][change] or 0) + 1
  days[flow] = ARGV[n + 4]
end)
for value, by in pairs(counts) do if by ~= 0 then redis.call('HINCRBY', KEYS[2], value, by) end end
for flow, changes in pairs(flows) do
  for change, by in pairs(changes) do redis.call('HINCRBY', flow, change, by) end
  redis.call('EXPIRE', flow, ARGV[1])
  redis.call('ZADD', KEYS[3], days[flow], days[flow])
end
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -tonumber(ARGV[2]) - 1)
return 0
"""

# Value tiers (all keys in the {val} slot): KEYS[1] customer -> "time|tier|cents", KEYS[2] tier -> customers,
# KEYS[3] tier -> cents. ARGV: (customer, event time, "tier|cents") triples; an empty value drops the customer.
_SET_VALUES = _NEWEST_PER_CUSTOMER + """
local counts, cents = {}, {}
local function count(value, by)
  local tier, amount = string.match(value, '^(%d+)|(%-?%d+)$')
  counts[tier] = (counts[tier] or 0) + by
  cents[tier] = (cents[tier] or 0) + by * tonumber(amount)
end
keep_newest(1, 3, function(old, value)
  if old then count(old, -1) end
  if value then count(value, 1) end
end)
for tier, by in pairs(counts) do if by ~= 0 then redis.call('HINCRBY', KEYS[2], tier, by) end end
for tier, by in pairs(cents) do if by ~= 0 then redis.call('HINCRBY', KEYS[3], tier, by) end end
return 0
"""


def _customers_named(update: Update) -> set[str]:
    """The customer ids a read-model update writes about (none for a deletion or a dead letter)."""
    if isinstance(update, CustomerDeleted | DeadLettered):
        return set()
    if isinstance(update, CustomersMerged):
        return {update.survivor_id, update.merged_id}
    return {update.customer_id}


def _deletion_notice(update: Update) -> bool:
    """A `customer.deleted` webhook (triggers tells marketing about an erasure): never read-modelled."""
    return isinstance(update, ActionTaken | DeliveryEnded) and update.rule_id == DELETED_RULE_ID


@dataclass(frozen=True)
class RuleCounts:
    rule_id: str
    counts: dict[str, int]
    treated_at: dict[str, int]
    holdout_at: dict[str, int]
    delivered: int = 0
    delivery_failed: int = 0
    # Event-time day (days since 1970) -> outcome (fired, held_out, suppressed, backfill) -> actions.
    by_day: dict[int, dict[str, int]] = field(default_factory=dict)


@dataclass
class _Batch:
    """A batch's writes: each customer's ops (one script call each) and the shared keys' (one command each)."""

    ops: dict[str, list[Any]] = field(default_factory=dict)
    active: set[str] = field(default_factory=set)  # customers with an event, score or action in the batch
    newest_ms: int | None = None
    segments: dict[str, tuple[int, str]] = field(default_factory=dict)  # customer -> newest (time, "segment|stage")
    values: dict[str, tuple[int, str]] = field(default_factory=dict)  # customer -> newest (time, "tier|cents")
    rule_customers: dict[str, set[str]] = field(default_factory=dict)  # rule -> customers with its actions
    dead_letters: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (stage, reason) -> digests

    def add(self, customer_id: str, *args: Any) -> None:
        self.ops.setdefault(customer_id, []).extend(args)

    def saw(self, customer_id: str, time_ms: int) -> None:
        self.active.add(customer_id)
        self.newest_ms = time_ms if self.newest_ms is None else max(self.newest_ms, time_ms)

    def scored(self, customer_id: str, time_ms: int, segment: str, stage: str) -> None:
        latest = self.segments.get(customer_id)
        if latest is None or latest[0] <= time_ms:
            self.segments[customer_id] = (time_ms, f"{segment}|{stage}")

    def valued(self, customer_id: str, time_ms: int, tier_entry: str) -> None:
        latest = self.values.get(customer_id)
        if latest is None or latest[0] <= time_ms:
            self.values[customer_id] = (time_ms, tier_entry)

    def acted(self, customer_id: str, rule_id: str) -> None:
        self.rule_customers.setdefault(rule_id, set()).add(customer_id)

    def moved(self, redirects: dict[str, str]) -> _Batch:
        """The shared writes of this batch that named merged-away customers, undone and redone for the survivors."""
        fix = _Batch()
        for cid, lives in redirects.items():
            if cid in self.active:
                fix.active.add(lives)
            if cid in self.segments:
                fix.segments[cid] = (0, "")
                fix.segments[lives] = self.segments[cid]
            if cid in self.values:
                fix.values[cid] = (0, "")
                fix.values[lives] = self.values[cid]
            for rule, customers in self.rule_customers.items():
                if cid in customers:
                    fix.acted(lives, rule)
        return fix

    @property
    def empty(self) -> bool:
        return not (self.ops or self.dead_letters)


class ReadModel(Protocol):
    """The console's read model as its worker and pages use it: `ReadModelStore` on Redis; an in-memory
    fake in tests/unit/console/fakes.py runs the same contract tests (tests/integration/test_console_store.py
    runs each against both) and lets the pages' logic be tested without Redis."""

    async def apply(self, updates: Sequence[Update]) -> int: ...

    async def forget(self, customer_id: str) -> list[str]: ...

    async def customer(self, customer_id: str, timeline_limit: int = TIMELINE_CAP) -> CustomerView: ...

    async def change_marker(self, customer_id: str) -> str: ...

    async def segments(self) -> dict[tuple[str, str], int]: ...

    async def value_tiers(self) -> list[ValueTier]: ...

    async def segment_flow(self, days: int = 30) -> list[tuple[str, str, int]]: ...

    async def event_clock(self) -> int | None: ...

    async def customer_count(self) -> int: ...

    async def dead_letters(self) -> list[tuple[str, str, int]]: ...

    async def rule_ids(self) -> list[str]: ...

    async def rule_counts(self, rule_id: str) -> RuleCounts: ...

    async def converted(self, first_action_ms: dict[str, int], window_ms: int) -> int: ...

    async def rules_marker(self) -> str: ...

    async def overview_marker(self) -> str: ...

    async def save_backtest(self, result: BacktestResult) -> None: ...

    async def backtest(self) -> BacktestResult | None: ...

    async def record_pipeline_sample(self, sample: PipelineSample) -> None: ...

    async def pipeline_samples(self) -> list[PipelineSample]: ...


class ReadModelStore:
    """Apply read-model updates in batches and answer the pages' reads (the `ReadModel` on Redis)."""

    def __init__(self, client: aioredis.Redis, prefix: str = "ts:console:",
                 customer_ttl_s: int = DEFAULT_CUSTOMER_TTL_S, *,
                 event_time_tolerance_s: float = DEFAULT_EVENT_TIME_TOLERANCE_S,
                 clock: Callable[[], float] = time.time, erased_ttl_s: int = DEFAULT_ERASED_TTL_S) -> None:
        self.client = client
        self.prefix = prefix
        self.customer_ttl_s = customer_ttl_s
        # The event clock and the segment flow's days stop at the wall clock plus this, so one
        # record stamped years ahead cannot close every attribution window or empty the flow.
        self.event_time_tolerance_s = event_time_tolerance_s
        self._clock = clock
        self.erased = ErasedCustomers(client, self.key("erased"), erased_ttl_s)
        self._apply_script = client.register_script(_APPLY)
        self._absorb_script = client.register_script(_ABSORB)
        self._mark_merged = client.register_script(_MARK_MERGED)
        self._set_segments = client.register_script(_SET_SEGMENTS)
        self._set_values = client.register_script(_SET_VALUES)
        self._scripts_loaded = False
        self._settings = [customer_ttl_s, TRIM_SLACK, PURCHASES_CAP, TIMELINE_CAP, SCORE_HISTORY_CAP, ACTIONS_CAP,
                          TALLY_DAYS_KEPT]
        # What this worker has written to the shared keys already, so a batch need not write it again
        # (the read model is rebuilt from the topics, never emptied under a running worker).
        self._rules_noted: set[str] = set()
        self._clock_noted = 0

    def _ceiling_ms(self) -> int:
        return event_time_ceiling_ms(int(self._clock() * 1000), self.event_time_tolerance_s)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def ckey(self, customer_id: str) -> str:
        """The customer's hash (its id as the Redis Cluster hash tag)."""
        return f"{self.prefix}c:{{{customer_id}}}"

    def rule_key(self, rule_id: str) -> str:
        return f"{self.prefix}rule:{{{rule_id}}}"

    # -- writing ----------------------------------------------------------------------------------------

    async def apply(self, updates: Sequence[Update]) -> int:
        """Write a batch of updates; every write is idempotent, so replaying a batch changes nothing."""
        updates = await self._apply_deletions(updates)
        batch = _Batch()
        ceiling_ms = self._ceiling_ms()
        for update in updates:
            if isinstance(update, CustomersMerged):
                # A merge reads what it moves, so everything before it must be written first.
                await self._write(batch)
                batch = _Batch()
                await self._apply_merge(update)
            elif isinstance(update, DeadLettered):
                batch.dead_letters.setdefault((update.stage, update.reason), set()).add(update.digest)
            elif isinstance(update, TouchpointSeen):
                batch.add(update.customer_id, "T", update.message_id, update.event_time_ms, touchpoint_value(update),
                          1 if update.is_purchase else 0, update.channel)
                batch.saw(update.customer_id, update.event_time_ms)
            elif isinstance(update, ScoreUpdated):
                latest = latest_score_values(update)
                segment, model, why = latest if latest is not None else (b"", "", [])
                batch.add(update.customer_id, "S", update.message_id, score_point_value(update), segment, model,
                          len(why), *why)
                batch.saw(update.customer_id, update.event_time_ms)
                if latest is not None:
                    batch.scored(update.customer_id, update.event_time_ms, update.segment, update.stage)
                estimate = value_estimate(update)
                if estimate is not None:
                    batch.add(update.customer_id, "V", value_field(estimate))
                    batch.valued(update.customer_id, update.event_time_ms, value_tier_entry(estimate))
            elif isinstance(update, ActionTaken):
                group = "T" if update.outcome == "fired" else "H" if update.outcome == "held_out" else ""
                batch.add(update.customer_id, "A", update.action_id, update.event_time_ms, action_value(update),
                          update.rule_id, tally_field(update), group, tally_day_field(update, ceiling_ms))
                batch.saw(update.customer_id, update.event_time_ms)
                batch.acted(update.customer_id, update.rule_id)
            elif isinstance(update, DeliveryEnded):
                # Not customer activity (no event of the customer's): only the action's delivery status.
                batch.add(update.customer_id, "D", update.action_id, delivery_value(update), update.rule_id)
                batch.acted(update.customer_id, update.rule_id)
        await self._write(batch)
        return len(updates)

    async def _write(self, batch: _Batch) -> None:
        if batch.empty:
            return
        written: list[tuple[set[str], int]] = []
        named = list(batch.ops)

        def alongside(pipe: Any) -> None:
            written.append(self._shared_writes(pipe, batch))
            # Whether any of them was erased, asked in the same round trip (see below).
            if named:
                pipe.zmscore(self.erased.key, [erased_token(cid) for cid in named])

        redirects, answers = await self._run(self._apply_script,
                                             {cid: [*self._settings, *ops] for cid, ops in batch.ops.items()},
                                             alongside)
        self._noted(*written[0])
        # Records about an erased customer (in flight during its erasure, or read again by a restarted
        # or lagging worker) were just written with the rest: rarely, so they are forgotten again at once
        # rather than every batch waiting one more round trip to ask first.
        erased = [cid for cid, at in zip(named, answers[-1] if named else [], strict=True) if at is not None]
        for cid in erased:
            await self.forget(cid)
        if redirects:
            # Records for ids merged away meanwhile went to the survivors: so do their places in the counts.
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.srem(self.key("customers"), *redirects)
                for rule in batch.rule_customers:
                    pipe.srem(self.rule_key(rule), *redirects)
                noted = self._shared_writes(pipe, batch.moved(redirects))
                await self._execute(pipe)
            self._noted(*noted)

    def _shared_writes(self, pipe: Any, batch: _Batch) -> tuple[set[str], int]:
        """Queue the batch's writes to keys shared by every customer, each one command, none needing an answer.

        Return the rule ids and the clock it writes, to be noted (`_noted`) once the pipeline has run.
        """
        clock = 0
        if batch.active:
            pipe.sadd(self.key("customers"), *batch.active)
        newest = None if batch.newest_ms is None else min(batch.newest_ms, self._ceiling_ms())
        if newest is not None and newest > self._clock_noted:
            # GT: a batch of older events never moves the clock back (another worker's may be newer).
            pipe.zadd(self.key("clock"), {"event_time": newest}, gt=True)
            clock = newest
        rules = set(batch.rule_customers)
        if rules - self._rules_noted:
            pipe.sadd(self.key("rules"), *rules)
        for rule, customers in batch.rule_customers.items():
            pipe.sadd(self.rule_key(rule), *customers)
        if batch.rule_customers:
            pipe.incr(self.key("rules", "version"))
        for (stage, reason), digests in batch.dead_letters.items():
            pipe.sadd(self.key("dl", stage, reason), *digests)
            pipe.sadd(self.key("dlreasons"), json.dumps([stage, reason]))
        if batch.segments:
            self._count_segments(pipe, batch.segments)
        if batch.values:
            self._count_values(pipe, batch.values)
        return rules, clock

    def _noted(self, rules: set[str], clock_ms: int) -> None:
        """Remember what a pipeline that ran wrote to the rule list and the clock (later batches skip it)."""
        self._rules_noted |= rules
        self._clock_noted = max(self._clock_noted, clock_ms)

    def _count_segments(self, pipe: Any, changes: dict[str, tuple[int, str]]) -> None:
        """Queue one call of the segment-count script: customer -> (event time, "segment|stage", or "" to drop)."""
        # A change counts on its event-time day, never one past the wall clock plus the tolerance.
        ceiling = self._ceiling_ms()
        day_of = {cid: min(time_ms, ceiling) // DAY_MS for cid, (time_ms, _) in changes.items()}
        days = sorted({day_of[cid] for cid, (_, value) in changes.items() if value})
        index = {day: 4 + n for n, day in enumerate(days)}
        args: list[Any] = [FLOW_KEEP_DAYS * DAY_S, FLOW_KEEP_DAYS * 2]
        for cid, (time_ms, value) in changes.items():
            args += [cid, time_ms, value, index.get(day_of[cid], 0), day_of[cid]]
        pipe.evalsha(self._set_segments.sha, 3 + len(days), self.key("{seg}"), self.key("{seg}", "counts"),
                     self.key("{seg}", "days"), *(self.key("{seg}", "flow", str(day)) for day in days), *args)

    def _count_values(self, pipe: Any, changes: dict[str, tuple[int, str]]) -> None:
        """Queue one call of the value-tier script: customer -> (event time, "tier|cents", or "" to drop)."""
        args: list[Any] = [part for cid, (time_ms, entry) in changes.items() for part in (cid, time_ms, entry)]
        pipe.evalsha(self._set_values.sha, 3, self.key("{val}"), self.key("{val}", "counts"),
                     self.key("{val}", "cents"), *args)

    async def _run(self, script: Any, calls: dict[str, list[Any]],
                   alongside: Callable[[Any], None] | None = None) -> tuple[dict[str, str], list[Any]]:
        """Call a customer script for each customer in one pipeline, with what `alongside` queues; calls that find
        the customer merged away go again where it lives now. Return those ids, each with where it lives, and the
        answers to what `alongside` queued."""
        redirects: dict[str, str] = {}
        answers: list[Any] = []
        pending = calls
        for _ in range(MAX_MERGE_HOPS):
            if not pending and alongside is None:
                break
            async with self.client.pipeline(transaction=False) as pipe:
                for cid, args in pending.items():
                    pipe.evalsha(script.sha, 1, self.ckey(cid), *args)
                if alongside is not None:
                    alongside(pipe)
                    alongside = None
                    replies = await self._execute(pipe)
                    replies, answers = replies[:len(pending)], replies[len(pending):]
                else:
                    replies = await self._execute(pipe)
            moved: dict[str, list[Any]] = {}
            for (cid, args), into in zip(pending.items(), replies, strict=True):
                if not into:
                    continue
                target = as_text(into)
                for sent, lives in redirects.items():
                    if lives == cid:
                        redirects[sent] = target
                redirects.setdefault(cid, target)
                # The settings head every call; only the ops move (the script reads them in order).
                moved.setdefault(target, list(args[:len(self._settings)])).extend(args[len(self._settings):])
            pending = moved
        return redirects, answers

    async def _execute(self, pipe: Any) -> list[Any]:
        """Run a pipeline whose scripts go by sha1 (no SCRIPT EXISTS round trip): a Redis that lost them
        (restarted) answers NOSCRIPT, so they are loaded and the pipeline sent again (every write is idempotent)."""
        if not self._scripts_loaded:
            await self._load_scripts()
        commands = list(pipe.command_stack)
        try:
            return list(await pipe.execute())
        except NoScriptError:
            await self._load_scripts()
            async with self.client.pipeline(transaction=False) as again:
                again.command_stack = commands
                return list(await again.execute())

    async def _load_scripts(self) -> None:
        """Load the scripts into Redis (SCRIPT LOAD is idempotent; their sha1 never changes)."""
        for script in (self._apply_script, self._absorb_script, self._mark_merged, self._set_segments,
                       self._set_values):
            await self.client.script_load(script.script)
        self._scripts_loaded = True

    async def _live(self, customer_id: str) -> str:
        """Return the customer `customer_id` lives on now (following merges)."""
        current = customer_id
        for _ in range(MAX_MERGE_HOPS):
            into = await self.client.hget(self.ckey(current), "into")
            if into is None or as_text(into) == current:
                return current
            current = as_text(into)
        return current

    async def _apply_merge(self, merge: CustomersMerged) -> None:
        entry = json.dumps({"merge_id": merge.merge_id, "kind": merge.kind, "survivor_id": merge.survivor_id,
                            "merged_id": merge.merged_id, "reason": merge.reason,
                            "event_time_ms": merge.event_time_ms})
        survivor, merged = merge.survivor_id, merge.merged_id
        if await self.erased.among([survivor, merged]):
            return  # about an erased customer: read again after its erasure, never modelled
        if merge.kind != "merge":
            # An un-merge splits identifiers off; the history stays with the survivor, the new customer
            # starts empty and is no longer redirected. Each names the other, for an erasure to find.
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hdel(self.ckey(merged), "into")
                pipe.hdel(self.key("merged_into"), merged)
                await pipe.execute()
            await self._run(self._apply_script, {cid: [*self._settings, "M", merge.merge_id, entry]
                                                 for cid in (survivor, merged)})
            await self._note_mentions({survivor: [merged], merged: [survivor]})
            return
        # The survivor may itself have been merged on since (records from two topics arrive in any order):
        # move into where it lives now, and never into the merged customer itself.
        survivor = await self._live(survivor)
        if survivor == merged:
            return
        fields = await self.client.hgetall(self.ckey(merged))
        pairs = [part for name, value in fields.items() if name not in _COUNTERS for part in (name, value)]
        redirects, _ = await self._run(self._absorb_script,
                                       {survivor: [*self._settings, merge.merge_id, entry, *pairs]})
        live = redirects.get(survivor, survivor)
        # Where the merged customer counted, the survivor counts now (each write idempotent).
        moved = _Batch()
        if fields:
            moved.active.add(live)
        for raw_name, value in fields.items():
            name = as_text(raw_name)
            if name.startswith("r:"):
                moved.acted(live, name[2:])
            elif name == "seg":
                time_ms, segment, stage = json.loads(value)
                moved.scored(live, int(time_ms), segment, stage)
            elif name == "val":
                time_ms, predicted, tier, *_ = json.loads(value)
                moved.valued(live, int(time_ms), value_tier_entry(ValueEstimate(int(time_ms), predicted, tier)))
        moved.segments = {merged: (0, ""), **moved.segments}
        moved.values = {merged: (0, ""), **moved.values}
        async with self.client.pipeline(transaction=False) as pipe:
            for rule in moved.rule_customers:
                pipe.srem(self.rule_key(rule), merged)
            pipe.srem(self.key("customers"), merged)
            noted = self._shared_writes(pipe, moved)
            pipe.hset(self.key("merged_into"), merged, live)
            pipe.evalsha(self._mark_merged.sha, 1, self.ckey(merged), live, self.customer_ttl_s)
            await self._execute(pipe)
        self._noted(*noted)

    async def _note_mentions(self, mentioned: dict[str, list[str]]) -> None:
        """Remember which customers' hashes hold split entries naming each id."""
        current = await self.client.hmget(self.key("mentions"), list(mentioned))
        merged: dict[Any, Any] = {
            cid: ",".join(sorted(set(as_text(found).split(",") if found else []) | set(holders)))
            for (cid, holders), found in zip(mentioned.items(), current, strict=True)}
        await self.client.hset(self.key("mentions"), mapping=merged)

    async def _apply_deletions(self, updates: Sequence[Update]) -> list[Update]:
        """Forget the customers of every CustomerDeleted in `updates` (all ids listed, recorded as erased first,
        so a crash in between leaves them erased), and return the other updates minus those about them."""
        deleted: set[str] = set()
        for update in updates:
            if isinstance(update, CustomerDeleted):
                await self.erased.add(update.customer_ids)
                for cid in update.customer_ids:
                    await self.forget(cid)
                deleted.update(update.customer_ids)
        return [u for u in updates
                if not (isinstance(u, CustomerDeleted) or _deletion_notice(u) or deleted & _customers_named(u))]

    async def forget(self, customer_id: str) -> list[str]:
        """Remove every trace of a customer (and of the ids merged into it); return the ids forgotten.

        For the deletion flow (DESIGN: DELETE /v1/customers/{id}); rule counts drop its actions too.
        """
        live = await self._live(customer_id)
        redirects = {as_text(k): as_text(v) for k, v in (await self.client.hgetall(self.key("merged_into"))).items()}
        ids = sorted({live, customer_id} | {m for m in redirects if follow_merges(m, redirects) == live})
        rules = sorted(as_text(r) for r in await self.client.smembers(self.key("rules")))
        noted = await self.client.hmget(self.key("mentions"), ids)
        holders = {h for found in noted if found for h in as_text(found).split(",")}
        holders = {await self._live(h) for h in holders} - set(ids)
        async with self.client.pipeline(transaction=False) as pipe:
            for holder in sorted(holders):
                pipe.hgetall(self.ckey(holder))
                pipe.hget(self.key("mentions"), holder)
            replies = await pipe.execute()
        async with self.client.pipeline(transaction=False) as pipe:
            for holder, fields, noted_here in zip(sorted(holders), replies[::2], replies[1::2], strict=True):
                stale = [name for name, value in fields.items()
                         if as_text(name).startswith("m:") and any(cid in as_text(value) for cid in ids)]
                if stale:
                    pipe.hdel(self.ckey(holder), *stale)
                if noted_here:
                    kept = [h for h in as_text(noted_here).split(",") if h not in ids]
                    if kept:
                        pipe.hset(self.key("mentions"), holder, ",".join(kept))
                    else:
                        pipe.hdel(self.key("mentions"), holder)
            pipe.delete(*(self.ckey(cid) for cid in ids))
            for rule in rules:
                pipe.srem(self.rule_key(rule), *ids)
            pipe.incr(self.key("rules", "version"))
            pipe.srem(self.key("customers"), *ids)
            pipe.hdel(self.key("merged_into"), *ids)
            pipe.hdel(self.key("mentions"), *ids)
            self._count_segments(pipe, dict.fromkeys(ids, (0, "")))
            self._count_values(pipe, dict.fromkeys(ids, (0, "")))
            await self._execute(pipe)
        return ids

    # -- reading ----------------------------------------------------------------------------------------

    async def customer(self, customer_id: str, timeline_limit: int = TIMELINE_CAP) -> CustomerView:
        """Read one customer (following merges); an unknown id gives an empty record."""
        current = customer_id
        fields: dict[Any, Any] = {}
        for _ in range(MAX_MERGE_HOPS):
            fields = await self.client.hgetall(self.ckey(current))
            into = fields.get(b"into")
            if into is None or as_text(into) == current:
                break
            current = as_text(into)
        return customer_view(current, customer_id, fields, timeline_limit)

    async def change_marker(self, customer_id: str) -> str:
        """Return a token that changes whenever anything the customer page shows changes (live updates)."""
        live = await self._live(customer_id)
        return f"{live}|{as_text(await self.client.hget(self.ckey(live), 'v') or b'0')}"

    async def segments(self) -> dict[tuple[str, str], int]:
        """Count customers by (segment, stage) of their latest score."""
        counts: dict[tuple[str, str], int] = {}
        for value, n in (await self.client.hgetall(self.key("{seg}", "counts"))).items():
            if int(n) > 0:
                segment, stage = as_text(value).split("|", 1)
                counts[(segment, stage)] = int(n)
        return counts

    async def value_tiers(self) -> list[ValueTier]:
        """Customers and their predicted value per value tier of their latest score (tier 0: not ranked yet)."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.key("{val}", "counts"))
            pipe.hgetall(self.key("{val}", "cents"))
            counts, cents = await pipe.execute()
        tiers = [ValueTier(int(tier), int(n), int(cents.get(tier, 0)) / 100)
                 for tier, n in counts.items() if int(n) > 0]
        return sorted(tiers, key=lambda t: -t.tier)

    async def segment_flow(self, days: int = 30) -> list[tuple[str, str, int]]:
        """Return (from, to, count) of segment|stage changes over the last `days` days of event time seen."""
        latest = await self.client.zrevrange(self.key("{seg}", "days"), 0, 0)
        if not latest:
            return []
        head = latest[0]
        last_day = int(head.decode() if isinstance(head, bytes) else str(head))
        async with self.client.pipeline(transaction=False) as pipe:
            for day in range(last_day - days + 1, last_day + 1):
                pipe.hgetall(self.key("{seg}", "flow", str(day)))
            replies = await pipe.execute()
        totals: dict[tuple[str, str], int] = {}
        for reply in replies:
            for change, n in reply.items():
                before, _, after = as_text(change).partition(">")
                totals[(before, after)] = totals.get((before, after), 0) + int(n)
        return sorted(((b, a, n) for (b, a), n in totals.items() if n > 0), key=lambda r: (-r[2], r[0], r[1]))

    async def event_clock(self) -> int | None:
        """Return the newest event time the read model has applied (None before the first record)."""
        value = await self.client.zscore(self.key("clock"), "event_time")
        return None if value is None else min(int(value), self._ceiling_ms())

    async def customer_count(self) -> int:
        return int(await self.client.scard(self.key("customers")))

    async def dead_letters(self) -> list[tuple[str, str, int]]:
        """Return (stage, reason, count), most frequent first."""
        reasons = [json.loads(r) for r in await self.client.smembers(self.key("dlreasons"))]
        async with self.client.pipeline(transaction=False) as pipe:
            for stage, reason in reasons:
                pipe.scard(self.key("dl", stage, reason))
            counts = await pipe.execute()
        rows = [(stage, reason, int(n)) for (stage, reason), n in zip(reasons, counts, strict=True)]
        return sorted(rows, key=lambda r: (-r[2], r[0], r[1]))

    async def rule_ids(self) -> list[str]:
        return sorted(as_text(r) for r in await self.client.smembers(self.key("rules")))

    async def rule_counts(self, rule_id: str) -> RuleCounts:
        """Add up the tallies of a rule's customers: counts by outcome (suppressed split by reason),
        deliveries, when each customer's first treated and hold-out actions came, and outcomes per day."""
        customers = sorted(as_text(c) for c in await self.client.smembers(self.rule_key(rule_id)))
        async with self.client.pipeline(transaction=False) as pipe:
            for cid in customers:
                pipe.hget(self.ckey(cid), f"r:{rule_id}")
            replies = await pipe.execute()
        # A customer whose hash expired (no record for the TTL) no longer counts.
        tallies = {cid: parse_rule_tally(text) for cid, text in zip(customers, replies, strict=True) if text}
        total = sum_tallies(tallies.values())
        return RuleCounts(rule_id, total.counts,
                          {cid: t.first_treated_ms for cid, t in tallies.items() if t.first_treated_ms is not None},
                          {cid: t.first_holdout_ms for cid, t in tallies.items() if t.first_holdout_ms is not None},
                          total.delivered, total.delivery_failed, total.by_day)

    async def converted(self, first_action_ms: dict[str, int], window_ms: int) -> int:
        """Count the customers with a purchase within `window_ms` after their first action."""
        customers = list(first_action_ms)
        if not customers:
            return 0
        async with self.client.pipeline(transaction=False) as pipe:
            for cid in customers:
                pipe.hget(self.ckey(cid), "pu")
            replies = await pipe.execute()
        return sum(converted_within(first_action_ms[cid], purchase_times(found), window_ms)
                   for cid, found in zip(customers, replies, strict=True))

    async def rules_marker(self) -> str:
        """A token that changes whenever a rule's counts may have (a tally moved, or the clock closed windows)."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.get(self.key("rules", "version"))
            pipe.zscore(self.key("clock"), "event_time")
            version, clock = await pipe.execute()
        return f"{as_text(version or b'0')}|{clock}"

    async def overview_marker(self) -> str:
        """A token that changes with the overview's numbers: segment counts and the newest day's changes,
        customers, dead letters, the pipeline's samples (a few commands, whatever the number of customers)."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.key("{seg}", "counts"))
            pipe.zrevrange(self.key("{seg}", "days"), 0, 0)
            pipe.scard(self.key("customers"))
            pipe.hgetall(self.key("pipeline", "minutes"))
            pipe.hgetall(self.key("{val}", "counts"))
            pipe.hgetall(self.key("{val}", "cents"))
            counts, last_day, customers, samples, value_counts, value_cents = await pipe.execute()
        flow = await self.client.hgetall(self.key("{seg}", "flow", as_text(last_day[0]))) if last_day else {}
        state = [sorted(counts.items()), sorted(flow.items()), customers, sorted(samples.items()),
                 await self.dead_letters(), sorted(value_counts.items()), sorted(value_cents.items())]
        return hashlib.sha256(repr(state).encode()).hexdigest()

    async def save_backtest(self, result: BacktestResult) -> None:
        """Keep `result` as the latest backtest (the one before it goes) and tell the live rules pages."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self.key("backtest"), result.to_json())
            pipe.incr(self.key("rules", "version"))
            await pipe.execute()

    async def backtest(self) -> BacktestResult | None:
        """Return the latest backtest sent to the console, if any."""
        found = await self.client.get(self.key("backtest"))
        return None if found is None else BacktestResult.from_json(found)

    async def record_pipeline_sample(self, sample: PipelineSample) -> None:
        """Keep `sample` as its minute's (the latest sample of a minute wins) and drop minutes past the window."""
        key = self.key("pipeline", "minutes")
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(key, str(sample.minute), sample.to_json())
            pipe.hkeys(key)
            _, minutes = await pipe.execute()
        old = [m for m in minutes if int(m) <= sample.minute - HISTORY_MINUTES]
        if old:
            await self.client.hdel(key, *old)

    async def pipeline_samples(self) -> list[PipelineSample]:
        """Return the kept minute samples, oldest first."""
        found = await self.client.hgetall(self.key("pipeline", "minutes"))
        return sorted((PipelineSample.from_json(text) for text in found.values()), key=lambda s: s.minute)
