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
import logging
import time
from typing import Any

import yaml
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.ingest.http_api import Refused, bad_request, basic_user, error_response, read_json, unavailable
from services.ingest.segment import EVENT_TYPES, EventRejected, parse_timestamp
from services.ingest.service import IngestService
from services.ingest.settings import DEV_WRITE_KEY, IngestSettings, hash_write_key
from touchstream import avro
from touchstream.client_address import client_address
from touchstream.event_semantics import EventSemanticsError, load_event_semantics
from touchstream.metrics import render
from touchstream.settings import CoreSettings, Environment
from touchstream.startup import ConfigurationError

OPENAPI_PATH = avro.SCHEMA_DIR / "openapi.yaml"
# Readiness waits this long for the broker to answer a metadata request.
BROKER_PROBE_TIMEOUT_S = 2.0
log = logging.getLogger(__name__)


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
            response = unavailable(f"Redis unavailable: {type(exc).__name__}").response()
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
        body = await read_json(request, limit, limit_name)
        if source is None:
            body_key = body.get("writeKey") if isinstance(body, dict) else None
            source = await service.authenticate(body_key if isinstance(body_key, str) else None, address)
        if not batch:
            encoded, suppressed = await service.encode_and_screen(source, [body], call_type, None, check_size=False)
            return await service.accept(source, encoded, suppressed)
        if not isinstance(body, dict) or not isinstance(body.get("batch"), list):
            raise bad_request("batch", "the body must be an object with a 'batch' list")
        events = body["batch"]
        if len(events) > settings.max_batch_events:
            raise Refused(413, f"batch has {len(events)} events, the limit is {settings.max_batch_events} "
                               "(max_batch_events)")
        if not events:
            raise bad_request("batch", "is empty")
        # Segment SDKs put shared context and sentAt at the batch level; events inherit them.
        shared_context = body.get("context") if isinstance(body.get("context"), dict) else None
        if shared_context:
            events = [{**e, "context": shared_context} if isinstance(e, dict) and "context" not in e else e
                      for e in events]
        try:
            sent_at = body.get("sentAt")
            sent_at_ms = None if sent_at is None else parse_timestamp(sent_at, "sentAt")
        except EventRejected as exc:
            raise bad_request(exc.field, exc.reason) from None
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
            await asyncio.wait_for(service.producer.fetch_metadata(), BROKER_PROBE_TIMEOUT_S)
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
