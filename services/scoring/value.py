"""Predicted customer value: expected purchases over a horizon times expected order value.

The spend model is Gamma-Gamma (Fader, Hardie & Lee 2005, "RFM and CLV"): a customer's order
values scatter around their own mean, and those means vary across customers as a gamma
distribution. Its three parameters (p, q, v) are the maximum-likelihood fit on customers'
(number of orders x, mean order value m) - order values are known when the order arrives, so
they are matured outcomes the moment they are seen. A customer's expected order value is
then their own mean shrunk toward the population's, the more the fewer orders they have:

    E[M | x, m] = (p (v + x m)) / (p x + q - 1)   -> population mean p v / (q - 1) at x = 0

Expected purchases come from the step model's horizon chain (`engine.horizon_forecasts`), so
predicted value = expected purchases x expected order value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from river import stats
from scipy import optimize, special

# Fewer customers with an order than this and the fit is not attempted: the population mean is used.
MIN_CUSTOMERS = 30
# q must stay above 1 for the population mean to exist.
_Q_FLOOR = 1.0 + 1e-3


@dataclass(frozen=True)
class SpendModel:
    """Gamma-Gamma parameters; `fitted` False means the plain population mean stands in."""

    p: float = 1.0
    q: float = 2.0
    v: float = 0.0
    fitted: bool = False
    population_mean: float = 0.0

    def expected_order_value(self, orders: np.ndarray, mean_value: np.ndarray) -> np.ndarray:
        """Return each customer's expected order value (population mean for a customer with none).

        >>> model = SpendModel(p=6.0, q=4.0, v=15.0, fitted=True, population_mean=30.0)
        >>> [round(float(x), 2) for x in model.expected_order_value(np.array([0, 1, 10]), np.array([0., 90., 90.]))]
        [30.0, 70.0, 87.14]
        """
        orders = np.asarray(orders, dtype=float)
        mean_value = np.asarray(mean_value, dtype=float)
        if not self.fitted:
            return np.full(orders.shape, self.population_mean)
        return self.p * (self.v + orders * np.nan_to_num(mean_value)) / (self.p * orders + self.q - 1.0)


def _negative_log_likelihood(log_params: np.ndarray, x: np.ndarray, m: np.ndarray) -> float:
    p, q, v = np.exp(log_params)
    px = p * x
    # Gamma-Gamma likelihood of a customer's mean order value given x orders (constant terms dropped).
    ll = (special.gammaln(px + q) - special.gammaln(px) - special.gammaln(q) + q * math.log(v)
          + (px - 1) * np.log(m) + px * np.log(x) - (px + q) * np.log(x * m + v))
    return float(-np.sum(ll))


def fit_spend_model(orders: np.ndarray, mean_value: np.ndarray, previous: SpendModel | None = None) -> SpendModel:
    """Fit Gamma-Gamma on customers with at least one order of positive value.

    >>> rng = np.random.default_rng(0)
    >>> nu = rng.gamma(4.0, 1 / 15.0, 3000)                      # q=4, v=15: customers' scale
    >>> x = rng.integers(1, 8, 3000)
    >>> m = np.array([rng.gamma(6.0 * n, 1 / (n * s)) for n, s in zip(x, nu)])  # p=6
    >>> model = fit_spend_model(x, m)
    >>> model.fitted, round(model.population_mean, 0)
    (True, 30.0)
    """
    orders = np.asarray(orders, dtype=float)
    mean_value = np.asarray(mean_value, dtype=float)
    keep = (orders >= 1) & (mean_value > 0) & np.isfinite(mean_value)
    x, m = orders[keep], mean_value[keep]
    population_mean = float(np.sum(x * m) / np.sum(x)) if len(x) else 0.0
    if len(x) < MIN_CUSTOMERS:
        return SpendModel(population_mean=population_mean)
    starts = [np.log([1.0, 2.0, max(population_mean, 1e-3)])]
    if previous is not None and previous.fitted:
        starts.append(np.log([previous.p, previous.q, previous.v]))
    best = None
    for start in starts:
        found = optimize.minimize(_negative_log_likelihood, start, args=(x, m), method="L-BFGS-B",
                                  bounds=[(-10, 10), (math.log(_Q_FLOOR), 10), (-10, 15)])
        if best is None or found.fun < best.fun:
            best = found
    assert best is not None
    p, q, v = (float(value) for value in np.exp(best.x))
    if not best.success and not np.isfinite(best.fun):
        return SpendModel(population_mean=population_mean)
    return SpendModel(p=p, q=q, v=v, fitted=True, population_mean=p * v / (q - 1.0))


def predicted_value(expected_purchases: np.ndarray, expected_order_value: np.ndarray) -> np.ndarray:
    """Return predicted value over the horizon: expected purchases x expected order value.

    >>> predicted_value(np.array([2.0, 0.5]), np.array([30.0, 40.0])).tolist()
    [60.0, 20.0]
    """
    return np.asarray(expected_purchases, dtype=float) * np.asarray(expected_order_value, dtype=float)


def value_tier(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Return each value's tier 1 (lowest) .. len(edges) + 1 (highest) given ascending quantile `edges`.

    >>> value_tier(np.array([1.0, 25.0, 300.0]), np.array([10.0, 50.0, 200.0, 400.0])).tolist()
    [1, 2, 4]
    """
    return np.searchsorted(np.asarray(edges, dtype=float), np.asarray(values, dtype=float), side="right") + 1


# The newest customers' (orders, mean order value) the spend model is fitted on, and how often.
SPEND_WINDOW = 50_000
SPEND_REFIT_EVERY = 5_000
# Value tiers: quartiles of the predicted values scored so far, as RFM cuts its scores.
VALUE_QUANTILES = (0.25, 0.5, 0.75)
VALUE_WARM_UP = 100


@dataclass
class SpendLearner:
    """The online spend model: a rolling window of buyers' order summaries, refitted as purchases arrive.

    A buyer enters the window at each purchase with its orders and mean order value as of then
    (no customer id: the checkpoint holds no identifier); the model is refitted every
    SPEND_REFIT_EVERY purchases from the previous parameters.

    >>> spend = SpendLearner()
    >>> for n in range(40):
    ...     spend.observe_purchase(1 + n % 3, 20.0 + n)
    >>> spend.model.fitted, round(spend.model.population_mean, 1)
    (False, 0.0)
    >>> spend.refit(); spend.model.fitted
    True
    """

    orders: list[float] = field(default_factory=list)
    mean_values: list[float] = field(default_factory=list)
    model: SpendModel = field(default_factory=SpendModel)
    since_fit: int = 0
    value_cuts: list[Any] = field(default_factory=lambda: [stats.Quantile(q) for q in VALUE_QUANTILES])
    values_seen: int = 0
    # Mean expected purchases of the points scored so far: the "typical customer" a value reason compares with.
    typical_purchases: stats.Mean = field(default_factory=stats.Mean)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A checkpoint from before value reasons has no typical purchases yet.
        state.setdefault("typical_purchases", stats.Mean())
        self.__dict__.update(state)

    def observe_purchase(self, orders: int, mean_value: float) -> None:
        self.orders.append(float(orders))
        self.mean_values.append(float(mean_value))
        if len(self.orders) > SPEND_WINDOW:
            del self.orders[: -SPEND_WINDOW], self.mean_values[: -SPEND_WINDOW]
        self.since_fit += 1
        if self.since_fit >= SPEND_REFIT_EVERY:
            self.refit()

    def refit(self) -> None:
        self.model = fit_spend_model(np.array(self.orders), np.array(self.mean_values), self.model)
        self.since_fit = 0

    def expected_order_value(self, orders: np.ndarray, mean_value: np.ndarray) -> np.ndarray:
        """Return expected order values; before the first fit, the window's order-weighted mean."""
        if not self.model.fitted and self.orders:
            x, m = np.array(self.orders), np.array(self.mean_values)
            return np.full(np.shape(orders), float(np.sum(x * m) / max(np.sum(x), 1.0)))
        return self.model.expected_order_value(orders, mean_value)

    def tiers(self, values: np.ndarray) -> np.ndarray:
        """Return value tiers 1-4 (quartiles of the values seen so far; 0 while fewer than VALUE_WARM_UP)."""
        if self.values_seen < VALUE_WARM_UP:
            tiers = np.zeros(len(values), dtype=int)
        else:
            tiers = value_tier(values, np.array(sorted(float(q.get() or 0.0) for q in self.value_cuts)))
        for value in values:
            for q in self.value_cuts:
                q.update(float(value))
        self.values_seen += len(values)
        return tiers


def value_reasons(expected_purchases: np.ndarray, order_value: np.ndarray, typical_purchases: float,
                  typical_order_value: float) -> tuple[np.ndarray, np.ndarray]:
    """Return why a predicted value is what it is: its two parts over the typical customer's (1.0 = typical).

    Predicted value over the typical one is the product of the two ratios; 0 where no typical is known yet.

    >>> purchases, order = value_reasons(np.array([3.0, 0.5]), np.array([20.0, 80.0]), 1.0, 40.0)
    >>> purchases.tolist(), order.tolist()
    ([3.0, 0.5], [0.5, 2.0])
    """
    def ratio(values: np.ndarray, typical: float) -> np.ndarray:
        values = np.asarray(values, dtype=float)
        return values / typical if typical > 0 else np.zeros_like(values)

    return ratio(expected_purchases, typical_purchases), ratio(order_value, typical_order_value)


def value_in_words(features: dict[str, float], horizon_days: float) -> str | None:
    """Say a ScoreUpdate's predicted value and its reason the way a person reads it (None without one).

    >>> print(value_in_words({"predicted_value": 120.5, "value_tier": 4.0, "expected_purchases_value_horizon": 2.1,
    ...                       "expected_order_value": 57.38, "value_purchases_vs_typical": 1.8,
    ...                       "value_order_value_vs_typical": 0.9}, 365))  # doctest: +NORMALIZE_WHITESPACE
    Worth 120.50 over the next 365 days (tier 4 of 4), mostly because they are expected to buy more often
    than the typical customer: 2.1 purchases (1.8x typical) of 57.38 (0.9x typical)
    """
    if "predicted_value" not in features:
        return None
    purchases = features.get("value_purchases_vs_typical", 0.0)
    order = features.get("value_order_value_vs_typical", 0.0)
    tier = int(features.get("value_tier", 0.0))
    said = f"Worth {features['predicted_value']:.2f} over the next {horizon_days:g} days"
    if tier:
        said += f" (tier {tier} of {len(VALUE_QUANTILES) + 1})"
    if purchases > 0 and order > 0:
        # The part farther from typical (in log terms) is what sets this customer apart.
        by_purchases = abs(math.log(purchases)) >= abs(math.log(order))
        size = purchases if by_purchases else order
        what = ("buy more often" if size > 1 else "buy less often") if by_purchases else (
            "spend more per order" if size > 1 else "spend less per order")
        said += f", mostly because they are expected to {what} than the typical customer"
    return (f"{said}: {features.get('expected_purchases_value_horizon', 0.0):.1f} purchases ({purchases:.1f}x typical)"
            f" of {features.get('expected_order_value', 0.0):.2f} ({order:.1f}x typical)")
