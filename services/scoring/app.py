"""Wiring of the scoring service: stream kernel (decoded batches) -> ScoringService -> scores, metrics."""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

import faust
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.scoring.metrics import ScoringMetrics
from services.scoring.sentiment import load_scorers
from services.scoring.service import MergeInput, ResolvedInput, ScoringService
from services.scoring.settings import ScoringSettings
from services.scoring.state import touchpoint_from_record
from services.scoring.store import RedisScoringStore
from touchstream import avro
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
    while_redis_is_down,
)
from touchstream.topics import CUSTOMER_DELETIONS, IDENTITY_MERGES, SCORES, TOUCHPOINTS_RESOLVED

STAGE = "scoring"
log = logging.getLogger(__name__)


def build_app(core: CoreSettings, settings: ScoringSettings, metrics: ScoringMetrics | None = None) -> faust.App:
    """Build the scoring Faust app; nothing connects until the worker starts."""
    app = make_app(STAGE, core, settings.web_port, settings.web_host)
    metrics = metrics or ScoringMetrics()
    # from_url only builds a pool; the first command opens a connection.
    redis = aioredis.from_url(core.redis_url)
    store = RedisScoringStore(redis, settings.key_prefix, core.erased_customer_ttl_s)
    service = ScoringService(store, settings, metrics, event_time_tolerance_s=core.event_time_tolerance_s)
    stage = ScoringStage(service, metrics, core.partitions)
    readiness = Readiness("partitions_assigned", "model_restored")
    kernel = StreamKernel(STAGE, core, stage.inputs(), metrics.service, readiness)
    kernel.before_consuming.append(partial(stage.restore_model, readiness))
    add_health_pages(app, STAGE, readiness, kernel=kernel)
    run_kernel(app, kernel)
    app.scoring_service = service  # type: ignore[attr-defined]  # for tests and the console

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


class ScoringStage:
    """The scoring service's handlers of decoded batches: touchpoints, merges, erasures."""

    def __init__(self, service: ScoringService, metrics: ScoringMetrics, partitions: int) -> None:
        self.service = service
        self.metrics = metrics
        self.partitions = partitions

    def inputs(self) -> tuple[Consumes, ...]:
        # Erasures first within a batch: a touchpoint of an erased customer in the same batch is dropped.
        return (Consumes((CUSTOMER_DELETIONS,), self.forget_customers),
                Consumes((IDENTITY_MERGES,), self.apply_merges),
                Consumes((TOUCHPOINTS_RESOLVED,), self.score_touchpoints))

    async def restore_model(self, readiness: Readiness) -> None:
        # The sentiment models load in seconds; before the first batch, not inside it.
        await asyncio.to_thread(load_scorers)
        await while_redis_is_down(self.service.restore_model, self.metrics.service, "scoring: restore model")
        readiness.done("model_restored")

    async def score_touchpoints(self, records: list[Record], outbox: Outbox) -> None:
        # A batch handled again (a crash before its commit) changes no state: each state remembers
        # the events it has applied (the model may learn an example twice).
        inputs = [ResolvedInput(r.partition, r.value["customer_id"], touchpoint_from_record(r.value["event"]))
                  for r in records if r.value is not None]
        for item in inputs:
            if item.touch.sentiment is not None:
                self.metrics.sentiments.labels("scored").inc()
            elif item.touch.sentiment_unscored is not None:
                self.metrics.sentiments.labels(item.touch.sentiment_unscored).inc()
        for update in await self.service.score_touchpoints(inputs):
            await outbox.send(SCORES, update["customer_id"], avro.encode(SCORES.schema, update))

    async def apply_merges(self, records: list[Record], outbox: Outbox) -> None:
        merges: list[MergeInput] = []
        for record in records:
            merge = record.value
            if merge is None:
                continue
            if merge["kind"] != "merge":
                # An unmerge starts a new customer from nothing; there is no state to move.
                self.metrics.merges.labels("unmerge_ignored").inc()
                continue
            merges.append(MergeInput(record.partition, merge["merge_id"], merge["survivor_id"], merge["merged_id"]))
        await self.service.apply_merges(merges)

    async def forget_customers(self, records: list[Record], outbox: Outbox) -> None:
        """Erasures: delete each listed customer's state, waiting examples and ticks (idempotent)."""
        ids = [cid for r in records if r.value is not None for cid in (r.value["customer_id"], *r.value["merged_ids"])]
        if not ids:
            return
        await self.service.forget_customers(ids, range(self.partitions))
        self.metrics.customers_forgotten.inc(len(set(ids)))
        # identity tombstoned `scores` already; a score this worker sent meanwhile (a batch that
        # ran before the erasure reached it) would be the key's latest value: null it again.
        for cid in dict.fromkeys(ids):
            await outbox.tombstone(SCORES, cid)
