"""Per-customer state in event time: RFM totals, decayed activity, waiting examples.

Everything is computed from each event's own timestamp, never the wall clock, so a
replay of history ends in the same state as live traffic did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from services.scoring.labels import DAY_MS, PendingExample, label_with_purchase, union_pending

# A redelivery after a crash replays at most the offsets not yet committed (about one
# second of traffic); no customer has more than this many events in that window.
RECENT_IDS_KEPT = 100
TOUCH_DECAY_MS = 30 * DAY_MS
PURCHASE_DECAY_MS = 90 * DAY_MS


@dataclass(frozen=True)
class Touchpoint:
    """The parts of a resolved touchpoint that scoring uses."""

    message_id: str
    timestamp_ms: int
    received_at_ms: int
    event_type: str = "track"
    event_name: str | None = None
    order_amount: float | None = None
    is_complaint: bool = False
    consent: tuple[str, ...] = ()

    @property
    def is_purchase(self) -> bool:
        return self.order_amount is not None


def touchpoint_from_record(event: dict[str, Any]) -> Touchpoint:
    """Build a Touchpoint from the `event` field of a decoded ResolvedTouchpoint."""
    order = event.get("order")
    feedback = event.get("feedback")
    return Touchpoint(
        message_id=event["message_id"],
        timestamp_ms=int(event["timestamp_ms"]),
        received_at_ms=int(event["received_at_ms"]),
        event_type=str(event.get("type", "track")),
        event_name=event.get("event"),
        order_amount=float(order["amount"]) if order else None,
        is_complaint=bool(feedback and feedback.get("kind") == "complaint"),
        consent=tuple(event.get("consent") or ()),
    )


@dataclass
class DecayedCount:
    """An exponentially decayed count, valued at `at_ms`; late additions are decayed back to it."""

    value: float = 0.0
    at_ms: int | None = None

    def add(self, t_ms: int, amount: float, decay_ms: int) -> None:
        if self.at_ms is None:
            self.value, self.at_ms = amount, t_ms
        elif t_ms >= self.at_ms:
            self.value = self.value * math.exp(-(t_ms - self.at_ms) / decay_ms) + amount
            self.at_ms = t_ms
        else:
            self.value += amount * math.exp(-(self.at_ms - t_ms) / decay_ms)

    def value_at(self, t_ms: int, decay_ms: int) -> float:
        """Return the count seen from `t_ms` (never grown for a `t_ms` earlier than the last update)."""
        if self.at_ms is None:
            return 0.0
        return self.value * math.exp(-max(0, t_ms - self.at_ms) / decay_ms)

    def merge(self, other: DecayedCount, decay_ms: int) -> None:
        if other.at_ms is not None:
            self.add(other.at_ms, other.value, decay_ms)


@dataclass
class CustomerState:
    """What scoring remembers about one customer."""

    first_touch_ms: int | None = None
    last_touch_ms: int | None = None
    first_purchase_ms: int | None = None
    last_purchase_ms: int | None = None
    purchase_count: int = 0
    monetary_total: float = 0.0
    gap_before_last_purchase_ms: int | None = None
    complaints: int = 0
    recent_touches: DecayedCount = field(default_factory=DecayedCount)
    recent_purchases: DecayedCount = field(default_factory=DecayedCount)
    pending: list[PendingExample] = field(default_factory=list)
    last_example_day: int = -1
    applied_ids: list[str] = field(default_factory=list)

    def has_applied(self, idempotency_key: str) -> bool:
        return idempotency_key in self.applied_ids

    def remember(self, idempotency_key: str) -> None:
        self.applied_ids.append(idempotency_key)
        del self.applied_ids[:-RECENT_IDS_KEPT]


def apply_touchpoint(state: CustomerState, touch: Touchpoint) -> bool:
    """Fold `touch` into `state`; return False (and change nothing) if it was applied before.

    >>> state = CustomerState()
    >>> touch = Touchpoint("m1", timestamp_ms=DAY_MS, received_at_ms=DAY_MS, order_amount=20.0)
    >>> apply_touchpoint(state, touch), apply_touchpoint(state, touch), state.purchase_count
    (True, False, 1)
    """
    if state.has_applied(touch.message_id):
        return False
    state.remember(touch.message_id)
    t = touch.timestamp_ms
    state.first_touch_ms = t if state.first_touch_ms is None else min(state.first_touch_ms, t)
    state.last_touch_ms = t if state.last_touch_ms is None else max(state.last_touch_ms, t)
    state.recent_touches.add(t, 1.0, TOUCH_DECAY_MS)
    if touch.is_complaint:
        state.complaints += 1
    if touch.order_amount is not None:
        _apply_purchase(state, t, touch.order_amount)
    return True


def _apply_purchase(state: CustomerState, t: int, amount: float) -> None:
    label_with_purchase(state.pending, t)
    if state.last_purchase_ms is None or t > state.last_purchase_ms:
        if state.last_purchase_ms is not None:
            state.gap_before_last_purchase_ms = t - state.last_purchase_ms
        state.last_purchase_ms = t
    state.first_purchase_ms = t if state.first_purchase_ms is None else min(state.first_purchase_ms, t)
    state.purchase_count += 1
    state.monetary_total += amount
    state.recent_purchases.add(t, 1.0, PURCHASE_DECAY_MS)


def merge_states(survivor: CustomerState, merged: CustomerState, merge_id: str) -> bool:
    """Fold `merged` (a customer found to be `survivor`) into `survivor`; False if already done.

    >>> a = CustomerState(purchase_count=2, first_purchase_ms=5, last_purchase_ms=9)
    >>> b = CustomerState(purchase_count=1, first_purchase_ms=3, last_purchase_ms=4)
    >>> merge_states(a, b, "x"), merge_states(a, b, "x"), a.purchase_count, a.first_purchase_ms
    (True, False, 3, 3)
    """
    key = f"merge:{merge_id}"
    if survivor.has_applied(key):
        return False
    # Their purchases may fall in the other's open windows; only the first and last
    # purchase times are kept, so those are the ones that can relabel.
    for source, target in ((merged, survivor), (survivor, merged)):
        for purchase_ms in {source.first_purchase_ms, source.last_purchase_ms} - {None}:
            assert purchase_ms is not None
            label_with_purchase(target.pending, purchase_ms)
    if (merged.last_purchase_ms or -1) > (survivor.last_purchase_ms or -1):
        survivor.gap_before_last_purchase_ms = merged.gap_before_last_purchase_ms
    survivor.first_touch_ms = _earliest(survivor.first_touch_ms, merged.first_touch_ms)
    survivor.last_touch_ms = _latest(survivor.last_touch_ms, merged.last_touch_ms)
    survivor.first_purchase_ms = _earliest(survivor.first_purchase_ms, merged.first_purchase_ms)
    survivor.last_purchase_ms = _latest(survivor.last_purchase_ms, merged.last_purchase_ms)
    survivor.purchase_count += merged.purchase_count
    survivor.monetary_total += merged.monetary_total
    survivor.complaints += merged.complaints
    survivor.recent_touches.merge(merged.recent_touches, TOUCH_DECAY_MS)
    survivor.recent_purchases.merge(merged.recent_purchases, PURCHASE_DECAY_MS)
    survivor.pending = union_pending(survivor.pending, merged.pending)
    survivor.last_example_day = max(survivor.last_example_day, merged.last_example_day)
    for applied in merged.applied_ids:
        if not survivor.has_applied(applied):
            survivor.remember(applied)
    survivor.remember(key)
    return True


def _earliest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _latest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def state_to_dict(state: CustomerState) -> dict[str, Any]:
    """Return `state` as plain JSON-ready data."""
    # Written out rather than dataclasses.asdict, whose deep copies were most of a batch's time.
    data = {f.name: getattr(state, f.name) for f in fields(state)}
    data["recent_touches"] = {"value": state.recent_touches.value, "at_ms": state.recent_touches.at_ms}
    data["recent_purchases"] = {"value": state.recent_purchases.value, "at_ms": state.recent_purchases.at_ms}
    data["pending"] = [
        {"t_ms": e.t_ms, "due_ms": e.due_ms, "features": e.features, "propensity": e.propensity, "positive": e.positive}
        for e in state.pending
    ]
    return data


def state_from_dict(data: dict[str, Any]) -> CustomerState:
    """Rebuild a CustomerState from `state_to_dict` output.

    >>> state = CustomerState(purchase_count=2, pending=[PendingExample(1, 2, {"f": 1.0}, 0.3)])
    >>> state_from_dict(state_to_dict(state)) == state
    True
    """
    values = dict(data)
    values["recent_touches"] = DecayedCount(**values["recent_touches"])
    values["recent_purchases"] = DecayedCount(**values["recent_purchases"])
    values["pending"] = [PendingExample(**e) for e in values["pending"]]
    return CustomerState(**values)
