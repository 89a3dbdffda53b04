"""Translate Segment-style API calls into TouchpointEvent records. Pure: no I/O.

Accepts the Segment HTTP Tracking API shapes (userId/anonymousId, messageId, timestamp,
context, properties, traits) plus touchstream's CRM fields (channel, identifiers, order,
complaint/feedback, consent).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from touchstream.identifiers import KNOWN_TYPES

EVENT_TYPES = ("track", "identify", "page", "screen", "group", "alias")
_ORDER_EVENTS = frozenset({"order completed", "order placed", "purchase", "checkout completed"})


@dataclass(frozen=True)
class EventRejected(ValueError):
    """An event that cannot be accepted; `field` names where, `reason` says why."""

    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


def parse_timestamp(value: Any, field: str) -> int:
    """Return epoch milliseconds from an ISO 8601 string or epoch number.

    >>> parse_timestamp("1997-01-01T12:00:00Z", "timestamp")
    852120000000
    """
    if isinstance(value, bool):
        raise EventRejected(field, "must be an ISO 8601 string")
    if isinstance(value, int | float):
        # Segment sends strings; numbers are accepted as epoch milliseconds.
        return int(value)
    if not isinstance(value, str):
        raise EventRejected(field, "must be an ISO 8601 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise EventRejected(field, f"{value[:40]!r} is not an ISO 8601 timestamp") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


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
    text = str(value).strip()
    return text or None


def collect_identifiers(payload: dict[str, Any]) -> list[dict[str, str]]:
    """Gather identifiers from Segment ids, traits, context.traits and touchstream fields."""
    found: dict[tuple[str, str], None] = {}

    def add(kind: str, value: Any, field: str) -> None:
        text = _identifier_value(value, field)
        if text is not None:
            found[(kind, text)] = None

    add("user_id", payload.get("userId"), "userId")
    add("anonymous_id", payload.get("anonymousId"), "anonymousId")
    if payload.get("type") == "alias":
        add("user_id", payload.get("previousId"), "previousId")
    context = _object(payload, "context")
    device = context.get("device")
    if isinstance(device, dict):
        add("device_id", device.get("id"), "context.device.id")
    for source_name, source in (("context.traits", context.get("traits")), ("traits", payload.get("traits"))):
        if isinstance(source, dict):
            for kind in ("email", "phone"):
                add(kind, source.get(kind), f"{source_name}.{kind}")
    for kind in KNOWN_TYPES:
        if kind in payload:
            add(kind, payload[kind], kind)
    extra = payload.get("identifiers")
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
    return float(value)


def extract_order(payload: dict[str, Any], event_name: str | None) -> dict[str, Any] | None:
    """Read `order`, or a Segment e-commerce event's revenue/total, as an Order record."""
    order = payload.get("order")
    properties = _object(payload, "properties")
    if order is None and event_name and event_name.lower() in _ORDER_EVENTS:
        amount = properties.get("total", properties.get("revenue"))
        if amount is None:
            return None
        order = {"amount": amount, "currency": properties.get("currency"), "order_id": properties.get("order_id"),
                 "items": properties.get("products", [])}
    if order is None:
        return None
    if not isinstance(order, dict):
        raise EventRejected("order", "must be an object")
    amount = _number(order.get("amount"), "order.amount")
    items_raw = order.get("items") or []
    if not isinstance(items_raw, list):
        raise EventRejected("order.items", "must be a list")
    items = []
    for index, item in enumerate(items_raw):
        if not isinstance(item, dict):
            raise EventRejected(f"order.items[{index}]", "must be an object")
        quantity = item.get("quantity", 1)
        if isinstance(quantity, bool) or not isinstance(quantity, int):
            raise EventRejected(f"order.items[{index}].quantity", "must be an integer")
        price = item.get("price")
        items.append({
            "sku": None if item.get("sku") is None else str(item.get("sku")),
            "quantity": quantity,
            "price": None if price is None else _number(price, f"order.items[{index}].price"),
        })
    currency = order.get("currency") or "USD"
    if not isinstance(currency, str):
        raise EventRejected("order.currency", "must be a string")
    order_id = order.get("order_id")
    return {"order_id": None if order_id is None else str(order_id), "amount": amount,
            "currency": currency, "items": items}


def extract_feedback(payload: dict[str, Any]) -> dict[str, Any] | None:
    for kind in ("complaint", "feedback"):
        value = payload.get(kind)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise EventRejected(kind, "must be an object")
        rating = value.get("rating")
        if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int)):
            raise EventRejected(f"{kind}.rating", "must be an integer")
        text = value.get("text")
        if text is not None and not isinstance(text, str):
            raise EventRejected(f"{kind}.text", "must be a string")
        return {"kind": kind, "text": text, "rating": rating}
    return None


def to_touchpoint(payload: Any, call_type: str | None, source: str, received_at_ms: int,
                  default_channel: str = "web") -> dict[str, Any]:
    """Build a TouchpointEvent record from one API call, or raise EventRejected."""
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
    identifiers = collect_identifiers(payload)
    if not identifiers:
        raise EventRejected("userId", "an event needs userId, anonymousId or another identifier")
    name = payload.get("event") if event_type == "track" else payload.get("name")
    if event_type == "track" and not (isinstance(name, str) and name.strip()):
        raise EventRejected("event", "a track call needs an event name")
    if name is not None and not isinstance(name, str):
        raise EventRejected("event" if event_type == "track" else "name", "must be a string")
    channel = payload.get("channel", default_channel)
    if not isinstance(channel, str) or not channel.strip():
        raise EventRejected("channel", "must be a non-empty string")
    timestamp = payload.get("timestamp")
    timestamp_ms = received_at_ms if timestamp is None else parse_timestamp(timestamp, "timestamp")
    consent = payload.get("consent", [])
    if not isinstance(consent, list) or not all(isinstance(c, str) for c in consent):
        raise EventRejected("consent", "must be a list of category names")
    extras = {k: payload[k] for k in ("properties", "traits", "context", "groupId") if payload.get(k) is not None}
    return {
        "message_id": message_id,
        "type": event_type,
        "event": name,
        "channel": channel.strip().lower(),
        "source": source,
        "timestamp_ms": timestamp_ms,
        "received_at_ms": received_at_ms,
        "identifiers": identifiers,
        "order": extract_order(payload, name),
        "feedback": extract_feedback(payload),
        "consent": consent,
        "properties_json": json.dumps(extras, separators=(",", ":"), default=str) if extras else None,
    }
