"""The MBG/NBD prior: the textbook formula, its gradient, and learning the parameters back from simulated customers."""

from __future__ import annotations

import numpy as np
import pandas as pd
from lifetimes import BetaGeoFitter, ModifiedBetaGeoFitter

from services.scoring.btyd import BtydInputs, BtydPrior, BtydWindow, log_loss_gradient, p_any_purchase

PARAMS = {"r": 0.25, "alpha": 30.0, "a": 0.8, "b": 2.4}
LOG_PARAMS = np.log(list(PARAMS.values()))


def some_customers() -> BtydInputs:
    rng = np.random.default_rng(0)
    repeats = rng.integers(0, 6, 200).astype(float)
    age = rng.uniform(1, 400, 200)
    return BtydInputs(repeats, np.where(repeats > 0, rng.uniform(0, 1, 200) * age, 0.0), age)


def test_p_any_purchase_is_lifetimes_bg_nbd_and_mbg_nbd() -> None:
    customers = some_customers()
    r, alpha = PARAMS["r"], PARAMS["alpha"]
    for fitter, structure in ((BetaGeoFitter(), "bg_nbd"), (ModifiedBetaGeoFitter(), "mbg_nbd")):
        fitter.params_ = pd.Series(PARAMS)
        alive = fitter.conditional_probability_alive(customers.repeats, customers.last_purchase_age, customers.age)
        # An alive customer cannot drop out before the next purchase.
        silent = ((alpha + customers.age) / (alpha + customers.age + 90)) ** (r + customers.repeats)
        expected = 1 - (1 - alive + alive * silent)
        got = p_any_purchase(LOG_PARAMS, customers, 90.0, structure)
        assert np.allclose(got, expected, rtol=1e-9, atol=1e-12), structure


def test_the_gradient_is_the_derivative_of_the_log_loss() -> None:
    customers = some_customers()
    bought = np.random.default_rng(1).random(200) < 0.2
    for structure in ("bg_nbd", "mbg_nbd"):
        _, gradient = log_loss_gradient(LOG_PARAMS, customers, 14.0, bought, structure)
        for i in range(4):
            step = np.zeros(4)
            step[i] = 1e-6
            numeric = (log_loss_gradient(LOG_PARAMS + step, customers, 14.0, bought, structure)[0]
                       - log_loss_gradient(LOG_PARAMS - step, customers, 14.0, bought, structure)[0]) / 2e-6
            assert abs(gradient[i] - numeric) < 1e-6, (structure, i)


def test_the_prior_learns_from_window_labels_what_simulated_customers_do() -> None:
    rng = np.random.default_rng(2)
    customers = some_customers()
    truth = p_any_purchase(LOG_PARAMS, customers, 14.0)
    prior, window = BtydPrior(14.0), BtydWindow(size=20_000, refit_every=10_000)
    before = np.abs(prior.p_any(customers) - truth).mean()
    for _ in range(400):
        batch = rng.integers(0, 200, 64)
        sample = BtydInputs(customers.repeats[batch], customers.last_purchase_age[batch], customers.age[batch])
        if window.observe(sample, rng.random(64) < truth[batch]):
            prior.fit(*window.examples())
    assert window.fitted_at == 16_384  # at 1,024 examples, doubling while below 10,000; next at 26,384
    after = np.abs(prior.p_any(customers) - truth).mean()
    assert after < before / 3


def test_priors_refitted_side_by_side_get_the_parameters_of_fits_one_after_the_other() -> None:
    """The refit's minimisations run on threads; each must end where it would alone, and the best start wins."""
    from scipy import optimize

    from services.scoring.btyd import INITIAL_PARAMS, STRUCTURES, fit_priors

    inputs = some_customers()
    rng = np.random.default_rng(1)
    purchased = rng.uniform(0, 1, len(inputs.age)) < p_any_purchase(LOG_PARAMS, inputs, 14.0)
    warm = np.log(np.array([0.5, 20.0, 2.0, 3.0]))
    expected = []
    for structure in STRUCTURES:
        fits = [optimize.minimize(log_loss_gradient, start, args=(inputs, 14.0, purchased, structure), jac=True,
                                  method="L-BFGS-B", bounds=[(-10.0, 10.0)] * 4)
                for start in (warm, np.log(np.array(INITIAL_PARAMS)))]
        expected.append(min(fits, key=lambda f: f.fun).x)
    priors = [BtydPrior(14.0, structure, warm.copy()) for structure in STRUCTURES]
    fit_priors(priors, inputs, purchased)
    for prior, params in zip(priors, expected, strict=True):
        assert np.array_equal(prior.params, params)
        assert not np.array_equal(prior.params, warm)
