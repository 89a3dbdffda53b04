"""Faust wiring: agent `evaluate_rules` (scores -> actions) and agent `deliver_actions` (actions -> webhooks)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import faust
import httpx
import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry
from redis.exceptions import RedisError

from services.triggers.actions import retention_action_record
from services.triggers.crossing import evaluate_scores
from services.triggers.delivery import ActionDelivery, WebhookSender, endpoint_refusal
from services.triggers.events import ScoreUpdated
from services.triggers.metrics import TriggersMetrics
from services.triggers.rules import Rule, parse_rules
from services.triggers.settings import TriggersSettings
from services.triggers.state_store import DeliveryLedger, RuleStateStore
from touchstream import avro
from touchstream.settings import CoreSettings
from touchstream.streams import Outbox, add_health_pages, batches, faust_topic, make_app
from touchstream.topics import ACTIONS, DEADLETTER, SCORES

log = logging.getLogger(__name__)
T = TypeVar("T")
DAY_S = 86_400
REDIS_RETRY_S = 1.0


def load_rules(path: Path) -> tuple[Rule, ...]:
    """Read and parse the rule file at `path`."""
    return parse_rules(path.read_text(encoding="utf-8"), source=str(path))


def check_configuration(rules: Sequence[Rule], settings: TriggersSettings) -> None:
    """Refuse to start with a rule whose endpoint is unknown or an endpoint the SSRF guard refuses."""
    for rule in rules:
        if rule.action.endpoint not in settings.endpoints:
            raise ValueError(
                f"rule {rule.id!r}: endpoint {rule.action.endpoint!r} is not registered; "
                f"set TOUCHSTREAM_TRIGGERS_ENDPOINTS (registered: {sorted(settings.endpoints) or 'none'})"
            )
    for name, endpoint in settings.endpoints.items():
        refusal = endpoint_refusal(endpoint.url, settings.allow_private_endpoints)
        if refusal:
            raise ValueError(f"endpoint {name!r}: {refusal}")


def build_app(core: CoreSettings, settings: TriggersSettings, registry: CollectorRegistry = REGISTRY) -> faust.App:
    """Build the triggers Faust app: rules evaluated on scores, actions delivered as signed webhooks."""
    rules = load_rules(settings.rules_file)
    check_configuration(rules, settings)
    app = make_app("triggers", core, settings.web_port, settings.web_host)
    scores_topic = faust_topic(app, SCORES, core)
    actions_topic = faust_topic(app, ACTIONS, core)
    deadletter_topic = faust_topic(app, DEADLETTER, core)
    metrics = TriggersMetrics(registry)
    ready = {"ok": False}
    add_health_pages(app, ready, registry)

    # Clients connect lazily on first use, inside the worker's event loop.
    redis = aioredis.from_url(core.redis_url)
    http = httpx.AsyncClient(
        timeout=settings.delivery_timeout_s,
        follow_redirects=False,
        limits=httpx.Limits(max_connections=settings.delivery_concurrency),
    )
    states = RuleStateStore(redis, settings.state_ttl_days * DAY_S)
    delivery = ActionDelivery(
        WebhookSender(http, settings.endpoints),
        DeliveryLedger(redis, settings.delivered_ttl_days * DAY_S),
        metrics,
        max_attempts=settings.delivery_max_attempts,
        backoff_s=settings.delivery_backoff_s,
        concurrency=settings.delivery_concurrency,
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
            try:
                scores.append(ScoreUpdated.from_record(avro.decode(SCORES.schema, event.value)))
            except avro.DecodeError as exc:
                await outbox.dead_letter(deadletter_topic, "triggers", SCORES.name, f"decode: {exc}",
                                         _raw(event.key), event.value)
        keys = {(rule.id, score.customer_id) for score in scores for rule in rules}
        stored = await until_redis_answers(lambda: states.load(keys))
        decisions, changed = evaluate_scores(rules, scores, stored)
        created_at_ms = int(time.time() * 1000)
        for decided in decisions:
            record = retention_action_record(decided, created_at_ms)
            await outbox.send(actions_topic, decided.score.customer_id, avro.encode(ACTIONS.schema, record))
            metrics.actions.labels(decided.rule.id, decided.outcome.value, decided.reason or "").inc()
        await outbox.flush()
        # Save state only once the actions are acknowledged: a crash in between replays the
        # batch, which re-emits the same action ids, and delivery drops the repeats.
        await until_redis_answers(lambda: states.save(changed))
        metrics.batch_events.observe(len(events))
        metrics.batch_seconds.observe(time.perf_counter() - started)

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
            actions.append(action)
            originals.setdefault(action["action_id"], event)
        failures = await until_redis_answers(lambda: delivery.deliver_batch(actions))
        for failure in failures:
            event = originals[failure.action["action_id"]]
            await outbox.dead_letter(deadletter_topic, "delivery", ACTIONS.name, failure.reason,
                                     _raw(event.key), event.value)
        await outbox.flush()
        metrics.batch_events.observe(len(events))
        metrics.batch_seconds.observe(time.perf_counter() - started)

    @app.agent(scores_topic, name="evaluate_rules")
    async def evaluate_rules(stream: faust.StreamT) -> None:
        async for events in batches(stream, core):
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
