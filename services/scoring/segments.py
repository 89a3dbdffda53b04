"""RFM segment and lifecycle stage by simple recency/frequency rules.

Segments (by days since the last purchase and purchase count):
prospect (never bought), new (one purchase, recent), champions (recent and frequent),
loyal (recent, repeat), promising (one purchase, within the horizon), at_risk (repeat
buyer silent past the horizon), about_to_sleep (one-time buyer silent past the horizon),
hibernating (silent past twice the horizon).

Stages: prospect, new, habit_forming, loyal, won_back (bought again after a gap longer
than the horizon), at_risk, churned.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.scoring.labels import DAY_MS
from services.scoring.state import CustomerState


@dataclass(frozen=True)
class StageRules:
    """Thresholds of the segment and stage rules."""

    active_days: float = 90.0
    churned_days: float = 180.0
    recent_days: float = 30.0
    loyal_min_purchases: int = 3


def _recency_days(state: CustomerState, t_ms: int) -> float | None:
    if state.last_purchase_ms is None:
        return None
    return max(0, t_ms - state.last_purchase_ms) / DAY_MS


def rfm_segment(state: CustomerState, t_ms: int, rules: StageRules) -> str:
    """Name the customer's RFM segment at `t_ms`.

    >>> rfm_segment(CustomerState(purchase_count=4, last_purchase_ms=0), 10 * DAY_MS, StageRules())
    'champions'
    >>> rfm_segment(CustomerState(purchase_count=4, last_purchase_ms=0), 400 * DAY_MS, StageRules())
    'hibernating'
    """
    recency = _recency_days(state, t_ms)
    if recency is None:
        return "prospect"
    frequent = state.purchase_count >= rules.loyal_min_purchases
    repeat = state.purchase_count >= 2
    if recency > rules.churned_days:
        return "hibernating"
    if recency > rules.active_days:
        return "at_risk" if repeat else "about_to_sleep"
    if recency <= rules.recent_days:
        return "champions" if frequent else "loyal" if repeat else "new"
    return "loyal" if repeat else "promising"


def lifecycle_stage(state: CustomerState, t_ms: int, rules: StageRules) -> str:
    """Name the customer's lifecycle stage at `t_ms`.

    >>> won_back = CustomerState(purchase_count=3, last_purchase_ms=200 * DAY_MS,
    ...                          gap_before_last_purchase_ms=150 * DAY_MS)
    >>> lifecycle_stage(won_back, 201 * DAY_MS, StageRules())
    'won_back'
    """
    recency = _recency_days(state, t_ms)
    if recency is None:
        return "prospect"
    if recency > rules.churned_days:
        return "churned"
    if recency > rules.active_days:
        return "at_risk"
    gap = state.gap_before_last_purchase_ms
    if gap is not None and gap / DAY_MS > rules.active_days:
        return "won_back"
    if state.purchase_count >= rules.loyal_min_purchases:
        return "loyal"
    return "habit_forming" if state.purchase_count >= 2 else "new"
