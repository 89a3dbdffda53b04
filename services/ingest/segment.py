"""Translate Segment-style API calls into TouchpointEvent records. Pure: no I/O.

Accepts the Segment HTTP Tracking API shapes (userId/anonymousId, messageId, timestamp,
context, properties, traits) plus touchstream's CRM fields (channel, identifiers, order,
complaint/feedback, consent).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from touchstream.event_semantics import EventMeaning, EventSemantics, Meaning, default_event_semantics
from touchstream.eventtime import too_far_ahead
from touchstream.identifiers import KNOWN_TYPES
from touchstream.privacy import CONSENT_WITHDRAW_PREFIX, CONSENT_WITHDRAWN

EVENT_TYPES = ("track", "identify", "page", "screen", "group", "alias")
DEFAULT_SEMANTICS = default_event_semantics()


@dataclass(frozen=True)
class EventRejected(ValueError):
    """An event that cannot be accepted; `field` names where, `reason` says why."""

    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


# Event times outside this window are refused: they are typos or unit mistakes (seconds
# sent as milliseconds), and they would poison event-time windows downstream. 1970 keeps
# historical replays (CDNOW is 1997) working.
MIN_TIMESTAMP_MS = 0
MAX_TIMESTAMP_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z
_INT32 = (-(2**31), 2**31 - 1)
MAX_IDENTIFIER_CHARS = 512


def parse_timestamp(value: Any, field: str) -> int:
    """Return epoch milliseconds from an ISO 8601 string or epoch number.

    >>> parse_timestamp("1997-01-01T12:00:00Z", "timestamp")
    852120000000
    >>> parse_timestamp("1969-12-31T23:59:59Z", "timestamp")
    Traceback (most recent call last):
    ...
    services.ingest.segment.EventRejected: timestamp: must be between 1970-01-01 and 2100-01-01
    """
    if isinstance(value, bool):
        raise EventRejected(field, "must be an ISO 8601 string")
    if isinstance(value, int | float):
        # Segment sends strings; numbers are accepted as epoch milliseconds.
        if not MIN_TIMESTAMP_MS <= value < MAX_TIMESTAMP_MS:  # also false for NaN
            raise EventRejected(field, "must be between 1970-01-01 and 2100-01-01")
        return int(value)
    if not isinstance(value, str):
        raise EventRejected(field, "must be an ISO 8601 string")
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        millis = int(parsed.timestamp() * 1000)
    except (ValueError, OverflowError):
        raise EventRejected(field, f"{value[:40]!r} is not an ISO 8601 timestamp") from None
    if not MIN_TIMESTAMP_MS <= millis < MAX_TIMESTAMP_MS:
        raise EventRejected(field, "must be between 1970-01-01 and 2100-01-01")
    return millis


def corrected_timestamp(timestamp_ms: int, sent_at_ms: int | None, received_at_ms: int) -> int:
    """Correct a client's clock skew the way Segment does: timestamp + (receivedAt - sentAt).

    `sentAt` is read on the same (client) clock as `timestamp`, `receivedAt` on ours, so
    the difference is the client's clock offset plus the transit time.

    >>> corrected_timestamp(1_000_000, sent_at_ms=1_060_000, received_at_ms=1_000_500)
    940500
    >>> corrected_timestamp(1_000_000, sent_at_ms=None, received_at_ms=1_000_500)
    1000000
    """
    if sent_at_ms is None:
        return timestamp_ms
    return timestamp_ms + (received_at_ms - sent_at_ms)


def _object(payload: dict[str, Any], field: str) -> dict[str, Any]:
    value = payload.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EventRejected(field, "must be an object")
    return value


def _identifier_value(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise EventRejected(field, "must be a string")
    text = (value if isinstance(value, str) else str(value)).strip()
    if len(text) > MAX_IDENTIFIER_CHARS:
        raise EventRejected(field, f"must be at most {MAX_IDENTIFIER_CHARS} characters")
    return text or None


def collect_identifiers(payload: dict[str, Any], event_type: str | None = None) -> list[dict[str, str]]:
    """Gather identifiers from Segment ids, traits, context.traits and touchstream fields.

    >>> collect_identifiers({"previousId": "anon-1", "userId": "u-1"}, "alias")
    [{'type': 'user_id', 'value': 'u-1'}, {'type': 'user_id', 'value': 'anon-1'}]
    """
    found: dict[tuple[str, str], None] = {}

    def add(kind: str, value: Any, field: str) -> None:
        # Callers skip None first: most fields are absent, and their names cost an f-string.
        text = _identifier_value(value, field)
        if text is not None:
            found[(kind, text)] = None

    get = payload.get
    if (value := get("userId")) is not None:
        add("user_id", value, "userId")
    if (value := get("anonymousId")) is not None:
        add("anonymous_id", value, "anonymousId")
    if (event_type or get("type")) == "alias" and (value := get("previousId")) is not None:
        add("user_id", value, "previousId")
    context = _object(payload, "context")
    device = context.get("device")
    if isinstance(device, dict) and (value := device.get("id")) is not None:
        add("device_id", value, "context.device.id")
    for source_name, source in (("context.traits", context.get("traits")), ("traits", get("traits"))):
        if isinstance(source, dict):
            for kind in ("email", "phone"):
                if (value := source.get(kind)) is not None:
                    add(kind, value, f"{source_name}.{kind}")
    for kind in KNOWN_TYPES:
        if (value := get(kind)) is not None:
            add(kind, value, kind)
    extra = get("identifiers")
    if extra is not None:
        if not isinstance(extra, dict):
            raise EventRejected("identifiers", "must be an object of type -> value")
        for kind, value in extra.items():
            if not isinstance(kind, str) or not kind.strip():
                raise EventRejected("identifiers", "identifier types must be non-empty strings")
            add(kind.strip().lower(), value, f"identifiers.{kind}")
    return [{"type": kind, "value": value} for kind, value in found]


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EventRejected(field, "must be a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise EventRejected(field, "must be a finite number")
    return number


def _int32(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EventRejected(field, "must be an integer")
    if not _INT32[0] <= value <= _INT32[1]:
        raise EventRejected(field, "must fit in 32 bits")
    return value


def _first_property(properties: dict[str, Any], names: tuple[str, ...]) -> tuple[str, Any]:
    """Return (key, value) of the first of `names` present in `properties`, or ("", None)."""
    for name in names:
        if properties.get(name) is not None:
            return name, properties[name]
    return "", None


def extract_order(payload: dict[str, Any], meaning: EventMeaning | None,
                  semantics: EventSemantics = DEFAULT_SEMANTICS) -> dict[str, Any] | None:
    """Read `order`, or an order or refund event's amount from its properties, as an Order record.

    A refund is a negative order: its amount is the refunded sum below zero. An order or refund
    event without an amount (a full refund named by its order id alone) carries no Order. Errors
    name the field the client sent (`properties.total`), not the Order field it fills.

    >>> refunded = DEFAULT_SEMANTICS.meaning_of("Order Refunded")
    >>> extract_order({"properties": {"total": 30, "currency": "EUR", "order_id": 7}}, refunded)
    {'order_id': '7', 'amount': -30.0, 'currency': 'EUR', 'items': []}
    """
    order = payload.get("order")
    sent_as = {key: f"order.{key}" for key in ("amount", "currency", "items")}
    if order is None and meaning is not None and meaning.meaning in (Meaning.ORDER, Meaning.REFUND):
        properties = _object(payload, "properties")
        names = semantics.properties
        found = {role: _first_property(properties, getattr(names, role))
                 for role in ("amount", "currency", "order_id", "items")}
        if found["amount"][1] is None:
            return None
        sent_as = {role: f"properties.{found[role][0] or getattr(names, role)[0]}"
                   for role in ("amount", "currency", "items")}
        order = {role: value for role, (_, value) in found.items()}
    if order is None:
        return None
    if not isinstance(order, dict):
        raise EventRejected("order", "must be an object")
    amount = _number(order.get("amount"), sent_as["amount"])
    if meaning is not None and meaning.meaning is Meaning.REFUND and "order" not in payload:
        amount = -abs(amount)
    items_raw = order.get("items") or []
    items_field = sent_as["items"]
    if not isinstance(items_raw, list):
        raise EventRejected(items_field, "must be a list")
    items = []
    for index, item in enumerate(items_raw):
        if not isinstance(item, dict):
            raise EventRejected(f"{items_field}[{index}]", "must be an object")
        quantity = _int32(item.get("quantity", 1), f"{items_field}[{index}].quantity")
        price = item.get("price")
        # Segment's products name the item by product_id, sku optional.
        sku = item.get("sku", item.get("product_id"))
        items.append({
            "sku": None if sku is None else str(sku),
            "quantity": quantity,
            "price": None if price is None else _number(price, f"{items_field}[{index}].price"),
        })
    currency = order.get("currency") or "USD"
    if not isinstance(currency, str):
        raise EventRejected(sent_as["currency"], "must be a string")
    order_id = order.get("order_id")
    return {"order_id": None if order_id is None else str(order_id), "amount": amount,
            "currency": currency, "items": items}


def _rating(value: Any, field: str) -> int:
    """Return a rating as the whole number Feedback.rating holds: numbers and numeric text are rounded.

    Segment's `Product Reviewed` spec sends the star rating as text ("4").

    >>> _rating("4", "properties.rating"), _rating(2.4, "properties.rating")
    (4, 2)
    """
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise EventRejected(field, f"must be a number (a rating), got {value[:40]!r}") from None
    number = _number(value, field)
    return _int32(round(number), field)


def extract_feedback(payload: dict[str, Any], meaning: EventMeaning | None = None,
                     semantics: EventSemantics = DEFAULT_SEMANTICS) -> dict[str, Any] | None:
    """Read `complaint`/`feedback`, or a complaint or feedback event's rating and text, as a Feedback record.

    A feedback event rated at or below its name's `complaint_at_or_below` is a complaint.

    >>> submitted = DEFAULT_SEMANTICS.meaning_of("Feedback Submitted")
    >>> extract_feedback({"properties": {"rating": 1, "comment": "cold food"}}, submitted)
    {'kind': 'complaint', 'text': 'cold food', 'rating': 1}
    >>> extract_feedback({"properties": {"rating": 5}}, submitted)["kind"]
    'feedback'
    """
    for kind in ("complaint", "feedback"):
        value = payload.get(kind)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise EventRejected(kind, "must be an object")
        rating = value.get("rating")
        if rating is not None:
            _int32(rating, f"{kind}.rating")
        text = value.get("text")
        if text is not None and not isinstance(text, str):
            raise EventRejected(f"{kind}.text", "must be a string")
        return {"kind": kind, "text": text, "rating": rating}
    if meaning is None or meaning.meaning not in (Meaning.COMPLAINT, Meaning.FEEDBACK):
        return None
    properties = _object(payload, "properties")
    names = semantics.properties
    rating_key, rating_value = _first_property(properties, names.rating)
    rating = None if rating_value is None else _rating(rating_value, f"properties.{rating_key}")
    text_key, text = _first_property(properties, names.text)
    if text is not None and not isinstance(text, str):
        raise EventRejected(f"properties.{text_key}", "must be a string")
    kind = "complaint" if meaning.meaning is Meaning.COMPLAINT else "feedback"
    threshold = meaning.complaint_at_or_below
    if kind == "feedback" and threshold is not None and rating is not None and rating <= threshold:
        kind = "complaint"
    return {"kind": kind, "text": text, "rating": rating}


def _category_names(value: Any, field: str) -> list[str]:
    """Read consent categories as a list of names, or Segment's {category: true/false} (the true ones)."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict) and all(isinstance(v, bool) for v in value.values()):
        return [str(k).strip() for k, v in value.items() if v and str(k).strip()]
    if isinstance(value, list) and all(isinstance(c, str) for c in value):
        return [c.strip() for c in value if c.strip()]
    raise EventRejected(field, "must be a list of consent category names (or an object of category -> true/false)")


def extract_consent(payload: dict[str, Any], meaning: EventMeaning | None = None,
                    semantics: EventSemantics = DEFAULT_SEMANTICS) -> list[str]:
    """Read the consent categories an event states, as TouchpointEvent.consent carries them.

    `consent` (a list of categories) wins; otherwise Segment's consent object,
    `context.consent.categoryPreferences` ({category: true/false}), gives the categories set true.
    An event that says nothing gives [] (the customer's consent is unchanged); one that states no
    category at all (`"consent": []`, or every preference false) gives ["none"]: consent withdrawn.
    Without either, a consent event's `properties.categories` states the categories, and an
    unsubscribe withdraws the categories it names (or its name's `withdraws`), each as `-category`:
    the customer's other categories stand.

    >>> extract_consent({}), extract_consent({"consent": ["email"]}), extract_consent({"consent": []})
    ([], ['email'], ['none'])
    >>> extract_consent({"context": {"consent": {"categoryPreferences": {"email": True, "sms": False}}}})
    ['email']
    >>> extract_consent({"properties": {}}, DEFAULT_SEMANTICS.meaning_of("Unsubscribed"))
    ['-email', '-marketing']
    """
    if "consent" in payload:
        consent = payload["consent"]
        if not isinstance(consent, list) or not all(isinstance(c, str) for c in consent):
            raise EventRejected("consent", "must be a list of category names")
        return [c.strip() for c in consent if c.strip()] or [CONSENT_WITHDRAWN]
    context = payload.get("context")
    stated = context.get("consent") if isinstance(context, dict) else None
    preferences = stated.get("categoryPreferences") if isinstance(stated, dict) else None
    if preferences is not None:
        if not isinstance(preferences, dict) or not all(isinstance(v, bool) for v in preferences.values()):
            raise EventRejected("context.consent.categoryPreferences", "must be an object of category -> true/false")
        return [str(k) for k, v in preferences.items() if v] or [CONSENT_WITHDRAWN]
    if meaning is None or meaning.meaning not in (Meaning.CONSENT, Meaning.UNSUBSCRIBE):
        return []
    key, value = _first_property(_object(payload, "properties"), semantics.properties.categories)
    named = None if value is None else _category_names(value, f"properties.{key}")
    if meaning.meaning is Meaning.CONSENT:
        return [] if named is None else (named or [CONSENT_WITHDRAWN])
    withdrawn = named or list(meaning.withdraws)
    return [CONSENT_WITHDRAW_PREFIX + c for c in withdrawn] if withdrawn else [CONSENT_WITHDRAWN]


def to_touchpoint(payload: Any, call_type: str | None, source: str, received_at_ms: int,
                  default_channel: str = "web", batch_sent_at_ms: int | None = None,
                  event_time_tolerance_s: float | None = None,
                  semantics: EventSemantics = DEFAULT_SEMANTICS) -> dict[str, Any]:
    """Build a TouchpointEvent record from one API call, or raise EventRejected.

    A track call's name gives its meaning (`semantics`): an order, refund, complaint, feedback,
    consent or unsubscribe event fills `order`, `feedback` or `consent` from its properties, unless
    the call carries those fields itself.

    `batch_sent_at_ms` is the batch-level `sentAt` (Segment SDKs put it there), already
    parsed; an event's own `sentAt` wins. With both a timestamp and a sentAt, the timestamp is corrected for the
    client's clock skew (see `corrected_timestamp`). With `event_time_tolerance_s`, an event stamped
    (after that correction) further than this past `received_at_ms` is refused.
    """
    if not isinstance(payload, dict):
        raise EventRejected("(event)", "must be a JSON object")
    event_type = call_type or payload.get("type")
    if event_type not in EVENT_TYPES:
        raise EventRejected("type", f"must be one of {', '.join(EVENT_TYPES)}")
    message_id = payload.get("messageId")
    if message_id is None:
        message_id = str(uuid.uuid4())
    elif not isinstance(message_id, str) or not message_id.strip() or len(message_id) > 200:
        raise EventRejected("messageId", "must be a non-empty string of at most 200 characters")
    identifiers = collect_identifiers(payload, event_type)
    if not identifiers:
        raise EventRejected("userId", "an event needs userId, anonymousId or another identifier")
    name = payload.get("event") if event_type == "track" else payload.get("name")
    if event_type == "track" and not (isinstance(name, str) and name.strip()):
        raise EventRejected("event", "a track call needs an event name")
    if name is not None and not isinstance(name, str):
        raise EventRejected("event" if event_type == "track" else "name", "must be a string")
    channel = payload.get("channel", default_channel)
    if not isinstance(channel, str) or not channel.strip() or len(channel) > 64:
        raise EventRejected("channel", "must be a non-empty string of at most 64 characters")
    extras = {k: payload[k] for k in ("properties", "traits", "context", "groupId") if payload.get(k) is not None}
    timestamp_field = "timestamp" if payload.get("timestamp") is not None else "originalTimestamp"
    timestamp = payload.get(timestamp_field)
    if timestamp is None:
        timestamp_ms = received_at_ms
    else:
        client_ms = parse_timestamp(timestamp, timestamp_field)
        sent_at = payload.get("sentAt")
        sent_at_ms = batch_sent_at_ms if sent_at is None else parse_timestamp(sent_at, "sentAt")
        timestamp_ms = corrected_timestamp(client_ms, sent_at_ms, received_at_ms)
        if timestamp_ms != client_ms:
            extras["originalTimestamp"] = timestamp
            extras["sentAt"] = sent_at if sent_at is not None else batch_sent_at_ms
        if not MIN_TIMESTAMP_MS <= timestamp_ms < MAX_TIMESTAMP_MS:
            raise EventRejected(timestamp_field, "is out of range once corrected for clock skew (sentAt)")
        if event_time_tolerance_s is not None:
            ahead = too_far_ahead(timestamp_ms, received_at_ms, event_time_tolerance_s)
            if ahead is not None:
                raise EventRejected(timestamp_field, ahead if timestamp_ms == client_ms
                                    else f"{ahead}, once corrected for clock skew (sentAt)")
    meaning = semantics.meaning_of(name) if event_type == "track" else None
    consent = extract_consent(payload, meaning, semantics)
    return {
        "message_id": message_id,
        "type": event_type,
        "event": name,
        "channel": channel.strip().lower(),
        "source": source,
        "timestamp_ms": timestamp_ms,
        "received_at_ms": received_at_ms,
        "identifiers": identifiers,
        "order": extract_order(payload, meaning, semantics),
        "feedback": extract_feedback(payload, meaning, semantics),
        "consent": consent,
        "properties_json": _json_text(extras) if extras else None,
    }


def _json_text(extras: dict[str, Any]) -> str:
    try:
        return orjson.dumps(extras, default=str).decode()
    except TypeError as exc:  # lone surrogates, integers beyond 64 bits
        field = next(iter(extras)) if len(extras) == 1 else "properties"
        raise EventRejected(field, f"cannot be stored as JSON: {exc}") from None
