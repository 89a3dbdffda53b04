"""The pipeline benchmark's two workloads, as Segment-style calls an upstream system would send.

- One webhook per event: a new customer per event (an order), and a rule that fires on the
  first score (`ONE_WEBHOOK_RULES`). Every event crosses every stage and makes a signed POST.
- A CDNOW-like mix (`cdnow_mix`): CDNOW's real order history (from the `lifetimes` package)
  for a sample of its customers, with the page views, second devices and complaints a shop
  would also send, in event-time order. Most events only update identity and features;
  a minority fires an action under the default rules (deploy/rules/default.yaml).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from touchstream.datasets import Purchase, cdnow_purchases
from touchstream.eventtime import DAY_MS, HOUR_MS

DEFAULT_RULES_FILE = Path(__file__).resolve().parents[1] / "deploy" / "rules" / "default.yaml"
ONE_WEBHOOK_RULE_ID = "bench-first-score"
# crosses_above 0 fires on a customer's first score whatever the model says (a model that has
# learned from the mix may put a new customer's risk anywhere); rearm_below 0 never re-arms.
ONE_WEBHOOK_RULES = f"""
rules:
  - id: {ONE_WEBHOOK_RULE_ID}
    when: {{score: churn_risk, crosses_above: 0.0, rearm_below: 0.0}}
    action: {{endpoint: marketing, template: {{kind: bench}}}}
    cooldown_hours: 24
    holdout_percent: 0
"""
MINUTE_MS = 60_000


def track_call(run: str, index: int) -> dict[str, Any]:
    """Return the one-webhook workload's event `index`: an order by a customer nobody has seen."""
    return {"type": "track", "event": "Order Completed", "userId": f"bench-{run}-{index}",
            "messageId": f"bench-{run}-{index}", "order": {"amount": 10.0 + index % 50}}


def one_webhook_calls(run: str, count: int) -> list[dict[str, Any]]:
    return [track_call(run, i) for i in range(count)]


@dataclass(frozen=True)
class MixShape:
    """What a shop sends around CDNOW's orders; shares are per customer unless named otherwise."""

    page_views_before_order: int = 2
    browse_sessions_mean: float = 1.5  # Poisson mean of browse-only sessions (1-3 anonymous page views)
    second_device_share: float = 0.2  # browses once on another device, then orders from it (an identity merge)
    complaint_share: float = 0.05  # complains once, 1-72 h after one of their orders
    complaint_answered_share: float = 0.6  # of complaints: answered 2-20 h later (stops the 24 h escalation)
    marketing_consent_share: float = 0.7  # states marketing + loyalty consent on every event
    app_channel_share: float = 0.3  # shops in the app rather than on the web

    def describe(self) -> dict[str, Any]:
        return {
            "orders": "CDNOW order lines (dates, amounts, CDs bought) of a seeded sample of its customers",
            "page_views_before_each_order": self.page_views_before_order,
            "browse_only_sessions_per_customer_mean": self.browse_sessions_mean,
            "customers_with_a_second_device": self.second_device_share,
            "customers_who_complain_once": self.complaint_share,
            "complaints_answered_within_24h": self.complaint_answered_share,
            "customers_with_marketing_consent": self.marketing_consent_share,
            "customers_on_the_app_channel": self.app_channel_share,
            "identifiers": "orders: userId + anonymousId (device) + e-mail; page views: anonymousId, half also userId",
            "event_time": "CDNOW's 18 months moved to end a week before the run; sent in event-time order",
        }


@dataclass
class Mix:
    """A mix's calls in event-time order and what is in them."""

    calls: list[dict[str, Any]]
    customers: int
    kinds: Counter[str] = field(default_factory=Counter)

    def describe(self) -> dict[str, Any]:
        return {"events": len(self.calls), "customers": self.customers,
                "events_per_customer": round(len(self.calls) / max(self.customers, 1), 2),
                "events_by_kind": dict(self.kinds.most_common())}


def _iso(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _CustomerEvents:
    """Build one customer's events; `shift_ms` moves CDNOW's 1997-98 dates to the run's time."""

    def __init__(self, run: str, customer: str, rng: random.Random, shape: MixShape, shift_ms: int) -> None:
        self.run, self.customer, self.rng, self.shape, self.shift_ms = run, customer, rng, shape, shift_ms
        self.user_id = f"{run}-cdnow-{customer}"
        self.device = f"{run}-dev-{customer}"
        self.channel = "app" if rng.random() < shape.app_channel_share else "web"
        consent = rng.random() < shape.marketing_consent_share
        self.context: dict[str, Any] = (
            {"consent": {"categoryPreferences": {"marketing": True, "loyalty": True}}} if consent else {})
        self.events: list[tuple[int, str, dict[str, Any]]] = []

    def add(self, t_ms: int, kind: str, call: dict[str, Any]) -> None:
        number = len(self.events)
        call = {**call, "messageId": f"{self.run}-{self.customer}-{number}", "timestamp": _iso(t_ms)}
        context = {**self.context, **call.get("context", {})}
        if context:
            call["context"] = context
        self.events.append((t_ms, kind, call))

    def page_view(self, t_ms: int, device: str, logged_in: bool) -> None:
        call: dict[str, Any] = {"type": "page", "name": "Product", "anonymousId": device, "channel": self.channel,
                                "properties": {"path": f"/cd/{self.rng.randrange(5000)}"}}
        if logged_in:
            call["userId"] = self.user_id
        self.add(t_ms, "page_view", call)

    def order(self, purchase: Purchase, device: str) -> None:
        t_ms = purchase.timestamp_ms + self.shift_ms
        self.add(t_ms, "order", {
            "type": "track", "event": "Order Completed", "userId": self.user_id, "anonymousId": device,
            "channel": self.channel, "context": {"traits": {"email": f"{self.user_id}@example.com"}},
            "order": {"order_id": f"{self.run}-o{purchase.line}", "amount": purchase.amount, "currency": "USD",
                      "items": [{"sku": "cd", "quantity": purchase.quantity}]}})

    def history(self, purchases: list[Purchase], last_ms: int) -> None:
        shape, rng = self.shape, self.rng
        second_device_before = (rng.randrange(1, len(purchases))
                                if len(purchases) > 1 and rng.random() < shape.second_device_share else None)
        for number, purchase in enumerate(purchases):
            t_ms = purchase.timestamp_ms + self.shift_ms
            device = self.device
            if number == second_device_before:
                device = f"{self.device}-2"
                self.page_view(t_ms - rng.randrange(40, 90) * MINUTE_MS, device, logged_in=False)
            for _ in range(shape.page_views_before_order):
                self.page_view(t_ms - rng.randrange(2, 35) * MINUTE_MS, device, logged_in=rng.random() < 0.5)
            self.order(purchase, device)
        first_ms = purchases[0].timestamp_ms + self.shift_ms
        active_until = min(purchases[-1].timestamp_ms + self.shift_ms + 90 * DAY_MS, last_ms)
        for _ in range(_poisson(rng, shape.browse_sessions_mean)):
            start = rng.randrange(first_ms, max(active_until, first_ms + 1))
            for view in range(rng.randint(1, 3)):
                self.page_view(start + view * MINUTE_MS, self.device, logged_in=False)
        if rng.random() < shape.complaint_share:
            complained = rng.choice(purchases).timestamp_ms + self.shift_ms + rng.randrange(1, 72) * HOUR_MS
            self.add(complained, "complaint", {
                "type": "track", "event": "Complaint Submitted", "userId": self.user_id, "channel": "call_center",
                "complaint": {"rating": rng.choice((1, 2)), "text": "The CD arrived scratched."}})
            if rng.random() < shape.complaint_answered_share:
                self.add(complained + rng.randrange(2, 20) * HOUR_MS, "complaint_answered", {
                    "type": "track", "event": "Complaint Answered", "userId": self.user_id,
                    "channel": "call_center"})


def _poisson(rng: random.Random, mean: float) -> int:
    # Knuth's method: fine for small means.
    limit, count, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return count


def cdnow_mix(run: str, target_events: int, end_ms: int, seed: int = 15, shape: MixShape | None = None,
              purchases: list[Purchase] | None = None) -> Mix:
    """Return about `target_events` events of whole CDNOW customer histories, ending at `end_ms` in event time.

    Customers are drawn in a seeded order until the target is reached, so a customer's history
    is never cut. The same seed and target give the same customers; `run` keeps ids apart.
    """
    shape = shape or MixShape()
    purchases = purchases if purchases is not None else cdnow_purchases()
    by_customer: dict[str, list[Purchase]] = {}
    for purchase in purchases:
        by_customer.setdefault(purchase.customer, []).append(purchase)
    last_cdnow_ms = max(p.timestamp_ms for p in purchases)
    shift_ms = end_ms - last_cdnow_ms
    order = sorted(by_customer)
    rng = random.Random(seed)
    rng.shuffle(order)
    events: list[tuple[int, str, dict[str, Any]]] = []
    customers = 0
    for customer in order:
        if len(events) >= target_events:
            break
        builder = _CustomerEvents(run, customer, random.Random(f"{seed}-{customer}"), shape, shift_ms)
        builder.history(by_customer[customer], end_ms)
        events += builder.events
        customers += 1
    events.sort(key=lambda item: item[0])
    return Mix([call for _, _, call in events], customers, Counter(kind for _, kind, _ in events))
