"""The model's feature vector, read from a customer's state at an event time."""

from __future__ import annotations

import math

from services.scoring.labels import DAY_MS
from services.scoring.state import PURCHASE_DECAY_MS, TOUCH_DECAY_MS, CustomerState

FEATURE_NAMES = (
    "recency_days",
    "tenure_days",
    "log_purchase_count",
    "log_monetary_total",
    "avg_order_value",
    "mean_interpurchase_days",
    "purchases_decayed_90d",
    "touches_decayed_30d",
    "complaints",
)


def features_at(state: CustomerState, t_ms: int) -> dict[str, float]:
    """Return the model features of `state` as seen at event time `t_ms`.

    Recency counts from the last purchase, or from the first touch for a customer who
    never bought, so "long silent" reads the same for both.

    >>> from services.scoring.state import Touchpoint, apply_touchpoint
    >>> state = CustomerState()
    >>> _ = apply_touchpoint(state, Touchpoint("m1", 0, 0, order_amount=10.0))
    >>> _ = apply_touchpoint(state, Touchpoint("m2", 10 * DAY_MS, 0, order_amount=30.0))
    >>> f = features_at(state, 40 * DAY_MS)
    >>> f["recency_days"], f["avg_order_value"], f["mean_interpurchase_days"]
    (30.0, 20.0, 10.0)
    """
    count = state.purchase_count
    since = state.last_purchase_ms if state.last_purchase_ms is not None else state.first_touch_ms
    interpurchase = 0.0
    if count >= 2 and state.first_purchase_ms is not None and state.last_purchase_ms is not None:
        interpurchase = _days(state.last_purchase_ms - state.first_purchase_ms) / (count - 1)
    return {
        "recency_days": _days(t_ms - since) if since is not None else 0.0,
        "tenure_days": _days(t_ms - state.first_touch_ms) if state.first_touch_ms is not None else 0.0,
        "log_purchase_count": math.log1p(count),
        "log_monetary_total": math.log1p(max(0.0, state.monetary_total)),
        "avg_order_value": state.monetary_total / count if count else 0.0,
        "mean_interpurchase_days": interpurchase,
        "purchases_decayed_90d": state.recent_purchases.value_at(t_ms, PURCHASE_DECAY_MS),
        "touches_decayed_30d": state.recent_touches.value_at(t_ms, TOUCH_DECAY_MS),
        "complaints": float(state.complaints),
    }


def _days(ms: int) -> float:
    # Out-of-order events can sit before the latest state; never report negative ages.
    return max(0, ms) / DAY_MS
