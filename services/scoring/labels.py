"""Late labels: prediction points wait until event time says whether the customer bought.

A prediction made at time t asks "will this customer purchase in (t, t+H]?". A purchase
at T labels every waiting prediction with t < T <= t+H positive; the rest become negative
once the event-time watermark passes t+H. Only then is the example learned: learning a
positive as soon as the purchase arrives, before the negatives could mature, would feed the
model almost only positives and collapse SGD.
"""

from __future__ import annotations

from dataclasses import dataclass

from touchstream.eventtime import DAY_MS


@dataclass
class PendingExample:
    """A scored prediction point waiting for its label."""

    t_ms: int
    due_ms: int
    # The customer's silent path (features.PATH_FIELDS) as it was at t_ms: its model inputs follow from it.
    path: list[float]
    propensity: float
    positive: bool = False
    # Purchases inside the window so far (positive = at least one); expected counts learn from it.
    purchases: int = 0


def event_day(t_ms: int) -> int:
    """Return the event-time day number of `t_ms` (days since the epoch, UTC).

    >>> event_day(DAY_MS * 3 + 5)
    3
    """
    return t_ms // DAY_MS


def is_prediction_point(last_example_day: int, t_ms: int, horizon_ms: int, maturity_cutoff_ms: int) -> bool:
    """Say whether an event at `t_ms` becomes a stored example.

    At most one per customer per event-time day, so a busy customer does not dominate the
    training data; none for events so late that their label window already closed.

    >>> is_prediction_point(-1, DAY_MS, 90 * DAY_MS, 0)
    True
    >>> is_prediction_point(1, DAY_MS + 5, 90 * DAY_MS, 0)
    False
    """
    return event_day(t_ms) > last_example_day and t_ms + horizon_ms > maturity_cutoff_ms


def label_with_purchase(pending: list[PendingExample], purchase_ms: int) -> int:
    """Count `purchase_ms` in every waiting window that contains it; return how many turned positive.

    >>> waiting = [PendingExample(0, 10, [], 0.5), PendingExample(20, 30, [], 0.5)]
    >>> label_with_purchase(waiting, 10), [e.positive for e in waiting]
    (1, [True, False])
    """
    changed = 0
    for example in pending:
        if example.t_ms < purchase_ms <= example.due_ms:
            example.purchases += 1
            if not example.positive:
                example.positive = True
                changed += 1
    return changed


def split_matured(
    pending: list[PendingExample], maturity_cutoff_ms: int
) -> tuple[list[PendingExample], list[PendingExample]]:
    """Split `pending` into (matured, still waiting) at the watermark-derived cutoff.

    >>> matured, waiting = split_matured([PendingExample(0, 10, [], 0.5), PendingExample(5, 15, [], 0.5)], 12)
    >>> [e.t_ms for e in matured], [e.t_ms for e in waiting]
    ([0], [5])
    """
    matured = [e for e in pending if e.due_ms <= maturity_cutoff_ms]
    waiting = [e for e in pending if e.due_ms > maturity_cutoff_ms]
    return matured, waiting


def union_pending(kept: list[PendingExample], added: list[PendingExample]) -> list[PendingExample]:
    """Union two customers' waiting examples, one per event-time day, a positive label winning."""
    by_day = {event_day(e.t_ms): e for e in kept}
    for example in added:
        day = event_day(example.t_ms)
        if day in by_day:
            by_day[day].positive = by_day[day].positive or example.positive
            by_day[day].purchases = max(by_day[day].purchases, example.purchases)
        else:
            by_day[day] = example
    return sorted(by_day.values(), key=lambda e: e.t_ms)
