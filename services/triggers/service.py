"""The triggers service layer: rules on score batches, actions out, erasures, and the delivery queue's feed.

The stream kernel hands it decoded batches (scores, actions, customers.deletions); delivery
itself (`ActionDelivery.run`, the retry timer) runs beside it in the same worker.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from services.triggers.actions import retention_action_record
from services.triggers.crossing import (
    ActionDecided,
    CrossingState,
    DecisionContext,
    StateKey,
    as_backfill,
    customer_zone,
    evaluate_scores,
    fire_due_timers,
    local_day,
)
from services.triggers.delivery import ActionDelivery, DeliveryEnded, FailedDelivery
from services.triggers.erasure import DELETED_RULE_ID, deleted_ids, deletion_action_records, forget_customers
from services.triggers.events import ScoreUpdated
from services.triggers.metrics import TriggersMetrics
from services.triggers.rules import RuleSet, Silence
from services.triggers.settings import TriggersSettings
from services.triggers.state_store import DeliveryQueue, RuleStates
from touchstream import avro
from touchstream.eventtime import DEFAULT_EVENT_TIME_TOLERANCE_S, HOUR_MS, event_time_ceiling_ms
from touchstream.privacy import ErasedCustomers
from touchstream.streams import Consumes, Outbox, Record
from touchstream.topics import ACTION_DELIVERIES, ACTIONS, CUSTOMER_DELETIONS, SCORES

log = logging.getLogger(__name__)
# A consumer lag longer than this many actions only costs an idempotent re-queue.
QUEUED_HERE_KEPT = 100_000


class TriggersService:
    """Decide actions from score batches, queue them for delivery, and forget erased customers."""

    def __init__(self, rule_set: RuleSet, settings: TriggersSettings, redis: aioredis.Redis,
                 states: RuleStates, delivery: ActionDelivery, delivery_queue: DeliveryQueue,
                 metrics: TriggersMetrics, erased: ErasedCustomers,
                 event_time_tolerance_s: float = DEFAULT_EVENT_TIME_TOLERANCE_S) -> None:
        self.rules = rule_set.rules
        self.policy = rule_set.policy
        self.rules_by_id = {rule.id: rule for rule in self.rules}
        self.silence_rules = [rule.id for rule in self.rules if isinstance(rule.when, Silence)]
        self.settings = settings
        self.redis = redis
        self.states = states
        self.delivery = delivery
        self.delivery_queue = delivery_queue
        self.metrics = metrics
        # Action ids the evaluator queued for delivery itself (see queue_straight_away), oldest first.
        self.queued_here: OrderedDict[str, None] = OrderedDict()
        # Erased customers (durable): their scores, in flight during the erasure or read again by a
        # restarted or lagging worker, are not evaluated; delivery neither queues nor sends their actions.
        self.erased = erased
        # The timer watermark never runs past the wall clock plus this (CoreSettings.event_time_tolerance_s).
        self.event_time_tolerance_s = event_time_tolerance_s

    def inputs(self) -> tuple[Consumes, ...]:
        # Erasures first within a batch: a score or action of an erased customer in the same batch is dropped.
        return (Consumes((CUSTOMER_DELETIONS,), self.forget_batch),
                Consumes((SCORES,), self.evaluate_score_batch),
                Consumes((ACTIONS,), self.deliver_action_batch))

    async def evaluate_score_batch(self, records: list[Record], outbox: Outbox) -> None:
        """Decide on a batch of scores; actions acknowledged first, rule states saved after."""
        rules, policy, states = self.rules, self.policy, self.states
        scores = [ScoreUpdated.from_record(r.value) for r in records if r.value is not None]
        gone = await self.erased.among(s.customer_id for s in scores)
        if gone:
            self.metrics.events_erased.inc(sum(s.customer_id in gone for s in scores))
            scores = [s for s in scores if s.customer_id not in gone]
        keys = {(rule.id, score.customer_id) for score in scores for rule in rules}
        stored = await states.load(keys)
        context = DecisionContext(policy, now_ms=int(time.time() * 1000))
        if policy.frequency_cap_per_day:
            days = {(s.customer_id, local_day(s.event_time_ms, customer_zone(s, policy))) for s in scores}
            context.caps.update(await states.load_caps(days))
        decisions, changed = evaluate_scores(rules, scores, stored, context)
        if self.silence_rules and scores:
            timer_decisions, timer_changes = await self.fire_timers(max(s.event_time_ms for s in scores),
                                                                    {**stored, **changed}, context)
            decisions += timer_decisions
            changed.update(timer_changes)
        if self.settings.backfill_horizon_hours:
            decisions = as_backfill(decisions, context.now_ms - round(self.settings.backfill_horizon_hours * HOUR_MS))
        created_at_ms = int(time.time() * 1000)
        actions = []
        for decided in decisions:
            record = retention_action_record(decided, created_at_ms, policy)
            actions.append(record)
            await outbox.send(ACTIONS, decided.score.customer_id, avro.encode(ACTIONS.schema, record))
            self.metrics.actions.labels(decided.rule.id, decided.outcome.value, decided.reason or "").inc()
        await outbox.flush()
        if actions:
            await self.queue_straight_away(actions)
        # Save state only once the actions are acknowledged: a crash in between replays the
        # batch, which re-emits the same action ids, and delivery drops the repeats.
        await states.save(changed, self.silence_rules)
        await states.save_caps({key: context.caps[key] for key in context.caps_changed})
        for (rule_id, result), count in context.timer_events.items():
            self.metrics.timers.labels(rule_id, result).inc(count)

    async def queue_straight_away(self, actions: list[dict[str, Any]]) -> None:
        """Queue acknowledged actions for delivery now, saving them the hop through the `actions` topic.

        That topic's consumer stays the path after a crash: it skips the ids this process has
        queued (remembered only once queued), and queueing is idempotent anyway. Failures
        (unknown or disabled endpoint) are left to it, so they are dead-lettered once.
        """
        failed = {f.action["action_id"] for f in await self.delivery.enqueue(actions)}
        for action in actions:
            if action["outcome"] == "fired" and action["action_id"] not in failed:
                self.queued_here[action["action_id"]] = None
        while len(self.queued_here) > QUEUED_HERE_KEPT:
            self.queued_here.popitem(last=False)

    async def fire_timers(self, latest_event_ms: int, current: dict[StateKey, CrossingState],
                          context: DecisionContext) -> tuple[list[ActionDecided], dict[StateKey, CrossingState]]:
        states = self.states
        # One score stamped years ahead must not make every timer due at once.
        ceiling_ms = event_time_ceiling_ms(int(time.time() * 1000), self.event_time_tolerance_s)
        watermark = await states.raise_watermark(latest_event_ms, ceiling_ms)
        self.metrics.watermark.set(watermark / 1000)
        watermark -= int(self.settings.timer_lateness_s * 1000)
        due = await states.due_timers(watermark)
        # Timers started in this very batch are not indexed yet; partitions interleave, so the
        # watermark may already be past their deadline.
        due += [key for key, state in current.items()
                if key[0] in self.silence_rules and 0 < state.timer_due_ms <= watermark and key not in due]
        missing = [key for key in due if key not in current]
        current = {**current, **await states.load(missing)}
        if self.policy.frequency_cap_per_day:
            days = set()
            for key in due:
                state = current.get(key)
                if state and state.timer_due_ms and state.timer_snapshot and key[0] in self.rules_by_id:
                    started_by = ScoreUpdated.from_json(json.loads(state.timer_snapshot))
                    days.add((key[1], local_day(state.timer_due_ms, customer_zone(started_by, self.policy))))
            context.caps.update(await states.load_caps(days - context.caps.keys()))
        return fire_due_timers(self.rules_by_id, due, current, watermark, context)

    async def deliver_action_batch(self, records: list[Record], outbox: Outbox) -> None:
        """Queue actions (decided by any worker) for delivery; only a Redis write, the HTTP runs elsewhere."""
        actions: list[dict[str, Any]] = []
        originals: dict[str, Record] = {}
        for record in records:
            action = record.value
            if action is None or action["action_id"] in self.queued_here:
                continue
            actions.append(action)
            originals.setdefault(action["action_id"], record)
        # A dead receiver never stalls this stream: delivery's own task does the HTTP. Actions about
        # erased customers (decided before the erasure, or read again) are not queued.
        failures = await self.delivery.enqueue(actions)
        for failure in failures:
            original = originals[failure.action["action_id"]]
            await outbox.dead_letter(ACTIONS.name, failure.reason, original.key, original.raw)
        await announce_deliveries(outbox, [failure.ended() for failure in failures])

    async def forget_batch(self, records: list[Record], outbox: Outbox) -> None:
        """Erasures: forget the customers' states and queued actions, then send the deletion notices."""
        deletions = [r.value for r in records if r.value is not None]
        ids = [cid for deletion in deletions for cid in deleted_ids(deletion)]
        if ids:
            deleted, dropped = await forget_customers(self.redis, self.delivery_queue, self.erased, ids,
                                                      self.rules_by_id, self.settings.endpoints)
            self.metrics.customers_forgotten.inc(len(set(ids)))
            self.metrics.deliveries_dropped.inc(dropped)
            log.info("triggers: forgot %d customer ids (%d keys, %d queued actions)", len(set(ids)), deleted, dropped)
        notices = []
        created_at_ms = int(time.time() * 1000)
        for deletion in deletions:
            for notice in deletion_action_records(deletion, self.settings.deletion_notice_endpoints(), created_at_ms):
                notices.append(notice)
                await outbox.send(ACTIONS, notice["customer_id"], avro.encode(ACTIONS.schema, notice))
                self.metrics.actions.labels(DELETED_RULE_ID, "fired", "").inc()
        await outbox.flush()
        if notices:
            await self.queue_straight_away(notices)


async def dead_letter_failed_deliveries(outbox: Outbox, failures: Sequence[FailedDelivery]) -> None:
    """Send actions delivery gave up on to `deadletter`, each with its reason, and say so on
    `actions.deliveries`; return once every record is acknowledged."""
    for failure in failures:
        original = avro.encode(ACTIONS.schema, dict(failure.action))
        await outbox.dead_letter(ACTIONS.name, failure.reason, failure.action["customer_id"].encode(), original)
    await announce_deliveries(outbox, [failure.ended() for failure in failures])
    await outbox.flush()


async def announce_deliveries(outbox: Outbox, outcomes: Sequence[DeliveryEnded]) -> None:
    """Add how each action's delivery ended to `outbox` (topic actions.deliveries, keyed by customer id).

    A `customer.deleted` notice is left out: it is about a customer just erased, and nobody
    read-models it (its delivery shows in triggers' metrics).
    """
    for outcome in outcomes:
        if outcome.action["rule_id"] == DELETED_RULE_ID:
            continue
        await outbox.send(ACTION_DELIVERIES, outcome.action["customer_id"],
                          avro.encode(ACTION_DELIVERIES.schema, outcome.record()))
