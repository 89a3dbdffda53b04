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

Between two events a customer's state does not change, so its model inputs at any later
time follow from a few numbers: `silent_path` packs them into one vector, and
`path_model_inputs` computes MODEL_FEATURES (and the BG/NBD summary, see btyd.py) for many
(path, time) pairs in one numpy computation. That is how a horizon is chained, a threshold
crossing is searched for, and a silent customer's examples are learned without loading
their state. `features_at` stays the reference: a test holds the two to the same values.
"""

from __future__ import annotations

import math

import numpy as np

from services.scoring.btyd import BtydInputs
from services.scoring.labels import DAY_MS
from services.scoring.state import CHANNELS, WINDOW_DAYS, CustomerState, DecayedWindows

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


# The window (days) of the decayed recent mean of the customer's message sentiment.
SENTIMENT_WINDOW_DAYS = 30


def sentiment_features(state: CustomerState) -> dict[str, float]:
    """Return the customer's voice for rules and people (none until a message had a sentiment).

    `sentiment_recent` is the mean of the messages' sentiments, each weighed exp(-age / 30 days)
    from the newest, so a fresh complaint outweighs last year's praise; `sentiment_last` is the
    newest message's. Not model inputs: the model learns from purchases, and text is too rare
    on most streams (none on CDNOW) to learn a weight from.

    >>> from services.scoring.state import Touchpoint, apply_touchpoint
    >>> state = CustomerState()
    >>> sentiment_features(state)
    {}
    >>> _ = apply_touchpoint(state, Touchpoint("m1", 0, 0, sentiment=0.6))
    >>> _ = apply_touchpoint(state, Touchpoint("m2", 30 * DAY_MS, 0, sentiment=-0.9))
    >>> {k: round(v, 3) for k, v in sentiment_features(state).items()}
    {'sentiment_recent': -0.497, 'sentiment_last': -0.9}
    """
    if state.sentiment_last is None:
        return {}
    window = WINDOW_DAYS.index(SENTIMENT_WINDOW_DAYS)
    count = state.sentiment_count.values[window]
    recent = state.sentiment_sum.values[window] / count if count > 0 else state.sentiment_last
    return {"sentiment_recent": recent, "sentiment_last": state.sentiment_last}


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


# The layout of a silent path vector. Times are epoch milliseconds (exact in a float64 up to
# year 287,000), NaN where the state has none.
PATH_FIELDS = (
    "recency_from_ms",
    "first_touch_ms",
    "last_touch_ms",
    "first_purchase_ms",
    "last_purchase_ms",
    "purchase_count",
    "repeat_purchase_days",
    "monetary_total",
    "mean_interpurchase_days",
    "complaints",
    "rating_mean",
    "ratings_count",
    "channels_used",
    *(f"channel_share_{c}" for c in (*CHANNELS, "other")),
    "purchases_at_ms",
    *(f"purchases_{w}d" for w in WINDOW_DAYS),
    "spend_at_ms",
    *(f"spend_{w}d" for w in WINDOW_DAYS),
    "touches_at_ms",
    "touches_30d",
    "complaints_at_ms",
    "complaints_90d",
)
_AT = {name: i for i, name in enumerate(PATH_FIELDS)}
_NAN = float("nan")


def silent_path(state: CustomerState) -> np.ndarray:
    """Return the vector `path_model_inputs` reads: `state` as it stays while the customer is silent."""
    count = state.purchase_count
    mean_gap = 0.0
    if count >= 2 and state.first_purchase_ms is not None and state.last_purchase_ms is not None:
        mean_gap = _days(state.last_purchase_ms - state.first_purchase_ms) / (count - 1)
    touches = sum(state.channel_counts.values())
    values: list[float] = [
        _ms(state.last_purchase_ms if state.last_purchase_ms is not None else state.first_touch_ms),
        _ms(state.first_touch_ms),
        _ms(state.last_touch_ms),
        _ms(state.first_purchase_ms),
        _ms(state.last_purchase_ms),
        float(count),
        float(repeat_purchase_days(state)),
        state.monetary_total,
        mean_gap,
        float(state.complaints),
        state.ratings_sum / state.ratings_count if state.ratings_count else 0.0,
        float(state.ratings_count),
        float(len(state.channel_counts)),
        *(state.channel_counts.get(c, 0) / touches if touches else 0.0 for c in (*CHANNELS, "other")),
        *_windows(state.purchases),
        *_windows(state.spend),
        *_windows(state.touches)[:1], state.touches.values[WINDOW_DAYS.index(30)],
        *_windows(state.complaints_recent)[:1], state.complaints_recent.values[WINDOW_DAYS.index(90)],
    ]
    return np.array(values, dtype=np.float64)


def repeat_purchase_days(state: CustomerState) -> int:
    """Return BG/NBD's x: the days with a purchase after the first one (several orders a day count once).

    >>> from services.scoring.state import Touchpoint, apply_touchpoint
    >>> state = CustomerState()
    >>> for n, hours in enumerate((0, 1, 30)):
    ...     _ = apply_touchpoint(state, Touchpoint(f"m{n}", hours * 3_600_000, 0, order_amount=5.0))
    >>> repeat_purchase_days(state)
    1
    """
    days = len({t // DAY_MS for t in state.purchase_times})
    # Purchases older than the kept times are counted as one day each.
    return max(0, days - 1 + state.purchase_count - len(state.purchase_times))


def _ms(t_ms: int | None) -> float:
    return _NAN if t_ms is None else float(t_ms)


def _windows(windows: DecayedWindows) -> list[float]:
    return [_ms(windows.at_ms), *windows.values]


def path_model_inputs(
    paths: np.ndarray, times_ms: np.ndarray, rows: np.ndarray | None = None
) -> tuple[np.ndarray, BtydInputs]:
    """Return MODEL_FEATURES (one row per time, in that order) and the BG/NBD summary at `times_ms`.

    `paths` is (m, len(PATH_FIELDS)). Row i is path `rows[i]` seen at `times_ms[i]` (without
    `rows`, path i). What does not change with time is computed once per path.

    >>> from services.scoring.state import Touchpoint, apply_touchpoint
    >>> state = CustomerState()
    >>> _ = apply_touchpoint(state, Touchpoint("m1", 0, 0, order_amount=10.0))
    >>> _ = apply_touchpoint(state, Touchpoint("m2", 10 * DAY_MS, 0, order_amount=30.0))
    >>> inputs, btyd = path_model_inputs(silent_path(state)[None, :], np.array([40.0 * DAY_MS]))
    >>> round(float(inputs[0, MODEL_FEATURES.index("log_overdue_ratio")]), 4), round(math.log1p(3.0), 4)
    (1.3863, 1.3863)
    >>> float(btyd.repeats[0]), float(btyd.last_purchase_age[0]), float(btyd.age[0])
    (1.0, 10.0, 40.0)
    """
    p = paths.T
    t = np.asarray(times_ms, dtype=np.float64)
    which = np.arange(len(paths)) if rows is None else rows

    def per_row(name: str) -> np.ndarray:
        return p[_AT[name]][which]

    def since(name: str) -> np.ndarray:
        # Out-of-order events can sit after `t`; never report negative ages (as features_at).
        return np.nan_to_num(np.maximum(0.0, t - per_row(name)) / DAY_MS, nan=0.0)

    def decayed(at: str, value: str, window_days: int) -> np.ndarray:
        age = np.maximum(0.0, t - per_row(at))
        return np.nan_to_num(per_row(value) * np.exp(-age / (window_days * DAY_MS)), nan=0.0)

    count, mean_gap = p[_AT["purchase_count"]], p[_AT["mean_interpurchase_days"]]
    log_count = np.log1p(count)
    safe_count = np.where(count > 0, count, 1.0)
    static = {
        "log_purchase_count": log_count,
        "log_monetary_total": np.log1p(np.maximum(0.0, p[_AT["monetary_total"]])),
        "log_avg_order_value": np.log1p(np.maximum(0.0, np.where(count > 0, p[_AT["monetary_total"]] / safe_count,
                                                                  0.0))),
        "log_mean_interpurchase_days": np.log1p(mean_gap),
        "log_complaints": np.log1p(p[_AT["complaints"]]),
        "rating_mean": p[_AT["rating_mean"]],
        "log_ratings_count": np.log1p(p[_AT["ratings_count"]]),
        "channels_used": p[_AT["channels_used"]],
        **{f"channel_share_{c}": p[_AT[f"channel_share_{c}"]] for c in (*CHANNELS, "other")},
    }
    recency, tenure = since("recency_from_ms"), since("first_touch_ms")
    log_recency = np.log1p(recency)
    gap = mean_gap[which]
    moving = {
        "log_recency_days": log_recency,
        "log_tenure_days": np.log1p(tenure),
        "log_days_since_last_touch": np.log1p(since("last_touch_ms")),
        "log_overdue_ratio": np.log1p(np.where(gap > 0, recency / np.where(gap > 0, gap, 1.0), 0.0)),
        "recency_x_frequency": log_recency * log_count[which],
        "repeat_rate_30d": np.maximum(0.0, count[which] - 1) / (tenure + 1.0) * 30.0,
        "touches_30d": decayed("touches_at_ms", "touches_30d", 30),
        "complaints_90d": decayed("complaints_at_ms", "complaints_90d", 90),
    }
    for w in WINDOW_DAYS:
        moving[f"purchases_{w}d"] = decayed("purchases_at_ms", f"purchases_{w}d", w)
        moving[f"log_spend_{w}d"] = np.log1p(np.maximum(0.0, decayed("spend_at_ms", f"spend_{w}d", w)))
    inputs = np.empty((len(t), len(MODEL_FEATURES)))
    inputs[:, _STATIC_COLUMNS] = np.column_stack([static[MODEL_FEATURES[i]] for i in _STATIC_COLUMNS])[which]
    for i in _MOVING_COLUMNS:
        inputs[:, i] = moving[MODEL_FEATURES[i]]
    bought = ~np.isnan(p[_AT["first_purchase_ms"]])
    repeats = p[_AT["repeat_purchase_days"]]
    # BG/NBD counts a customer's time from the first purchase; a prospect's from the first touch.
    born = np.where(bought, p[_AT["first_purchase_ms"]], p[_AT["first_touch_ms"]])
    last_age = np.where(bought & (repeats > 0), np.maximum(0.0, p[_AT["last_purchase_ms"]] - born), 0.0)
    btyd = BtydInputs(
        repeats=repeats[which],
        last_purchase_age=np.nan_to_num(last_age / DAY_MS, nan=0.0)[which],
        age=np.nan_to_num(np.maximum(0.0, t - born[which]) / DAY_MS, nan=0.0),
    )
    return inputs, btyd


# Model inputs that stay the same while a customer is silent, and those that move with time.
_STATIC_COLUMNS = [i for i, name in enumerate(MODEL_FEATURES) if name in {
    "log_purchase_count", "log_monetary_total", "log_avg_order_value", "log_mean_interpurchase_days",
    "log_complaints", "rating_mean", "log_ratings_count", "channels_used",
    *(f"channel_share_{c}" for c in (*CHANNELS, "other"))}]
_MOVING_COLUMNS = [i for i in range(len(MODEL_FEATURES)) if i not in _STATIC_COLUMNS]
