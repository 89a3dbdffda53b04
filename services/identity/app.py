"""Faust wiring of the identity service: touchpoints.raw -> graph -> touchpoints.resolved + identity.merges."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import faust
import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.identity.domain import (
    GraphLayout,
    ResolutionRequest,
    identity_merge_record,
    prepare_identifiers,
    resolution_request,
    resolved_touchpoint_record,
)
from services.identity.graph import IdentityGraph
from services.identity.metrics import IdentityMetrics
from services.identity.settings import IdentitySettings
from touchstream import avro
from touchstream.identifiers import Identifier
from touchstream.settings import CoreSettings
from touchstream.streams import Outbox, add_health_pages, batches, faust_topic, make_app
from touchstream.topics import DEADLETTER, IDENTITY_MERGES, TOUCHPOINTS_RAW, TOUCHPOINTS_RESOLVED

STAGE = "identity"
MAX_REDIS_BACKOFF_S = 5.0

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class _Pending:
    event: dict[str, Any]
    identifiers: tuple[Identifier, ...]
    request: ResolutionRequest


class TouchpointResolver:
    """Resolve batches of raw touchpoints and send their records, acknowledged, before the next batch."""

    def __init__(
        self,
        graph: IdentityGraph,
        metrics: IdentityMetrics,
        settings: IdentitySettings,
        hash_key: bytes,
        resolved: faust.TopicT,
        merges: faust.TopicT,
        deadletter: faust.TopicT,
    ) -> None:
        self.graph = graph
        self.metrics = metrics
        self.settings = settings
        self._hash_key = hash_key
        self._resolved = resolved
        self._merges = merges
        self._deadletter = deadletter

    async def resolve_batch(self, events: Sequence[faust.EventT]) -> None:
        """Decode, resolve in one Redis round trip, emit, and wait for the broker's acks."""
        outbox = Outbox(self.metrics.service)
        pending: list[_Pending] = []
        for event in events:
            self.metrics.service.events_in.labels(TOUCHPOINTS_RAW.name).inc()
            pending_event = await self._prepare(event, outbox)
            if pending_event is not None:
                pending.append(pending_event)

        resolutions = await self.with_redis_retry(lambda: self.graph.resolve([p.request for p in pending]))
        resolved_at_ms = int(time.time() * 1000)
        for item, resolution in zip(pending, resolutions, strict=True):
            self.metrics.count_resolution(resolution)
            for refusal in resolution.refused:
                log.info("identity: refused merging %s into %s for event %s: %s", refusal.customer_id,
                         resolution.customer_id, item.request.message_id, refusal.reason)
            for merge in resolution.merges:
                await outbox.send(self._merges, merge.survivor_id,
                                  avro.encode(IDENTITY_MERGES.schema, identity_merge_record(merge, item.event)))
            record = resolved_touchpoint_record(item.event, resolution, item.identifiers, resolved_at_ms)
            await outbox.send(self._resolved, resolution.customer_id, avro.encode(TOUCHPOINTS_RESOLVED.schema, record))
        await outbox.flush()

    async def _prepare(self, event: faust.EventT, outbox: Outbox) -> _Pending | None:
        raw_key = event.key if isinstance(event.key, bytes) else None
        original = event.value if isinstance(event.value, bytes) else b""
        try:
            touchpoint = avro.decode(TOUCHPOINTS_RAW.schema, original)
        except avro.DecodeError as exc:
            await outbox.dead_letter(self._deadletter, STAGE, TOUCHPOINTS_RAW.name, f"undecodable: {exc}",
                                     raw_key, original)
            return None
        prepared = prepare_identifiers(touchpoint["identifiers"], self._hash_key,
                                       self.settings.default_phone_region, self.settings.blocklist)
        for rejected in prepared.rejected:
            self.metrics.identifiers_invalid.labels(rejected.type_label, rejected.reason).inc()
        if not prepared.hashed:
            # A customer per orphan event would only add noise to scoring; ops see it instead.
            reasons = ", ".join(sorted({f"{r.type_label} {r.reason}" for r in prepared.rejected})) or "none sent"
            await outbox.dead_letter(self._deadletter, STAGE, TOUCHPOINTS_RAW.name,
                                     f"no usable identifier: {reasons}", raw_key, original)
            return None
        return _Pending(touchpoint, prepared.hashed, resolution_request(touchpoint, prepared.hashed))

    async def with_redis_retry(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retry `call` while Redis is unreachable: the batch waits rather than being skipped."""
        backoff = 0.1
        while True:
            try:
                return await call()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                self.metrics.service.redis_errors.inc()
                log.warning("identity: Redis unavailable (%s), retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_REDIS_BACKOFF_S)


def build_app(
    core: CoreSettings, settings: IdentitySettings, registry: CollectorRegistry = REGISTRY
) -> faust.App:
    """Build the identity Faust app; nothing connects until the worker starts."""
    app = make_app(STAGE, core, settings.web_port)
    raw = faust_topic(app, TOUCHPOINTS_RAW, core)
    metrics = IdentityMetrics(registry)
    graph = IdentityGraph(aioredis.from_url(core.redis_url), GraphLayout(settings.graph_key_prefix),
                          settings.strong_types, settings.event_ttl_s)
    resolver = TouchpointResolver(
        graph, metrics, settings, core.pii_hash_key.get_secret_value().encode(),
        resolved=faust_topic(app, TOUCHPOINTS_RESOLVED, core),
        merges=faust_topic(app, IDENTITY_MERGES, core),
        deadletter=faust_topic(app, DEADLETTER, core),
    )
    ready = {"ok": False}
    progress = {"partitions_assigned": False, "script_loaded": False}
    add_health_pages(app, ready, registry)

    def mark(step: str) -> None:
        progress[step] = True
        ready["ok"] = all(progress.values())

    @app.on_partitions_assigned.connect
    def on_partitions_assigned(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        mark("partitions_assigned")

    @app.agent(raw, name="resolve_touchpoints")
    async def resolve_touchpoints(stream: faust.StreamT) -> None:
        await resolver.with_redis_retry(graph.load_script)
        mark("script_loaded")
        async for events in batches(stream, core):
            with metrics.service.batch_seconds.time():
                metrics.service.batch_events.observe(len(events))
                await resolver.resolve_batch(events)

    return app
