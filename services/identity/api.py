"""Identity's admin customer API: 360 lookup, un-merge, erasure, matching review (Faust web pages)."""

from __future__ import annotations

import uuid
from typing import Any, cast

import faust
import redis.asyncio as aioredis
from aiohttp import web
from faust.web import Request, Response, View

from services.identity.admin import is_admin
from services.identity.customer360 import find_customer, read_customer, read_review
from services.identity.domain import (
    Erasure,
    GraphLayout,
    GraphRefused,
    deletion_id,
    identifier_ref,
    parse_identifier_ref,
)
from services.identity.service import CustomerEraser, TouchpointResolver
from touchstream.client_address import client_address
from touchstream.failures import FailureCounter, KeyFailureThrottle, KeyRefusal
from touchstream.identifiers import Identifier, InvalidIdentifier


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
