"""Ingest HTTP app (Starlette): authenticate, validate, dedupe, produce, answer after the broker's ack.

Request flow: route -> client address (through trusted proxies) not locked out by failed
authentications -> write key from the HTTP Basic user, checked before the body is read -> body
(size-capped, gzip) -> JSON -> or else the write key from `writeKey` in the body, as Segment
allows -> every event translated and Avro-encoded (any error refuses the whole request, see
`encode_all`) -> rate limit and provisional messageId claims in one Redis call (`admission`) ->
records produced -> claims made final -> `200` once the broker acknowledged them all.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import random
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import redis.asyncio as aioredis
import yaml
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2
from prometheus_client import CollectorRegistry, ProcessCollector
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.ingest.admission import Admitter
from services.ingest.keys import WriteKeyStore
from services.ingest.segment import EVENT_TYPES, EventRejected, parse_timestamp, to_touchpoint
from services.ingest.settings import DEV_WRITE_KEY, IngestSettings, hash_write_key
from touchstream import avro
from touchstream.client_address import client_address
from touchstream.event_semantics import EventSemantics, EventSemanticsError, load_event_semantics
from touchstream.failures import FailureCounter
from touchstream.identifiers import KEY_PRIORITY, raw_topic_key
from touchstream.metrics import ServiceMetrics, render
from touchstream.privacy import SuppressionList, event_suppression_tokens
from touchstream.settings import CoreSettings, Environment
from touchstream.startup import ConfigurationError
from touchstream.topics import TOUCHPOINTS_RAW

OPENAPI_PATH = avro.SCHEMA_DIR / "openapi.yaml"
AUTH_FAILURES_PREFIX = "ts:in:authfail:"
# Readiness waits this long for the broker to answer a metadata request.
BROKER_PROBE_TIMEOUT_S = 2.0
log = logging.getLogger(__name__)


class IngestMetrics(ServiceMetrics):
    def __init__(self) -> None:
        # Own registry: one process may build several apps (tests), each with its own counts.
        super().__init__("ingest", CollectorRegistry())
        ProcessCollector(registry=self.registry)
        self.requests = self.counter("requests", "HTTP requests by endpoint and status.", ["endpoint", "status"])
        self.rejected = self.counter("events_rejected", "Events refused, by field.", ["field"])
        self.duplicates = self.counter("events_duplicate", "Events with a messageId already accepted.")
        self.suppressed = self.counter(
            "events_suppressed", "Events dropped because they carry an identifier of an erased customer.")
        self.rate_limited = self.counter("events_rate_limited", "Events refused with 429, by source.", ["source"])
        self.in_flight = self.counter(
            "events_in_flight", "Events refused with 503 because a request with the same messageId was still "
                                "waiting for the broker's ack (its claim was provisional).")
        self.claims_unconfirmed = self.counter(
            "claims_unconfirmed", "Acknowledged events whose messageId claim Redis did not make final; a retry "
                                  "after the claim expires is produced again (downstream dedupes by messageId).")
        self.auth_refused = self.counter(
            "auth_refused", "Requests refused for their write key (bad_key: 401) or their client address "
            "(locked_out: 429 after too many bad keys).", ["reason"])
        self.request_seconds = self.histogram("request_duration", "Request time until the broker's ack.",
                                              ["endpoint"])


class Refused(Exception):
    """A request answered with an error status; `errors` lists per-event problems."""

    def __init__(self, status: int, message: str, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None, retry: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors
        self.headers = headers
        self.retry = retry

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.errors, self.headers, self.retry)


# The Segment and RudderStack SDKs read `code` and `message` from an error body; without them
# RudderStack's SDK retries even a 400 as if the network had failed.
ERROR_CODES = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "too_large", 429: "rate_limited", 503: "unavailable"}


def error_response(status: int, message: str, errors: list[dict[str, Any]] | None = None,
                   headers: dict[str, str] | None = None, retry: bool = False) -> JSONResponse:
    body: dict[str, Any] = {"success": False, "code": ERROR_CODES.get(status, "error"), "message": message,
                            "error": message}
    if errors is not None:
        body["errors"] = errors
    if retry:
        body["retry"] = True
    return JSONResponse(body, status_code=status, headers=headers)


def _bad_request(field: str, reason: str, index: int | None = None) -> Refused:
    return Refused(400, f"{field}: {reason}", errors=[{"index": index, "field": field, "reason": reason}])


def _unauthorized() -> Refused:
    return Refused(401, "missing, unknown or revoked write key (HTTP Basic user, or writeKey in the body)",
                   headers={"WWW-Authenticate": 'Basic realm="touchstream"'})


def _unavailable(what: str) -> Refused:
    return Refused(503, f"{what}; nothing in this request was accepted, retry it", headers={"Retry-After": "1"},
                   retry=True)


def parse_json(body: bytes) -> Any:
    """Parse a request body with orjson, which refuses NaN, Infinity, numbers that overflow a
    double, lone surrogates, invalid UTF-8 and nesting deeper than 1024.

    >>> parse_json(b'{"a": 1.5}')
    {'a': 1.5}
    >>> try:
    ...     parse_json(b'[1e999]')
    ... except ValueError as exc:
    ...     print(str(exc).split(":")[0])
    number is infinity when parsed as double
    """
    return orjson.loads(body)


def basic_user(header: str) -> str | None:
    """Return the user of an HTTP Basic `Authorization` header, or None.

    >>> basic_user("Basic " + base64.b64encode(b"key:").decode())
    'key'
    """
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        return base64.b64decode(encoded.strip(), validate=True).decode().split(":", 1)[0] or None
    except (binascii.Error, UnicodeDecodeError):
        return None


def record_key(record: dict[str, Any], hash_key: bytes) -> bytes:
    """Return the raw topic's key: the keyed hash of the most stable identifier, else of the messageId.

    The rule is `touchstream.identifiers.partition_key`'s, read straight off the record's
    dicts (building Identifier objects per event showed up in profiles).
    """
    by_type = {i["type"]: i["value"] for i in record["identifiers"]}
    text = next((f"{kind}:{by_type[kind]}" for kind in KEY_PRIORITY if kind in by_type), record["message_id"])
    return raw_topic_key(text, hash_key)


class CachedPartitioner:
    """Kafka's default partitioner (murmur2 of the key), remembering recent keys.

    aiokafka's murmur2 is pure Python (~20 µs a key, the largest single cost per event in
    profiles); customers send many events, so most keys repeat.
    """

    def __init__(self, size: int = 100_000) -> None:
        self._size = size
        self._hashes: dict[bytes, int] = {}

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return random.choice(available or all_partitions)
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= self._size:
                self._hashes.clear()
            hashed = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return all_partitions[hashed % len(all_partitions)]


class IngestService:
    """Holds the producer, Redis client and settings for the request handlers."""

    def __init__(self, core: CoreSettings, settings: IngestSettings, semantics: EventSemantics) -> None:
        self.core = core
        self.settings = settings
        self.semantics = semantics
        self.metrics = IngestMetrics()
        self.producer: AIOKafkaProducer | None = None
        self.redis: aioredis.Redis | None = None
        self.keys: WriteKeyStore | None = None
        self.admitter: Admitter | None = None
        self.suppression: SuppressionList | None = None
        self.auth_failures: FailureCounter | None = None
        self._hash_key = core.pii_hash_key.get_secret_value().encode()
        self._partitioner = CachedPartitioner()

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self.redis = aioredis.from_url(self.core.redis_url)
        self.keys = WriteKeyStore(self.redis, self.settings.write_keys)
        self.admitter = Admitter(self.redis, self.settings.dedupe_ttl_s, self.settings.provisional_claim_ttl_ms)
        self.suppression = SuppressionList(self.redis, self.settings.suppression_key,
                                           self.settings.suppression_refresh_s)
        self.auth_failures = FailureCounter(self.redis, AUTH_FAILURES_PREFIX, self.settings.auth_max_failures,
                                            self.settings.auth_failure_window_s)
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.core.kafka_bootstrap,
            acks="all",
            enable_idempotence=self.core.idempotent_producer,
            linger_ms=2,
            # Room for a whole request's records per partition in one batch (the default is 16 KB).
            max_batch_size=256 * 1024,
            partitioner=self._partitioner,
        )
        await self.producer.start()
        try:
            yield
        finally:
            await self.producer.stop()
            await self.redis.aclose()

    async def read_json(self, request: Request, limit: int, limit_name: str) -> Any:
        """Read the body (at most `limit` bytes, before and after gzip) and parse it."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise Refused(413, f"body is {declared} bytes, the limit is {limit} bytes ({limit_name})")
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"body is over {limit} bytes ({limit_name})")
            chunks.append(chunk)
        body = b"".join(chunks)
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if encoding == "gzip":
            body = _gunzip(body, limit, limit_name)
        elif encoding not in ("", "identity"):
            raise _bad_request("Content-Encoding", f"{encoding[:40]!r} is not supported; use gzip or none")
        try:
            return parse_json(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise _bad_request("(body)", f"not valid JSON: {str(exc)[:200]}") from None

    async def refuse_if_locked_out(self, address: str) -> None:
        """Refuse every request from an address with too many failed authentications, until its window ends.

        Before the key is looked at, so a guesser learns nothing more once locked out, not even a right guess.
        """
        assert self.auth_failures is not None
        wait_s = await self.auth_failures.retry_after(address)
        if wait_s is not None:
            self.metrics.auth_refused.labels("locked_out").inc()
            raise Refused(429, f"too many failed authentications from this address; retry after {wait_s}s",
                          headers={"Retry-After": str(wait_s)}, retry=True)

    async def authenticate(self, key: str | None, address: str) -> str:
        """Return the source of a write key; refuse unknown and revoked keys, counting the failure."""
        assert self.keys is not None and self.auth_failures is not None
        source = await self.keys.source_for(key) if key else None
        if source is None:
            self.metrics.auth_refused.labels("bad_key").inc()
            await self.auth_failures.failed(address)
            raise _unauthorized()
        return source

    def encode_all(self, source: str, payloads: list[Any], call_type: str | None, batch_sent_at_ms: int | None,
                   check_size: bool, tokens: list[list[str]] | None = None) -> list[tuple[str, bytes, bytes]]:
        """Return (messageId, key, Avro value) per event, or refuse the request listing every bad event.

        With `tokens`, each event's suppression tokens (see touchstream.privacy) are appended to it.
        """
        received_at_ms = int(time.time() * 1000)
        limit = self.settings.max_event_bytes
        encoded: list[tuple[str, bytes, bytes]] = []
        errors = []
        too_large = False
        for index, payload in enumerate(payloads):
            try:
                record = to_touchpoint(payload, call_type, source, received_at_ms, self.settings.default_channel,
                                       batch_sent_at_ms, self.core.event_time_tolerance_s, self.semantics)
                try:
                    value = avro.encode(TOUCHPOINTS_RAW.schema, record)
                except (ValueError, OverflowError) as exc:  # e.g. a lone surrogate in a string field
                    raise EventRejected("(schema)", str(exc)[:300]) from None
                # A single call's body was already held to the limit. In a batch, the event's
                # encoded record is measured: it is the event in compact form (properties,
                # traits and context as compact JSON), so no event is serialised twice.
                if check_size and len(value) > limit:
                    too_large = True
                    raise EventRejected("(event)", f"event is {len(value)} bytes encoded, the limit is {limit} "
                                                   "(max_event_bytes)")
                encoded.append((record["message_id"], record_key(record, self._hash_key), value))
                if tokens is not None:
                    tokens.append(event_suppression_tokens(record["identifiers"], self._hash_key,
                                                           self.settings.default_phone_region))
            except (EventRejected, RecursionError) as exc:
                if isinstance(exc, RecursionError):
                    exc = EventRejected("(event)", "is nested too deeply")
                self.metrics.rejected.labels(exc.field.split(".")[0][:40]).inc()
                errors.append({"index": index, "field": exc.field, "reason": exc.reason})
        if errors:
            # All-or-nothing: a batch with any invalid event is refused whole, so a client
            # can fix and resend it without tracking which events went through.
            # SDKs log only the message, so it names the first problem too.
            first = f"[{errors[0]['index']}] {errors[0]['field']}: {errors[0]['reason']}"
            more = f" (and {len(errors) - 1} more in errors[])" if len(errors) > 1 else ""
            if too_large:
                raise Refused(413, f"event(s) over max_event_bytes; nothing in this request was accepted: "
                                   f"{first}{more}", errors=errors)
            raise Refused(400, f"invalid event(s); nothing in this request was accepted: {first}{more}",
                          errors=errors)
        return encoded

    async def encode_and_screen(
        self, source: str, payloads: list[Any], call_type: str | None, batch_sent_at_ms: int | None, check_size: bool
    ) -> tuple[list[tuple[str, bytes, bytes]], int]:
        """`encode_all`, then leave out the events carrying an identifier of an erased customer.

        Returns the events to produce and how many were dropped. A dropped event is not a client
        error: the request succeeds, and the answer counts it in `suppressed`.
        """
        assert self.suppression is not None
        await self.suppression.refresh()
        tokens: list[list[str]] | None = [] if self.suppression.active else None
        encoded = self.encode_all(source, payloads, call_type, batch_sent_at_ms, check_size, tokens)
        if tokens is None:
            return encoded, 0
        flags = await self.suppression.suppressed(tokens)
        kept = [item for item, dropped in zip(encoded, flags, strict=True) if not dropped]
        dropped = len(encoded) - len(kept)
        self.metrics.suppressed.inc(dropped)
        return kept, dropped

    async def accept(self, source: str, encoded: list[tuple[str, bytes, bytes]], suppressed: int = 0) -> JSONResponse:
        """Spend the rate limit, drop duplicates, produce the rest, answer once the broker acknowledged."""
        assert self.admitter is not None
        if not encoded:
            return JSONResponse({"success": True, "accepted": 0, "duplicates": 0, "suppressed": suppressed})
        rate = self.settings.rate_limits.get(source, self.settings.rate_limit_events_per_s)
        message_ids = [message_id for message_id, _, _ in encoded]
        admission = await self.admitter.admit(source, message_ids, rate, self.settings.rate_limit_burst_events)
        if admission.in_flight:
            # Not 409: the SDKs retry only 429 and 5xx, and the request holding the claim may still fail.
            self.metrics.in_flight.inc(len(encoded))
            raise Refused(503, "an event of this request (same messageId) is being accepted by another request; "
                               "nothing in this request was accepted, retry it",
                          headers={"Retry-After": str(admission.retry_after_s)}, retry=True)
        if not admission.allowed:
            self.metrics.rate_limited.labels(source).inc(len(encoded))
            raise Refused(429, f"rate limit of {rate:g} events/s for source {source!r} reached; "
                               f"retry after {admission.retry_after_s}s",
                          headers={"Retry-After": str(admission.retry_after_s)}, retry=True)
        new = [item for item, is_new in zip(encoded, admission.fresh, strict=True) if is_new]
        new_ids = [message_id for message_id, _, _ in new]
        try:
            await asyncio.wait_for(self._produce(new), self.settings.produce_timeout_s)
        except Exception as exc:
            # Only broker trouble is left here: every record was encoded before.
            log.warning("produce failed: %r", exc)
            try:
                await self.admitter.release(source, admission.token, new_ids)
            except RedisError as redis_exc:
                # The claims are provisional: they expire on their own, and a retry meanwhile gets a 503.
                log.warning("releasing messageId claims failed: %r", redis_exc)
                self.metrics.redis_errors.inc()
            raise _unavailable(f"broker did not acknowledge: {type(exc).__name__}") from None
        try:
            await self.admitter.confirm(source, admission.token, new_ids)
        except RedisError as exc:
            # The events are durable: still a 200. Their claims expire, and a retry after that is produced
            # again, which downstream stages dedupe by messageId: a duplicate, never a loss.
            log.warning("confirming messageId claims failed: %r", exc)
            self.metrics.redis_errors.inc()
            self.metrics.claims_unconfirmed.inc(len(new_ids))
        duplicates = len(encoded) - len(new)
        self.metrics.duplicates.inc(duplicates)
        return JSONResponse({"success": True, "accepted": len(new), "duplicates": duplicates,
                             "suppressed": suppressed})

    async def _produce(self, encoded: list[tuple[str, bytes, bytes]]) -> None:
        # One record batch per partition and request instead of one send() per record: a
        # request's events leave together anyway, and send() costs more than the encoding.
        assert self.producer is not None
        if not encoded:
            return
        topic = TOUCHPOINTS_RAW.name
        partitions = sorted(await self.producer.partitions_for(topic))
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        for _, key, value in encoded:
            by_partition.setdefault(self._partitioner(key, partitions, partitions), []).append((key, value))
        futures = []
        for partition, records in by_partition.items():
            batch = self.producer.create_batch()
            for key, value in records:
                if batch.append(key=key, value=value, timestamp=None) is None:  # batch full: send it
                    batch.close()
                    futures.append(await self.producer.send_batch(batch, topic, partition=partition))
                    batch = self.producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            batch.close()
            futures.append(await self.producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*futures)
        self.metrics.events_out.labels(topic).inc(len(encoded))


def _gunzip(body: bytes, limit: int, limit_name: str) -> bytes:
    # Decompress at most limit+1 bytes, so a small gzip bomb cannot take the worker's memory.
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise _bad_request("Content-Encoding", f"gzip body could not be decompressed: {exc}") from None
    if len(out) > limit:
        raise Refused(413, f"decompressed body is over {limit} bytes ({limit_name})")
    if not inflater.eof:
        raise _bad_request("Content-Encoding", "gzip body is truncated")
    return out


def load_openapi() -> dict[str, Any]:
    """Return the API document from schemas/openapi.yaml (the one place it is written)."""
    document = yaml.safe_load(OPENAPI_PATH.read_text())
    assert isinstance(document, dict)
    return document


def build_app(core: CoreSettings, settings: IngestSettings) -> Starlette:
    """Build the ingest ASGI app; in prod, refuse to run with the well-known dev write key. A bad event
    semantics file (TOUCHSTREAM_EVENT_SEMANTICS_FILE) is a ConfigurationError listing its problems by line."""
    if core.environment is Environment.PROD and hash_write_key(DEV_WRITE_KEY) in settings.write_keys.values():
        raise ValueError("the dev write key is configured in prod: set TOUCHSTREAM_INGEST_WRITE_KEYS "
                         "(or {} and `touchstream keys add SOURCE`)")
    try:
        semantics = load_event_semantics(core.event_semantics_file)
    except EventSemanticsError as exc:
        raise ConfigurationError("\n".join(f"TOUCHSTREAM_EVENT_SEMANTICS_FILE: {p}" for p in exc.problems)) from None
    service = IngestService(core, settings, semantics)
    openapi = load_openapi()

    async def single(request: Request) -> Response:
        return await handle(request, request.path_params["call_type"], batch=False)

    async def batch(request: Request) -> Response:
        return await handle(request, None, batch=True)

    async def handle(request: Request, call_type: str | None, batch: bool) -> Response:
        endpoint = "batch" if batch else str(call_type) if call_type in EVENT_TYPES else "unknown"
        started = time.perf_counter()
        try:
            response = await _handle(request, call_type, batch)
        except Refused as refused:
            response = refused.response()
        except RedisError as exc:
            log.warning("redis failed: %r", exc)
            service.metrics.redis_errors.inc()
            response = _unavailable(f"Redis unavailable: {type(exc).__name__}").response()
        service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        service.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - started)
        return response

    async def _handle(request: Request, call_type: str | None, batch: bool) -> Response:
        if call_type is not None and call_type not in EVENT_TYPES:
            raise Refused(404, f"unknown call type {call_type[:40]!r}; use one of {', '.join(EVENT_TYPES)} or batch")
        address = client_address(request.client.host if request.client else None,
                                 request.headers.getlist("x-forwarded-for"), settings.trusted_proxies)
        await service.refuse_if_locked_out(address)
        header = request.headers.get("authorization")
        # A key in the header is checked before the body is read, gunzipped and parsed.
        source = await service.authenticate(basic_user(header), address) if header else None
        limit, limit_name = ((settings.max_batch_bytes, "max_batch_bytes") if batch
                             else (settings.max_event_bytes, "max_event_bytes"))
        body = await service.read_json(request, limit, limit_name)
        if source is None:
            body_key = body.get("writeKey") if isinstance(body, dict) else None
            source = await service.authenticate(body_key if isinstance(body_key, str) else None, address)
        if not batch:
            encoded, suppressed = await service.encode_and_screen(source, [body], call_type, None, check_size=False)
            return await service.accept(source, encoded, suppressed)
        if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
            raise _bad_request("batch", "the body must be an object with a 'batch' list")
        events = body["batch"]
        if len(events) > settings.max_batch_events:
            raise Refused(413, f"batch has {len(events)} events, the limit is {settings.max_batch_events} "
                               "(max_batch_events)")
        if not events:
            raise _bad_request("batch", "is empty")
        # Segment SDKs put shared context and sentAt at the batch level; events inherit them.
        shared_context = body.get("context") if isinstance(body.get("context"), dict) else None
        if shared_context:
            events = [{**e, "context": shared_context} if isinstance(e, dict) and "context" not in e else e
                      for e in events]
        try:
            sent_at = body.get("sentAt")
            sent_at_ms = None if sent_at is None else parse_timestamp(sent_at, "sentAt")
        except EventRejected as exc:
            raise _bad_request(exc.field, exc.reason) from None
        encoded, suppressed = await service.encode_and_screen(source, events, None, sent_at_ms, check_size=True)
        return await service.accept(source, encoded, suppressed)

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
        # A metadata round trip, not the producer's cached view: with the broker away every request
        # would be answered 503 after the produce timeout, so a load balancer should send none.
        try:
            await asyncio.wait_for(service.producer.client.fetch_all_metadata(), BROKER_PROBE_TIMEOUT_S)
        except Exception as exc:
            return JSONResponse({"status": "unready", "reason": f"broker: {type(exc).__name__}"}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def openapi_json(_request: Request) -> Response:
        return JSONResponse(openapi)

    async def http_error(_request: Request, exc: Exception) -> Response:
        # Unknown paths and wrong methods answer JSON like every other error.
        assert isinstance(exc, HTTPException)
        return error_response(exc.status_code, exc.detail, headers=dict(exc.headers) if exc.headers else None)

    routes = [
        Route("/v1/batch", batch, methods=["POST"]),
        Route("/v1/import", batch, methods=["POST"]),
        Route("/v1/{call_type}", single, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=service.lifespan, exception_handlers={HTTPException: http_error})
