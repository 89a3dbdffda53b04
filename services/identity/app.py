"""Wiring of the identity service: stream kernel -> graph -> touchpoints.resolved + identity.merges."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import faust
import redis.asyncio as aioredis
from aiohttp import web
from aiokafka import TopicPartition
from faust.web import Request, Response, View
from prometheus_client import REGISTRY, CollectorRegistry

from services.identity.admin import is_admin
from services.identity.customer360 import find_customer, read_customer, read_review
from services.identity.domain import (
    MERGE_REASON_OPERATOR,
    Erasure,
    GraphLayout,
    GraphRefused,
    Resolution,
    answer_slot,
    customer_deletion_record,
    deletion_id,
    identifier_ref,
    identity_merge_record,
    lookup_identifier,
    parse_identifier_ref,
    prepare_identifiers,
    refusal_log_lines,
    resolution_request,
    resolved_touchpoint_record,
    short_ref,
)
from services.identity.graph import GraphStore, IdentityGraph, PersonIndex
from services.identity.metrics import IdentityMetrics
from services.identity.resolver import EventToResolve, IdentityResolver, RedisMatching
from services.identity.settings import IdentitySettings
from touchstream import avro
from touchstream.client_address import client_address
from touchstream.eventtime import too_far_ahead
from touchstream.failures import FailureCounter, KeyFailureThrottle, KeyRefusal
from touchstream.identifiers import Identifier, InvalidIdentifier
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
from touchstream.topics import (
    CUSTOMER_DELETIONS,
    IDENTITY_MERGES,
    SCORES,
    TOUCHPOINTS_RAW,
    TOUCHPOINTS_RESOLVED,
)

STAGE = "identity"

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


class CustomerRequestError(ValueError):
    """A client error on the customer API, answered 400 with its message."""


def _identifiers_to_split(body: Any, resolver: TouchpointResolver) -> list[Identifier]:
    """Read the identifiers of an unmerge body: hashed refs as the 360 shows them, or clear type/value pairs."""
    items = body.get("identifiers") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise CustomerRequestError("body must be {\"identifiers\": [...]}: hashed \"type:hash\" refs or "
                                   "{\"type\": ..., \"value\": ...} clear values")
    found = []
    for item in items:
        if isinstance(item, str):
            found.append(parse_identifier_ref(item))
        elif isinstance(item, dict) and isinstance(item.get("type"), str) and isinstance(item.get("value"), str):
            found.append(resolver.hashed_lookup(item["type"], item["value"]))
        else:
            raise CustomerRequestError(f"not an identifier: {item!r}")
    return found


class FieldError(CustomerRequestError):
    """A client error naming the field at fault and why (answered 400 as {error, field, reason})."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


MAX_ID_CHARS = 200
LOOKUP_IN_THE_BODY = ('identifiers stay out of URLs and access logs: POST /v1/customers/lookup with '
                      '{"identifier": {"type": "email", "value": "..."}} instead')


def _request_id(value: Any) -> str:
    """Return the client's idempotency key, or a fresh one."""
    if value is None:
        return uuid.uuid4().hex
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID_CHARS:
        raise FieldError("request_id", f"must be a non-empty string of at most {MAX_ID_CHARS} characters")
    return value


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise FieldError("(body)", "is not valid JSON") from None


def _body_identifier(item: Any, resolver: TouchpointResolver) -> Identifier:
    """Read the identifier of a request body: {"type", "value"} (a clear value, hashed here) or a
    hashed "type:hash" reference (as the 360 shows it)."""
    if isinstance(item, str):
        identifier = parse_identifier_ref(item)
        if not identifier.type or not identifier.value:
            raise FieldError("identifier", 'a string must be a hashed "type:hash" reference')
        return identifier
    if not isinstance(item, dict):
        raise FieldError("identifier", 'must be {"type": ..., "value": ...} or a hashed "type:hash" reference')
    kind, value = item.get("type"), item.get("value")
    if not isinstance(kind, str) or not kind.strip():
        raise FieldError("identifier.type", "must be an identifier type such as email, phone or user_id")
    if not isinstance(value, str) or not value.strip():
        raise FieldError("identifier.value", "must be a non-empty string")
    try:
        return resolver.hashed_lookup(kind, value)
    except InvalidIdentifier as exc:
        reason = "is on the blocklist" if "blocklist" in str(exc) else "is not a usable identifier of this type"
        raise FieldError("identifier.value", reason) from None


def _lookup_target(body: Any, resolver: TouchpointResolver) -> Identifier:
    """Return the identifier a look-up body names: {"identifier": {"type", "value"} or "type:hash"}."""
    if not isinstance(body, dict):
        raise FieldError("(body)", 'must be a JSON object: {"identifier": {"type": "email", "value": "..."}}')
    unknown = sorted(set(body) - {"identifier"})
    if unknown:
        raise FieldError(unknown[0], "unknown field; give identifier")
    if "identifier" not in body:
        raise FieldError("identifier", 'is required: {"type": "email", "value": "..."} or "type:hash"')
    return _body_identifier(body["identifier"], resolver)


async def _erase_target(body: Any, resolver: TouchpointResolver, client: aioredis.Redis,
                        layout: GraphLayout) -> str | None:
    """Return the customer id an erasure body names: {"identifier": ...} (see `_body_identifier`) or
    {"customer_id": ...}. None when no customer owns the identifier."""
    if not isinstance(body, dict):
        raise FieldError("(body)", 'must be a JSON object: {"identifier": {"type": "email", "value": "..."}}')
    unknown = sorted(set(body) - {"identifier", "customer_id", "request_id"})
    if unknown:
        raise FieldError(unknown[0], "unknown field; give identifier or customer_id (and request_id)")
    if ("identifier" in body) == ("customer_id" in body):
        raise FieldError("identifier", "give exactly one of identifier or customer_id")
    if "customer_id" in body:
        customer_id = body["customer_id"]
        if not isinstance(customer_id, str) or not customer_id.strip() or len(customer_id) > MAX_ID_CHARS:
            raise FieldError("customer_id", f"must be a non-empty string of at most {MAX_ID_CHARS} characters")
        return customer_id
    identifier = _body_identifier(body["identifier"], resolver)
    owner = await client.hget(layout.identifier_key(identifier_ref(identifier)), "owner")
    return None if owner is None else (owner.decode() if isinstance(owner, bytes) else str(owner))


# Failed admin keys per client address (sha256 of the address), shared by every identity worker.
ADMIN_FAILURES_PREFIX = "ts:identity:admin_failures:"


def add_customer_pages(app: faust.App, resolver: TouchpointResolver, eraser: CustomerEraser,
                       client: aioredis.Redis, layout: GraphLayout) -> None:
    """Serve the admin customer API: 360 lookup by id or by identifier (in the body), un-merge, and erasure."""

    settings = resolver.settings
    throttle = KeyFailureThrottle(
        FailureCounter(client, ADMIN_FAILURES_PREFIX, settings.admin_max_failures, settings.admin_failure_window_s),
        resolver.metrics.admin_auth_refused)

    async def admitted(request: Request) -> KeyRefusal | None:
        """None for a request with an admin key; else 401, or 429 once its address sent too many wrong keys."""
        peer = cast(web.Request, request)  # faust's aiohttp driver hands over aiohttp's request
        address = client_address(peer.remote, peer.headers.getall("X-Forwarded-For", []), settings.trusted_proxies)
        return await throttle.check(request.headers.get("Authorization", ""), address,
                                    lambda authorization: is_admin(authorization, settings.admin_keys))

    def field_error(view: View, exc: FieldError) -> Response:
        return view.json({"error": str(exc), "field": exc.field, "reason": exc.reason}, status=400)

    async def erase_answer(view: View, customer_id: str | None, request_id: str) -> Response:
        erasure, the_deletion_id = (await eraser.erase(customer_id, request_id) if customer_id is not None
                                    else (Erasure(False), deletion_id(request_id)))
        if not erasure.found:
            return view.json({"deleted": False, "deletion_id": the_deletion_id,
                              "error": "no such customer: unknown, or erased already"}, status=404)
        return view.json({"deleted": True, "deletion_id": the_deletion_id, "customer_id": erasure.customer_id,
                          "merged_ids": list(erasure.merged_ids), "identifiers_suppressed": erasure.suppressed})

    # Before /v1/customers/{customer_id}, which would otherwise take "delete" for an id.
    @app.page("/v1/customers/delete")
    class CustomerEraseView(View):
        """Erase the customer owning an identifier; the identifier travels in the body, never in a URL."""

        async def post(self, request: Request) -> Response:
            if (refusal := await admitted(request)) is not None:
                return self.error(refusal.status, refusal.message, headers=refusal.headers)
            try:
                body = await _json_body(request)
                request_id = _request_id(body.get("request_id") if isinstance(body, dict) else None)
                customer_id = await _erase_target(body, resolver, client, layout)
            except FieldError as exc:
                return field_error(self, exc)
            return await erase_answer(self, customer_id, request_id)

    @app.page("/v1/customers/lookup")
    class CustomerLookupView(View):
        """Find the customer owning an identifier; the identifier travels in the body, never in a URL."""

        async def post(self, request: Request) -> Response:
            if (refusal := await admitted(request)) is not None:
                return self.error(refusal.status, refusal.message, headers=refusal.headers)
            try:
                identifier = _lookup_target(await _json_body(request), resolver)
            except FieldError as exc:
                return field_error(self, exc)
            view = await find_customer(client, layout, identifier)
            if view is None:
                return self.error(404, "no customer has this identifier")
            return self.json(view.to_json())

    @app.page("/v1/customers")
    class CustomerSearchView(View):
        async def get(self, request: Request) -> Response:
            """Refuse a look-up by query string: a clear e-mail or phone there lands in every access log."""
            if (refusal := await admitted(request)) is not None:
                return self.error(refusal.status, refusal.message, headers=refusal.headers)
            return field_error(self, FieldError("identifier", LOOKUP_IN_THE_BODY))

    @app.page("/v1/customers/{customer_id}")
    class CustomerView(View):
        async def get(self, request: Request, customer_id: str) -> Response:
            if (refusal := await admitted(request)) is not None:
                return self.error(refusal.status, refusal.message, headers=refusal.headers)
            view = await read_customer(client, layout, customer_id)
            if view is None:
                return self.notfound("unknown customer")
            return self.json(view.to_json())

        async def delete(self, request: Request, customer_id: str) -> Response:
            """Erase the customer (any id it ever had); `?request_id=` makes a retry the same erasure."""
            if (refusal := await admitted(request)) is not None:
                return self.error(refusal.status, refusal.message, headers=refusal.headers)
            try:
                if not customer_id.strip() or len(customer_id) > MAX_ID_CHARS:
                    raise FieldError("customer_id", f"must be a non-empty string of at most {MAX_ID_CHARS} characters")
                request_id = _request_id(request.query.get("request_id"))
            except FieldError as exc:
                return field_error(self, exc)
            return await erase_answer(self, customer_id, request_id)

    @app.page("/v1/matching/review")
    class MatchReviewView(View):
        """The latest possible matches (plausible, not merged), for an operator to look at."""

        async def get(self, request: Request) -> Response:
            if (refusal := await admitted(request)) is not None:
                return self.error(refusal.status, refusal.message, headers=refusal.headers)
            try:
                limit = min(max(int(request.query.get("limit", "100")), 1), 1000)
            except ValueError:
                return self.error(400, "limit must be a whole number")
            return self.json({"possible_matches": await read_review(client, layout, limit)})

    @app.page("/v1/matching/model")
    class MatchModelView(View):
        """The fitted Fellegi-Sunter model in use: m, u and weight per field and level, the prior, the fit."""

        async def get(self, request: Request) -> Response:
            if (refusal := await admitted(request)) is not None:
                return self.error(refusal.status, refusal.message, headers=refusal.headers)
            persons = resolver.resolver.person_index
            if persons is None:
                return self.notfound("probabilistic matching is off")
            return self.json(await persons.describe_model())

    @app.page("/v1/customers/{customer_id}/unmerge")
    class UnmergeView(View):
        async def post(self, request: Request, customer_id: str) -> Response:
            if (refusal := await admitted(request)) is not None:
                return self.error(refusal.status, refusal.message, headers=refusal.headers)
            try:
                body = await request.json()
                identifiers = _identifiers_to_split(body, resolver)
            except (ValueError, InvalidIdentifier) as exc:
                return self.error(400, str(exc))
            # A client retrying with the same request_id gets the same split, not a second one.
            op_id = f"unmerge:{body.get('request_id') or uuid.uuid4().hex}"
            try:
                result = await resolver.unmerge(op_id, customer_id, identifiers)
            except GraphRefused as exc:
                return self.error(409, f"cannot split: {exc}")
            [split] = result.merges
            return self.json({
                "customer_id": split.survivor_id,
                "new_customer_id": split.merged_id,
                "identifiers": [identifier_ref(i) for i in split.linking_identifiers],
                "merge_id": split.merge_id,
            })
