"""Faust wiring: agent `evaluate_rules` (scores -> actions) and agent `deliver_actions` (actions -> webhooks)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import faust
import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry
from redis.exceptions import RedisError

from services.triggers.actions import retention_action_record
from services.triggers.crossing import (
    ActionDecided,
    CrossingState,
    DecisionContext,
    StateKey,
    customer_zone,
    evaluate_scores,
    fire_due_timers,
    local_day,
)
from services.triggers.delivery import (
    ActionDelivery,
    FailedDelivery,
    WebhookSender,
    endpoint_refusal,
    guarded_client,
)
from services.triggers.erasure import DELETED_RULE_ID, deleted_ids, deletion_action_records, forget_customers
from services.triggers.events import ScoreUpdated
from services.triggers.metrics import TriggersMetrics
from services.triggers.rules import Rule, RuleSet, Silence, parse_rule_file
from services.triggers.settings import TriggersSettings
from services.triggers.state_store import ERASED_KEY, DeliveryLedger, DeliveryQueue, RuleStateStore
from touchstream import avro
from touchstream.eventtime import event_time_ceiling_ms
from touchstream.privacy import ErasedCustomers
from touchstream.settings import CoreSettings
from touchstream.streams import Outbox, add_health_pages, batches, faust_topic, make_app
from touchstream.topics import ACTIONS, CUSTOMER_DELETIONS, DEADLETTER, SCORES

log = logging.getLogger(__name__)
T = TypeVar("T")
DAY_S = 86_400
REDIS_RETRY_S = 1.0
# A consumer lag longer than this many actions only costs an idempotent re-queue.
QUEUED_HERE_KEPT = 100_000


def load_rules(path: Path) -> RuleSet:
    """Read and parse the rule file at `path`."""
    return parse_rule_file(path.read_text(encoding="utf-8"), source=str(path))


def check_configuration(rules: Sequence[Rule], settings: TriggersSettings) -> None:
    """Refuse to start with a rule whose endpoint is unknown or an endpoint the SSRF guard refuses."""
    for rule in rules:
        if rule.action.endpoint not in settings.endpoints:
            raise ValueError(
                f"rule {rule.id!r}: endpoint {rule.action.endpoint!r} is not registered; "
                f"set TOUCHSTREAM_TRIGGERS_ENDPOINTS (registered: {sorted(settings.endpoints) or 'none'})"
            )
    for name in settings.deletion_notice_endpoints():
        if name not in settings.endpoints:
            raise ValueError(f"TOUCHSTREAM_TRIGGERS_DELETION_ENDPOINTS: endpoint {name!r} is not registered "
                             f"(registered: {sorted(settings.endpoints) or 'none'})")
    for name, endpoint in settings.endpoints.items():
        refusal = endpoint_refusal(endpoint.url, settings.allow_private_endpoints, settings.endpoint_allowlist)
        if refusal:
            raise ValueError(f"endpoint {name!r}: {refusal}")


def build_app(core: CoreSettings, settings: TriggersSettings, registry: CollectorRegistry = REGISTRY) -> faust.App:
    """Build the triggers Faust app: rules evaluated on scores, actions delivered as signed webhooks."""
    rule_set = load_rules(settings.rules_file)
    rules, policy = rule_set.rules, rule_set.policy
    rules_by_id = {rule.id: rule for rule in rules}
    silence_rules = [rule.id for rule in rules if isinstance(rule.when, Silence)]
    check_configuration(rules, settings)
    app = make_app("triggers", core, settings.web_port, settings.web_host)
    scores_topic = faust_topic(app, SCORES, core)
    actions_topic = faust_topic(app, ACTIONS, core)
    deadletter_topic = faust_topic(app, DEADLETTER, core)
    deletions_topic = faust_topic(app, CUSTOMER_DELETIONS, core)
    metrics = TriggersMetrics(registry)
    ready = {"ok": False}
    add_health_pages(app, ready, registry)

    # Clients connect lazily on first use, inside the worker's event loop.
    redis = aioredis.from_url(core.redis_url)
    http = guarded_client(settings.delivery_timeout_s, allow_private=settings.allow_private_endpoints,
                          allowlist=settings.endpoint_allowlist)
    states = RuleStateStore(redis, settings.state_ttl_days * DAY_S)
    # Action ids the evaluator queued for delivery itself (see queue_straight_away), oldest first.
    queued_here: OrderedDict[str, None] = OrderedDict()
    # Durable (Redis): scores of erased customers are not evaluated, their actions never queued nor sent,
    # also when a restarted or lagging worker reads `scores` or `actions` again.
    erased = ErasedCustomers(redis, ERASED_KEY, core.erased_customer_ttl_s)
    # An erasure and a batch of scores never interleave in this worker: a batch that found the customer
    # not erased cannot save its rule states after the erasure deleted them.
    erasure_lock = asyncio.Lock()

    async def dead_letter_actions(failures: Sequence[FailedDelivery]) -> None:
        outbox = Outbox(metrics)
        for failure in failures:
            original = avro.encode(ACTIONS.schema, dict(failure.action))
            await outbox.dead_letter(deadletter_topic, "delivery", ACTIONS.name, failure.reason,
                                     failure.action["customer_id"].encode(), original)
        await outbox.flush()

    delivery_queue = DeliveryQueue(redis)
    delivery = ActionDelivery(
        WebhookSender(http, settings.endpoints),
        DeliveryLedger(redis, settings.delivered_ttl_days * DAY_S),
        delivery_queue,
        metrics,
        dead_letter_actions,
        endpoints=sorted(settings.endpoints),
        concurrency_per_endpoint=settings.endpoint_concurrency,
        breaker_threshold=settings.breaker_threshold,
        breaker_cool_off_s=settings.breaker_cool_off_s,
        lease_s=settings.delivery_lease_s,
        poll_s=settings.dispatch_poll_s,
        schedule=settings.retry_schedule_s,
        erased=erased,
    )

    async def until_redis_answers(call: Callable[[], Awaitable[T]]) -> T:
        # Never drop a batch because Redis blinked: wait and try again; Kafka holds the offsets.
        while True:
            try:
                return await call()
            except (RedisError, OSError) as exc:
                metrics.redis_errors.inc()
                log.warning("redis unavailable, retrying in %.1fs: %s", REDIS_RETRY_S, exc)
                await asyncio.sleep(REDIS_RETRY_S)

    async def evaluate_score_batch(events: Sequence[faust.EventT]) -> None:
        started = time.perf_counter()
        outbox = Outbox(metrics)
        scores: list[ScoreUpdated] = []
        for event in events:
            metrics.events_in.labels(SCORES.name).inc()
            if event.value is None:
                continue  # a tombstone: `scores` is compacted, and an erasure nulls the customer's key
            try:
                scores.append(ScoreUpdated.from_record(avro.decode(SCORES.schema, event.value)))
            except avro.DecodeError as exc:
                await outbox.dead_letter(deadletter_topic, "triggers", SCORES.name, f"decode: {exc}",
                                         _raw(event.key), event.value)
        gone = await until_redis_answers(lambda: erased.among(s.customer_id for s in scores))
        if gone:
            metrics.events_erased.inc(sum(s.customer_id in gone for s in scores))
            scores = [s for s in scores if s.customer_id not in gone]
        keys = {(rule.id, score.customer_id) for score in scores for rule in rules}
        stored = await until_redis_answers(lambda: states.load(keys))
        context = DecisionContext(policy, now_ms=int(time.time() * 1000))
        if policy.frequency_cap_per_day:
            days = {(s.customer_id, local_day(s.event_time_ms, customer_zone(s, policy))) for s in scores}
            context.caps.update(await until_redis_answers(lambda: states.load_caps(days)))
        decisions, changed = evaluate_scores(rules, scores, stored, context)
        if silence_rules and scores:
            timer_decisions, timer_changes = await fire_timers(max(s.event_time_ms for s in scores),
                                                               {**stored, **changed}, context)
            decisions += timer_decisions
            changed.update(timer_changes)
        created_at_ms = int(time.time() * 1000)
        records = []
        for decided in decisions:
            record = retention_action_record(decided, created_at_ms, policy)
            records.append(record)
            await outbox.send(actions_topic, decided.score.customer_id, avro.encode(ACTIONS.schema, record))
            metrics.actions.labels(decided.rule.id, decided.outcome.value, decided.reason or "").inc()
        await outbox.flush()
        if records:
            await queue_straight_away(records)
        # Save state only once the actions are acknowledged: a crash in between replays the
        # batch, which re-emits the same action ids, and delivery drops the repeats.
        await until_redis_answers(lambda: states.save(changed, silence_rules))
        caps = {key: context.caps[key] for key in context.caps_changed}
        await until_redis_answers(lambda: states.save_caps(caps))
        for (rule_id, result), count in context.timer_events.items():
            metrics.timers.labels(rule_id, result).inc(count)
        metrics.batch_events.observe(len(events))
        metrics.batch_seconds.observe(time.perf_counter() - started)

    async def queue_straight_away(records: list[dict[str, Any]]) -> None:
        # The actions are durable in Kafka now; queueing them here saves the hop through the
        # `actions` topic. That consumer stays the path after a crash: it skips the ids this
        # process has queued (remembered only once queued), and queueing is idempotent anyway.
        # Failures (unknown or disabled endpoint) are left to it, so they are dead-lettered once.
        failed = {f.action["action_id"] for f in await until_redis_answers(lambda: delivery.enqueue(records))}
        for record in records:
            if record["outcome"] == "fired" and record["action_id"] not in failed:
                queued_here[record["action_id"]] = None
        while len(queued_here) > QUEUED_HERE_KEPT:
            queued_here.popitem(last=False)

    async def fire_timers(latest_event_ms: int, current: dict[StateKey, CrossingState],
                          context: DecisionContext) -> tuple[list[ActionDecided], dict[StateKey, CrossingState]]:
        # One score stamped years ahead must not make every timer due at once.
        ceiling_ms = event_time_ceiling_ms(int(time.time() * 1000), core.event_time_tolerance_s)
        watermark = await until_redis_answers(lambda: states.raise_watermark(latest_event_ms, ceiling_ms))
        metrics.watermark.set(watermark / 1000)
        watermark -= int(settings.timer_lateness_s * 1000)
        due = await until_redis_answers(lambda: states.due_timers(watermark))
        # Timers started in this very batch are not indexed yet; partitions interleave, so the
        # watermark may already be past their deadline.
        due += [key for key, state in current.items()
                if key[0] in silence_rules and 0 < state.timer_due_ms <= watermark and key not in due]
        missing = [key for key in due if key not in current]
        current = {**current, **await until_redis_answers(lambda: states.load(missing))}
        if policy.frequency_cap_per_day:
            days = set()
            for key in due:
                state = current.get(key)
                if state and state.timer_due_ms and state.timer_snapshot and key[0] in rules_by_id:
                    started_by = ScoreUpdated.from_json(json.loads(state.timer_snapshot))
                    days.add((key[1], local_day(state.timer_due_ms, customer_zone(started_by, policy))))
            loaded = await until_redis_answers(lambda: states.load_caps(days - context.caps.keys()))
            context.caps.update(loaded)
        return fire_due_timers(rules_by_id, due, current, watermark, context)

    async def deliver_action_batch(events: Sequence[faust.EventT]) -> None:
        started = time.perf_counter()
        outbox = Outbox(metrics)
        actions: list[dict[str, Any]] = []
        originals: dict[str, faust.EventT] = {}
        for event in events:
            metrics.events_in.labels(ACTIONS.name).inc()
            try:
                action = avro.decode(ACTIONS.schema, event.value)
            except avro.DecodeError as exc:
                await outbox.dead_letter(deadletter_topic, "delivery", ACTIONS.name, f"decode: {exc}",
                                         _raw(event.key), event.value)
                continue
            if action["action_id"] in queued_here:
                continue
            actions.append(action)
            originals.setdefault(action["action_id"], event)
        # Only a Redis write: the timer task does the HTTP, so a dead receiver never stalls this stream.
        # Actions about erased customers (decided before the erasure, or read again) are not queued.
        failures = await until_redis_answers(lambda: delivery.enqueue(actions))
        for failure in failures:
            event = originals[failure.action["action_id"]]
            await outbox.dead_letter(deadletter_topic, "delivery", ACTIONS.name, failure.reason,
                                     _raw(event.key), event.value)
        await outbox.flush()
        metrics.batch_events.observe(len(events))
        metrics.batch_seconds.observe(time.perf_counter() - started)

    @app.task
    async def deliver_due_actions() -> None:
        """The retry timer: deliver queued actions as they fall due, for as long as the worker runs."""
        await delivery.run()

    @app.timer(interval=15.0)
    async def publish_queue_sizes() -> None:
        try:
            await delivery.pending()
        except (RedisError, OSError) as exc:
            metrics.redis_errors.inc()
            log.warning("queue sizes: %s", exc)

    async def forget_batch(events: Sequence[faust.EventT]) -> None:
        """Erasures: forget the customers' states and queued actions, then send the deletion notices."""
        outbox = Outbox(metrics)
        records = []
        for event in events:
            metrics.events_in.labels(CUSTOMER_DELETIONS.name).inc()
            try:
                records.append(avro.decode(CUSTOMER_DELETIONS.schema, event.value or b""))
            except avro.DecodeError as exc:
                await outbox.dead_letter(deadletter_topic, "triggers", CUSTOMER_DELETIONS.name, f"decode: {exc}",
                                         _raw(event.key), event.value or b"")
        ids = [cid for record in records for cid in deleted_ids(record)]
        if ids:
            async with erasure_lock:
                deleted, dropped = await until_redis_answers(
                    lambda: forget_customers(redis, delivery_queue, erased, ids, rules_by_id, settings.endpoints))
            metrics.customers_forgotten.inc(len(set(ids)))
            metrics.deliveries_dropped.inc(dropped)
            log.info("triggers: forgot %d customer ids (%d keys, %d queued actions)", len(set(ids)), deleted, dropped)
        notices = []
        created_at_ms = int(time.time() * 1000)
        for record in records:
            for notice in deletion_action_records(record, settings.deletion_notice_endpoints(), created_at_ms):
                notices.append(notice)
                await outbox.send(actions_topic, notice["customer_id"], avro.encode(ACTIONS.schema, notice))
                metrics.actions.labels(DELETED_RULE_ID, "fired", "").inc()
        await outbox.flush()
        if notices:
            await queue_straight_away(notices)

    @app.agent(deletions_topic, name="forget_customers")
    async def forget_customers_agent(stream: faust.StreamT) -> None:
        async for events in batches(stream, core):
            await forget_batch(events)

    @app.agent(scores_topic, name="evaluate_rules")
    async def evaluate_rules(stream: faust.StreamT) -> None:
        async for events in batches(stream, core):
            async with erasure_lock:
                await evaluate_score_batch(events)

    @app.agent(actions_topic, name="deliver_actions")
    async def deliver_actions(stream: faust.StreamT) -> None:
        async for events in batches(stream, core):
            await deliver_action_batch(events)

    async def mark_ready(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        ready["ok"] = True

    async def close_clients(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        await http.aclose()
        await redis.aclose()

    # mode's SignalHandlerT is written with mypy_extensions callable types that no plain
    # async def matches, so the connect calls are the one place type checking is waived.
    app.on_partitions_assigned.connect(mark_ready)  # type: ignore[arg-type]
    app.on_before_shutdown.connect(close_clients)  # type: ignore[arg-type]

    return app


def _raw(key: Any) -> bytes | None:
    return key if isinstance(key, bytes | None) else str(key).encode()
