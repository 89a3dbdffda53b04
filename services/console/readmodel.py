"""Pure read-model logic of the console: topic records -> what the customer-360 keeps and shows.

Nothing here does I/O. The Redis adapter (store.py) persists what these functions return;
the web layer (web.py) renders what they compute.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

PURCHASE_EVENT_NAMES = frozenset({"order completed", "purchase", "order placed", "checkout completed"})
# Free-form properties are attacker-controlled and unbounded: keep a few, short, as text.
MAX_PROPERTIES = 20
MAX_PROPERTY_CHARS = 200
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class TouchpointSeen:
    """A resolved touchpoint as the timeline shows it (hashed identifiers only)."""

    customer_id: str
    message_id: str
    event_time_ms: int
    type: str
    name: str | None
    channel: str
    source: str
    order_amount: float | None
    currency: str | None
    feedback_kind: str | None
    feedback_text: str | None
    properties: dict[str, str] = field(default_factory=dict)
    identifier_types: tuple[str, ...] = ()

    @property
    def is_purchase(self) -> bool:
        return is_purchase(self.order_amount, self.name)

    def to_json(self) -> str:
        return json.dumps(vars(self), separators=(",", ":"))  # vars(): no deep copy, fields are JSON-shaped

    @classmethod
    def from_json(cls, text: str | bytes) -> TouchpointSeen:
        data = json.loads(text)
        data["identifier_types"] = tuple(data.get("identifier_types", ()))
        return cls(**data)


@dataclass(frozen=True)
class ScoreUpdated:
    customer_id: str
    message_id: str
    event_time_ms: int
    churn_risk: float
    purchase_propensity: float
    segment: str
    stage: str
    model_version: str
    reasons: tuple[tuple[str, float], ...]
    features: dict[str, float]

    def to_json(self) -> str:
        return json.dumps(vars(self), separators=(",", ":"))  # vars(): no deep copy, fields are JSON-shaped

    @classmethod
    def from_json(cls, text: str | bytes) -> ScoreUpdated:
        data = json.loads(text)
        data["reasons"] = tuple((str(f), float(c)) for f, c in data.get("reasons", ()))
        return cls(**data)


@dataclass(frozen=True)
class ActionTaken:
    action_id: str
    rule_id: str
    customer_id: str
    outcome: str  # fired, held_out, suppressed
    reason: str | None
    endpoint: str
    event_time_ms: int
    created_at_ms: int

    def to_json(self) -> str:
        return json.dumps(vars(self), separators=(",", ":"))  # vars(): no deep copy, fields are JSON-shaped

    @classmethod
    def from_json(cls, text: str | bytes) -> ActionTaken:
        return cls(**json.loads(text))

    @property
    def count_field(self) -> str:
        """Name the per-rule counter this action adds to.

        >>> ActionTaken("a", "r", "c", "suppressed", "cooldown", "m", 0, 0).count_field
        'suppressed:cooldown'
        """
        if self.outcome == "suppressed":
            return f"suppressed:{self.reason or 'unspecified'}"
        return self.outcome


@dataclass(frozen=True)
class CustomersMerged:
    merge_id: str
    survivor_id: str
    merged_id: str
    kind: str
    reason: str
    event_time_ms: int


@dataclass(frozen=True)
class CustomerDeleted:
    """An erasure (customers.deletions): the read model forgets every id listed."""

    deletion_id: str
    customer_ids: tuple[str, ...]


@dataclass(frozen=True)
class DeliveryEnded:
    """How a fired action's delivery ended (actions.deliveries): delivered, or dead-lettered after its tries."""

    action_id: str
    rule_id: str
    customer_id: str
    endpoint: str
    outcome: str  # delivered, dead_lettered
    attempts: int
    status: int | None
    reason: str | None
    received_at_ms: int
    ended_at_ms: int

    @property
    def delivered(self) -> bool:
        return self.outcome == "delivered"


@dataclass(frozen=True)
class DeadLettered:
    stage: str
    reason: str
    digest: str


def is_purchase(order_amount: float | None, event_name: str | None) -> bool:
    """Say whether a touchpoint is a conversion: it carries an order or is named like one.

    >>> is_purchase(12.5, None), is_purchase(None, "Order Completed"), is_purchase(None, "Page Viewed")
    (True, True, False)
    """
    return order_amount is not None or (event_name or "").strip().lower() in PURCHASE_EVENT_NAMES


# Values shaped like an e-mail or a phone number are personal data whatever key they sit under.
_PERSONAL = re.compile(r"[^@\s]+@[^@\s]+\.\w+|\+?\d[\d\s().-]{7,}\d")
# Traits and context belong to identity (names, addresses, identifiers); the timeline shows only what happened.
_NOT_SHOWN = frozenset({"traits", "context"})


def _properties_as_text(properties_json: str | None, message_text: str | None = None) -> dict[str, str]:
    """Flatten an event's properties to short strings (shown as text, never markup), personal data masked.

    Ingest wraps them as {"properties": {...}, "traits": {...}, "context": {...}}; only the
    event's own properties are kept. A property holding the customer's message (`message_text`,
    the text ingest mapped into the event's feedback) is left out: a message's words stay in the
    event log, the read model keeps only the sentiment scoring gave them.

    >>> _properties_as_text('{"properties": {"comment": "cold food", "rating": 1}}', "cold food")
    {'rating': '1'}

    >>> _properties_as_text('{"properties": {"a": "<b>x</b>", "n": 3, "d": {"k": 1}}, "traits": {"name": "Ann"}}')
    {'a': '<b>x</b>', 'n': '3', 'd.k': '1'}
    >>> _properties_as_text('{"note": "call +44 20 7946 0958 or ann@example.com"}')
    {'note': 'call [masked] or [masked]'}
    >>> _properties_as_text("not json")
    {'raw': 'not json'}
    """
    if not properties_json:
        return {}
    try:
        data = json.loads(properties_json)
    except ValueError:
        return {"raw": _PERSONAL.sub("[masked]", properties_json[:MAX_PROPERTY_CHARS])}
    if not isinstance(data, dict):
        return {"value": _PERSONAL.sub("[masked]", json.dumps(data)[:MAX_PROPERTY_CHARS])}
    if isinstance(data.get("properties"), dict):
        data = data["properties"]
    shown: dict[str, str] = {}

    def add(prefix: str, value: Any, depth: int) -> None:
        if len(shown) >= MAX_PROPERTIES:
            return
        if isinstance(value, dict) and depth < 2:
            for key, inner in value.items():
                if depth == 0 and key in _NOT_SHOWN:
                    continue
                add(f"{prefix}.{key}" if prefix else str(key), inner, depth + 1)
            return
        if message_text is not None and value == message_text:
            return
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        shown[prefix[:80]] = _PERSONAL.sub("[masked]", text[:MAX_PROPERTY_CHARS])

    add("", data, 0)
    return shown


def touchpoint_seen(record: Mapping[str, Any]) -> TouchpointSeen:
    """Turn a decoded ResolvedTouchpoint into its timeline entry.

    `feedback_text` rides along for this batch only: the read model never stores it (issue 20: a
    message's words stay in the event log; scoring's sentiment of them reaches the timeline with
    the score point), nor the property it was mapped from.
    """
    event = record["event"]
    order = event.get("order")
    feedback = event.get("feedback")
    return TouchpointSeen(
        customer_id=record["customer_id"],
        message_id=event["message_id"],
        event_time_ms=int(event["timestamp_ms"]),
        type=str(event["type"]),
        name=event.get("event"),
        channel=event.get("channel") or "unknown",
        source=event.get("source") or "unknown",
        order_amount=float(order["amount"]) if order else None,
        currency=order.get("currency") if order else None,
        feedback_kind=str(feedback["kind"]) if feedback else None,
        feedback_text=feedback.get("text") if feedback else None,
        properties=_properties_as_text(event.get("properties_json"), feedback.get("text") if feedback else None),
        identifier_types=tuple(sorted({i["type"] for i in event.get("identifiers", ())})),
    )


def score_updated(record: Mapping[str, Any]) -> ScoreUpdated:
    """Turn a decoded ScoreUpdate into a score-history entry."""
    return ScoreUpdated(
        customer_id=record["customer_id"],
        message_id=record["message_id"],
        event_time_ms=int(record["event_time_ms"]),
        churn_risk=float(record["churn_risk"]),
        purchase_propensity=float(record["purchase_propensity"]),
        segment=record["segment"],
        stage=record["stage"],
        model_version=record["model_version"],
        reasons=tuple((r["feature"], float(r["contribution"])) for r in record.get("reasons", ())),
        features={k: float(v) for k, v in (record.get("features") or {}).items()},
    )


def action_taken(record: Mapping[str, Any]) -> ActionTaken:
    """Turn a decoded RetentionAction into an action entry."""
    return ActionTaken(
        action_id=record["action_id"],
        rule_id=record["rule_id"],
        customer_id=record["customer_id"],
        outcome=str(record["outcome"]),
        reason=record.get("reason"),
        endpoint=record["endpoint"],
        event_time_ms=int(record["event_time_ms"]),
        created_at_ms=int(record["created_at_ms"]),
    )


def customers_merged(record: Mapping[str, Any]) -> CustomersMerged:
    """Turn a decoded IdentityMerge into a merge entry."""
    return CustomersMerged(
        merge_id=record["merge_id"],
        survivor_id=record["survivor_id"],
        merged_id=record["merged_id"],
        kind=str(record.get("kind") or "merge"),
        reason=record["reason"],
        event_time_ms=int(record["event_time_ms"]),
    )


def delivery_ended(record: Mapping[str, Any]) -> DeliveryEnded:
    """Turn a decoded ActionDeliveryEnded into a delivery outcome (the reason kept short)."""
    reason = record.get("reason")
    return DeliveryEnded(
        action_id=record["action_id"],
        rule_id=record["rule_id"],
        customer_id=record["customer_id"],
        endpoint=record["endpoint"],
        outcome=str(record["outcome"]),
        attempts=int(record["attempts"]),
        status=record.get("status"),
        reason=reason[:200] if reason else None,
        received_at_ms=int(record["received_at_ms"]),
        ended_at_ms=int(record["ended_at_ms"]),
    )


def customer_deleted(record: Mapping[str, Any]) -> CustomerDeleted:
    """Turn a decoded CustomerDeletion into the ids to forget, the live one first.

    >>> customer_deleted({"deletion_id": "d", "customer_id": "c_1", "merged_ids": ["c_0"]}).customer_ids
    ('c_1', 'c_0')
    """
    ids = dict.fromkeys([record["customer_id"], *record.get("merged_ids", [])])
    return CustomerDeleted(deletion_id=record["deletion_id"], customer_ids=tuple(ids))


def dead_lettered(record: Mapping[str, Any]) -> DeadLettered:
    """Turn a decoded DeadLetter into a count key: stage, the reason's first clause, a digest for dedupe.

    (How an action's delivery failed comes from actions.deliveries, never from the dead letter's bytes.)

    >>> d = dead_lettered({"stage": "identity", "reason": "no usable identifier: email invalid",
    ...                    "source": "touchpoints.raw", "original": b"x", "failed_at_ms": 1})
    >>> d.stage, d.reason
    ('identity', 'no usable identifier')
    """
    digest = hashlib.sha256(
        b"\x1f".join([record["source"].encode(), str(record["failed_at_ms"]).encode(), record["original"]])
    ).hexdigest()
    return DeadLettered(record["stage"], record["reason"].split(":")[0].strip()[:80], digest)


RESOLUTION_EVENT_NAMES = frozenset({"complaint resolved", "ticket resolved", "case closed", "ticket closed"})


class TimelineEvent(Protocol):
    """What the complaint clock needs of a timeline entry."""

    @property
    def event_time_ms(self) -> int: ...
    @property
    def name(self) -> str | None: ...
    @property
    def feedback_kind(self) -> str | None: ...


Event = TypeVar("Event", bound=TimelineEvent)


def open_complaints(timeline: Sequence[Event], now_ms: int) -> list[tuple[Event, int]]:
    """Return complaints with no later resolution event, oldest first, each with how long it has been open.

    >>> def e(n, t, kind=None): return TouchpointSeen("c", f"m{t}", t, "track", n, "web", "s", None, None, kind, None)
    >>> [(c.message_id, age) for c, age in open_complaints(
    ...     [e("Complaint", 10, "complaint"), e("Ticket Resolved", 20), e("Complaint", 30, "complaint")], 100)]
    [('m30', 70)]
    """
    ordered = sorted(timeline, key=lambda event: event.event_time_ms)
    found: list[tuple[Event, int]] = []
    for event in ordered:
        if event.feedback_kind == "complaint":
            found.append((event, max(0, now_ms - event.event_time_ms)))
        elif (event.name or "").strip().lower() in RESOLUTION_EVENT_NAMES:
            found = [c for c in found if c[0].event_time_ms > event.event_time_ms]
    return found


def duration_in_words(ms: int) -> str:
    """Say a duration the way a service agent reads an SLA clock.

    >>> duration_in_words(90_000), duration_in_words(3 * 3_600_000 + 60_000), duration_in_words(50 * 3_600_000)
    ('1 min', '3 h 1 min', '2 d 2 h')
    """
    minutes = ms // 60_000
    days, hours, mins = minutes // 1440, (minutes // 60) % 24, minutes % 60
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {mins} min" if hours else f"{mins} min"


def follow_merges(customer_id: str, merged_into: Mapping[str, str], max_hops: int = 64) -> str:
    """Return the customer that `customer_id` lives on now.

    >>> follow_merges("c3", {"c3": "c2", "c2": "c1"})
    'c1'
    """
    current = customer_id
    for _ in range(max_hops):
        nxt = merged_into.get(current)
        if nxt is None or nxt == current:
            return current
        current = nxt
    return current


FEATURE_WORDS = {
    "recency_days": "days since the last purchase",
    "log_recency_days": "days since the last purchase",
    "tenure_days": "time as a customer",
    "log_tenure_days": "time as a customer",
    "days_since_last_touch": "days since the last contact",
    "log_purchase_count": "number of purchases",
    "log_monetary_total": "total spend",
    "avg_order_value": "average order value",
    "mean_interpurchase_days": "usual time between purchases",
    "interpurchase_std_days": "irregularity of purchases",
    "last_interpurchase_days": "time between the last two purchases",
    "overdue_ratio": "how overdue the next purchase is",
    "complaints": "open complaints",
    "bias": "baseline",
}


def sentiment_in_words(score: float) -> str:
    """Say a sentiment score (scoring's scale: -1 negative to 1 positive) the way a person reads it.

    >>> [sentiment_in_words(s) for s in (-0.8, -0.3, 0.0, 0.3, 0.8)]
    ['strongly negative', 'negative', 'neutral', 'positive', 'strongly positive']
    """
    size = abs(score)
    if size < 0.2:
        return "neutral"
    tone = "negative" if score < 0 else "positive"
    return f"strongly {tone}" if size >= 0.6 else tone


# |sentiment_recent| from which the customer's voice is a reason shown beside the model's.
VOICE_MATTERS_AT = 0.6


def voice_in_words(recent: float | None, last: float | None) -> str | None:
    """Say the customer's recent voice when it matters (strongly negative or positive), else None.

    Scoring's sentiment is no model input (reasons are the model's terms), so it is said apart.

    >>> voice_in_words(-0.72, -0.9)
    "The customer's recent messages are strongly negative (mean -0.72, last -0.90)"
    >>> voice_in_words(0.1, 0.1) is None, voice_in_words(None, None) is None
    (True, True)
    """
    if recent is None or last is None or abs(recent) < VOICE_MATTERS_AT:
        return None
    return f"The customer's recent messages are {sentiment_in_words(recent)} (mean {recent:+.2f}, last {last:+.2f})"


def reason_in_words(feature: str, contribution: float) -> str:
    """Say what a reason code means for a person reading the page.

    >>> reason_in_words("overdue_ratio", 1.3)
    'How overdue the next purchase is strongly raises churn risk'
    >>> reason_in_words("log_purchase_count", -0.1)
    'Number of purchases slightly lowers churn risk'
    """
    words = FEATURE_WORDS.get(feature, feature.replace("_", " "))
    size = abs(contribution)
    strength = "strongly " if size >= 1.0 else "slightly " if size < 0.25 else ""
    direction = "raises" if contribution > 0 else "lowers"
    return f"{words[:1].upper()}{words[1:]} {strength}{direction} churn risk"


@dataclass(frozen=True)
class Outcome:
    """Treated versus hold-out conversion of one rule."""

    treated: int
    treated_converted: int
    holdout: int
    holdout_converted: int
    min_group_size: int
    enough_data: bool
    treated_rate: float | None
    holdout_rate: float | None
    uplift: float | None
    ci_low: float | None
    ci_high: float | None
    # Customers whose attribution window is still open: in neither count above until it closes.
    treated_open: int = 0
    holdout_open: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def conversion_uplift(treated: int, treated_converted: int, holdout: int, holdout_converted: int,
                      min_group_size: int, treated_open: int = 0, holdout_open: int = 0) -> Outcome:
    """Absolute uplift (treated rate - hold-out rate) with a 95% Wald interval; None until both groups are big enough.

    `treated` and `holdout` count closed windows only; the open ones are carried along to be shown.

    >>> o = conversion_uplift(100, 30, 100, 20, 30)
    >>> round(o.uplift, 3), round(o.ci_low, 3), round(o.ci_high, 3)
    (0.1, -0.019, 0.219)
    >>> conversion_uplift(5, 1, 100, 20, 30, treated_open=40).enough_data
    False
    """
    enough = treated >= min_group_size and holdout >= min_group_size and treated > 0 and holdout > 0
    if not enough:
        return Outcome(treated, treated_converted, holdout, holdout_converted, min_group_size, False,
                       None, None, None, None, None, treated_open, holdout_open)
    p1, p0 = treated_converted / treated, holdout_converted / holdout
    se = math.sqrt(p1 * (1 - p1) / treated + p0 * (1 - p0) / holdout)
    uplift = p1 - p0
    return Outcome(treated, treated_converted, holdout, holdout_converted, min_group_size, True,
                   p1, p0, uplift, uplift - Z_95 * se, uplift + Z_95 * se, treated_open, holdout_open)


def closed_windows(first_action_ms: Mapping[str, int], window_ms: int, now_ms: int) -> tuple[dict[str, int], int]:
    """Split a group into customers whose attribution window has closed by `now_ms` and a count of open ones.

    A window is closed when action time + window <= now: only then is "did not convert" final, so
    only closed windows enter the conversion rates (an open one would count as a non-conversion).

    >>> closed_windows({"a": 0, "b": 500, "c": 900}, 500, 1000)
    ({'a': 0, 'b': 500}, 1)
    """
    closed = {cid: at for cid, at in first_action_ms.items() if at + window_ms <= now_ms}
    return closed, len(first_action_ms) - len(closed)


def converted_within(action_ms: int, purchase_times_ms: Sequence[int], window_ms: int) -> bool:
    """Say whether a purchase happened after the action and within the attribution window.

    >>> converted_within(1000, [500, 1500], 1000), converted_within(1000, [2500], 1000)
    (True, False)
    """
    return any(action_ms < t <= action_ms + window_ms for t in purchase_times_ms)
