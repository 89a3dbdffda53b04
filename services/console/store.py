"""The console's read model in Redis: written in batches from the topics, read by the pages.

Key layout (prefix `ts:console:` by default). Every per-customer key carries the customer id
as a Redis Cluster hash tag, so one customer's keys share a slot; a merge touches two
customers and is therefore done with plain commands (idempotent), never one Lua script.

    c:{cid}:tl / c:{cid}:tle   timeline: sorted set message_id -> event time, hash message_id -> JSON
    c:{cid}:sc / c:{cid}:sce   score history, the same shape
    c:{cid}:ac / c:{cid}:ace   actions (fired, held out, suppressed), keyed by action_id
    c:{cid}:pu                 purchases: message_id -> event time (for rule outcomes, not capped)
    c:{cid}:ch                 channels: channel -> last event time
    c:{cid}:mg                 merges and un-merges: merge_id -> JSON
    c:{cid}:dv                 how fired actions' deliveries ended (actions.deliveries): action_id -> JSON
    customers                  customer id -> last event time
    clock                      "event_time" -> the newest event time applied (closes attribution windows)
    merged_into                merged customer id -> survivor
    {seg}, {seg}:counts        customer id -> "event time|segment|stage" of the latest score; counts per value
    {seg}:flow:<day>           "from>to" -> changes that day (event time, days since 1970); {seg}:days lists days
    rules, rule:{id}:o:<count> sets of action ids per outcome (SCARD is the count: idempotent)
    rule:{id}:delivered / :delivery_failed  sets of action ids by how their delivery ended
    rule:{id}:treated/holdout  customer id -> event time of the first action
    dl:<stage>:<reason>        set of dead-letter digests; dlreasons lists those keys
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from services.console.readmodel import (
    ACTIONS_CAP,
    SCORE_HISTORY_CAP,
    TIMELINE_CAP,
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
from touchstream.privacy import DELETED_RULE_ID

Update = TouchpointSeen | ScoreUpdated | ActionTaken | CustomersMerged | DeadLettered | CustomerDeleted | DeliveryEnded
# How many erased customer ids a console worker remembers (in memory) to drop their in-flight records.
FORGOTTEN_KEPT = 100_000

# Add entries to a capped log (sorted set KEYS[1] + hash KEYS[2], one customer's slot) and
# drop the oldest beyond the cap ARGV[1]; entries follow as (member, event time, body) triples.
_ADD_TO_LOG = """
for i = 2, #ARGV, 3 do
  redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
end
local n = redis.call('ZCARD', KEYS[1])
local cap = tonumber(ARGV[1])
if n > cap then
  local old = redis.call('ZRANGE', KEYS[1], 0, n - cap - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - cap - 1)
  redis.call('HDEL', KEYS[2], unpack(old))
end
return n
"""

# Record a customer's latest (segment|stage) in KEYS[1] if ARGV[2] (event time) is not older than
# what is stored, keeping per-value counts in KEYS[2] so the overview never scans every customer,
# and the changes of day ARGV[4] in KEYS[3] (days seen in KEYS[4]).
_SET_SEGMENT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
local old = ''
if current then
  local t
  t, old = string.match(current, '^(%d+)|(.*)$')
  if tonumber(t) > tonumber(ARGV[2]) then return 0 end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. ARGV[3])
  if old == ARGV[3] then return 0 end
  redis.call('HINCRBY', KEYS[2], old, -1)
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. ARGV[3])
end
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
-- The flow: one count per change, on the day (event time) it happened; '' is a new customer.
redis.call('HINCRBY', KEYS[3], old .. '>' .. ARGV[3], 1)
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[4])
return 1
"""

# Forget a merged-away customer's segment and take it out of the counts.
_DROP_SEGMENT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  redis.call('HINCRBY', KEYS[2], string.match(current, '^%d+|(.*)$'), -1)
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

DAY_MS = 86_400_000
_LOGS = (("tl", TIMELINE_CAP), ("sc", SCORE_HISTORY_CAP), ("ac", ACTIONS_CAP))


def _deletion_notice(update: Update) -> bool:
    """A `customer.deleted` webhook (triggers tells marketing about an erasure): never read-modelled."""
    return isinstance(update, ActionTaken | DeliveryEnded) and update.rule_id == DELETED_RULE_ID


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class CustomerRecord:
    """Everything the read model holds about one customer."""

    customer_id: str
    looked_up_id: str
    timeline: list[TouchpointSeen]
    scores: list[ScoreUpdated]  # oldest first
    actions: list[ActionTaken]  # newest first
    channels: list[tuple[str, int]]
    merges: list[dict[str, Any]]
    deliveries: dict[str, DeliveryEnded] = field(default_factory=dict)  # action id -> how its delivery ended

    @property
    def latest_score(self) -> ScoreUpdated | None:
        return self.scores[-1] if self.scores else None

    @property
    def known(self) -> bool:
        return bool(self.timeline or self.scores or self.actions or self.merges)


@dataclass(frozen=True)
class RuleCounts:
    rule_id: str
    counts: dict[str, int]
    treated_at: dict[str, int]
    holdout_at: dict[str, int]
    delivered: int = 0
    delivery_failed: int = 0


@dataclass
class _BatchWrites:
    """A batch's writes grouped by key, so a pipeline sends one command per key, not per update."""

    zadds: dict[str, dict[str, int]] = field(default_factory=dict)
    zadds_gt: dict[str, dict[str, int]] = field(default_factory=dict)
    hsets: dict[str, dict[Any, Any]] = field(default_factory=dict)
    sadds: dict[str, set[str]] = field(default_factory=dict)
    hsetnx: list[tuple[str, str, int]] = field(default_factory=list)
    segments: dict[str, tuple[int, str]] = field(default_factory=dict)
    logs: dict[tuple[str, str, int], list[str | int]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.zadds or self.zadds_gt or self.hsets or self.sadds or self.hsetnx or self.segments
                    or self.logs)

    def zadd(self, key: str, member: str, score: int) -> None:
        self.zadds.setdefault(key, {})[member] = score

    def zadd_gt(self, key: str, member: str, score: int) -> None:
        mapping = self.zadds_gt.setdefault(key, {})
        mapping[member] = max(score, mapping.get(member, score))

    def sadd(self, key: str, member: str) -> None:
        self.sadds.setdefault(key, set()).add(member)

    def log(self, order_key: str, body_key: str, member: str, time_ms: int, body: str, cap: int) -> None:
        self.logs.setdefault((order_key, body_key, cap), []).extend((member, time_ms, body))


class ReadModelStore:
    """Apply read-model updates in batches and answer the pages' reads."""

    def __init__(self, client: aioredis.Redis, prefix: str = "ts:console:") -> None:
        self.client = client
        self.prefix = prefix
        self._add_to_log = client.register_script(_ADD_TO_LOG)
        self._set_segment = client.register_script(_SET_SEGMENT)
        self._drop_segment = client.register_script(_DROP_SEGMENT)
        self._scripts_loaded = False  # _set_segment and _add_to_log, for _write's EVALSHA
        # One hash tag for both, so the scripts stay legal on Redis Cluster.
        self._segment_keys = [self.key("{seg}"), self.key("{seg}", "counts")]
        # Erased customers (memory only, newest last): records about them still in flight on the
        # other topics are dropped instead of writing the customer back.
        self._forgotten: dict[str, None] = {}

    def _segment_change_keys(self, time_ms: int) -> list[str]:
        return [*self._segment_keys, self.key("{seg}", "flow", str(time_ms // DAY_MS)), self.key("{seg}", "days")]

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def ckey(self, customer_id: str, part: str) -> str:
        return f"{self.prefix}c:{{{customer_id}}}:{part}"

    async def redirects(self, customer_ids: Iterable[str]) -> dict[str, str]:
        """Return merged-away ids among `customer_ids` (and their chains) mapped to where they went."""
        found: dict[str, str] = {}
        pending = list(dict.fromkeys(customer_ids))
        while pending:
            replies = await self.client.hmget(self.key("merged_into"), pending)
            nxt = []
            for cid, into in zip(pending, replies, strict=True):
                if into is not None:
                    found[cid] = _text(into)
                    if found[cid] not in found:
                        nxt.append(found[cid])
            pending = [c for c in dict.fromkeys(nxt) if c not in found]
        return found

    async def apply(self, updates: Sequence[Update]) -> int:
        """Write a batch of updates; every write is idempotent, so replaying a batch changes nothing."""
        if self._forgotten or any(isinstance(u, CustomerDeleted) or _deletion_notice(u) for u in updates):
            updates = await self._apply_deletions(updates)
        ids = {u.customer_id for u in updates if not isinstance(u, CustomersMerged | DeadLettered | CustomerDeleted)}
        merged_into = await self.redirects(ids)
        writes = _BatchWrites()
        for update in updates:
            if isinstance(update, CustomerDeleted):
                continue  # applied above
            if isinstance(update, CustomersMerged):
                # A merge reads what it moves, so everything before it must be written first.
                await self._write(writes)
                writes = _BatchWrites()
                await self._apply_merge(update)
                if update.kind == "merge":
                    merged_into[update.merged_id] = update.survivor_id
                else:
                    merged_into.pop(update.merged_id, None)
                continue
            if isinstance(update, DeadLettered):
                writes.sadd(self.key("dl", update.stage, update.reason), update.digest)
                writes.sadd(self.key("dlreasons"), json.dumps([update.stage, update.reason]))
                continue
            if isinstance(update, DeliveryEnded):
                # Not customer activity (no event of the customer's): only the action's delivery status.
                cid = follow_merges(update.customer_id, merged_into)
                writes.hsets.setdefault(self.ckey(cid, "dv"), {})[update.action_id] = json.dumps(vars(update))
                group = "delivered" if update.delivered else "delivery_failed"
                writes.sadd(self.key("rule", update.rule_id, group), update.action_id)
                continue
            cid = follow_merges(update.customer_id, merged_into)
            writes.zadd_gt(self.key("customers"), cid, update.event_time_ms)
            writes.zadd_gt(self.key("clock"), "event_time", update.event_time_ms)
            if isinstance(update, TouchpointSeen):
                writes.log(self.ckey(cid, "tl"), self.ckey(cid, "tle"), update.message_id, update.event_time_ms,
                           update.to_json(), TIMELINE_CAP)
                writes.zadd_gt(self.ckey(cid, "ch"), update.channel, update.event_time_ms)
                if update.is_purchase:
                    writes.zadd(self.ckey(cid, "pu"), update.message_id, update.event_time_ms)
            elif isinstance(update, ScoreUpdated):
                writes.log(self.ckey(cid, "sc"), self.ckey(cid, "sce"), update.message_id, update.event_time_ms,
                           update.to_json(), SCORE_HISTORY_CAP)
                latest = writes.segments.get(cid)
                if latest is None or latest[0] <= update.event_time_ms:
                    writes.segments[cid] = (update.event_time_ms, f"{update.segment}|{update.stage}")
            else:
                writes.log(self.ckey(cid, "ac"), self.ckey(cid, "ace"), update.action_id, update.event_time_ms,
                           update.to_json(), ACTIONS_CAP)
                writes.sadd(self.key("rules"), update.rule_id)
                writes.sadd(self.key("rule", update.rule_id, "o", update.count_field), update.action_id)
                writes.sadd(self.key("rule", update.rule_id, "fields"), update.count_field)
                if update.outcome in ("fired", "held_out"):
                    group = "treated" if update.outcome == "fired" else "holdout"
                    writes.hsetnx.append((self.key("rule", update.rule_id, group), cid, update.event_time_ms))
        await self._write(writes)
        return len(updates)

    async def _write(self, writes: _BatchWrites, first_try: bool = True) -> None:
        """Send one batch's writes in one pipeline: one command per key, one script call per capped log."""
        if writes.empty:
            return
        pipe = self.client.pipeline(transaction=False)
        for key, mapping in writes.zadds.items():
            pipe.zadd(key, mapping)
        for key, mapping in writes.zadds_gt.items():
            # GT still adds new members; it only refuses to move an existing one back in time.
            pipe.zadd(key, mapping, gt=True)
        for key, fields in writes.hsets.items():
            pipe.hset(key, mapping=fields)
        for key, members in writes.sadds.items():
            pipe.sadd(key, *members)
        for key, field_name, first_ms in writes.hsetnx:
            pipe.hsetnx(key, field_name, first_ms)
        # EVALSHA straight into the pipeline: going through the Script objects would make redis-py
        # ask SCRIPT EXISTS first, one more round trip per batch. A Redis that lost its scripts
        # (restarted) answers NOSCRIPT: load them and send the batch again (every write is idempotent).
        set_segment, add_to_log = self._set_segment.sha, self._add_to_log.sha
        for cid, (time_ms, value) in writes.segments.items():
            pipe.evalsha(set_segment, 4, *self._segment_change_keys(time_ms), cid, time_ms, value, time_ms // DAY_MS)
        for (order_key, body_key, cap), entries in writes.logs.items():
            pipe.evalsha(add_to_log, 2, order_key, body_key, cap, *entries)
        if not self._scripts_loaded and (writes.segments or writes.logs):
            await self._load_scripts()
        try:
            await pipe.execute()
        except NoScriptError:
            if not first_try:
                raise
            await self._load_scripts()
            await self._write(writes, first_try=False)

    async def _load_scripts(self) -> None:
        """Load the batch scripts into Redis (SCRIPT LOAD is idempotent; their sha1 never changes)."""
        for script in (self._set_segment, self._add_to_log):
            await self.client.script_load(script.script)
        self._scripts_loaded = True

    async def _apply_merge(self, merge: CustomersMerged) -> None:
        survivor, merged = merge.survivor_id, merge.merged_id
        entry = json.dumps({"merge_id": merge.merge_id, "kind": merge.kind, "survivor_id": survivor,
                            "merged_id": merged, "reason": merge.reason, "event_time_ms": merge.event_time_ms})
        if merge.kind != "merge":
            # An un-merge splits identifiers off; the history stays with the survivor, the new
            # customer starts empty and is no longer redirected.
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hset(self.ckey(survivor, "mg"), merge.merge_id, entry)
                pipe.hset(self.ckey(merged, "mg"), merge.merge_id, entry)
                pipe.hdel(self.key("merged_into"), merged)
                await pipe.execute()
            return
        # The survivor may itself have been merged on since (records from two topics arrive in any
        # order): move into where it lives now, and never into the merged customer itself.
        survivor = follow_merges(survivor, await self.redirects([survivor]))
        if survivor == merged:
            return
        rules = sorted(_text(r) for r in await self.client.smembers(self.key("rules")))
        parts = ("tl", "sc", "ac", "pu", "ch")
        async with self.client.pipeline(transaction=False) as pipe:
            for part in parts:
                pipe.zrange(self.ckey(merged, part), 0, -1, withscores=True)
            for part in ("tle", "sce", "ace", "mg", "dv"):
                pipe.hgetall(self.ckey(merged, part))
            for rule in rules:
                pipe.hget(self.key("rule", rule, "treated"), merged)
                pipe.hget(self.key("rule", rule, "holdout"), merged)
            pipe.zscore(self.key("customers"), merged)
            pipe.hget(self._segment_keys[0], merged)
            replies = await pipe.execute()
        segment = replies.pop()
        zsets = dict(zip(parts, replies[: len(parts)], strict=True))
        hashes = dict(zip(("tle", "sce", "ace", "mg", "dv"), replies[len(parts): len(parts) + 5], strict=True))
        groups = replies[len(parts) + 5: -1]
        last_seen = replies[-1]
        async with self.client.pipeline(transaction=False) as pipe:
            for part, cap in _LOGS:
                bodies = {_text(k): v for k, v in hashes[part + "e"].items()}
                entries: list[Any] = []
                for member, time_ms in zsets[part]:
                    if _text(member) in bodies:
                        entries.extend((_text(member), int(time_ms), bodies[_text(member)]))
                if entries:
                    await self._add_to_log(keys=[self.ckey(survivor, part), self.ckey(survivor, part + "e")],
                                           args=[cap, *entries], client=pipe)
            if zsets["pu"]:
                pipe.zadd(self.ckey(survivor, "pu"), {_text(m): t for m, t in zsets["pu"]})
            if zsets["ch"]:
                pipe.zadd(self.ckey(survivor, "ch"), {_text(m): t for m, t in zsets["ch"]}, gt=True)
            for part in ("mg", "dv"):
                if hashes[part]:
                    pipe.hset(self.ckey(survivor, part), mapping=hashes[part])
            for i, rule in enumerate(rules):
                for group, at in zip(("treated", "holdout"), groups[2 * i: 2 * i + 2], strict=True):
                    if at is not None:
                        pipe.hsetnx(self.key("rule", rule, group), survivor, at)
                        pipe.hdel(self.key("rule", rule, group), merged)
            if last_seen is not None:
                pipe.zadd(self.key("customers"), {survivor: last_seen}, gt=True)
            pipe.hset(self.ckey(survivor, "mg"), merge.merge_id, entry)
            pipe.hset(self.key("merged_into"), merged, survivor)
            pipe.zrem(self.key("customers"), merged)
            await self._drop_segment(keys=self._segment_keys, args=[merged], client=pipe)
            if segment is not None:
                # The survivor now holds the merged customer's scores: its latest may be the newer one.
                time_ms, value = _text(segment).split("|", 1)
                await self._set_segment(keys=self._segment_change_keys(int(time_ms)),
                                        args=[survivor, time_ms, value, int(time_ms) // DAY_MS], client=pipe)
            pipe.delete(*(self.ckey(merged, p) for p in (*parts, "tle", "sce", "ace", "mg", "dv")))
            await pipe.execute()

    async def _apply_deletions(self, updates: Sequence[Update]) -> list[Update]:
        """Forget the customers of every CustomerDeleted in `updates` (all ids listed), and return
        the other updates minus those about a customer erased here lately."""
        for update in updates:
            if isinstance(update, CustomerDeleted):
                for cid in update.customer_ids:
                    await self.forget(cid)
                    self._forgotten.pop(cid, None)
                    self._forgotten[cid] = None
        while len(self._forgotten) > FORGOTTEN_KEPT:
            del self._forgotten[next(iter(self._forgotten))]
        gone = self._forgotten

        def erased(update: Update) -> bool:
            if isinstance(update, CustomerDeleted) or _deletion_notice(update):
                return True
            if isinstance(update, CustomersMerged):
                return update.survivor_id in gone or update.merged_id in gone
            if isinstance(update, DeadLettered):
                return False
            return update.customer_id in gone

        return [u for u in updates if not erased(u)]

    async def forget(self, customer_id: str) -> list[str]:
        """Remove every trace of a customer (and of the ids merged into it); return the ids forgotten.

        For the deletion flow (DESIGN: DELETE /v1/customers/{id}); rule counts drop its actions too.
        """
        live = follow_merges(customer_id, await self.redirects([customer_id]))
        redirects = {_text(k): _text(v) for k, v in (await self.client.hgetall(self.key("merged_into"))).items()}
        ids = sorted({live, customer_id} | {m for m in redirects if follow_merges(m, redirects) == live})
        rules = sorted(_text(r) for r in await self.client.smembers(self.key("rules")))
        async with self.client.pipeline(transaction=False) as pipe:
            for cid in ids:
                pipe.hkeys(self.ckey(cid, "ace"))
            for rule in rules:
                pipe.smembers(self.key("rule", rule, "fields"))
            replies = await pipe.execute()
        action_ids = {_text(a) for reply in replies[: len(ids)] for a in reply}
        fields = {rule: sorted(_text(f) for f in reply) for rule, reply in zip(rules, replies[len(ids):], strict=True)}
        mentions = []
        async for key in self.client.scan_iter(match=f"{self.prefix}c:*:mg", count=1000):
            mentions.append(_text(key))
        async with self.client.pipeline(transaction=False) as pipe:
            for key in mentions:
                pipe.hgetall(key)
            merge_logs = await pipe.execute()
        async with self.client.pipeline(transaction=False) as pipe:
            for cid in ids:
                pipe.delete(*(self.ckey(cid, part) for part in ("tl", "tle", "sc", "sce", "ac", "ace", "pu", "ch",
                                                                  "mg", "dv")))
                await self._drop_segment(keys=self._segment_keys, args=[cid], client=pipe)
            pipe.zrem(self.key("customers"), *ids)
            pipe.hdel(self.key("merged_into"), *ids)
            for rule in rules:
                pipe.hdel(self.key("rule", rule, "treated"), *ids)
                pipe.hdel(self.key("rule", rule, "holdout"), *ids)
                if action_ids:
                    for name in fields[rule]:
                        pipe.srem(self.key("rule", rule, "o", name), *action_ids)
                    pipe.srem(self.key("rule", rule, "delivery_failed"), *action_ids)
                    pipe.srem(self.key("rule", rule, "delivered"), *action_ids)
            for key, entries in zip(mentions, merge_logs, strict=True):
                stale = [merge_id for merge_id, body in entries.items()
                         if any(cid in _text(body) for cid in ids)]
                if stale:
                    pipe.hdel(key, *stale)
            await pipe.execute()
        return ids

    async def customer(self, customer_id: str, timeline_limit: int = TIMELINE_CAP) -> CustomerRecord:
        """Read one customer (following merges); an unknown id gives an empty record."""
        live = follow_merges(customer_id, await self.redirects([customer_id]))
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zrevrange(self.ckey(live, "tl"), 0, timeline_limit - 1)
            pipe.zrange(self.ckey(live, "sc"), 0, -1)
            pipe.zrevrange(self.ckey(live, "ac"), 0, -1)
            pipe.zrevrange(self.ckey(live, "ch"), 0, -1, withscores=True)
            pipe.hvals(self.ckey(live, "mg"))
            pipe.hvals(self.ckey(live, "dv"))
            tl_ids, sc_ids, ac_ids, channels, merges, deliveries = await pipe.execute()
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hmget(self.ckey(live, "tle"), tl_ids or ["-"])
            pipe.hmget(self.ckey(live, "sce"), sc_ids or ["-"])
            pipe.hmget(self.ckey(live, "ace"), ac_ids or ["-"])
            tl_bodies, sc_bodies, ac_bodies = await pipe.execute()
        merge_list = sorted((json.loads(m) for m in merges), key=lambda m: m["event_time_ms"], reverse=True)
        return CustomerRecord(
            customer_id=live,
            looked_up_id=customer_id,
            timeline=[TouchpointSeen.from_json(b) for b in tl_bodies if b is not None],
            scores=[ScoreUpdated.from_json(b) for b in sc_bodies if b is not None],
            actions=[ActionTaken.from_json(b) for b in ac_bodies if b is not None],
            channels=[(_text(c), int(t)) for c, t in channels],
            merges=merge_list,
            deliveries={d.action_id: d for d in (DeliveryEnded(**json.loads(body)) for body in deliveries)},
        )

    async def change_marker(self, customer_id: str) -> str:
        """Return a token that changes with the customer's timeline, scores, actions or deliveries (live updates)."""
        live = follow_merges(customer_id, await self.redirects([customer_id]))
        async with self.client.pipeline(transaction=False) as pipe:
            for part in ("tl", "sc", "ac"):
                pipe.zrevrange(self.ckey(live, part), 0, 0, withscores=True)
            pipe.hlen(self.ckey(live, "dv"))
            replies = await pipe.execute()
        return f"{live}|{replies!r}"

    async def segments(self) -> dict[tuple[str, str], int]:
        """Count customers by (segment, stage) of their latest score."""
        counts: dict[tuple[str, str], int] = {}
        for value, n in (await self.client.hgetall(self._segment_keys[1])).items():
            if int(n) > 0:
                segment, stage = _text(value).split("|", 1)
                counts[(segment, stage)] = int(n)
        return counts

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
                before, _, after = _text(change).partition(">")
                totals[(before, after)] = totals.get((before, after), 0) + int(n)
        return sorted(((b, a, n) for (b, a), n in totals.items() if n > 0), key=lambda r: (-r[2], r[0], r[1]))

    async def event_clock(self) -> int | None:
        """Return the newest event time the read model has applied (None before the first record)."""
        value = await self.client.zscore(self.key("clock"), "event_time")
        return None if value is None else int(value)

    async def customer_count(self) -> int:
        return int(await self.client.zcard(self.key("customers")))

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
        return sorted(_text(r) for r in await self.client.smembers(self.key("rules")))

    async def rule_counts(self, rule_id: str) -> RuleCounts:
        """Return a rule's counts by outcome (suppressed split by reason) and its two groups."""
        fields = sorted(_text(f) for f in await self.client.smembers(self.key("rule", rule_id, "fields")))
        async with self.client.pipeline(transaction=False) as pipe:
            for name in fields:
                pipe.scard(self.key("rule", rule_id, "o", name))
            pipe.hgetall(self.key("rule", rule_id, "treated"))
            pipe.hgetall(self.key("rule", rule_id, "holdout"))
            pipe.scard(self.key("rule", rule_id, "delivered"))
            pipe.scard(self.key("rule", rule_id, "delivery_failed"))
            replies = await pipe.execute()
        counts = {name: int(n) for name, n in zip(fields, replies[: len(fields)], strict=True)}
        treated, holdout, delivered, failed = replies[-4:]
        return RuleCounts(rule_id, counts, {_text(c): int(t) for c, t in treated.items()},
                          {_text(c): int(t) for c, t in holdout.items()}, int(delivered), int(failed))

    async def converted(self, first_action_ms: dict[str, int], window_ms: int) -> int:
        """Count the customers with a purchase within `window_ms` after their first action."""
        customers = list(first_action_ms)
        if not customers:
            return 0
        async with self.client.pipeline(transaction=False) as pipe:
            for cid in customers:
                at = first_action_ms[cid]
                pipe.zrangebyscore(self.ckey(cid, "pu"), f"({at}", at + window_ms, withscores=True)
            replies = await pipe.execute()
        return sum(
            converted_within(first_action_ms[cid], [int(s) for _, s in found], window_ms)
            for cid, found in zip(customers, replies, strict=True)
        )
