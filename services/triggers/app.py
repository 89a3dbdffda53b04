"""Wiring of the triggers service: stream kernel -> TriggersService (scores -> actions), and delivery beside it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faust
import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry
from redis.exceptions import RedisError

from services.triggers.delivery import ActionDelivery, DeliveryEnded, FailedDelivery
from services.triggers.metrics import TriggersMetrics
from services.triggers.rules import Rule, RuleSet, parse_rule_file
from services.triggers.service import TriggersService, announce_deliveries, dead_letter_failed_deliveries
from services.triggers.settings import TriggersSettings
from services.triggers.state_store import ERASED_KEY, DeliveryLedger, DeliveryQueue, RuleStateStore
from services.triggers.transport import WebhookSender, endpoint_refusal, guarded_client
from touchstream.eventtime import DAY_S
from touchstream.privacy import ErasedCustomers
from touchstream.settings import CoreSettings
from touchstream.startup import ConfigurationError
from touchstream.streams import Readiness, StreamKernel, add_health_pages, make_app, run_kernel

log = logging.getLogger(__name__)
STAGE = "triggers"


def load_rules(path: Path) -> RuleSet:
    """Read and parse the rule file at `path`."""
    return parse_rule_file(path.read_text(encoding="utf-8"), source=str(path))


def check_configuration(rules: Sequence[Rule], settings: TriggersSettings, production: bool = False) -> None:
    """Refuse to start with a rule whose endpoint is unknown, an endpoint the SSRF guard refuses, or (in
    production) an allowlist that opens non-public networks."""
    problems = []
    for rule in rules:
        if rule.action.endpoint not in settings.endpoints:
            problems.append(
                f"rule {rule.id!r}: endpoint {rule.action.endpoint!r} is not registered; "
                f"set TOUCHSTREAM_TRIGGERS_ENDPOINTS (registered: {sorted(settings.endpoints) or 'none'})"
            )
    for name in settings.deletion_notice_endpoints():
        if name not in settings.endpoints:
            problems.append(f"TOUCHSTREAM_TRIGGERS_DELETION_ENDPOINTS: endpoint {name!r} is not registered "
                            f"(registered: {sorted(settings.endpoints) or 'none'})")
    problems += settings.allowlist_refusals(production)
    for name, endpoint in settings.endpoints.items():
        refusal = endpoint_refusal(endpoint.url, settings.networks_allowed_for(name))
        if refusal:
            problems.append(f"endpoint {name!r}: {refusal}")
    if problems:
        raise ConfigurationError("\n".join(problems))


def build_app(core: CoreSettings, settings: TriggersSettings, registry: CollectorRegistry = REGISTRY) -> faust.App:
    """Build the triggers Faust app: rules evaluated on scores, actions delivered as signed webhooks."""
    rule_set = load_rules(settings.rules_file)
    check_configuration(rule_set.rules, settings, production=core.is_production)
    app = make_app(STAGE, core, settings.web_port, settings.web_host)
    metrics = TriggersMetrics(registry)
    # Clients connect lazily on first use, inside the worker's event loop.
    redis = aioredis.from_url(core.redis_url)
    http = guarded_client(settings.delivery_timeout_s, allow_networks=settings.allow_networks)
    # Durable: scores of erased customers are not evaluated, their actions never queued nor sent,
    # also when a restarted or lagging worker reads `scores` or `actions` again.
    erased = ErasedCustomers(redis, ERASED_KEY, core.erased_customer_ttl_s)
    readiness = Readiness("partitions_assigned")
    kernel: StreamKernel

    async def dead_letter(failures: Sequence[FailedDelivery]) -> None:
        await dead_letter_failed_deliveries(kernel.outbox(), failures)

    async def announce_delivered(outcomes: Sequence[DeliveryEnded]) -> None:
        outbox = kernel.outbox()
        await announce_deliveries(outbox, outcomes)
        await outbox.flush()

    delivery_queue = DeliveryQueue(redis)
    delivery = ActionDelivery(
        WebhookSender(http, settings.endpoints),
        DeliveryLedger(redis, settings.delivered_ttl_days * DAY_S),
        delivery_queue,
        metrics,
        dead_letter,
        endpoints=sorted(settings.endpoints),
        concurrency_per_endpoint=settings.endpoint_concurrency,
        breaker_threshold=settings.breaker_threshold,
        breaker_cool_off_s=settings.breaker_cool_off_s,
        lease_s=settings.delivery_lease_s,
        poll_s=settings.dispatch_poll_s,
        schedule=settings.retry_schedule_s,
        announce_delivered=announce_delivered,
        erased=erased,
    )
    service = TriggersService(rule_set, settings, redis, RuleStateStore(redis, settings.state_ttl_days * DAY_S),
                              delivery, delivery_queue, metrics, erased,
                              event_time_tolerance_s=core.event_time_tolerance_s)
    kernel = StreamKernel(STAGE, core, service.inputs(), metrics, readiness)
    add_health_pages(app, STAGE, readiness, registry, kernel)
    run_kernel(app, kernel)

    @app.task
    async def deliver_due_actions() -> None:
        """The retry timer: deliver queued actions as they fall due, for as long as the worker runs."""
        await kernel.start_producer()  # dead letters and delivery outcomes go out through it
        await delivery.run()

    @app.timer(interval=15.0)
    async def publish_queue_sizes() -> None:
        try:
            await delivery.pending()
        except (RedisError, OSError) as exc:
            metrics.redis_errors.inc()
            log.warning("queue sizes: %s", exc)

    async def close_clients(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        await http.aclose()
        await redis.aclose()

    # mode's SignalHandlerT is written with mypy_extensions callable types that no plain
    # async def matches, so the connect call is the one place type checking is waived.
    app.on_before_shutdown.connect(close_clients)  # type: ignore[arg-type]
    return app
