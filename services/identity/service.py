"""Identity's stream stage and admin operations: resolve raw touchpoints, split and erase customers."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from services.identity.domain import (
    MERGE_REASON_OPERATOR,
    Erasure,
    Resolution,
    answer_slot,
    customer_deletion_record,
    deletion_id,
    identifier_ref,
    identity_merge_record,
    lookup_identifier,
    prepare_identifiers,
    refusal_log_lines,
    resolution_request,
    resolved_touchpoint_record,
    short_ref,
)
from services.identity.graph import GraphStore, IdentityGraph
from services.identity.metrics import IdentityMetrics
from services.identity.resolver import EventToResolve, IdentityResolver
from services.identity.settings import IdentitySettings
from touchstream import avro
from touchstream.eventtime import too_far_ahead
from touchstream.identifiers import Identifier
from touchstream.streams import (
    Outbox,
    Record,
    while_redis_is_down,
)
from touchstream.topics import (
    CUSTOMER_DELETIONS,
    IDENTITY_MERGES,
    SCORES,
    TOUCHPOINTS_RAW,
    TOUCHPOINTS_RESOLVED,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class _Pending:
    event: dict[str, Any]
    identifiers: tuple[Identifier, ...]
    item: EventToResolve


class TouchpointResolver:
    """Resolve batches of raw touchpoints and send their records, acknowledged, before the next batch."""

    def __init__(
        self,
        resolver: IdentityResolver,
        metrics: IdentityMetrics,
        settings: IdentitySettings,
        hash_key: bytes,
        outbox: Callable[[], Outbox],
        event_time_tolerance_s: float | None = None,
    ) -> None:
        self.resolver = resolver
        self.graph: GraphStore = resolver.graph
        self.metrics = metrics
        self.settings = settings
        self._hash_key = hash_key
        # For the API's splits and erasures, outside the stream's batches.
        self._outbox = outbox
        self._event_time_tolerance_s = event_time_tolerance_s

    async def resolve_batch(self, records: list[Record], outbox: Outbox) -> None:
        """Resolve a decoded batch in one Redis round trip and put its records in `outbox`."""
        pending: list[_Pending] = []
        read_at_ms = int(time.time() * 1000)
        for record in records:
            pending_event = await self._prepare(record, outbox, read_at_ms)
            if pending_event is not None:
                pending.append(pending_event)

        resolutions = await self.with_redis_retry(lambda: self.resolver.resolve([p.item for p in pending]))
        resolved_at_ms = int(time.time() * 1000)
        for item, resolution in zip(pending, resolutions, strict=True):
            self.metrics.count_resolution(resolution)
            if resolution.suppressed:
                # Carries an identifier of an erased customer (produced straight to Kafka, or in
                # flight while the erasure ran): counted, never resolved nor passed on.
                continue
            if not resolution.replayed:
                for line in refusal_log_lines(item.item.request.message_id, resolution):
                    log.info("%s", line)
            for merge in resolution.merges:
                await outbox.send(IDENTITY_MERGES, merge.survivor_id,
                                  avro.encode(IDENTITY_MERGES.schema, identity_merge_record(merge, item.event)))
            resolved = resolved_touchpoint_record(item.event, resolution, item.identifiers, resolved_at_ms)
            await outbox.send(TOUCHPOINTS_RESOLVED, resolution.customer_id,
                              avro.encode(TOUCHPOINTS_RESOLVED.schema, resolved))

    async def _prepare(self, record: Record, outbox: Outbox, read_at_ms: int) -> _Pending | None:
        touchpoint = record.value
        if touchpoint is None:
            return None
        if self._event_time_tolerance_s is not None:
            # Dead-lettered rather than clamped: a clamped time would be invented, and scoring's
            # features and labels would be built on it; the dead letter keeps the original bytes to
            # fix and replay. Identity's read time stands in for the receive time: events produced
            # straight to Kafka have no other trustworthy one, and it only ever comes later.
            ahead = too_far_ahead(int(touchpoint["timestamp_ms"]), read_at_ms, self._event_time_tolerance_s)
            if ahead is not None:
                await outbox.dead_letter(TOUCHPOINTS_RAW.name, f"timestamp_ms: {ahead}", record.key, record.raw)
                return None
        prepared = prepare_identifiers(touchpoint["identifiers"], self._hash_key,
                                       self.settings.default_phone_region, self.settings.blocklist)
        for rejected in prepared.rejected:
            self.metrics.identifiers_invalid.labels(rejected.type_label, rejected.reason).inc()
        if not prepared.hashed:
            # A customer per orphan event would only add noise to scoring; ops see it instead.
            reasons = ", ".join(sorted({f"{r.type_label} {r.reason}" for r in prepared.rejected})) or "none sent"
            await outbox.dead_letter(TOUCHPOINTS_RAW.name, f"no usable identifier: {reasons}", record.key, record.raw)
            return None
        request = resolution_request(touchpoint, prepared.hashed, answer_slot(record.topic, record.partition,
                                                                              record.offset))
        item = EventToResolve.of(touchpoint, request, self.resolver.matching)
        return _Pending(touchpoint, prepared.hashed, item)

    def hashed_lookup(self, kind: str, clear_value: str) -> Identifier:
        """Hash a clear identifier as the pipeline does (raises InvalidIdentifier)."""
        return lookup_identifier(kind, clear_value, self._hash_key, self.settings.default_phone_region,
                                 self.settings.blocklist)

    async def unmerge(self, op_id: str, customer_id: str, identifiers: Sequence[Identifier]) -> Resolution:
        """Split identifiers off a customer and announce it on identity.merges, acknowledged."""
        now_ms = int(time.time() * 1000)
        result = await self.with_redis_retry(
            lambda: self.graph.unmerge(op_id, now_ms, customer_id, identifiers, MERGE_REASON_OPERATOR))
        outbox = self._outbox()
        for split in result.merges:
            if not result.replayed:
                self.metrics.unmerges.inc()
                log.info("identity: operator split %s off %s into %s (%s)", ", ".join(
                    short_ref(i) for i in split.linking_identifiers), split.survivor_id, split.merged_id, op_id)
            record = identity_merge_record(split, {"timestamp_ms": now_ms, "message_id": op_id})
            await outbox.send(IDENTITY_MERGES, split.survivor_id, avro.encode(IDENTITY_MERGES.schema, record))
        await outbox.flush()
        return result

    async def with_redis_retry(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retry `call` while Redis is unreachable: the batch waits rather than being skipped."""
        return await while_redis_is_down(call, self.metrics.service, "identity")


class CustomerEraser:
    """Erase customers for the admin API: suppress, announce, delete, sweep (Redis only: the sweep scans keys)."""

    def __init__(self, graph: IdentityGraph, metrics: IdentityMetrics, outbox: Callable[[], Outbox]) -> None:
        self.graph = graph
        self.metrics = metrics
        self._outbox = outbox

    async def erase(self, customer_id: str, request_id: str) -> tuple[Erasure, str]:
        """Erase a customer: suppress its identifiers, announce the erasure, delete its graph entries.

        In that order, so a crash anywhere leaves something a retry finishes: the customer stays
        in the graph (its events already suppressed) until the CustomerDeletion record and the
        `scores` tombstones are acknowledged, and a retry announces it again (every consumer
        forgets idempotently). Returns the erasure (found=False for an unknown customer) and its id.
        """
        the_deletion_id = deletion_id(request_id)
        op_id = f"erase:{the_deletion_id}"
        now_ms = int(time.time() * 1000)
        plan = await self._with_redis_retry(lambda: self.graph.erase(op_id, now_ms, customer_id, "plan"))
        if not plan.found:
            return plan, the_deletion_id
        await self._announce_erasure(plan, the_deletion_id, now_ms)
        done = await self._with_redis_retry(lambda: self.graph.erase(op_id, now_ms, plan.customer_id, "erase"))
        if done.found and set(done.customer_ids) - set(plan.customer_ids):
            # A merge landed between the two steps: announce the ids it added too.
            await self._announce_erasure(done, the_deletion_id, now_ms)
        erased = done if done.found else plan
        ids = sorted(set(plan.customer_ids) | set(erased.customer_ids))
        identifiers = sorted(set(plan.identifiers) | set(erased.identifiers), key=identifier_ref)
        swept = await self._with_redis_retry(lambda: self.graph.sweep(ids, identifiers))
        self.metrics.customers_deleted.inc()
        log.info("identity: erased a customer and %d merged ids (%s); %d identifiers suppressed, %d other keys swept",
                 len(ids) - 1, the_deletion_id, erased.suppressed, swept)
        return erased, the_deletion_id

    async def _announce_erasure(self, erasure: Erasure, the_deletion_id: str, now_ms: int) -> None:
        outbox = self._outbox()
        record = customer_deletion_record(erasure, the_deletion_id, now_ms)
        await outbox.send(CUSTOMER_DELETIONS, erasure.customer_id, avro.encode(CUSTOMER_DELETIONS.schema, record))
        for cid in erasure.customer_ids:
            await outbox.tombstone(SCORES, cid)
        await outbox.flush()

    async def _with_redis_retry(self, call: Callable[[], Awaitable[T]]) -> T:
        return await while_redis_is_down(call, self.metrics.service, "identity")


