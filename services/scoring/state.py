"""What scoring remembers per customer, folded from touchpoints in event time.

Every aggregate here is order-independent (sums, minima and maxima, a sorted list of
recent purchase times, decayed windows that decay a late addition back to the time they
are valued at), so a replay of history and live traffic that arrives out of order end in
the same state.

Sliding windows are exponentially decayed counts: an event of age a days weighs
exp(-a / w) in the w-day window (w = 7, 30, 90, 365). That keeps one number per window
instead of a bucket per day, and it never needs a timer to drop expired events; a decayed
count is about 0.63 times a hard w-day count for events spread evenly over the window.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field
from typing import Any

from services.scoring.labels import DAY_MS, PendingExample, label_with_purchase, union_pending
from services.scoring.sentiment import score_text
from touchstream.privacy import CONSENT_WITHDRAWN, consent_update

# A redelivery after a crash replays at most the offsets not yet committed (about one
# second of traffic); no customer has more than this many events in that window.
RECENT_IDS_KEPT = 100
# Interval statistics are over the most recent purchases only, to bound the state.
PURCHASE_TIMES_KEPT = 64
WINDOW_DAYS = (7, 30, 90, 365)
# Channels named in the TouchpointEvent contract; anything else counts as "other" so the
# model's feature space stays bounded whatever upstream sends.
CHANNELS = ("web", "app", "store_pos", "wechat", "douyin", "email", "call_center", "sms")


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
    # As the event states it: [] says nothing, ["none"] withdraws (see touchstream.privacy).
    consent: tuple[str, ...] = ()
    channel: str = "web"
    rating: int | None = None
    # IANA zone from Segment's context.timezone, when the event carries one.
    time_zone: str | None = None
    # The sentiment of the event's complaint/feedback text (sentiment.py); the text itself is not kept.
    sentiment: float | None = None
    # Why a text the event carried got no sentiment (sentiment.UNSCORED_REASONS); None if scored or no text.
    sentiment_unscored: str | None = None

    @property
    def is_purchase(self) -> bool:
        # A negative order is a refund (ingest's reading of `Order Refunded`), not a purchase.
        return self.order_amount is not None and self.order_amount >= 0


def touchpoint_from_record(event: dict[str, Any]) -> Touchpoint:
    """Build a Touchpoint from the `event` field of a decoded ResolvedTouchpoint."""
    order = event.get("order")
    feedback = event.get("feedback")
    text = feedback.get("text") if feedback else None
    voice = score_text(text) if text is not None else None
    return Touchpoint(
        message_id=event["message_id"],
        timestamp_ms=int(event["timestamp_ms"]),
        received_at_ms=int(event["received_at_ms"]),
        event_type=str(event.get("type", "track")),
        event_name=event.get("event"),
        order_amount=float(order["amount"]) if order else None,
        is_complaint=bool(feedback and feedback.get("kind") == "complaint"),
        consent=tuple(event.get("consent") or ()),
        channel=str(event.get("channel") or "web"),
        rating=feedback.get("rating") if feedback else None,
        time_zone=context_time_zone(event.get("properties_json")),
        sentiment=voice.score if voice else None,
        sentiment_unscored=voice.unscored if voice else None,
    )


_TIME_ZONE = re.compile(r'"timezone"\s*:\s*"([A-Za-z0-9_+\-/]{1,64})"')


def context_time_zone(properties_json: str | None) -> str | None:
    """Return `context.timezone` (Segment's field, an IANA name) from an event's properties text.

    A regular expression instead of a JSON parse: most events carry none, and this runs per event.

    >>> context_time_zone('{"context":{"timezone":"Asia/Shanghai"}}'), context_time_zone('{"a":1}')
    ('Asia/Shanghai', None)
    """
    if not properties_json or '"timezone"' not in properties_json:
        return None
    found = _TIME_ZONE.search(properties_json)
    return found.group(1) if found else None


def channel_bucket(channel: str) -> str:
    """Return the channel name the state counts `channel` under.

    >>> channel_bucket("wechat"), channel_bucket("fax")
    ('wechat', 'other')
    """
    return channel if channel in CHANNELS else "other"


@dataclass
class DecayedWindows:
    """Exponentially decayed sums over WINDOW_DAYS, valued at `at_ms`; late additions decay back to it.

    >>> w = DecayedWindows()
    >>> w.add(0, 1.0); w.add(7 * DAY_MS, 1.0)
    >>> [round(v, 3) for v in w.values_at(7 * DAY_MS)]
    [1.368, 1.792, 1.925, 1.981]
    """

    values: list[float] = field(default_factory=lambda: [0.0] * len(WINDOW_DAYS))
    at_ms: int | None = None

    def add(self, t_ms: int, amount: float) -> None:
        if self.at_ms is None:
            self.values, self.at_ms = [amount] * len(WINDOW_DAYS), t_ms
        elif t_ms >= self.at_ms:
            age = t_ms - self.at_ms
            self.values = [v * _decay(age, w) + amount for v, w in zip(self.values, WINDOW_DAYS, strict=True)]
            self.at_ms = t_ms
        else:
            age = self.at_ms - t_ms
            self.values = [v + amount * _decay(age, w) for v, w in zip(self.values, WINDOW_DAYS, strict=True)]

    def values_at(self, t_ms: int) -> list[float]:
        """Return the sums seen from `t_ms` (never grown for a `t_ms` earlier than the last update)."""
        if self.at_ms is None:
            return [0.0] * len(WINDOW_DAYS)
        return [v * _decay(max(0, t_ms - self.at_ms), w) for v, w in zip(self.values, WINDOW_DAYS, strict=True)]

    def merge(self, other: DecayedWindows) -> None:
        if other.at_ms is None:
            return
        if self.at_ms is None:
            self.values, self.at_ms = list(other.values), other.at_ms
            return
        at = max(self.at_ms, other.at_ms)
        self.values = [a + b for a, b in zip(self.values_at(at), other.values_at(at), strict=True)]
        self.at_ms = at


def _decay(age_ms: int, window_days: int) -> float:
    return math.exp(-age_ms / (window_days * DAY_MS))


# CustomerState's DecayedWindows fields (merged by adding; the codec writes them as values + time).
DECAYED_WINDOW_FIELDS = ("touches", "purchases", "spend", "complaints_recent", "sentiment_sum", "sentiment_count")


@dataclass
class CustomerState:
    """What scoring remembers about one customer."""

    first_touch_ms: int | None = None
    last_touch_ms: int | None = None
    first_purchase_ms: int | None = None
    last_purchase_ms: int | None = None
    purchase_count: int = 0
    monetary_total: float = 0.0
    # The newest PURCHASE_TIMES_KEPT purchase times, sorted.
    purchase_times: list[int] = field(default_factory=list)
    complaints: int = 0
    ratings_count: int = 0
    ratings_sum: float = 0.0
    channel_counts: dict[str, int] = field(default_factory=dict)
    touches: DecayedWindows = field(default_factory=DecayedWindows)
    purchases: DecayedWindows = field(default_factory=DecayedWindows)
    spend: DecayedWindows = field(default_factory=DecayedWindows)
    complaints_recent: DecayedWindows = field(default_factory=DecayedWindows)
    pending: list[PendingExample] = field(default_factory=list)
    last_example_day: int = -1
    # Event time of the newest event-made prediction point: a silent customer's examples follow it, a step apart.
    last_example_ms: int | None = None
    # What the customer's newest ScoreUpdate said: a silent customer gets another only when time
    # alone carries one of these across what a rule watches.
    last_scored_propensity: float | None = None
    last_scored_stage: str = ""
    last_scored_segment: str = ""
    # When the customer's scores are next checked for a crossing (None: no check due); the
    # timer set indexes it, the state decides whether a timer that fires is still current.
    next_check_ms: int | None = None
    applied_ids: list[str] = field(default_factory=list)
    # The customer's consent categories as last stated (None: never stated), and when (event time);
    # every ScoreUpdate carries them, rescores included.
    consent: list[str] | None = None
    consent_at_ms: int | None = None
    time_zone: str | None = None
    time_zone_at_ms: int | None = None
    # The customer's voice: decayed sums of message sentiments and of messages (their ratio is the
    # recent mean), and the newest message's sentiment (event time). Scores only, never the text.
    sentiment_sum: DecayedWindows = field(default_factory=DecayedWindows)
    sentiment_count: DecayedWindows = field(default_factory=DecayedWindows)
    sentiment_last: float | None = None
    sentiment_last_ms: int | None = None

    def has_applied(self, idempotency_key: str) -> bool:
        return idempotency_key in self.applied_ids

    def remember(self, idempotency_key: str) -> None:
        self.applied_ids.append(idempotency_key)
        del self.applied_ids[:-RECENT_IDS_KEPT]

    @property
    def gap_before_last_purchase_ms(self) -> int | None:
        """Return the time between the last two purchases, if there were two."""
        if len(self.purchase_times) < 2:
            return None
        return self.purchase_times[-1] - self.purchase_times[-2]


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
    state.touches.add(t, 1.0)
    _note_profile(state, t, touch.consent, touch.time_zone)
    bucket = channel_bucket(touch.channel)
    state.channel_counts[bucket] = state.channel_counts.get(bucket, 0) + 1
    if touch.is_complaint:
        state.complaints += 1
        state.complaints_recent.add(t, 1.0)
    if touch.rating is not None:
        state.ratings_count += 1
        state.ratings_sum += touch.rating
    if touch.sentiment is not None:
        _note_sentiment(state, t, touch.sentiment)
    if touch.is_purchase:
        _apply_purchase(state, t, touch.order_amount or 0.0)
    elif touch.order_amount is not None:
        _apply_refund(state, t, touch.order_amount)
    return True


def _note_sentiment(state: CustomerState, t: int, score: float) -> None:
    """Add a message's sentiment to the decayed sums; keep it as the last if it is the newest.

    >>> state = CustomerState()
    >>> _note_sentiment(state, 2 * DAY_MS, -0.8); _note_sentiment(state, DAY_MS, 0.5)  # the second is older
    >>> state.sentiment_last, round(state.sentiment_sum.values[1] / state.sentiment_count.values[1], 3)
    (-0.8, -0.161)
    """
    state.sentiment_sum.add(t, score)
    state.sentiment_count.add(t, 1.0)
    if state.sentiment_last_ms is None or t >= state.sentiment_last_ms:
        state.sentiment_last, state.sentiment_last_ms = score, t


def _apply_refund(state: CustomerState, t: int, amount: float) -> None:
    """Take a refund (a negative amount) off the spend; the purchase it refunds still happened.

    >>> state = CustomerState()
    >>> for message_id, amount in (("m1", 50.0), ("m2", -20.0)):
    ...     _ = apply_touchpoint(state, Touchpoint(message_id, DAY_MS, DAY_MS, order_amount=amount))
    >>> state.purchase_count, state.monetary_total
    (1, 30.0)
    """
    state.monetary_total += amount
    state.spend.add(t, amount)


def _note_profile(state: CustomerState, t: int, consent: tuple[str, ...] | list[str] | None,
                  time_zone: str | None) -> None:
    """Keep the latest (event time) consent statement and time zone.

    >>> state = CustomerState()
    >>> _note_profile(state, 10, ("email",), None); _note_profile(state, 20, (), "Asia/Shanghai")
    >>> _note_profile(state, 5, ("none",), None)  # older than the statement kept: ignored
    >>> state.consent, state.time_zone
    (['email'], 'Asia/Shanghai')
    >>> _note_profile(state, 30, ("none",), None); state.consent
    []
    """
    stated = consent_update(state.consent, consent or ())
    if stated is not None and (state.consent_at_ms is None or t >= state.consent_at_ms):
        state.consent, state.consent_at_ms = list(stated), t
    if time_zone and (state.time_zone_at_ms is None or t >= state.time_zone_at_ms):
        state.time_zone, state.time_zone_at_ms = time_zone, t


def _apply_purchase(state: CustomerState, t: int, amount: float) -> None:
    label_with_purchase(state.pending, t)
    _keep_purchase_time(state.purchase_times, t)
    state.last_purchase_ms = t if state.last_purchase_ms is None else max(state.last_purchase_ms, t)
    state.first_purchase_ms = t if state.first_purchase_ms is None else min(state.first_purchase_ms, t)
    state.purchase_count += 1
    state.monetary_total += amount
    state.purchases.add(t, 1.0)
    state.spend.add(t, amount)


def _keep_purchase_time(times: list[int], t: int) -> None:
    bisect.insort(times, t)
    del times[:-PURCHASE_TIMES_KEPT]


def merge_states(survivor: CustomerState, merged: CustomerState, merge_id: str) -> bool:
    """Fold `merged` (a customer found to be `survivor`) into `survivor`; False if already done.

    >>> a = CustomerState(purchase_count=2, first_purchase_ms=5, last_purchase_ms=9, purchase_times=[5, 9])
    >>> b = CustomerState(purchase_count=1, first_purchase_ms=3, last_purchase_ms=4, purchase_times=[4])
    >>> merge_states(a, b, "x"), merge_states(a, b, "x"), a.purchase_count, a.purchase_times
    (True, False, 3, [4, 5, 9])
    """
    key = f"merge:{merge_id}"
    if survivor.has_applied(key):
        return False
    # Each one's purchases may fall in the other's open label windows.
    for source, target in ((merged, survivor), (survivor, merged)):
        for purchase_ms in source.purchase_times:
            label_with_purchase(target.pending, purchase_ms)
    for purchase_ms in merged.purchase_times:
        _keep_purchase_time(survivor.purchase_times, purchase_ms)
    survivor.first_touch_ms = _earliest(survivor.first_touch_ms, merged.first_touch_ms)
    survivor.last_touch_ms = _latest(survivor.last_touch_ms, merged.last_touch_ms)
    survivor.first_purchase_ms = _earliest(survivor.first_purchase_ms, merged.first_purchase_ms)
    survivor.last_purchase_ms = _latest(survivor.last_purchase_ms, merged.last_purchase_ms)
    survivor.purchase_count += merged.purchase_count
    survivor.monetary_total += merged.monetary_total
    survivor.complaints += merged.complaints
    survivor.ratings_count += merged.ratings_count
    survivor.ratings_sum += merged.ratings_sum
    for channel, count in merged.channel_counts.items():
        survivor.channel_counts[channel] = survivor.channel_counts.get(channel, 0) + count
    for name in DECAYED_WINDOW_FIELDS:
        getattr(survivor, name).merge(getattr(merged, name))
    if merged.sentiment_last is not None and merged.sentiment_last_ms is not None and (
            survivor.sentiment_last_ms is None or merged.sentiment_last_ms > survivor.sentiment_last_ms):
        survivor.sentiment_last, survivor.sentiment_last_ms = merged.sentiment_last, merged.sentiment_last_ms
    survivor.pending = union_pending(survivor.pending, merged.pending)
    survivor.last_example_day = max(survivor.last_example_day, merged.last_example_day)
    survivor.last_example_ms = _latest(survivor.last_example_ms, merged.last_example_ms)
    # Consent and time zone: the most recent statement of either wins.
    if merged.consent is not None and merged.consent_at_ms is not None:
        _note_profile(survivor, merged.consent_at_ms, tuple(merged.consent) or (CONSENT_WITHDRAWN,), None)
    if merged.time_zone and merged.time_zone_at_ms is not None:
        _note_profile(survivor, merged.time_zone_at_ms, None, merged.time_zone)
    for applied in merged.applied_ids:
        if not survivor.has_applied(applied):
            survivor.remember(applied)
    survivor.remember(key)
    return True


def _earliest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _latest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)
