"""Faust wiring of the scoring service: decode -> ScoringService -> scores, deadletter, metrics."""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import faust
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.scoring.metrics import ScoringMetrics
from services.scoring.service import MergeInput, ResolvedInput, ScoringService
from services.scoring.settings import ScoringSettings
from services.scoring.state import touchpoint_from_record
from services.scoring.store import RedisScoringStore
from touchstream import avro
from touchstream.settings import CoreSettings
from touchstream.streams import Outbox, add_health_pages, batches, faust_topic, make_app, while_redis_is_down
from touchstream.topics import CUSTOMER_DELETIONS, DEADLETTER, IDENTITY_MERGES, SCORES, TOUCHPOINTS_RESOLVED

STAGE = "scoring"
log = logging.getLogger(__name__)


def build_app(core: CoreSettings, settings: ScoringSettings, metrics: ScoringMetrics | None = None) -> faust.App:
    """Build the scoring Faust app; nothing connects until the worker starts."""
    app = make_app("scoring", core, settings.web_port, settings.web_host)
    resolved_topic = faust_topic(app, TOUCHPOINTS_RESOLVED, core)
    merges_topic = faust_topic(app, IDENTITY_MERGES, core)
    scores_topic = faust_topic(app, SCORES, core)
    deadletter_topic = faust_topic(app, DEADLETTER, core)
    deletions_topic = faust_topic(app, CUSTOMER_DELETIONS, core)
    metrics = metrics or ScoringMetrics()
    # from_url only builds a pool; the first command opens a connection.
    redis = aioredis.from_url(core.redis_url)
    store = RedisScoringStore(redis, settings.key_prefix, core.erased_customer_ttl_s)
    service = ScoringService(store, settings, metrics, event_time_tolerance_s=core.event_time_tolerance_s)
    ready = {"ok": False}
    add_health_pages(app, ready)
    app.scoring_service = service  # type: ignore[attr-defined]  # for tests and the console

    # mode's SignalHandlerT rejects even an exactly matching handler under mypy, hence the ignores.
    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def mark_ready(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        ready["ok"] = True

    @app.agent(resolved_topic)
    async def score_touchpoints(stream: faust.StreamT) -> None:
        await while_redis_is_down(service.restore_model, metrics.service, "scoring: restore model")
        async for batch in batches(stream, core):
            started = time.perf_counter()
            outbox = Outbox(metrics.service)
            inputs: list[ResolvedInput] = []
            for event in batch:
                metrics.service.events_in.labels(TOUCHPOINTS_RESOLVED.name).inc()
                try:
                    record = avro.decode(TOUCHPOINTS_RESOLVED.schema, event.value)
                except avro.DecodeError as exc:
                    reason = f"undecodable: {exc}"
                    source = TOUCHPOINTS_RESOLVED.name
                    await outbox.dead_letter(deadletter_topic, STAGE, source, reason, event.key, event.value)
                    continue
                touch = touchpoint_from_record(record["event"])
                inputs.append(ResolvedInput(event.message.partition, record["customer_id"], touch))
            # A batch that failed half-way is scored again whole: each state remembers the events
            # it has applied, so a repeat changes no state (the model may learn an example twice).
            updates = await while_redis_is_down(partial(service.score_touchpoints, inputs), metrics.service,
                                                "scoring: touchpoints")
            for update in updates:
                await outbox.send(scores_topic, update["customer_id"], avro.encode(SCORES.schema, update))
            await outbox.flush()
            metrics.service.batch_events.observe(len(batch))
            metrics.service.batch_seconds.observe(time.perf_counter() - started)

    @app.agent(merges_topic)
    async def apply_merges(stream: faust.StreamT) -> None:
        async for batch in batches(stream, core):
            outbox = Outbox(metrics.service)
            merges: list[MergeInput] = []
            for event in batch:
                metrics.service.events_in.labels(IDENTITY_MERGES.name).inc()
                try:
                    record = avro.decode(IDENTITY_MERGES.schema, event.value)
                except avro.DecodeError as exc:
                    await outbox.dead_letter(
                        deadletter_topic, STAGE, IDENTITY_MERGES.name, f"undecodable: {exc}", event.key, event.value
                    )
                    continue
                if record["kind"] != "merge":
                    # An unmerge starts a new customer from nothing; there is no state to move.
                    metrics.merges.labels("unmerge_ignored").inc()
                    continue
                merges.append(
                    MergeInput(event.message.partition, record["merge_id"], record["survivor_id"], record["merged_id"])
                )
            await while_redis_is_down(partial(service.apply_merges, merges), metrics.service, "scoring: merges")
            await outbox.flush()

    @app.agent(deletions_topic, name="forget_customers")
    async def forget_customers(stream: faust.StreamT) -> None:
        """Erasures: delete each listed customer's state, waiting examples and ticks (idempotent)."""
        async for batch in batches(stream, core):
            outbox = Outbox(metrics.service)
            ids: list[str] = []
            for event in batch:
                metrics.service.events_in.labels(CUSTOMER_DELETIONS.name).inc()
                try:
                    record = avro.decode(CUSTOMER_DELETIONS.schema, event.value or b"")
                except avro.DecodeError as exc:
                    await outbox.dead_letter(deadletter_topic, STAGE, CUSTOMER_DELETIONS.name, f"undecodable: {exc}",
                                             event.key, event.value or b"")
                    continue
                ids += [record["customer_id"], *record["merged_ids"]]
            if ids:
                await while_redis_is_down(partial(service.forget_customers, ids, range(core.partitions)),
                                          metrics.service, "scoring: erasures")
                metrics.customers_forgotten.inc(len(set(ids)))
                # identity tombstoned `scores` already; a score this worker sent meanwhile (a batch
                # that ran before the erasure reached it) would be the key's latest value: null it again.
                for cid in dict.fromkeys(ids):
                    await outbox.tombstone(scores_topic, cid)
            await outbox.flush()

    @app.timer(interval=settings.checkpoint_interval_s)
    async def checkpoint_model() -> None:
        try:
            await service.checkpoint()
        except (RedisError, OSError) as exc:  # the next interval tries again
            metrics.service.redis_errors.inc()
            log.warning("scoring: model checkpoint failed: %s", exc)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def checkpoint_on_shutdown(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        await service.checkpoint()

    return app
