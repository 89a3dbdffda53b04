"""Wiring: the stream kernel feeds the read model (seven topics -> Redis) and the pages share the web server.

The pages are aiohttp routes added to the Faust worker's own web server (one port for pages,
JSON API, /metrics and health), so the console is one process per worker like every service.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import faust
import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry, Histogram

from services.console.quality import LatencyWindow, RateMeter
from services.console.readmodel import (
    action_taken,
    customer_deleted,
    customers_merged,
    dead_lettered,
    delivery_ended,
    score_updated,
    touchpoint_seen,
)
from services.console.settings import ConsoleSettings
from services.console.store import ReadModelStore, Update
from services.console.web import ConsoleWeb
from services.triggers.rules import Rule, RuleError, parse_rules
from touchstream.eventtime import DAY_S
from touchstream.metrics import ServiceMetrics, metric_name
from touchstream.settings import CoreSettings
from touchstream.streams import (
    Consumes,
    Outbox,
    Readiness,
    Record,
    StreamKernel,
    add_health_pages,
    make_app,
    run_kernel,
    transient_redis_error,
)
from touchstream.topics import (
    ACTION_DELIVERIES,
    ACTIONS,
    CUSTOMER_DELETIONS,
    DEADLETTER,
    IDENTITY_MERGES,
    SCORES,
    TOUCHPOINTS_RESOLVED,
    TopicSpec,
)

log = logging.getLogger(__name__)
REDIS_RETRY_S = 1.0
# Read-model updates written to Redis: declared below, and what the console benchmark waits on.
READ_MODEL_UPDATES = "read_model_updates"
READ_MODEL_UPDATES_TOTAL = metric_name("console", READ_MODEL_UPDATES, "total")
# customers.deletions: an erasure makes the read model forget the customer (ReadModelStore.forget).
CONSUMED: tuple[TopicSpec, ...] = (TOUCHPOINTS_RESOLVED, IDENTITY_MERGES, SCORES, ACTIONS, ACTION_DELIVERIES,
                                   DEADLETTER, CUSTOMER_DELETIONS)
_CONVERTERS: dict[str, Callable[[Mapping[str, Any]], Update]] = {
    TOUCHPOINTS_RESOLVED.name: touchpoint_seen,
    IDENTITY_MERGES.name: customers_merged,
    SCORES.name: score_updated,
    ACTIONS.name: action_taken,
    ACTION_DELIVERIES.name: delivery_ended,
    DEADLETTER.name: dead_lettered,
    CUSTOMER_DELETIONS.name: customer_deleted,
}


def load_rules(settings: ConsoleSettings) -> tuple[Rule, ...]:
    """Read the rule file triggers uses; without one the pages simply draw no thresholds."""
    try:
        return parse_rules(settings.rules_file.read_text(encoding="utf-8"), source=str(settings.rules_file))
    except (OSError, RuleError) as exc:
        log.warning("no rules for the console (%s): %s", settings.rules_file, exc)
        return ()


def latency_s(topic: str, record: Mapping[str, Any], now_s: float) -> float | None:
    """How long after ingest accepted the event behind a record it reached its point, in seconds.

    Touchpoints, scores and actions: until they got here (so the read model's own lag counts too). A
    delivered action: until the receiver acknowledged it, as triggers saw it. Others carry no such time.

    >>> latency_s("scores", {"received_at_ms": 1_000}, 3.5), latency_s("identity.merges", {}, 3.5)
    (2.5, None)
    >>> latency_s("actions.deliveries", {"outcome": "delivered", "received_at_ms": 1_000, "ended_at_ms": 1_250}, 9.0)
    0.25
    """
    if topic == ACTION_DELIVERIES.name:
        if record.get("outcome") != "delivered":
            return None
        return max(0.0, (int(record["ended_at_ms"]) - int(record["received_at_ms"])) / 1000)
    if topic == TOUCHPOINTS_RESOLVED.name:
        value = (record.get("event") or {}).get("received_at_ms")
    elif topic in (SCORES.name, ACTIONS.name):
        value = record.get("received_at_ms")
    else:
        return None
    return max(0.0, now_s - value / 1000) if isinstance(value, int) else None


def updates_of(records: Sequence[Record], metrics: ServiceMetrics, arrivals: LatencyWindow | None = None,
               arrival_seconds: Histogram | None = None, now_s: float | None = None) -> list[Update]:
    """Turn a batch of decoded records (any of the consumed topics, in arrival order) into read-model updates.

    With `arrivals` / `arrival_seconds`, also note how long after ingest accepted it each record got here.
    """
    updates: list[Update] = []
    now = time.time() if now_s is None else now_s
    arrival_by_topic: dict[str, Any] = {}  # the histogram's child per topic (labels() is not free)
    for record in records:
        topic, value = record.topic, record.value
        if value is None:
            continue  # a tombstone (`scores` is compacted; an erasure nulls the customer's key)
        try:
            updates.append(_CONVERTERS[topic](value))
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            # The console only reads; producing to deadletter from here could loop on a bad
            # deadletter record, so a record it cannot read is counted and logged instead.
            metrics.events_failed.labels(f"{topic} unreadable").inc()
            log.warning("skipped an unreadable %s record: %s", topic, type(exc).__name__)
            continue
        latency = latency_s(topic, value, now)
        if latency is not None:
            if arrivals is not None:
                arrivals.add(topic, latency, now)
            if arrival_seconds is not None:
                child = arrival_by_topic.get(topic)
                if child is None:
                    child = arrival_by_topic[topic] = arrival_seconds.labels(topic)
                child.observe(latency)
    return updates


def build_app(core: CoreSettings, settings: ConsoleSettings, registry: CollectorRegistry = REGISTRY) -> faust.App:
    """Build the console Faust app: the read model agent and the pages."""
    app = make_app("console", core, settings.web_port, settings.web_host)
    metrics = ServiceMetrics("console", registry)
    page_seconds = metrics.histogram("page_render", "Server time to answer a page.", ["page"])
    updates_applied = metrics.counter(READ_MODEL_UPDATES, "Read-model updates written to Redis.")
    arrival_seconds = metrics.histogram("event_to_read_model", "From ingest accepting an event to its record "
                                        "reaching the console, by topic (actions.deliveries: to the webhook's 2xx).",
                                        ["topic"])

    redis = aioredis.from_url(core.redis_url)
    store = ReadModelStore(redis, settings.key_prefix, int(settings.customer_ttl_days * DAY_S),
                           event_time_tolerance_s=core.event_time_tolerance_s,
                           erased_ttl_s=core.erased_customer_ttl_s)
    feed_rate = RateMeter()
    arrivals = LatencyWindow()
    api_refused = metrics.counter(
        "api_auth_refused", "JSON API requests refused for their admin key: bad_key (a wrong key, counted against its "
        "address) or locked_out (429: too many wrong keys from the address).", ["reason"])
    pages = ConsoleWeb(store, redis, settings, load_rules(settings), page_seconds, feed_rate, arrivals, api_refused)
    # Faust's web driver is aiohttp: the console's routes join its router before it starts.
    pages.register(app.web.web_app.router)  # type: ignore[attr-defined]

    async def apply_batch(records: list[Record], outbox: Outbox) -> None:
        updates = updates_of(records, metrics, arrivals, arrival_seconds)
        # Every write is idempotent: a batch retried (Redis blinked) or handled again changes nothing.
        await store.apply(updates)
        updates_applied.inc(len(updates))
        feed_rate.add(len(updates), time.time())

    readiness = Readiness("partitions_assigned")
    # Tombstones and unreadable records are passed over here: the console only reads, and
    # producing to deadletter from the console could loop on a bad deadletter record.
    kernel = StreamKernel("console", core, [Consumes(CONSUMED, apply_batch, dead_letters=False)],
                          metrics, readiness)
    add_health_pages(app, "console", readiness, registry, kernel)
    run_kernel(app, kernel)

    @app.timer(interval=settings.pipeline_sample_s, name="sample_pipeline")
    async def sample_pipeline() -> None:
        # Counters sampled in the background, so the overview has a rate when someone opens it.
        # A sample is worth nothing later: while Redis is away this one is skipped (the chart shows
        # a gap), rather than waited for or let out of the timer, where it would stop the worker.
        try:
            await pages.sample_pipeline()
        except Exception as exc:
            if not transient_redis_error(exc):
                raise
            metrics.redis_errors.inc()
            log.warning("pipeline sample skipped: Redis unavailable (%s)", exc)

    async def close_clients(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        await redis.aclose()

    # mode's SignalHandlerT is written with mypy_extensions callable types that no plain
    # async def matches, so the connect calls are the one place type checking is waived.
    app.on_before_shutdown.connect(close_clients)  # type: ignore[arg-type]
    return app
