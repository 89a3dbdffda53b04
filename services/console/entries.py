"""How the read model keeps one customer: the fields of its Redis hash, their compact values, and back. Pure.

One hash per customer (store.py writes it with one script call per batch). Values are JSON arrays
with the event time first (the script reads it to keep the newest entries) and trailing empty
items left out, so the common ones stay within 64 bytes: Redis then keeps the whole hash as one
listpack, several times smaller than a hash table.

    t:<message_id>  touchpoint    [time, type, name, channel, amount, currency, feedback kind, null,
                                   properties]  (the null held a message's text before: never read, never
                                   written; the words stay in the event log, the sentiment is on `s:`)
    s:<message_id>  score point   [time, churn risk, purchase propensity]   (4 decimals)
    a:<action_id>   action        [time, rule, outcome, endpoint, reason]
    d:<action_id>   delivery      [1 delivered | 0 dead-lettered, tries, last status, ms from ingest to the end, reason]
    seg             latest scored segment and stage [time, segment, stage]; `mv` its model version;
                    `why:0`.. its reasons ["feature", contribution], one field each
    val             latest predicted value (scoring's value features) [time, predicted value, value tier,
                    expected purchases over the value horizon, expected order value]
    ch:<channel>    last event time on that channel
    pu              purchase times, comma-separated, the newest PURCHASES_CAP
    r:<rule>        the customer's tally for a rule: `f=1;h=0;b=0;d=1;x=0;T=<first treated ms>;H=<first hold-out ms>;
                    s:<reason>=<suppressed>` (fired, held out, backfill, delivered, delivery failed), never trimmed;
                    and per event-time day the same outcomes, `@<day>f=1;@<day>s=2` (days since 1970, suppressed
                    not split by reason), the newest TALLY_DAYS_KEPT days before its newest action (the rules
                    page charts them over time)
    m:<merge_id>    a merge or split involving the customer (JSON object)
    n:t n:s n:a     how many touchpoints, score points, actions are kept (trimmed back to the cap past it)
    v               a counter bumped by every change (the live page's change marker)
    into            only on a merged-away id's hash: the customer it was merged into
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from services.console.readmodel import ActionTaken, DeliveryEnded, ScoreUpdated, TouchpointSeen
from touchstream.eventtime import DAY_MS

TIMELINE_CAP = 200
SCORE_HISTORY_CAP = 200
ACTIONS_CAP = 200
# Purchases are kept apart from the capped timeline because rule outcomes need them; the newest 50 do:
# a conversion is a purchase soon after an action, and only a customer with more than 50 purchases
# since then could have one of those dropped.
PURCHASES_CAP = 50
MAX_REASONS = 10
DELIVERED, DEAD_LETTERED = 1, 0
# A customer's tally keeps its per-day outcomes this many days before its newest one: the rules page charts
# the last ACTIVITY_DAYS days up to the newest event time, which never comes before a customer's newest action,
# so every day it shows is still kept (and a customer acted on daily for years keeps a bounded tally).
TALLY_DAYS_KEPT = 100


def _compact(values: list[Any]) -> bytes:
    """JSON array without its trailing empty items.

    >>> _compact([1, "a", None, {}, None])
    b'[1,"a"]'
    """
    while values and values[-1] in (None, "", {}, ()):
        values.pop()
    return orjson.dumps(values)


def touchpoint_value(touch: TouchpointSeen) -> bytes:
    """The `t:` value of a touchpoint.

    >>> touchpoint_value(TouchpointSeen("c", "m", 5, "track", "Order Completed", "web", "s", 10.0, "EUR", None, None))
    b'[5,"track","Order Completed","web",10.0,"EUR"]'
    """
    return _compact([touch.event_time_ms, touch.type, touch.name, touch.channel, touch.order_amount, touch.currency,
                     touch.feedback_kind, None, touch.properties])


def score_point_value(score: ScoreUpdated) -> bytes:
    """The `s:` value of a score.

    >>> score_point_value(ScoreUpdated("c", "m", 5, 0.123456, 0.876544, "loyal", "active", "v1", (), {}))
    b'[5,0.1235,0.8765]'

    With the customer's voice (scoring's sentiment features), three more: the message's own
    sentiment (null for an event without one), the recent mean and the last.

    >>> score_point_value(ScoreUpdated("c", "m", 5, 0.2, 0.8, "", "", "v1", (), {
    ...     "message_sentiment": -0.81234, "sentiment_recent": -0.5, "sentiment_last": -0.81234}))
    b'[5,0.2,0.8,-0.8123,-0.5,-0.8123]'
    """
    point: list[float | None] = [score.event_time_ms, round(score.churn_risk, 4), round(score.purchase_propensity, 4)]
    features = score.features
    if "sentiment_recent" in features and "sentiment_last" in features:
        message = features.get("message_sentiment")
        point += [None if message is None else round(message, 4), round(features["sentiment_recent"], 4),
                  round(features["sentiment_last"], 4)]
    return orjson.dumps(point)


@dataclass(frozen=True)
class ValueEstimate:
    """What scoring predicts a customer is worth (its ScoreUpdate's value features), as of a score."""

    event_time_ms: int
    predicted_value: float  # over scoring's value horizon (TOUCHSTREAM_SCORING_VALUE_HORIZON_DAYS, 365 by default)
    tier: int  # 1-4, the quartile among the customers scored so far; 0 while too few are scored to rank
    expected_purchases: float | None = None
    expected_order_value: float | None = None


@dataclass(frozen=True)
class ValueTier:
    """One value tier as the overview shows it: its customers (by their latest score) and their predicted value."""

    tier: int  # 1-4 (4: the top quarter of predicted values), 0: scored before scoring could rank
    customers: int
    predicted_value: float

    @property
    def mean_value(self) -> float:
        return self.predicted_value / self.customers if self.customers else 0.0


def value_estimate(score: ScoreUpdated) -> ValueEstimate | None:
    """The value a score predicts, or None for a score without value features (an older scoring).

    >>> value_estimate(ScoreUpdated("c", "m", 5, 0.2, 0.8, "", "", "v1", (), {"predicted_value": 120.0,
    ...     "value_tier": 3.0, "expected_purchases_value_horizon": 2.4, "expected_order_value": 50.0}))
    ValueEstimate(event_time_ms=5, predicted_value=120.0, tier=3, expected_purchases=2.4, expected_order_value=50.0)
    >>> value_estimate(ScoreUpdated("c", "m", 5, 0.2, 0.8, "", "", "v1", (), {})) is None
    True
    """
    features = score.features
    value = features.get("predicted_value")
    if value is None:
        return None
    return ValueEstimate(score.event_time_ms, value, int(features.get("value_tier", 0.0)),
                         features.get("expected_purchases_value_horizon"), features.get("expected_order_value"))


def value_field(estimate: ValueEstimate) -> bytes:
    """The `val` value of a value estimate (cents and four decimals are all the pages show).

    >>> value_field(ValueEstimate(5, 123.456, 4, 2.41234, 51.2345))
    b'[5,123.46,4,2.4123,51.23]'
    >>> value_field(ValueEstimate(5, 0.0, 0))
    b'[5,0.0,0]'
    """
    return _compact([estimate.event_time_ms, round(estimate.predicted_value, 2), estimate.tier,
                     None if estimate.expected_purchases is None else round(estimate.expected_purchases, 4),
                     None if estimate.expected_order_value is None else round(estimate.expected_order_value, 2)])


def value_tier_entry(estimate: ValueEstimate) -> str:
    """The customer's place in the overview's value tiers: "<tier>|<predicted value in cents>".

    >>> value_tier_entry(ValueEstimate(5, 123.456, 4))
    '4|12346'
    """
    return f"{estimate.tier}|{round(estimate.predicted_value * 100)}"


def latest_score_values(score: ScoreUpdated) -> tuple[bytes, str, list[bytes]] | None:
    """The `seg`, `mv` and `why:<n>` values a score sets when it is the newest; None for a score without a
    segment (a rescore scoring did not explain), which moves the risk line but not the segment.

    >>> latest_score_values(ScoreUpdated("c", "m", 5, 0.2, 0.8, "loyal", "active", "v1", (("recency_days", 0.4),), {}))
    (b'[5,"loyal","active"]', 'v1', [b'["recency_days",0.4]'])
    >>> latest_score_values(ScoreUpdated("c", "m", 5, 0.2, 0.8, "", "", "v1", (), {})) is None
    True
    """
    if not score.segment and not score.stage:
        return None
    reasons = [orjson.dumps([name, round(value, 4)]) for name, value in score.reasons[:MAX_REASONS]]
    return orjson.dumps([score.event_time_ms, score.segment, score.stage]), score.model_version, reasons


def action_value(action: ActionTaken) -> bytes:
    """The `a:` value of an action.

    >>> action_value(ActionTaken("a1", "churn-high", "c", "fired", None, "marketing", 5, 6))
    b'[5,"churn-high","fired","marketing"]'
    """
    return _compact([action.event_time_ms, action.rule_id, action.outcome, action.endpoint, action.reason])


def delivery_value(ended: DeliveryEnded) -> bytes:
    """The `d:` value of a delivery outcome.

    >>> delivery_value(DeliveryEnded("a1", "r", "c", "m", "delivered", 2, 204, None, 1_000, 1_250))
    b'[1,2,204,250]'
    >>> delivery_value(DeliveryEnded("a1", "r", "c", "m", "dead_lettered", 3, None, "webhook: timeout", 1_000, 9_000))
    b'[0,3,null,8000,"webhook: timeout"]'
    """
    return _compact([DELIVERED if ended.delivered else DEAD_LETTERED, ended.attempts, ended.status,
                     max(0, ended.ended_at_ms - ended.received_at_ms), ended.reason])


@dataclass(frozen=True)
class TimelineEntry:
    """A touchpoint as the customer page shows it."""

    message_id: str
    event_time_ms: int
    type: str
    name: str | None
    channel: str
    order_amount: float | None = None
    currency: str | None = None
    feedback_kind: str | None = None
    properties: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ScorePoint:
    event_time_ms: int
    churn_risk: float
    purchase_propensity: float
    message_id: str = ""
    # The customer's voice as scored with this point (None: no sentiment yet; message: this event had none).
    message_sentiment: float | None = None
    sentiment_recent: float | None = None
    sentiment_last: float | None = None


@dataclass(frozen=True)
class LatestScore:
    """The newest score with a segment: what the profile card and "Why" show."""

    event_time_ms: int
    churn_risk: float
    purchase_propensity: float
    segment: str
    stage: str
    model_version: str
    reasons: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class ActionEntry:
    action_id: str
    rule_id: str
    outcome: str
    endpoint: str
    reason: str | None
    event_time_ms: int


@dataclass(frozen=True)
class DeliveryStatus:
    """How an action's delivery ended, as kept for the customer page."""

    delivered: bool
    attempts: int
    status: int | None
    latency_ms: int  # from ingest accepting the event to the receiver's 2xx (or to giving up)
    reason: str | None = None


@dataclass(frozen=True)
class RuleTally:
    """One customer's (or, summed, a rule's) counts for a rule, and when its first actions of each group came."""

    counts: dict[str, int] = field(default_factory=dict)  # fired, held_out, suppressed:<reason>
    delivered: int = 0
    delivery_failed: int = 0
    first_treated_ms: int | None = None
    first_holdout_ms: int | None = None
    # Event-time day (days since 1970) -> outcome (fired, held_out, suppressed, backfill) -> actions.
    by_day: dict[int, dict[str, int]] = field(default_factory=dict)


_TALLY_COUNTS = {"f": "fired", "h": "held_out", "b": "backfill"}
_DAY_COUNTS = {"f": "fired", "h": "held_out", "s": "suppressed", "b": "backfill"}
_DAY_PART = re.compile(r"@(-?\d+)([fhsb])")


def parse_rule_tally(text: str | bytes) -> RuleTally:
    """Read an `r:<rule>` value.

    >>> parse_rule_tally("f=2;d=1;x=1;T=5;s:cooldown=3")
    RuleTally(counts={'fired': 2, 'suppressed:cooldown': 3}, delivered=1, delivery_failed=1, first_treated_ms=5, \
first_holdout_ms=None, by_day={})
    >>> parse_rule_tally("f=2;s:cooldown=1;@20400f=1;@20401f=1;@20401s=1").by_day
    {20400: {'fired': 1}, 20401: {'fired': 1, 'suppressed': 1}}
    """
    if isinstance(text, bytes):
        text = text.decode()
    counts: dict[str, int] = {}
    by_day: dict[int, dict[str, int]] = {}
    values = dict(part.split("=", 1) for part in text.split(";") if "=" in part)
    for name, value in values.items():
        if name in _TALLY_COUNTS:
            counts[_TALLY_COUNTS[name]] = int(value)
        elif name.startswith("s:"):
            counts[f"suppressed:{name[2:]}"] = int(value)
        elif day_part := _DAY_PART.fullmatch(name):
            by_day.setdefault(int(day_part.group(1)), {})[_DAY_COUNTS[day_part.group(2)]] = int(value)
    first_treated, first_holdout = values.get("T"), values.get("H")
    return RuleTally(counts, int(values.get("d", 0)), int(values.get("x", 0)),
                     int(first_treated) if first_treated else None, int(first_holdout) if first_holdout else None,
                     dict(sorted(by_day.items())))


def tally_field(action: ActionTaken) -> str:
    """The tally counter an action adds to.

    A `backfill` decision (about an event older than triggers' backfill horizon: recorded, never sent)
    counts apart, in neither group.

    >>> [tally_field(ActionTaken("a", "r", "c", o, why, "m", 0, 0)) for o, why in
    ...  (("fired", None), ("held_out", "holdout"), ("suppressed", "cooldown"), ("suppressed", None),
    ...   ("backfill", "fired"))]
    ['f', 'h', 's:cooldown', 's:unspecified', 'b']
    """
    if action.outcome == "fired":
        return "f"
    if action.outcome == "held_out":
        return "h"
    if action.outcome == "backfill":
        return "b"
    return "s:" + (action.reason or "unspecified").replace(";", ",").replace("=", ":")


def tally_day_field(action: ActionTaken, ceiling_ms: int | None = None) -> str:
    """The per-day tally counter an action adds to: its event-time day (at most the day of `ceiling_ms`, so
    one action stamped years ahead cannot push every other day out of the kept ones) and its outcome.

    >>> [tally_day_field(ActionTaken("a", "r", "c", o, None, "m", 1_762_473_600_000, 0)) for o in
    ...  ("fired", "held_out", "suppressed", "backfill")]
    ['@20399f', '@20399h', '@20399s', '@20399b']
    >>> tally_day_field(ActionTaken("a", "r", "c", "fired", None, "m", 4_102_444_800_000, 0), 1_762_473_600_000)
    '@20399f'
    """
    at = action.event_time_ms if ceiling_ms is None else min(action.event_time_ms, ceiling_ms)
    return f"@{at // DAY_MS}{tally_field(action)[0]}"


@dataclass
class CustomerView:
    """Everything the read model holds about one customer, decoded from its hash."""

    customer_id: str
    looked_up_id: str
    timeline: list[TimelineEntry] = field(default_factory=list)  # newest first
    scores: list[ScorePoint] = field(default_factory=list)  # oldest first
    latest_score: LatestScore | None = None
    actions: list[ActionEntry] = field(default_factory=list)  # newest first
    deliveries: dict[str, DeliveryStatus] = field(default_factory=dict)  # action id -> how its delivery ended
    channels: list[tuple[str, int]] = field(default_factory=list)  # most recent first
    merges: list[dict[str, Any]] = field(default_factory=list)  # newest first
    purchases_ms: list[int] = field(default_factory=list)
    tallies: dict[str, RuleTally] = field(default_factory=dict)
    value: ValueEstimate | None = None  # the newest score's predicted value, if scoring sent one

    @property
    def known(self) -> bool:
        return bool(self.timeline or self.scores or self.actions or self.merges)


def as_text(value: bytes | str) -> str:
    """A Redis reply (bytes) or a fake's (str) as text."""
    return value.decode() if isinstance(value, bytes) else value


def purchase_times(value: bytes | str | None) -> list[int]:
    """Read the `pu` field.

    >>> purchase_times(b"5,9"), purchase_times(None)
    ([5, 9], [])
    """
    return [int(t) for t in as_text(value).split(",") if t] if value else []


def customer_view(customer_id: str, looked_up_id: str, fields: Mapping[bytes | str, bytes | str],
                  timeline_limit: int = TIMELINE_CAP) -> CustomerView:
    """Decode a customer's hash (HGETALL) into what the pages show."""
    view = CustomerView(customer_id, looked_up_id)
    latest: list[Any] | None = None
    model_version, reasons = "", []
    for raw_name, raw_value in fields.items():
        name, value = as_text(raw_name), as_text(raw_value)
        kind, _, key = name.partition(":")
        if kind == "t":
            items = [*json.loads(value), None, None, None, None, None, None, None, None]
            view.timeline.append(TimelineEntry(key, items[0], items[1], items[2], items[3], items[4], items[5],
                                               items[6], items[8] or {}))
        elif kind == "s":
            items = [*json.loads(value), None, None, None]
            view.scores.append(ScorePoint(items[0], items[1], items[2], key, *items[3:6]))
        elif kind == "a":
            items = [*json.loads(value), None]
            view.actions.append(ActionEntry(key, items[1], items[2], items[3], items[4], items[0]))
        elif kind == "d":
            items = [*json.loads(value), None]
            view.deliveries[key] = DeliveryStatus(items[0] == DELIVERED, items[1], items[2], items[3], items[4])
        elif kind == "ch":
            view.channels.append((key, int(value)))
        elif kind == "m":
            view.merges.append(json.loads(value))
        elif kind == "r":
            view.tallies[key] = parse_rule_tally(value)
        elif kind == "why":
            reasons.append((int(key), json.loads(value)))
        elif name == "seg":
            latest = json.loads(value)
        elif name == "mv":
            model_version = value
        elif name == "pu":
            view.purchases_ms = purchase_times(value)
        elif name == "val":
            items = [*json.loads(value), None, None]
            view.value = ValueEstimate(items[0], items[1], items[2], items[3], items[4])
    view.timeline.sort(key=lambda e: (e.event_time_ms, e.message_id), reverse=True)
    del view.timeline[timeline_limit:]
    view.scores.sort(key=lambda s: s.event_time_ms)
    view.actions.sort(key=lambda a: (a.event_time_ms, a.action_id), reverse=True)
    view.channels.sort(key=lambda c: c[1], reverse=True)
    view.merges.sort(key=lambda m: m.get("event_time_ms", 0), reverse=True)
    if latest is not None:
        time_ms, segment, stage = latest
        # The risk line's newest point: a later rescore (no segment of its own) moves the numbers, not the segment.
        point = view.scores[-1] if view.scores else None
        risk, propensity = (point.churn_risk, point.purchase_propensity) if point else (0.0, 0.0)
        view.latest_score = LatestScore(time_ms, risk, propensity, segment, stage, model_version,
                                        tuple((str(f), float(c)) for _, (f, c) in sorted(reasons)))
    return view


def sum_tallies(tallies: Iterable[RuleTally]) -> RuleTally:
    """Add customers' tallies of one rule up (first times are per customer, so they are dropped).

    >>> sum_tallies([parse_rule_tally("f=1;d=1;T=5;@9f=1"), parse_rule_tally("f=2;s:cooldown=1;x=1;@9f=1;@10f=1")])
    RuleTally(counts={'fired': 3, 'suppressed:cooldown': 1}, delivered=1, delivery_failed=1, \
first_treated_ms=None, first_holdout_ms=None, by_day={9: {'fired': 2}, 10: {'fired': 1}})
    """
    counts: dict[str, int] = {}
    by_day: dict[int, dict[str, int]] = {}
    delivered = failed = 0
    for tally in tallies:
        for name, n in tally.counts.items():
            counts[name] = counts.get(name, 0) + n
        for day, outcomes in tally.by_day.items():
            summed = by_day.setdefault(day, {})
            for outcome, n in outcomes.items():
                summed[outcome] = summed.get(outcome, 0) + n
        delivered += tally.delivered
        failed += tally.delivery_failed
    return RuleTally(counts, delivered, failed, by_day=dict(sorted(by_day.items())))
