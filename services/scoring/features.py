"""The model's feature vector, read from a customer's state as of an event time.

Features are computed "as of" any time t at or after the state's events, so the same
function scores a fresh touchpoint, an as-of rescore of a silent customer (a tick), and a
what-if of the same customer staying silent (horizon chaining in `engine`).

| feature | meaning |
|---|---|
| recency_days, log_recency_days | days since the last purchase (since the first touch if none) |
| tenure_days, log_tenure_days | days since the first touch |
| days_since_last_touch | days since any touchpoint |
| log_purchase_count, log_monetary_total, avg_order_value | frequency and monetary totals |
| mean_interpurchase_days, interpurchase_std_days, last_interpurchase_days | interval statistics (recent purchases) |
| overdue_ratio | recency over the mean interval: how many "usual gaps" the customer is late |
| recency_x_frequency | log recency x log purchases: silence weighs more for a frequent buyer |
| repeat_rate_30d | repeat purchases per 30 days of tenure |
| purchases_{7,30,90,365}d, log_spend_{7,30,90,365}d | decayed window counts and spend (see state) |
| touches_30d | decayed 30-day count of every touchpoint |
| complaints, complaints_90d, rating_mean, ratings_count | service experience |
| channels_used, channel_share_{name} | channel mix |

The model reads MODEL_FEATURES only: durations and totals log-scaled (log_*), plus the
bounded window, rate, share and experience features. Raw day counts stay in the
ScoreUpdate for rules and people, but a linear model extrapolates them badly: the
horizon chaining asks about customers silent longer than any the model has seen, and on
CDNOW raw days made the 39-week forecast swing with the order examples were learned in.
"""

from __future__ import annotations

import math

from services.scoring.labels import DAY_MS
from services.scoring.state import CHANNELS, WINDOW_DAYS, CustomerState

FEATURE_NAMES = (
    "recency_days",
    "log_recency_days",
    "tenure_days",
    "log_tenure_days",
    "days_since_last_touch",
    "log_purchase_count",
    "log_monetary_total",
    "avg_order_value",
    "mean_interpurchase_days",
    "interpurchase_std_days",
    "last_interpurchase_days",
    "overdue_ratio",
    "repeat_rate_30d",
    *(f"purchases_{w}d" for w in WINDOW_DAYS),
    *(f"log_spend_{w}d" for w in WINDOW_DAYS),
    "touches_30d",
    "complaints",
    "complaints_90d",
    "rating_mean",
    "ratings_count",
    "channels_used",
    *(f"channel_share_{c}" for c in (*CHANNELS, "other")),
    "log_days_since_last_touch",
    "log_avg_order_value",
    "log_mean_interpurchase_days",
    "log_overdue_ratio",
    "log_complaints",
    "log_ratings_count",
    "recency_x_frequency",
)

MODEL_FEATURES = (
    "log_recency_days",
    "log_tenure_days",
    "log_days_since_last_touch",
    "log_purchase_count",
    "log_monetary_total",
    "log_avg_order_value",
    "log_mean_interpurchase_days",
    "log_overdue_ratio",
    "recency_x_frequency",
    "repeat_rate_30d",
    *(f"purchases_{w}d" for w in WINDOW_DAYS),
    *(f"log_spend_{w}d" for w in WINDOW_DAYS),
    "touches_30d",
    "log_complaints",
    "complaints_90d",
    "rating_mean",
    "log_ratings_count",
    "channels_used",
    *(f"channel_share_{c}" for c in (*CHANNELS, "other")),
)


def model_inputs(features: dict[str, float]) -> dict[str, float]:
    """Return the MODEL_FEATURES of `features`, in that order (those it has).

    >>> model_inputs({"recency_days": 3.0, "log_recency_days": 1.39})
    {'log_recency_days': 1.39}
    """
    return {name: features[name] for name in MODEL_FEATURES if name in features}


def features_at(state: CustomerState, t_ms: int) -> dict[str, float]:
    """Return the model features of `state` as seen at event time `t_ms`.

    Recency counts from the last purchase, or from the first touch for a customer who
    never bought, so "long silent" reads the same for both.

    >>> from services.scoring.state import Touchpoint, apply_touchpoint
    >>> state = CustomerState()
    >>> _ = apply_touchpoint(state, Touchpoint("m1", 0, 0, order_amount=10.0))
    >>> _ = apply_touchpoint(state, Touchpoint("m2", 10 * DAY_MS, 0, order_amount=30.0))
    >>> f = features_at(state, 40 * DAY_MS)
    >>> f["recency_days"], f["avg_order_value"], f["mean_interpurchase_days"], f["overdue_ratio"]
    (30.0, 20.0, 10.0, 3.0)
    """
    count = state.purchase_count
    since = state.last_purchase_ms if state.last_purchase_ms is not None else state.first_touch_ms
    recency = _days(t_ms - since) if since is not None else 0.0
    tenure = _days(t_ms - state.first_touch_ms) if state.first_touch_ms is not None else 0.0
    mean_gap = 0.0
    if count >= 2 and state.first_purchase_ms is not None and state.last_purchase_ms is not None:
        mean_gap = _days(state.last_purchase_ms - state.first_purchase_ms) / (count - 1)
    gaps = [_days(b - a) for a, b in zip(state.purchase_times, state.purchase_times[1:], strict=False)]
    gap_std = 0.0
    if len(gaps) >= 2:
        gap_mean = sum(gaps) / len(gaps)
        gap_std = math.sqrt(sum((g - gap_mean) ** 2 for g in gaps) / (len(gaps) - 1))
    features = {
        "recency_days": recency,
        "log_recency_days": math.log1p(recency),
        "tenure_days": tenure,
        "log_tenure_days": math.log1p(tenure),
        "days_since_last_touch": _days(t_ms - state.last_touch_ms) if state.last_touch_ms is not None else 0.0,
        "log_purchase_count": math.log1p(count),
        "log_monetary_total": math.log1p(max(0.0, state.monetary_total)),
        "avg_order_value": state.monetary_total / count if count else 0.0,
        "mean_interpurchase_days": mean_gap,
        "interpurchase_std_days": gap_std,
        "last_interpurchase_days": gaps[-1] if gaps else 0.0,
        "overdue_ratio": recency / mean_gap if mean_gap > 0 else 0.0,
        "repeat_rate_30d": max(0, count - 1) / (tenure + 1.0) * 30.0,
    }
    purchases, spend = state.purchases.values_at(t_ms), state.spend.values_at(t_ms)
    for w, n, amount in zip(WINDOW_DAYS, purchases, spend, strict=True):
        features[f"purchases_{w}d"] = n
        features[f"log_spend_{w}d"] = math.log1p(max(0.0, amount))
    features["touches_30d"] = state.touches.values_at(t_ms)[WINDOW_DAYS.index(30)]
    features["complaints"] = float(state.complaints)
    features["complaints_90d"] = state.complaints_recent.values_at(t_ms)[WINDOW_DAYS.index(90)]
    features["rating_mean"] = state.ratings_sum / state.ratings_count if state.ratings_count else 0.0
    features["ratings_count"] = float(state.ratings_count)
    touches = sum(state.channel_counts.values())
    features["channels_used"] = float(len(state.channel_counts))
    for channel in (*CHANNELS, "other"):
        features[f"channel_share_{channel}"] = state.channel_counts.get(channel, 0) / touches if touches else 0.0
    features["log_days_since_last_touch"] = math.log1p(features["days_since_last_touch"])
    features["log_avg_order_value"] = math.log1p(max(0.0, features["avg_order_value"]))
    features["log_mean_interpurchase_days"] = math.log1p(mean_gap)
    features["log_overdue_ratio"] = math.log1p(features["overdue_ratio"])
    # Long silence means more from a frequent buyer than from a one-off (BG/NBD's P(alive)).
    features["recency_x_frequency"] = features["log_recency_days"] * features["log_purchase_count"]
    features["log_complaints"] = math.log1p(state.complaints)
    features["log_ratings_count"] = math.log1p(state.ratings_count)
    return features


def _days(ms: int) -> float:
    # Out-of-order events can sit before the latest state; never report negative ages.
    return max(0, ms) / DAY_MS
