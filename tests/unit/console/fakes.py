"""An in-memory `ReadModel` (services/console/store.py) for tests of the console's logic without Redis.

It keeps each customer as the same fields and values the Redis store's hash holds (entries.py encodes
them, `customer_view` decodes both), and follows the store's rules: entries keyed by id are written
once, the newest score sets the segment and the value, tallies and counts move only when something
is new, caps trim back once past them by the slack, a merge moves the merged customer into its
survivor once per merge id, an erasure forgets every id merged into the customer. The contract tests
(tests/integration/test_console_store.py) run against both, so the two cannot drift apart unseen.
Not kept: TTLs (nothing expires in a test's life).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

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
from services.console.store import FLOW_KEEP_DAYS, MAX_MERGE_HOPS, TRIM_SLACK, RuleCounts, Update
from touchstream.eventtime import DAY_MS, DEFAULT_EVENT_TIME_TOLERANCE_S, event_time_ceiling_ms
from touchstream.privacy import DELETED_RULE_ID

Record = TouchpointSeen | ScoreUpdated | ActionTaken | DeliveryEnded
CAPS = {"t": TIMELINE_CAP, "s": SCORE_HISTORY_CAP, "a": ACTIONS_CAP}
_COUNTERS = {"into", "n:t", "n:s", "n:a", "v"}


def _time_of(value: str) -> int:
    return int(json.loads(value)[0])


class _Hash:
    """One customer's fields, written as the store's scripts write them (one call's `changed` and `added`)."""

    def __init__(self, fields: dict[str, str]) -> None:
        self.fields = fields
        self.changed = False
        self.added = {"t": 0, "s": 0, "a": 0}
        self.tallies: dict[str, dict[str, str]] = {}
        self.purchases: set[str] | None = None

    def tally(self, rule: str) -> dict[str, str]:
        if rule not in self.tallies:
            text = self.fields.get("r:" + rule, "")
            self.tallies[rule] = dict(part.split("=", 1) for part in text.split(";") if "=" in part)
        return self.tallies[rule]

    @staticmethod
    def bump(counts: dict[str, str], name: str, by: int) -> None:
        counts[name] = str(int(counts.get(name, "0")) + by)

    @staticmethod
    def earliest(counts: dict[str, str], name: str, at: str) -> None:
        if name not in counts or int(at) < int(counts[name]):
            counts[name] = at

    def add_entry(self, kind: str, entry_id: str, value: str) -> bool:
        name = f"{kind}:{entry_id}"
        if name in self.fields:
            return False
        self.fields[name] = value
        self.added[kind] += 1
        self.changed = True
        return True

    def set_channel(self, channel: str, at: str) -> None:
        seen = self.fields.get("ch:" + channel)
        if seen is None or int(seen) < int(at):
            self.fields["ch:" + channel] = at

    def add_purchase(self, at: str) -> None:
        if self.purchases is None:
            self.purchases = {t for t in self.fields.get("pu", "").split(",") if t}
        self.purchases.add(at)

    def set_latest(self, seg: str, model: str, why: list[str]) -> None:
        current = self.fields.get("seg")
        if current is not None and _time_of(current) > _time_of(seg):
            return
        if current != seg:
            self.changed = True
        self.fields.update({"seg": seg, "mv": model})
        for n, reason in enumerate(why):
            self.fields[f"why:{n}"] = reason
        if current is not None:
            for n in range(len(why), 10):
                self.fields.pop(f"why:{n}", None)

    def set_value(self, value: str) -> None:
        current = self.fields.get("val")
        if current is not None and _time_of(current) > _time_of(value):
            return
        if current != value:
            self.changed = True
            self.fields["val"] = value

    def set_delivery(self, action_id: str, value: str, rule: str) -> None:
        current = self.fields.get("d:" + action_id)
        outcome = value[1]
        if current is not None and current[1] == outcome:
            return
        counts = self.tally(rule)
        if current is not None:
            self.bump(counts, "d" if current[1] == "1" else "x", -1)
        self.bump(counts, "d" if outcome == "1" else "x", 1)
        self.fields["d:" + action_id] = value
        self.changed = True

    def _trim(self, kind: str) -> None:
        entries = sorted((_time_of(v), name) for name, v in self.fields.items() if name.startswith(kind + ":"))
        drop = max(0, len(entries) - CAPS[kind])
        gone = [name for _, name in entries[:drop]]
        if kind == "a":
            kept = {name[2:] for _, name in entries[drop:]}
            gone += [name for name in self.fields if name.startswith("d:") and name[2:] not in kept]
        for name in gone:
            self.fields.pop(name, None)
        self.fields["n:" + kind] = str(len(entries) - drop)

    def finish(self) -> None:
        for kind, n in self.added.items():
            if n > 0:
                count = int(self.fields.get("n:" + kind, "0")) + n
                self.fields["n:" + kind] = str(count)
                if count > CAPS[kind] + TRIM_SLACK:
                    self._trim(kind)
        if self.purchases is not None:
            self.fields["pu"] = ",".join(sorted(self.purchases, key=int)[-PURCHASES_CAP:])
        for rule, counts in self.tallies.items():
            days = [int(name[1:-1]) for name in counts if name.startswith("@")]
            newest = max(days, default=0)
            names = sorted(name for name in counts if not name.startswith("@") or int(name[1:-1]) >= newest
                           - TALLY_DAYS_KEPT)
            self.fields["r:" + rule] = ";".join(f"{name}={counts[name]}" for name in names)
        if self.changed:
            self.fields["v"] = str(int(self.fields.get("v", "0")) + 1)


class InMemoryReadModel:
    """`ReadModel` in dicts, with the Redis store's rules (see the module docstring)."""

    def __init__(self, *, event_time_tolerance_s: float = DEFAULT_EVENT_TIME_TOLERANCE_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.hashes: dict[str, dict[str, str]] = {}
        self.customers: set[str] = set()
        self.merged_into: dict[str, str] = {}
        self.mentions: dict[str, set[str]] = {}
        self.erased: set[str] = set()
        self.clock_ms: int | None = None
        self.segment_of: dict[str, tuple[int, str]] = {}  # customer -> (time, "segment|stage")
        self.segment_counts: dict[str, int] = {}
        self.flow: dict[int, dict[str, int]] = {}
        self.value_of: dict[str, tuple[int, str]] = {}  # customer -> (time, "tier|cents")
        self.tier_counts: dict[int, int] = {}
        self.tier_cents: dict[int, int] = {}
        self.rules: dict[str, set[str]] = {}
        self.rules_version = 0
        self.dead_letter_digests: dict[tuple[str, str], set[str]] = {}
        self.latest_backtest: BacktestResult | None = None
        self.samples: dict[int, PipelineSample] = {}
        self.event_time_tolerance_s = event_time_tolerance_s
        self._clock = clock

    def _ceiling_ms(self) -> int:
        return event_time_ceiling_ms(int(self._clock() * 1000), self.event_time_tolerance_s)

    # -- writing ----------------------------------------------------------------------------------------

    def _live(self, customer_id: str) -> str:
        current = customer_id
        for _ in range(MAX_MERGE_HOPS):
            into = self.hashes.get(current, {}).get("into")
            if into is None or into == current:
                return current
            current = into
        return current

    def _write(self, customer_id: str, ops: Callable[[_Hash], None]) -> str:
        """Run `ops` on the hash the customer lives on (as a store script would, once it followed the redirect)."""
        live = self._live(customer_id)
        target = _Hash(self.hashes.setdefault(live, {}))
        ops(target)
        target.finish()
        return live

    def _count_segment(self, customer_id: str, time_ms: int, value: str) -> None:
        stored = self.segment_of.get(customer_id)
        old, newer = (stored[1], stored[0] <= time_ms) if stored else (None, True)
        if value == "":
            if old is not None:
                self.segment_counts[old] -= 1
                del self.segment_of[customer_id]
            return
        if not newer:
            return
        self.segment_of[customer_id] = (time_ms, value)
        if old != value:
            if old is not None:
                self.segment_counts[old] -= 1
            self.segment_counts[value] = self.segment_counts.get(value, 0) + 1
            day = min(time_ms, self._ceiling_ms()) // DAY_MS
            changes = self.flow.setdefault(day, {})
            change = f"{old or ''}>{value}"
            changes[change] = changes.get(change, 0) + 1
            for gone in sorted(self.flow)[:-FLOW_KEEP_DAYS * 2]:
                del self.flow[gone]

    def _count_value(self, customer_id: str, time_ms: int, entry: str) -> None:
        stored = self.value_of.get(customer_id)
        old, newer = (stored[1], stored[0] <= time_ms) if stored else (None, True)

        def count(value: str, by: int) -> None:
            tier, cents = value.split("|")
            self.tier_counts[int(tier)] = self.tier_counts.get(int(tier), 0) + by
            self.tier_cents[int(tier)] = self.tier_cents.get(int(tier), 0) + by * int(cents)

        if entry == "":
            if old is not None:
                count(old, -1)
                del self.value_of[customer_id]
            return
        if newer:
            self.value_of[customer_id] = (time_ms, entry)
            if old != entry:
                if old is not None:
                    count(old, -1)
                count(entry, 1)

    def _saw(self, customer_id: str, time_ms: int) -> None:
        self.customers.add(customer_id)
        at = min(time_ms, self._ceiling_ms())
        self.clock_ms = at if self.clock_ms is None else max(self.clock_ms, at)

    async def apply(self, updates: Sequence[Update]) -> int:
        deleted: set[str] = set()
        for update in updates:
            if isinstance(update, CustomerDeleted):
                self.erased.update(update.customer_ids)
                for cid in update.customer_ids:
                    await self.forget(cid)
                deleted.update(update.customer_ids)
        kept = [u for u in updates if not (
            isinstance(u, CustomerDeleted)
            or (isinstance(u, ActionTaken | DeliveryEnded) and u.rule_id == DELETED_RULE_ID)
            or (not isinstance(u, DeadLettered) and deleted & _named(u)))]
        run: list[Record] = []
        for update in kept:
            if isinstance(update, CustomersMerged):
                self._apply_run(run)  # a merge reads what it moves: everything before it is written first
                run = []
                self._merge(update)
            elif isinstance(update, DeadLettered):
                self.dead_letter_digests.setdefault((update.stage, update.reason), set()).add(update.digest)
            elif update.customer_id not in self.erased:  # the store writes it, then forgets the customer at once
                run.append(update)
        self._apply_run(run)
        return len(kept)

    def _apply_run(self, updates: Sequence[Record]) -> None:
        """Write records as one store batch does: each customer's in one script call (one trim, one change to `v`),
        the segment and value counts with each customer's newest of the batch."""
        by_customer: dict[str, list[Record]] = {}
        for update in updates:
            by_customer.setdefault(update.customer_id, []).append(update)
        segments: dict[str, tuple[int, str]] = {}
        values: dict[str, tuple[int, str]] = {}
        for customer_id, records in by_customer.items():
            live = self._live(customer_id)
            target = _Hash(self.hashes.setdefault(live, {}))
            for update in records:
                self._apply_one(update, target, live, segments, values)
            target.finish()
        for live, (time_ms, value) in segments.items():
            self._count_segment(live, time_ms, value)
        for live, (time_ms, entry) in values.items():
            self._count_value(live, time_ms, entry)

    def _apply_one(self, update: Record, h: _Hash, live: str, segments: dict[str, tuple[int, str]],
                   values: dict[str, tuple[int, str]]) -> None:
        def newest(kept: dict[str, tuple[int, str]], time_ms: int, value: str) -> None:
            if live not in kept or kept[live][0] <= time_ms:
                kept[live] = (time_ms, value)

        if isinstance(update, TouchpointSeen):
            at = str(update.event_time_ms)
            h.add_entry("t", update.message_id, touchpoint_value(update).decode())
            h.set_channel(update.channel, at)
            if update.is_purchase:
                h.add_purchase(at)
            self._saw(live, update.event_time_ms)
        elif isinstance(update, ScoreUpdated):
            h.add_entry("s", update.message_id, score_point_value(update).decode())
            latest = latest_score_values(update)
            if latest is not None:
                h.set_latest(latest[0].decode(), latest[1], [w.decode() for w in latest[2]])
                newest(segments, update.event_time_ms, f"{update.segment}|{update.stage}")
            estimate = value_estimate(update)
            if estimate is not None:
                h.set_value(value_field(estimate).decode())
                newest(values, update.event_time_ms, value_tier_entry(estimate))
            self._saw(live, update.event_time_ms)
        elif isinstance(update, ActionTaken):
            if h.add_entry("a", update.action_id, action_value(update).decode()):
                counts = h.tally(update.rule_id)
                h.bump(counts, tally_field(update), 1)
                group = "T" if update.outcome == "fired" else "H" if update.outcome == "held_out" else ""
                if group:
                    h.earliest(counts, group, str(update.event_time_ms))
                h.bump(counts, tally_day_field(update, self._ceiling_ms()), 1)
            self._saw(live, update.event_time_ms)
            self._acted(live, update.rule_id)
        else:
            h.set_delivery(update.action_id, delivery_value(update).decode(), update.rule_id)
            self._acted(live, update.rule_id)

    def _acted(self, customer_id: str, rule_id: str) -> None:
        self.rules.setdefault(rule_id, set()).add(customer_id)
        self.rules_version += 1

    def _merge(self, merge: CustomersMerged) -> None:
        entry = json.dumps({"merge_id": merge.merge_id, "kind": merge.kind, "survivor_id": merge.survivor_id,
                            "merged_id": merge.merged_id, "reason": merge.reason,
                            "event_time_ms": merge.event_time_ms})
        survivor, merged = merge.survivor_id, merge.merged_id
        if {survivor, merged} & self.erased:
            return
        if merge.kind != "merge":
            self.hashes.get(merged, {}).pop("into", None)
            self.merged_into.pop(merged, None)
            for cid in (survivor, merged):
                def note(h: _Hash) -> None:
                    if "m:" + merge.merge_id not in h.fields:
                        h.fields["m:" + merge.merge_id] = entry
                        h.changed = True
                self._write(cid, note)
            self.mentions.setdefault(survivor, set()).add(merged)
            self.mentions.setdefault(merged, set()).add(survivor)
            return
        survivor = self._live(survivor)
        if survivor == merged:
            return
        fields = dict(self.hashes.get(merged, {}))

        def absorb(h: _Hash) -> None:
            if "m:" + merge.merge_id in h.fields:
                return
            h.changed = True
            h.fields["m:" + merge.merge_id] = entry
            seg, model, why = None, "", {}
            for name, value in fields.items():
                if name in _COUNTERS:
                    continue
                kind, _, rest = name.partition(":")
                if kind in CAPS and rest:
                    h.add_entry(kind, rest, value)
                elif kind in ("d", "m") and rest:
                    h.fields.setdefault(name, value)
                elif kind == "ch":
                    h.set_channel(rest, value)
                elif kind == "why":
                    why[int(rest)] = value
                elif kind == "r":
                    counts = h.tally(rest)
                    for part in value.split(";"):
                        if "=" in part:
                            key, count = part.split("=", 1)
                            if key in ("T", "H"):
                                h.earliest(counts, key, count)
                            else:
                                h.bump(counts, key, int(count))
                elif name == "seg":
                    seg = value
                elif name == "mv":
                    model = value
                elif name == "pu":
                    for at in purchase_times(value):
                        h.add_purchase(str(at))
                elif name == "val":
                    h.set_value(value)
            if seg is not None:
                h.set_latest(seg, model, [why[n] for n in sorted(why)])

        live = self._write(survivor, absorb)
        if fields:
            self.customers.add(live)
        for name in fields:
            if name.startswith("r:"):
                self.rules.get(name[2:], set()).discard(merged)
                self._acted(live, name[2:])
        self._count_segment(merged, 0, "")
        self._count_value(merged, 0, "")
        if "seg" in fields:
            time_ms, segment, stage = json.loads(fields["seg"])
            self._count_segment(live, int(time_ms), f"{segment}|{stage}")
        if "val" in fields:
            time_ms, predicted, tier, *_ = json.loads(fields["val"])
            self._count_value(live, int(time_ms), value_tier_entry(ValueEstimate(int(time_ms), predicted, tier)))
        self.customers.discard(merged)
        self.merged_into[merged] = live
        self.hashes[merged] = {"into": live}

    async def forget(self, customer_id: str) -> list[str]:
        live = self._live(customer_id)
        ids = sorted({live, customer_id} | {m for m in self.merged_into
                                             if follow_merges(m, self.merged_into) == live})
        holders = {self._live(h) for cid in ids for h in self.mentions.get(cid, set())} - set(ids)
        for holder in holders:
            fields = self.hashes.get(holder, {})
            for name in [n for n, v in fields.items() if n.startswith("m:") and any(cid in v for cid in ids)]:
                del fields[name]
            if holder in self.mentions:
                self.mentions[holder] -= set(ids)
                if not self.mentions[holder]:
                    del self.mentions[holder]
        for cid in ids:
            self.hashes.pop(cid, None)
            for customers in self.rules.values():
                customers.discard(cid)
            self.customers.discard(cid)
            self.merged_into.pop(cid, None)
            self.mentions.pop(cid, None)
            self._count_segment(cid, 0, "")
            self._count_value(cid, 0, "")
        self.rules_version += 1
        return ids

    # -- reading ----------------------------------------------------------------------------------------

    async def customer(self, customer_id: str, timeline_limit: int = TIMELINE_CAP) -> CustomerView:
        live = self._live(customer_id)
        return customer_view(live, customer_id, self.hashes.get(live, {}), timeline_limit)

    async def change_marker(self, customer_id: str) -> str:
        live = self._live(customer_id)
        return f"{live}|{self.hashes.get(live, {}).get('v', '0')}"

    async def segments(self) -> dict[tuple[str, str], int]:
        return {(value.split("|", 1)[0], value.split("|", 1)[1]): n for value, n in self.segment_counts.items()
                if n > 0}

    async def value_tiers(self) -> list[ValueTier]:
        return sorted((ValueTier(tier, n, self.tier_cents.get(tier, 0) / 100)
                       for tier, n in self.tier_counts.items() if n > 0), key=lambda t: -t.tier)

    async def segment_flow(self, days: int = 30) -> list[tuple[str, str, int]]:
        if not self.flow:
            return []
        last_day = max(self.flow)
        totals: dict[tuple[str, str], int] = {}
        for day in range(last_day - days + 1, last_day + 1):
            for change, n in self.flow.get(day, {}).items():
                before, _, after = change.partition(">")
                totals[(before, after)] = totals.get((before, after), 0) + n
        return sorted(((b, a, n) for (b, a), n in totals.items() if n > 0), key=lambda r: (-r[2], r[0], r[1]))

    async def event_clock(self) -> int | None:
        return None if self.clock_ms is None else min(self.clock_ms, self._ceiling_ms())

    async def customer_count(self) -> int:
        return len(self.customers)

    async def dead_letters(self) -> list[tuple[str, str, int]]:
        rows = [(stage, reason, len(digests)) for (stage, reason), digests in self.dead_letter_digests.items()]
        return sorted(rows, key=lambda r: (-r[2], r[0], r[1]))

    async def rule_ids(self) -> list[str]:
        return sorted(self.rules)

    async def rule_counts(self, rule_id: str) -> RuleCounts:
        field = "r:" + rule_id
        tallies = {cid: parse_rule_tally(self.hashes[cid][field]) for cid in sorted(self.rules.get(rule_id, ()))
                   if field in self.hashes.get(cid, {})}
        total = sum_tallies(tallies.values())
        return RuleCounts(rule_id, total.counts,
                          {cid: t.first_treated_ms for cid, t in tallies.items() if t.first_treated_ms is not None},
                          {cid: t.first_holdout_ms for cid, t in tallies.items() if t.first_holdout_ms is not None},
                          total.delivered, total.delivery_failed, total.by_day)

    async def converted(self, first_action_ms: dict[str, int], window_ms: int) -> int:
        return sum(converted_within(at, purchase_times(self.hashes.get(cid, {}).get("pu")), window_ms)
                   for cid, at in first_action_ms.items())

    async def rules_marker(self) -> str:
        return f"{self.rules_version}|{self.clock_ms}"

    async def overview_marker(self) -> str:
        state: list[Any] = [sorted(self.segment_counts.items()), sorted(self.flow.items()), len(self.customers),
                            sorted(self.samples), await self.dead_letters(), sorted(self.tier_counts.items()),
                            sorted(self.tier_cents.items())]
        return hashlib.sha256(orjson.dumps(state, default=repr)).hexdigest()

    async def save_backtest(self, result: BacktestResult) -> None:
        self.latest_backtest = result
        self.rules_version += 1

    async def backtest(self) -> BacktestResult | None:
        return self.latest_backtest

    async def record_pipeline_sample(self, sample: PipelineSample) -> None:
        self.samples[sample.minute] = sample
        for minute in [m for m in self.samples if m <= sample.minute - HISTORY_MINUTES]:
            del self.samples[minute]

    async def pipeline_samples(self) -> list[PipelineSample]:
        return [self.samples[m] for m in sorted(self.samples)]


def _named(update: Update) -> set[str]:
    if isinstance(update, CustomersMerged):
        return {update.survivor_id, update.merged_id}
    if isinstance(update, CustomerDeleted | DeadLettered):
        return set()
    return {update.customer_id}
