"""The spend model (Gamma-Gamma) and predicted value: pure, on synthetic customers whose truth is known."""

from __future__ import annotations

import numpy as np

from services.scoring.value import MIN_CUSTOMERS, SpendModel, fit_spend_model, predicted_value, value_tier


def synthetic_customers(n: int, p: float = 6.0, q: float = 4.0, v: float = 15.0,
                        seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Draw customers as Gamma-Gamma says they spend: orders 1-7, mean order value around their own scale."""
    rng = np.random.default_rng(seed)
    scale = rng.gamma(q, 1 / v, n)
    orders = rng.integers(1, 8, n)
    mean_value = np.array([rng.gamma(p * x, 1 / (x * s)) for x, s in zip(orders, scale, strict=True)])
    return orders, mean_value


def test_the_fit_recovers_the_population_mean_order_value() -> None:
    orders, mean_value = synthetic_customers(4000)
    model = fit_spend_model(orders, mean_value)
    # p v / (q - 1) = 6 * 15 / 3 = 30.
    assert model.fitted and abs(model.population_mean - 30.0) < 2.0


def test_a_customer_with_few_orders_is_shrunk_toward_the_population_more_than_one_with_many() -> None:
    orders, mean_value = synthetic_customers(4000)
    model = fit_spend_model(orders, mean_value)
    own = np.array([120.0, 120.0, 120.0])
    expected = model.expected_order_value(np.array([1, 5, 50]), own)
    assert model.population_mean < expected[0] < expected[1] < expected[2] < own[0]
    # A customer with no order is expected to spend what the population does.
    assert np.isclose(model.expected_order_value(np.array([0]), np.array([0.0]))[0], model.population_mean)


def test_too_few_customers_fall_back_to_the_order_weighted_mean() -> None:
    model = fit_spend_model(np.array([1, 3] * (MIN_CUSTOMERS // 4)), np.array([10.0, 30.0] * (MIN_CUSTOMERS // 4)))
    assert not model.fitted and model.population_mean == 25.0
    assert model.expected_order_value(np.array([1, 9]), np.array([500.0, 1.0])).tolist() == [25.0, 25.0]


def test_refunds_and_customers_without_orders_do_not_enter_the_fit() -> None:
    orders, mean_value = synthetic_customers(1000)
    with_noise = fit_spend_model(np.concatenate([orders, [0, 2, 3]]), np.concatenate([mean_value, [0.0, -5.0, np.nan]]))
    assert with_noise == fit_spend_model(orders, mean_value)


def test_predicted_value_and_its_tiers() -> None:
    value = predicted_value(np.array([0.0, 1.5, 4.0]), np.array([30.0, 40.0, 50.0]))
    assert value.tolist() == [0.0, 60.0, 200.0]
    assert value_tier(value, np.array([10.0, 100.0])).tolist() == [1, 2, 3]
    assert SpendModel().expected_order_value(np.array([3]), np.array([9.0])).tolist() == [0.0]
