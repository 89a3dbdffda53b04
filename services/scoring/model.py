"""The online model, its live quality, and what a checkpoint holds.

The model answers "will this customer buy within the next step" (`step_days`, 14 by
default), a discrete-time hazard: a longer horizon is the chain of steps of a customer who
stays silent (engine.py), and every example's label matures one step after it was made,
so even a stream of a few weeks has labels to learn from.

P(buy in the step) = sigmoid(Platt(logit(BTYD prior) + w . scaled inputs + b) + silence offset):
- the prior (btyd.py: BG/NBD or MBG/NBD) carries frequency, recency and age in the
  customer's own time and the heterogeneity across customers; it is learned online on the
  same matured labels;
- a logistic regression learns what the prior misses from MODEL_FEATURES. Its inputs are
  clipped to the range seen in learning, so a forecast far beyond the observed ages (a long
  horizon chained from a young stream) moves only through the prior, whose shape is known;
- neither the prior's structure nor the learning rate is a setting tuned on one data set:
  every pair of a structure and one of LEARNING_RATES is learned side by side, each is
  scored on every mini-batch before it learns it (test-then-train), and the one with the
  lowest recent log-loss predicts;
- a Platt scaling learned online (a Newton step per mini-batch, forgetting old examples) on
  those prequential scores keeps the probability honest as the population drifts, and a
  log-odds offset per step of silence (SilenceCalibration) corrects it where it is off at
  some silence, which every horizon chained through that silence inherits.
Learning takes mini-batches of MINI_BATCH examples in the order they come, with a remainder
carried over, so the model does not depend on where the stream's batches happened to end.
Reason codes are each input's term in the churn log-odds, the prior's against its average.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from river import drift, metrics, stats

from services.scoring.btyd import STRUCTURES, BtydInputs, BtydPrior, BtydWindow, fit_priors
from services.scoring.checkpoint import signed_checkpoint, verified_payload
from services.scoring.features import MODEL_FEATURES
from services.scoring.model_defaults import LEARNING_RATES
from services.scoring.segments import RfmQuantiles
from services.scoring.value import SpendLearner

ModelKind = Literal["logreg"]
MODEL_FAMILIES = {"logreg": "logreg-v3"}
MINI_BATCH = 32
# How far back the candidates' log-loss is remembered (examples for half the weight).
SELECTION_HALF_LIFE = 20_000
# Platt scaling: an online Newton step per mini-batch, remembering about CALIBRATION_WINDOW examples;
# the ridge (in examples' worth of curvature) damps the first steps.
CALIBRATION_WINDOW = 50_000
CALIBRATION_RIDGE = 1.0
# Silence calibration: one offset per step of silence up to a year of 14-day steps; longer silences share the last.
SILENCE_STEPS = 26
_SINCE_TOUCH = MODEL_FEATURES.index("log_days_since_last_touch")
# The reason code of the prior's term.
PRIOR_REASON = "repeat_buying_pattern"
_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))


def _log_loss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return -(y * np.log(p) + (1.0 - y) * np.log(1.0 - p))


@dataclass
class RunningScale:
    """Running mean, variance and range of each input; inputs are clipped to the range, then standardised.

    >>> scale = RunningScale(1)
    >>> scale.update(np.array([[1.0], [3.0]]))
    >>> scale.transform(np.array([[2.0], [9.0]])).ravel().tolist()
    [0.0, 1.0]
    """

    width: int
    count: float = 0.0
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    m2: np.ndarray = field(default_factory=lambda: np.zeros(0))
    low: np.ndarray = field(default_factory=lambda: np.zeros(0))
    high: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        if not self.mean.size:
            self.mean, self.m2 = np.zeros(self.width), np.zeros(self.width)
            self.low, self.high = np.full(self.width, np.inf), np.full(self.width, -np.inf)

    def update(self, rows: np.ndarray) -> None:
        # Chan et al.'s merge of the batch's moments into the running ones.
        n = float(len(rows))
        if not n:
            return
        batch_mean = rows.mean(axis=0)
        batch_m2 = ((rows - batch_mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + batch_m2 + delta**2 * self.count * n / total
        self.count = total
        self.low, self.high = np.minimum(self.low, rows.min(axis=0)), np.maximum(self.high, rows.max(axis=0))

    def transform(self, rows: np.ndarray) -> np.ndarray:
        if not self.count:
            return np.zeros_like(rows)
        std = np.sqrt(self.m2 / self.count)
        # An input that never varied says nothing yet: it scales to 0.
        inverse = np.divide(1.0, std, out=np.zeros_like(std), where=std > 0)
        return (np.clip(rows, self.low, self.high) - self.mean) * inverse


@dataclass
class PlattScaling:
    """P = sigmoid(slope * logit + intercept), learned by an online Newton step on each mini-batch of (logit, label).

    The curvature of the log-loss is accumulated with a forgetting factor (memory about
    `window` examples), so each mini-batch costs a 2x2 solve, never a refit over a stored
    window, and old examples fade as the population drifts. A ridge towards the identity
    damps the steps while little is known and keeps a stretch of nearly one class from
    running off.

    >>> platt = PlattScaling(window=1_000)
    >>> logits = np.linspace(-2, 2, 32)
    >>> for _ in range(50):
    ...     platt.observe(logits, logits > 0)
    >>> platt.slope > 1.0  # separable labels: the fitted slope only grows
    True
    """

    window: int = CALIBRATION_WINDOW
    slope: float = 1.0
    intercept: float = 0.0
    # The decayed sum of the examples' curvature (the log-loss Hessian in slope, intercept).
    curvature: np.ndarray = field(default_factory=lambda: np.zeros((2, 2)))
    seen: int = 0

    def observe(self, logits: np.ndarray, labels: np.ndarray) -> None:
        x = np.column_stack([logits, np.ones(len(logits))])
        params = np.array([self.slope, self.intercept])
        p = _sigmoid(x @ params)
        weight = p * (1.0 - p)
        forget = (1.0 - 1.0 / self.window) ** len(logits)
        self.curvature = forget * self.curvature + (x * weight[:, None]).T @ x
        gradient = x.T @ (p - np.asarray(labels, dtype=np.float64))
        params = params - np.linalg.solve(self.curvature + CALIBRATION_RIDGE * np.eye(2), gradient)
        self.slope, self.intercept = float(params[0]), float(params[1])
        self.seen += len(logits)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        return self.slope * logits + self.intercept

    def __setstate__(self, state: dict[str, object]) -> None:
        # A checkpoint from before the online step holds the window it refitted on: its
        # curvature at the fitted parameters is where the online step goes on from.
        logits, labels = state.pop("logits", None), state.pop("labels", None)
        for stale in ("refit_every", "since_fit"):
            state.pop(stale, None)
        self.__dict__.update(state)
        if "curvature" not in state:
            self.curvature = np.zeros((2, 2))
            if isinstance(logits, np.ndarray) and isinstance(labels, np.ndarray) and logits.size:
                kept = logits[: min(self.seen, len(logits))]
                x = np.column_stack([kept, np.ones(len(kept))])
                p = _sigmoid(x @ np.array([self.slope, self.intercept]))
                self.curvature = (x * (p * (1.0 - p))[:, None]).T @ x


@dataclass
class SilenceCalibration:
    """A log-odds offset per step of silence (whole steps since the customer's last touch), learned on matured labels.

    A horizon is a chain of silent steps, each at a longer silence than the one before; a
    hazard that is off at some silence is off in every chain that passes it. Platt scaling
    corrects the probability as a whole; this corrects it per silence, by an online Newton
    step per mini-batch on each step's examples (the curvature forgotten as Platt's, a ridge
    towards no offset). A silence longer than any learned takes the longest learned one's offset.

    >>> silence = SilenceCalibration(step_days=14.0)
    >>> days = np.repeat([1.0, 20.0], 32)
    >>> for _ in range(200):
    ...     silence.observe(np.zeros(64), days, np.tile([True, False], 32) & (days < 10))
    >>> [round(float(x), 1) for x in silence.apply(np.zeros(3), np.array([1.0, 20.0, 300.0]))]
    [0.0, -4.6, -4.6]
    """

    step_days: float
    steps: int = SILENCE_STEPS
    window: int = CALIBRATION_WINDOW
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(SILENCE_STEPS + 1))
    curvature: np.ndarray = field(default_factory=lambda: np.zeros(SILENCE_STEPS + 1))
    longest: int = -1

    def _steps(self, days_since_touch: np.ndarray) -> np.ndarray:
        steps = np.floor(np.maximum(days_since_touch, 0.0) / self.step_days).astype(np.int64)
        return np.minimum(steps, self.steps)

    def observe(self, logits: np.ndarray, days_since_touch: np.ndarray, labels: np.ndarray) -> None:
        steps = self._steps(days_since_touch)
        p = _sigmoid(logits + self.offsets[steps])
        size = self.steps + 1
        forget = (1.0 - 1.0 / self.window) ** len(logits)
        self.curvature = forget * self.curvature + np.bincount(steps, p * (1.0 - p), size)
        gradient = np.bincount(steps, p - np.asarray(labels, dtype=np.float64), size)
        self.offsets = self.offsets - gradient / (self.curvature + CALIBRATION_RIDGE)
        self.longest = max(self.longest, int(steps.max()))

    def apply(self, logits: np.ndarray, days_since_touch: np.ndarray) -> np.ndarray:
        if self.longest < 0:
            return logits
        return logits + self.offsets[np.minimum(self._steps(days_since_touch), self.longest)]


class PropensityModel:
    """Predict P(purchase within the next step) from model inputs and the BG/NBD summary; learn mini-batches.

    Candidates: every prior structure (btyd.STRUCTURES) with every learning rate.

    >>> model = PropensityModel()
    >>> model.version
    'logreg-v3-n0'
    >>> inputs = np.zeros((1, len(MODEL_FEATURES)))
    >>> btyd = BtydInputs(np.array([0.0]), np.array([0.0]), np.array([10.0]))
    >>> round(float(model.hazards(inputs, btyd)[0]), 3)  # the untrained BG/NBD prior alone
    0.259
    """

    def __init__(self, step_days: float = 14.0, kind: ModelKind = "logreg",
                 learning_rates: tuple[float, ...] = LEARNING_RATES) -> None:
        self.kind = kind
        self.family = MODEL_FAMILIES[kind]
        self.step_days = step_days
        width = len(MODEL_FEATURES)
        self.window = BtydWindow()
        self.priors = [BtydPrior(step_days, structure) for structure in STRUCTURES]
        # Candidate k learns with prior `candidate_prior[k]` and step size `learning_rates[k]`.
        self.candidate_prior = np.repeat(np.arange(len(self.priors)), len(learning_rates))
        self.learning_rates = np.tile(np.array(learning_rates, dtype=np.float64), len(self.priors))
        candidates = len(self.learning_rates)
        self.scale = RunningScale(width)
        self.weights = np.zeros((candidates, width))
        self.intercepts = np.zeros(candidates)
        self._moments = [np.zeros((candidates, width + 1)), np.zeros((candidates, width + 1))]
        self._steps = 0
        self.recent_log_loss = np.full(candidates, np.nan)
        self.active = int(np.argmin(np.abs(np.log(self.learning_rates) - math.log(0.01))))
        self.calibration = PlattScaling()
        self.silence = SilenceCalibration(step_days)
        # Each prior's logit over learned examples: the reference its reason code is measured from.
        self.prior_offset_total, self.prior_offset_count = np.zeros(len(self.priors)), 0
        # Examples waiting to fill the next mini-batch: inputs, BG/NBD summary columns, labels.
        self._waiting: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.examples_learned = 0

    @property
    def version(self) -> str:
        return f"{self.family}-n{self.examples_learned}"

    @property
    def prior(self) -> BtydPrior:
        """The prior of the candidate that predicts."""
        return self.priors[self.candidate_prior[self.active]]

    def raw_logits(self, inputs: np.ndarray, btyd: BtydInputs) -> tuple[np.ndarray, np.ndarray]:
        """Return (prior logit, active candidate's logit before calibration) per row."""
        offset = _logit(self.prior.p_any(btyd))
        scaled = self.scale.transform(inputs)
        return offset, offset + scaled @ self.weights[self.active] + self.intercepts[self.active]

    def hazards(self, inputs: np.ndarray, btyd: BtydInputs) -> np.ndarray:
        """Return calibrated P(at least one purchase within the next step) per row."""
        _, logits = self.raw_logits(inputs, btyd)
        return _sigmoid(self.silence.apply(self.calibration.apply(logits), np.expm1(inputs[:, _SINCE_TOUCH])))

    def learn_many(self, inputs: np.ndarray, btyd: BtydInputs, purchased: np.ndarray) -> None:
        """Learn matured examples in the given order."""
        if not len(inputs):
            return
        summary = np.column_stack([btyd.repeats, btyd.last_purchase_age, btyd.age])
        self._waiting.append((inputs, summary, purchased.astype(float)))
        self.examples_learned += len(inputs)
        waiting = sum(len(rows) for rows, _, _ in self._waiting)
        if waiting < MINI_BATCH:
            return
        rows = np.concatenate([r for r, _, _ in self._waiting])
        summaries = np.concatenate([s for _, s, _ in self._waiting])
        labels = np.concatenate([y for _, _, y in self._waiting])
        full = len(rows) - len(rows) % MINI_BATCH
        for start in range(0, full, MINI_BATCH):
            end = start + MINI_BATCH
            s = summaries[start:end]
            self._learn_batch(rows[start:end], BtydInputs(s[:, 0], s[:, 1], s[:, 2]), labels[start:end])
        self._waiting = [(rows[full:], summaries[full:], labels[full:])] if full < len(rows) else []

    def _offsets(self, btyd: BtydInputs) -> np.ndarray:
        """Return every prior's logit per row: (priors, rows)."""
        return np.stack([_logit(prior.p_any(btyd)) for prior in self.priors])

    def _learn_batch(self, inputs: np.ndarray, btyd: BtydInputs, y: np.ndarray) -> None:
        offsets = self._offsets(btyd)
        scaled = self.scale.transform(inputs)
        logits = offsets[self.candidate_prior].T + scaled @ self.weights.T + self.intercepts
        # Test, then train: each candidate is judged on examples it has not learned yet.
        losses = _log_loss(_sigmoid(logits), y[:, None]).mean(axis=0)
        decay = 0.5 ** (len(y) / SELECTION_HALF_LIFE)
        known = ~np.isnan(self.recent_log_loss)
        self.recent_log_loss = np.where(known, decay * self.recent_log_loss + (1 - decay) * losses, losses)
        self.calibration.observe(logits[:, self.active], y)
        self.silence.observe(self.calibration.apply(logits[:, self.active]), np.expm1(inputs[:, _SINCE_TOUCH]), y)
        self.active = int(np.argmin(self.recent_log_loss))
        self.prior_offset_total += offsets.sum(axis=1)
        self.prior_offset_count += len(y)
        if self.window.observe(btyd, y.astype(bool)):
            window_inputs, window_labels = self.window.examples()
            fit_priors(self.priors, window_inputs, window_labels)
            offsets = self._offsets(btyd)
        self.scale.update(inputs)
        scaled = self.scale.transform(inputs)
        p = _sigmoid(offsets[self.candidate_prior].T + scaled @ self.weights.T + self.intercepts)
        error = p - y[:, None]
        gradient = np.concatenate([(error.T @ scaled), error.sum(axis=0)[:, None]], axis=1) / len(y)
        self._steps += 1
        first, second = self._moments
        first *= 0.9
        first += 0.1 * gradient
        second *= 0.999
        second += 0.001 * gradient * gradient
        step = (first / (1 - 0.9**self._steps)) / (np.sqrt(second / (1 - 0.999**self._steps)) + 1e-8)
        step *= self.learning_rates[:, None]
        self.weights -= step[:, :-1]
        self.intercepts -= step[:, -1]

    def input_terms(self, inputs: np.ndarray) -> np.ndarray:
        """Return each input's signed term in the churn-risk log-odds, per row (reason codes)."""
        if not self.examples_learned:
            return np.zeros_like(inputs)
        # Churn log-odds = -propensity log-odds; positive means "raises churn risk".
        return -self.calibration.slope * self.weights[self.active] * self.scale.transform(inputs)

    def prior_terms(self, btyd: BtydInputs) -> np.ndarray:
        """Return the prior's term in the churn-risk log-odds against its average, per row."""
        if not self.examples_learned or not self.prior_offset_count:
            return np.zeros(len(btyd.age))
        offset = _logit(self.prior.p_any(btyd))
        mean = self.prior_offset_total[self.candidate_prior[self.active]] / self.prior_offset_count
        return -self.calibration.slope * (offset - mean)

    def describe(self) -> dict[str, object]:
        """Return what the model chose online: prior, learning rate, each candidate's recent log-loss, calibration."""
        structures = [self.priors[i].structure for i in self.candidate_prior]
        return {
            "learning_rate": float(self.learning_rates[self.active]),
            "prior": self.prior.describe(),
            "recent_log_loss": {f"{structure}@{lr}": round(float(v), 5) for structure, lr, v in
                                zip(structures, self.learning_rates, self.recent_log_loss, strict=True)},
            "priors": [prior.describe() for prior in self.priors],
            "platt": {"slope": round(self.calibration.slope, 4), "intercept": round(self.calibration.intercept, 4)},
        }


@dataclass
class CalibrationError:
    """Expected calibration error over equal-width probability bins (cumulative since start).

    >>> ece = CalibrationError(bins=2)
    >>> for p, y in [(0.2, False), (0.2, True), (0.9, True), (0.9, True)]:
    ...     ece.update(y, p)
    >>> round(ece.get(), 3)
    0.2
    """

    bins: int = 10
    counts: list[int] = field(default_factory=list)
    predicted: list[float] = field(default_factory=list)
    observed: list[float] = field(default_factory=list)

    def update(self, purchased: bool, propensity: float) -> None:
        if not self.counts:
            self.counts, self.predicted, self.observed = [0] * self.bins, [0.0] * self.bins, [0.0] * self.bins
        b = min(int(propensity * self.bins), self.bins - 1)
        self.counts[b] += 1
        self.predicted[b] += propensity
        self.observed[b] += float(purchased)

    def get(self) -> float:
        total = sum(self.counts)
        if not total:
            return 0.0
        gaps = (abs(p - o) for p, o in zip(self.predicted, self.observed, strict=True))
        return sum(gaps) / total


@dataclass
class PrequentialQuality:
    """Track ROC AUC, log-loss, calibration and drift of the scores emitted, as their labels mature."""

    roc_auc: metrics.ROCAUC = field(default_factory=lambda: metrics.ROCAUC(n_thresholds=50))
    log_loss: metrics.LogLoss = field(default_factory=metrics.LogLoss)
    brier: stats.Mean = field(default_factory=stats.Mean)
    calibration: CalibrationError = field(default_factory=CalibrationError)
    # ADWIN watches the per-example log-loss: a shift in its mean is a shift in how well
    # yesterday's model explains today's customers.
    detector: drift.ADWIN = field(default_factory=drift.ADWIN)
    examples: int = 0

    def update(self, purchased: bool, propensity: float) -> bool:
        """Account one matured example; return True when drift is detected."""
        return bool(self.update_many(np.array([purchased]), np.array([propensity])))

    def update_many(self, purchased: np.ndarray, propensity: np.ndarray) -> int:
        """Account matured examples in order, as `update` one by one would; return how many drift alarms rang.

        ROC AUC's 50 confusion matrices take each batch's counts at once (its sums are counts,
        exact in floating point, so the metric ends the same); the running means and the drift
        detector depend on the order and take the examples one by one.
        """
        labels, scores = purchased.astype(bool), propensity.astype(np.float64)
        alarms = 0
        for y, p in zip(labels.tolist(), scores.tolist(), strict=True):
            self.examples += 1
            self.log_loss.update(y, {True: p, False: 1.0 - p})
            self.brier.update((p - float(y)) ** 2)
            self.calibration.update(y, p)
            clipped = min(max(p, 1e-9), 1 - 1e-9)
            self.detector.update(-math.log(clipped if y else 1.0 - clipped))
            alarms += bool(self.detector.drift_detected)
        _count_into_roc_auc(self.roc_auc, labels, scores)
        return alarms


def _count_into_roc_auc(metric: metrics.ROCAUC, labels: np.ndarray, scores: np.ndarray) -> None:
    """Add examples to river's ROCAUC as its per-example `update` would (pos_val True, weight 1)."""
    positives = labels == metric.pos_val
    for threshold, matrix in zip(metric.thresholds, metric.cms, strict=True):
        above = scores > threshold
        for actual in (False, True):
            for predicted in (False, True):
                count = int(np.count_nonzero((positives == actual) & (above == predicted)))
                if count:
                    # One update of weight `count` adds what `count` updates of weight 1 add,
                    # except the sample count, which it moves by one.
                    matrix.update(actual, predicted, float(count))
                    matrix.n_samples += count - 1


@dataclass
class Learner:
    """Everything a worker learns online: model, its quality, RFM quantiles; what a checkpoint holds."""

    model: PropensityModel
    quality: PrequentialQuality = field(default_factory=PrequentialQuality)
    rfm_quantiles: RfmQuantiles = field(default_factory=RfmQuantiles)
    # Order values and the tiers of predicted value (value.py).
    spend: SpendLearner = field(default_factory=SpendLearner)
    # Share of orders that open a purchase day: the prior counts purchase days, value counts orders.
    purchase_day_share: stats.Mean = field(default_factory=stats.Mean)

    def orders_per_purchase_day(self) -> float:
        """Return the orders a purchase day holds on average (1 until an order was seen)."""
        share = self.purchase_day_share.get()
        return 1.0 / share if share > 0 else 1.0

    def to_bytes(self, key: bytes) -> bytes:
        """Return this learner as a checkpoint signed with `key`."""
        return signed_checkpoint(pickle.dumps(self), key)

    @staticmethod
    def from_bytes(data: bytes, key: bytes) -> Learner:
        """Restore a learner from a checkpoint; raise UntrustedCheckpoint, before unpickling, unless `key` signed it."""
        learner = pickle.loads(verified_payload(data, key))
        if not isinstance(learner, Learner):
            raise TypeError(f"checkpoint holds a {type(learner).__name__}, not a Learner")
        # A checkpoint pickled by an older version lacks attributes this one reads.
        if not hasattr(learner, "rfm_quantiles") or not hasattr(
            learner.model, "kind"
        ):
            raise IncompatibleCheckpoint("checkpoint was written by an older scoring version")
        if not hasattr(learner, "spend"):
            # Written before predicted value: the propensity model stands; the spend model starts empty.
            learner.spend = SpendLearner()
        if not hasattr(learner.model, "silence"):
            # Written before the silence calibration: it starts with no offset.
            learner.model.silence = SilenceCalibration(learner.model.step_days)
        if not hasattr(learner, "purchase_day_share"):
            learner.purchase_day_share = stats.Mean()
        return learner


class IncompatibleCheckpoint(TypeError):
    """The stored checkpoint cannot serve this version or these settings."""
