"""A "buy till you die" prior learned online from matured labels: BG/NBD and MBG/NBD.

BG/NBD (Fader, Hardie & Lee 2005) describes a customer in their own time: `x` repeat
purchases, the last at age `t_x`, now aged `T` (days since the first purchase). While alive
they buy at a Poisson rate drawn from Gamma(r, alpha) across customers; after each purchase
they drop out with a probability drawn from Beta(a, b). Two facts follow that an online
classifier on raw features does not know: rates differ across customers and a customer's
own history shrinks towards the population (`(r + x) / (alpha + T)`), and a long silence
means more from a frequent buyer than from a one-off one (P(alive)).

MBG/NBD (Batislam, Denizel & Filiztekin 2007) differs in one assumption: a customer may also
drop out right after the first purchase, where BG/NBD holds every one-off buyer alive for
certain. Which of the two a stream follows is an empirical question: model.py learns with
both and lets the stream's prequential log-loss decide.

Here the four parameters are not fitted on a calibration period but online: by maximum
likelihood of P(any purchase in the next `window_days`) over a rolling window of matured
examples only (`BtydWindow`), the same examples the model learns from. The prior's P(any
purchase in a window) is an offset of the hazard model in model.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize, special

# r, alpha (days), a, b before anything is learned: one purchase a month on average, half
# of the customers gone after each purchase. Weak enough that a few thousand examples move them.
INITIAL_PARAMS = (1.0, 30.0, 1.0, 1.0)
# The first fit waits for this many matured examples; until then the initial parameters hold.
MIN_FIT_EXAMPLES = 1_000
# Keeps exp() and the logit finite for extreme ages; far beyond anything a forecast needs.
_MAX_LOG = 50.0
_EPS = 1e-9
STRUCTURES = ("bg_nbd", "mbg_nbd")


@dataclass(frozen=True)
class BtydInputs:
    """A customer's BG/NBD summary as of one time, in days: repeats, age at the last purchase, age now."""

    repeats: np.ndarray
    last_purchase_age: np.ndarray
    age: np.ndarray


def p_any_purchase(params: np.ndarray, inputs: BtydInputs, window_days: float | np.ndarray,
                   structure: str = "bg_nbd") -> np.ndarray:
    """Return BG/NBD's (or MBG/NBD's) P(at least one purchase in the next `window_days`), per customer.

    `params` are log(r), log(alpha), log(a), log(b).

    >>> params = np.log([0.25, 30.0, 0.8, 2.4])
    >>> fresh = BtydInputs(np.array([0.0, 4.0]), np.array([0.0, 50.0]), np.array([10.0, 60.0]))
    >>> [round(float(p), 3) for p in p_any_purchase(params, fresh, 90.0)]
    [0.255, 0.761]
    >>> [round(float(p), 3) for p in p_any_purchase(params, fresh, 90.0, "mbg_nbd")]
    [0.188, 0.785]
    """
    p, _ = _p_any_and_gradient(params, inputs, window_days, structure, want_gradient=False)
    return p


def expected_purchases(params: np.ndarray, inputs: BtydInputs, window_days: float | np.ndarray,
                       structure: str = "bg_nbd") -> np.ndarray:
    """Return the expected number of purchases (purchase days) in the next `window_days`, per customer.

    The closed form of the conditional expectation given (x, t_x, T): BG/NBD in Fader, Hardie
    & Lee (2005, eq. 10), MBG/NBD in Batislam, Denizel & Filiztekin (2007). Unlike a sum of
    silent steps' probabilities, it counts that a customer who buys again goes on buying.
    `params` as in `p_any_purchase`; `a` is kept off 1, where the formula's 0/0 is removable.
    The examples agree with lifetimes' BetaGeoFitter and ModifiedBetaGeoFitter.

    >>> params = np.log([0.25, 30.0, 0.8, 2.4])
    >>> fresh = BtydInputs(np.array([0.0, 4.0]), np.array([0.0, 50.0]), np.array([10.0, 60.0]))
    >>> [round(float(n), 3) for n in expected_purchases(params, fresh, 90.0)]
    [0.44, 2.717]
    >>> [round(float(n), 3) for n in expected_purchases(params, fresh, 90.0, "mbg_nbd")]
    [0.34, 2.87]
    """
    r, alpha, a, b = np.exp(params)
    if abs(a - 1.0) < 1e-4:
        a = 1.0 + math.copysign(1e-4, a - 1.0)
    x, big_t = inputs.repeats, np.maximum(inputs.age, inputs.last_purchase_age)
    t = np.asarray(window_days, dtype=np.float64)
    # BG/NBD's hypergeometric carries b + x and a + b + x - 1; MBG/NBD's one more of each.
    shift = 1.0 if structure == "mbg_nbd" else 0.0
    log_ahead = (r + x) * (np.log(alpha + big_t) - np.log(alpha + big_t + t))
    hypergeometric = special.hyp2f1(r + x, b + x + shift, a + b + x - 1.0 + shift, t / (alpha + big_t + t))
    alive_if_never_gone = (a + b + x - 1.0 + shift) / (a - 1.0) * (1.0 - hypergeometric * np.exp(log_ahead))
    odds_gone, _, _ = _odds_gone(r, alpha, a, b, inputs, structure)
    expected = alive_if_never_gone / (1.0 + odds_gone)
    return np.where(np.isfinite(expected), np.maximum(expected, 0.0), 0.0)


def _odds_gone(r: float, alpha: float, a: float, b: float, inputs: BtydInputs,
               structure: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the odds that each customer dropped out after the last purchase, the drop-out
    Beta's second parameter after the repeats, and log((alpha + T) / (alpha + t_x))."""
    x, t_x = inputs.repeats, inputs.last_purchase_age
    big_t = np.maximum(inputs.age, t_x)
    # BG/NBD: a customer without a repeat purchase cannot be gone; MBG/NBD: they can.
    modified = structure == "mbg_nbd"
    dropouts = b + x if modified else b + np.maximum(x, 1.0) - 1.0
    can_be_gone = np.ones_like(x, dtype=bool) if modified else x > 0
    since_last = np.log(alpha + big_t) - np.log(alpha + t_x)
    log_odds_gone = np.log(a) - np.log(dropouts) + np.minimum((r + x) * since_last, _MAX_LOG)
    return np.where(can_be_gone, np.exp(np.minimum(log_odds_gone, _MAX_LOG)), 0.0), dropouts, since_last


def _p_any_and_gradient(
    params: np.ndarray, inputs: BtydInputs, window_days: float | np.ndarray, structure: str, want_gradient: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    r, alpha, a, b = np.exp(params)
    x, t_x, big_t = inputs.repeats, inputs.last_purchase_age, np.maximum(inputs.age, inputs.last_purchase_age)
    odds_gone, dropouts, since_last = _odds_gone(r, alpha, a, b, inputs, structure)
    alive = 1.0 / (1.0 + odds_gone)
    # P(no purchase in the window | alive): the Gamma-Poisson survival.
    ahead = np.log(alpha + big_t) - np.log(alpha + big_t + window_days)
    silent_if_alive = np.exp((r + x) * ahead)
    p = np.clip(alive * (1.0 - silent_if_alive), _EPS, 1.0 - _EPS)
    if not want_gradient:
        return p, None
    # d log p / d log(param) = -P(gone) * d log odds_gone - silent/(1 - silent) * d log silent_if_alive.
    gone = odds_gone / (1.0 + odds_gone)
    silent_ratio = silent_if_alive / np.maximum(1.0 - silent_if_alive, _EPS)
    d_odds = np.stack([
        r * since_last,
        (r + x) * alpha * (1.0 / (alpha + big_t) - 1.0 / (alpha + t_x)),
        np.ones_like(x),
        -b / dropouts,
    ])
    d_silent = np.stack([
        r * ahead,
        (r + x) * alpha * (1.0 / (alpha + big_t) - 1.0 / (alpha + big_t + window_days)),
        np.zeros_like(x),
        np.zeros_like(x),
    ])
    return p, -gone * d_odds - silent_ratio * d_silent


def log_loss_gradient(
    params: np.ndarray, inputs: BtydInputs, window_days: float, purchased: np.ndarray, structure: str = "bg_nbd"
) -> tuple[float, np.ndarray]:
    """Return the mean log-loss of P(any purchase in the window) against `purchased`, and its gradient.

    >>> params = np.log(INITIAL_PARAMS)
    >>> inputs = BtydInputs(np.array([1.0, 0.0]), np.array([5.0, 0.0]), np.array([20.0, 40.0]))
    >>> loss, gradient = log_loss_gradient(params, inputs, 14.0, np.array([True, False]))
    >>> round(loss, 4), gradient.shape
    (1.1185, (4,))
    """
    p, d_log_p = _p_any_and_gradient(params, inputs, window_days, structure, want_gradient=True)
    assert d_log_p is not None
    y = purchased.astype(float)
    loss = float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))
    # d loss / d log p = -(y - p) / (1 - p) per example.
    return loss, (d_log_p * (-(y - p) / (1.0 - p))).mean(axis=1)


def fit_priors(priors: Sequence[BtydPrior], inputs: BtydInputs, purchased: np.ndarray) -> None:
    """Refit every prior on the same window, each from two starts; the fits run side by side.

    Each minimisation is independent and deterministic, so running them on threads gives the
    same parameters as running them one after the other; the objective is numpy over the whole
    window (up to 50,000 rows), which leaves the GIL, so a refit stalls the batch that triggers
    it about half as long on two cores (scoring's longest pause in the demo). scipy's L-BFGS-B
    (C since scipy 1.15) keeps its whole state in the arrays each call passes, so calls on
    different threads share nothing.
    """
    if not 0 < purchased.sum() < len(purchased):
        return
    started = [(prior, prior._start_fits(inputs, purchased)) for prior in priors]
    for prior, fits in started:
        prior._keep_best(fits)


_FIT_POOL: ThreadPoolExecutor | None = None


def _fit_pool() -> ThreadPoolExecutor:
    """Return the threads refits run on (made on first use, one per core up to four: the fits of one refit)."""
    global _FIT_POOL
    if _FIT_POOL is None:
        _FIT_POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="btyd-fit")
    return _FIT_POOL


@dataclass
class BtydWindow:
    """The newest `size` matured examples' summaries (numbers only, no customer ids), and when to refit.

    A refit is due each time the window has doubled since the last one while it fills, then
    every `refit_every` examples.
    """

    size: int = 50_000
    refit_every: int = 20_000
    # Ring buffer: repeats, last purchase age, age, label.
    rows: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    seen: int = 0
    fitted_at: int = 0

    def observe(self, inputs: BtydInputs, purchased: np.ndarray) -> bool:
        """Add matured examples; return True when the priors should be refitted."""
        if not len(self.rows):
            self.rows = np.zeros((self.size, 4))
        positions = (self.seen + np.arange(len(purchased))) % self.size
        self.rows[positions] = np.column_stack([inputs.repeats, inputs.last_purchase_age, inputs.age, purchased])
        self.seen += len(purchased)
        due = self.fitted_at * 2 if self.fitted_at < self.refit_every else self.fitted_at + self.refit_every
        if self.seen < max(due, MIN_FIT_EXAMPLES):
            return False
        self.fitted_at = self.seen
        return True

    def examples(self) -> tuple[BtydInputs, np.ndarray]:
        rows = self.rows[: min(self.seen, self.size)]
        return BtydInputs(rows[:, 0], rows[:, 1], rows[:, 2]), rows[:, 3] > 0.5


@dataclass
class BtydPrior:
    """One structure's parameters, fitted by maximum likelihood on a window of matured window labels."""

    window_days: float
    structure: str = "bg_nbd"
    params: np.ndarray = field(default_factory=lambda: np.log(np.array(INITIAL_PARAMS)))

    def p_any(self, inputs: BtydInputs, window_days: float | np.ndarray | None = None) -> np.ndarray:
        return p_any_purchase(self.params, inputs, self.window_days if window_days is None else window_days,
                              self.structure)

    def expected(self, inputs: BtydInputs, window_days: float | np.ndarray) -> np.ndarray:
        return expected_purchases(self.params, inputs, window_days, self.structure)

    def fit(self, inputs: BtydInputs, purchased: np.ndarray) -> None:
        fit_priors([self], inputs, purchased)

    def _start_fits(self, inputs: BtydInputs, purchased: np.ndarray) -> list[Future[Any]]:
        # From where it was and from the neutral start: a small early window can leave the
        # parameters in a poor local optimum (e.g. no drop-out at all) that a warm start never leaves.
        return [_fit_pool().submit(optimize.minimize, log_loss_gradient, start,
                                   args=(inputs, self.window_days, purchased, self.structure),
                                   jac=True, method="L-BFGS-B", bounds=[(-10.0, 10.0)] * 4)
                for start in (self.params, np.log(np.array(INITIAL_PARAMS)))]

    def _keep_best(self, fits: list[Future[Any]]) -> None:
        results = [f.result() for f in fits]
        best = min((f for f in results if np.all(np.isfinite(f.x))), key=lambda f: f.fun, default=None)
        if best is not None:
            self.params = best.x

    def describe(self) -> dict[str, float | str]:
        """Return the structure and its parameters by name (alpha in days).

        >>> BtydPrior(14.0).describe()
        {'structure': 'bg_nbd', 'r': 1.0, 'alpha': 30.0, 'a': 1.0, 'b': 1.0}
        """
        values = {name: round(float(math.exp(v)), 6) for name, v in zip(("r", "alpha", "a", "b"), self.params,
                                                                          strict=True)}
        return {"structure": self.structure, **values}
