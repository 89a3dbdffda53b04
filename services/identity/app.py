"""Wiring of the identity service: kernel -> graph -> touchpoints.resolved + identity.merges, and its API."""

from __future__ import annotations

from collections.abc import Mapping

import faust
import redis.asyncio as aioredis
from aiokafka import TopicPartition
from prometheus_client import REGISTRY, CollectorRegistry

from services.identity.api import add_customer_pages
from services.identity.domain import (
    GraphLayout,
)
from services.identity.graph import IdentityGraph, PersonIndex
from services.identity.metrics import IdentityMetrics
from services.identity.resolver import IdentityResolver, RedisMatching
from services.identity.service import CustomerEraser, TouchpointResolver
from services.identity.settings import IdentitySettings
from touchstream.settings import CoreSettings
from touchstream.streams import (
    Consumes,
    Readiness,
    StreamKernel,
    add_health_pages,
    make_app,
    run_kernel,
)
from touchstream.topics import TOUCHPOINTS_RAW

STAGE = "identity"


def build_app(
    core: CoreSettings, settings: IdentitySettings, registry: CollectorRegistry = REGISTRY
) -> faust.App:
    """Build the identity Faust app; nothing connects until the worker starts."""
    app = make_app(STAGE, core, settings.web_port, settings.web_host)
    metrics = IdentityMetrics(registry)
    client = aioredis.from_url(core.redis_url)
    hash_key = core.pii_hash_key.get_secret_value().encode()
    layout = GraphLayout(settings.graph_key_prefix)
    graph = IdentityGraph(client, layout, settings.graph_rules(), settings.event_ttl_s)
    persons = PersonIndex(client, layout, hash_key, settings.matching.max_block_size)
    readiness = Readiness("partitions_assigned", "script_loaded")
    kernel: StreamKernel
    matching = RedisMatching(graph, persons) if settings.matching.enabled else None
    resolver = TouchpointResolver(IdentityResolver(graph, matching, settings.matching, observer=metrics), metrics,
                                  settings, hash_key, outbox=lambda: kernel.outbox(),
                                  event_time_tolerance_s=core.event_time_tolerance_s)
    eraser = CustomerEraser(graph, metrics, outbox=lambda: kernel.outbox())
    kernel = StreamKernel(STAGE, core, [Consumes((TOUCHPOINTS_RAW,), resolver.resolve_batch)], metrics.service,
                          readiness)

    async def forget_committed_answers(offsets: Mapping[TopicPartition, int]) -> None:
        # No redelivery can ask for a committed record's answer any more.
        await graph.forget_answers({f"{tp.topic}:{tp.partition}": offset for tp, offset in offsets.items()})

    kernel.after_commit.append(forget_committed_answers)

    async def load_script() -> None:
        await resolver.with_redis_retry(graph.load_script)
        readiness.done("script_loaded")

    kernel.before_consuming.append(load_script)
    add_health_pages(app, STAGE, readiness, registry, kernel)
    add_customer_pages(app, resolver, eraser, client, layout)
    run_kernel(app, kernel)
    return app
