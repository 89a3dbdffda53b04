"""Ingest HTTP app (Starlette): authenticate, validate, dedupe, produce, answer after the broker's ack."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import gzip
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry, ProcessCollector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.ingest.segment import EVENT_TYPES, EventRejected, to_touchpoint
from services.ingest.settings import IngestSettings, hash_write_key
from touchstream import avro
from touchstream.identifiers import Identifier, partition_key
from touchstream.metrics import ServiceMetrics, render
from touchstream.settings import CoreSettings
from touchstream.topics import TOUCHPOINTS_RAW

DEDUPE_PREFIX = "ts:in:msg:"


class IngestMetrics(ServiceMetrics):
    def __init__(self) -> None:
        # Own registry: one process may build several apps (tests), each with its own counts.
        super().__init__("ingest", CollectorRegistry())
        ProcessCollector(registry=self.registry)
        self.requests = self.counter("requests", "HTTP requests by endpoint and status.", ["endpoint", "status"])
        self.rejected = self.counter("events_rejected", "Events refused, by field.", ["field"])
        self.duplicates = self.counter("events_duplicate", "Events with a messageId already accepted.")
        self.request_seconds = self.histogram("request_duration", "Request time until the broker's ack.",
                                              ["endpoint"])


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"success": False, "error": message, **extra}, status_code=status)


class IngestService:
    """Holds the producer, Redis client and settings for the request handlers."""

    def __init__(self, core: CoreSettings, settings: IngestSettings) -> None:
        self.core = core
        self.settings = settings
        self.metrics = IngestMetrics()
        self.producer: AIOKafkaProducer | None = None
        self.redis: aioredis.Redis | None = None
        self._sources_by_key_hash = {digest: name for name, digest in settings.write_keys.items()}

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self.redis = aioredis.from_url(self.core.redis_url)
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.core.kafka_bootstrap,
            acks="all",
            enable_idempotence=self.core.idempotent_producer,
            linger_ms=2,
        )
        await self.producer.start()
        try:
            yield
        finally:
            await self.producer.stop()
            await self.redis.aclose()

    def authenticate(self, request: Request) -> str | None:
        """Return the source name for the request's write key (HTTP Basic user), or None."""
        header = request.headers.get("authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic" or not encoded:
            return None
        try:
            user = base64.b64decode(encoded, validate=True).decode().split(":", 1)[0]
        except (binascii.Error, UnicodeDecodeError):
            return None
        digest = hash_write_key(user)
        for stored, source in self._sources_by_key_hash.items():
            if hmac.compare_digest(stored, digest):
                return source
        return None

    async def read_json(self, request: Request, limit: int) -> Any:
        body = await request.body()
        if request.headers.get("content-encoding", "").lower() == "gzip":
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError):
                raise EventRejected("(body)", "gzip body could not be decompressed") from None
        if len(body) > limit:
            raise _TooLarge(f"body is {len(body)} bytes, the limit is {limit} bytes")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EventRejected("(body)", f"not valid JSON: {exc}") from None

    async def accept(self, source: str, payloads: list[tuple[Any, str | None]]) -> JSONResponse:
        """Validate every event, drop duplicates, produce the rest and wait for the broker."""
        received_at_ms = int(time.time() * 1000)
        records: list[dict[str, Any]] = []
        errors = []
        for index, (payload, call_type) in enumerate(payloads):
            try:
                size = len(json.dumps(payload, separators=(",", ":")))
                limit = self.settings.max_event_bytes
                if size > limit:
                    raise EventRejected("(event)", f"event is {size} bytes, the limit is {limit} (max_event_bytes)")
                record = to_touchpoint(payload, call_type, source, received_at_ms, self.settings.default_channel)
                problems = avro.validation_errors(TOUCHPOINTS_RAW.schema, record)
                if problems:
                    raise EventRejected("(schema)", "; ".join(problems))
            except EventRejected as exc:
                self.metrics.rejected.labels(exc.field.split(".")[0][:40]).inc()
                errors.append({"index": index, "field": exc.field, "reason": exc.reason})
                continue
            records.append(record)
        if errors:
            # All-or-nothing: a batch with any invalid event is refused whole, so a client
            # can fix and resend it without tracking which events went through.
            return _error(400, "invalid event(s); nothing in this request was accepted", errors=errors)
        fresh = await self._claim_message_ids(source, records)
        try:
            await self._produce([r for r, is_new in zip(records, fresh, strict=True) if is_new])
        except Exception as exc:
            await self._release_message_ids(source, [r for r, is_new in zip(records, fresh, strict=True) if is_new])
            return _error(503, f"broker did not acknowledge: {type(exc).__name__}", retry=True)
        duplicates = fresh.count(False)
        self.metrics.duplicates.inc(duplicates)
        return JSONResponse({"success": True, "accepted": len(records) - duplicates, "duplicates": duplicates})

    async def _claim_message_ids(self, source: str, records: list[dict[str, Any]]) -> list[bool]:
        assert self.redis is not None
        async with self.redis.pipeline(transaction=False) as pipe:
            for record in records:
                pipe.set(f"{DEDUPE_PREFIX}{source}:{record['message_id']}", 1, nx=True, ex=self.settings.dedupe_ttl_s)
            results = await pipe.execute()
        seen_in_request: set[str] = set()
        fresh = []
        for record, claimed in zip(records, results, strict=True):
            is_new = bool(claimed) and record["message_id"] not in seen_in_request
            seen_in_request.add(record["message_id"])
            fresh.append(is_new)
        return fresh

    async def _release_message_ids(self, source: str, records: list[dict[str, Any]]) -> None:
        # The broker never acknowledged these, so a retry by the client must not look like a duplicate.
        if records and self.redis is not None:
            await self.redis.delete(*[f"{DEDUPE_PREFIX}{source}:{r['message_id']}" for r in records])

    async def _produce(self, records: list[dict[str, Any]]) -> None:
        assert self.producer is not None
        futures = []
        for record in records:
            identifiers = [Identifier(i["type"], i["value"]) for i in record["identifiers"]]
            key_text = partition_key(identifiers, record["message_id"])
            # Hash the key: keys show up in more places (tools, logs) than values.
            key = hashlib.sha256(key_text.encode()).hexdigest().encode()
            value = avro.encode(TOUCHPOINTS_RAW.schema, record)
            futures.append(await self.producer.send(TOUCHPOINTS_RAW.name, value=value, key=key))
        if futures:
            await asyncio.gather(*futures)
            self.metrics.events_out.labels(TOUCHPOINTS_RAW.name).inc(len(futures))


class _TooLarge(Exception):
    pass


def build_app(core: CoreSettings, settings: IngestSettings) -> Starlette:
    """Build the ingest ASGI app."""
    service = IngestService(core, settings)

    async def single(request: Request) -> Response:
        call_type = request.path_params["call_type"]
        return await handle(request, call_type, batch=False)

    async def batch(request: Request) -> Response:
        return await handle(request, None, batch=True)

    async def handle(request: Request, call_type: str | None, batch: bool) -> Response:
        endpoint = "batch" if batch else str(call_type)
        started = time.perf_counter()
        response = await _handle(request, call_type, batch)
        service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        service.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - started)
        return response

    async def _handle(request: Request, call_type: str | None, batch: bool) -> Response:
        if call_type is not None and call_type not in EVENT_TYPES:
            return _error(404, f"unknown call type {call_type!r}; use one of {', '.join(EVENT_TYPES)} or batch")
        source = service.authenticate(request)
        if source is None:
            return JSONResponse({"success": False, "error": "missing or unknown write key (HTTP Basic user)"},
                                status_code=401, headers={"WWW-Authenticate": 'Basic realm="touchstream"'})
        limit = settings.max_batch_bytes if batch else settings.max_event_bytes
        try:
            body = await service.read_json(request, limit)
        except _TooLarge as exc:
            return _error(413, f"{exc} (limit: {'max_batch_bytes' if batch else 'max_event_bytes'})")
        except EventRejected as exc:
            return _error(400, str(exc), errors=[{"index": None, "field": exc.field, "reason": exc.reason}])
        if not batch:
            return await service.accept(source, [(body, call_type)])
        if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
            return _error(400, "batch: must be an object with a 'batch' list",
                          errors=[{"index": None, "field": "batch", "reason": "must be a list"}])
        events = body["batch"]
        if len(events) > settings.max_batch_events:
            return _error(413, f"batch has {len(events)} events, the limit is {settings.max_batch_events} "
                               "(limit: max_batch_events)")
        if not events:
            return _error(400, "batch: is empty", errors=[{"index": None, "field": "batch", "reason": "is empty"}])
        # Segment SDKs put shared context at the batch level; events inherit it.
        shared_context = body.get("context") if isinstance(body.get("context"), dict) else None
        payloads: list[tuple[Any, str | None]] = []
        for event in events:
            if shared_context and isinstance(event, dict) and "context" not in event:
                event = {**event, "context": shared_context}
            payloads.append((event, None))
        return await service.accept(source, payloads)

    async def metrics(_request: Request) -> Response:
        body, content_type = render(service.metrics.registry)
        return Response(body, media_type=content_type.split(";")[0])

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_request: Request) -> Response:
        if service.producer is None or service.redis is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        try:
            await service.redis.ping()
        except Exception as exc:
            return JSONResponse({"status": "unready", "reason": f"redis: {type(exc).__name__}"}, status_code=503)
        return JSONResponse({"status": "ready"})

    routes = [
        Route("/v1/batch", batch, methods=["POST"]),
        Route("/v1/import", batch, methods=["POST"]),
        Route("/v1/{call_type}", single, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=service.lifespan)
