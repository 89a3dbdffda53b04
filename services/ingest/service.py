"""Ingest's service: authenticate a write key, translate and encode every event (all or nothing), screen
out erased customers' events, spend the rate limit and claim `messageId`s, produce, confirm the claims."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, ProcessCollector
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.responses import JSONResponse

from services.ingest.admission import Admitter
from services.ingest.http_api import Refused, unauthorized, unavailable
from services.ingest.keys import WriteKeyStore
from services.ingest.producer import TouchpointProducer, record_key
from services.ingest.segment import EventRejected, to_touchpoint
from services.ingest.settings import IngestSettings
from touchstream import avro
from touchstream.event_semantics import EventSemantics
from touchstream.failures import FailureCounter
from touchstream.metrics import ServiceMetrics
from touchstream.privacy import SuppressionList, event_suppression_tokens
from touchstream.settings import CoreSettings
from touchstream.topics import TOUCHPOINTS_RAW

AUTH_FAILURES_PREFIX = "ts:in:authfail:"
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


class IngestService:
    """Holds the producer, Redis client and settings for the request handlers."""

    def __init__(self, core: CoreSettings, settings: IngestSettings, semantics: EventSemantics) -> None:
        self.core = core
        self.settings = settings
        self.semantics = semantics
        self.metrics = IngestMetrics()
        self.producer: TouchpointProducer | None = None
        self.redis: aioredis.Redis | None = None
        self.keys: WriteKeyStore | None = None
        self.admitter: Admitter | None = None
        self.suppression: SuppressionList | None = None
        self.auth_failures: FailureCounter | None = None
        self._hash_key = core.pii_hash_key.get_secret_value().encode()

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self.redis = aioredis.from_url(self.core.redis_url)
        self.keys = WriteKeyStore(self.redis, self.settings.write_keys)
        self.admitter = Admitter(self.redis, self.settings.dedupe_ttl_s, self.settings.provisional_claim_ttl_ms)
        self.suppression = SuppressionList(self.redis, self.settings.suppression_key,
                                           self.settings.suppression_refresh_s)
        self.auth_failures = FailureCounter(self.redis, AUTH_FAILURES_PREFIX, self.settings.auth_max_failures,
                                            self.settings.auth_failure_window_s)
        self.producer = TouchpointProducer(self.core)
        await self.producer.start()
        try:
            yield
        finally:
            await self.producer.stop()
            await self.redis.aclose()

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
            raise unauthorized()
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
            raise unavailable(f"broker did not acknowledge: {type(exc).__name__}") from None
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
        assert self.producer is not None
        if not encoded:
            return
        await self.producer.produce(encoded)
        self.metrics.events_out.labels(TOUCHPOINTS_RAW.name).inc(len(encoded))
