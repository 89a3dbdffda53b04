"""The online model, its live quality, and what a checkpoint holds.

Two model families, chosen by `ScoringSettings.model`:
- `logreg` (default): River StandardScaler | LogisticRegression (SGD). Reason codes are
  weight x scaled value, exact for a linear model.
- `forest`: River's adaptive random forest (ARFClassifier). Slower and less calibrated, but
  it finds interactions by itself. Reason codes are the change in churn log-odds when one
  feature is replaced by its running mean over customers who did buy (only for the
  REASON_CANDIDATES, to bound cost): "what stands between this customer and a typical buyer".
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from typing import Literal

from river import compose, drift, forest, linear_model, metrics, optim, preprocessing, stats

from services.scoring.checkpoint import signed_checkpoint, verified_payload
from services.scoring.features import model_inputs
from services.scoring.segments import RfmQuantiles

ModelKind = Literal["logreg", "forest"]
MODEL_FAMILIES = {"logreg": "logreg-v2", "forest": "arf-v1"}
# Features worth explaining with the forest's perturbation reasons (each costs one predict).
REASON_CANDIDATES = (
    "log_recency_days",
    "log_purchase_count",
    "log_monetary_total",
    "purchases_90d",
    "log_overdue_ratio",
    "log_complaints",
    "log_days_since_last_touch",
)
_EPS = 1e-6


def _logit(p: float) -> float:
    p = min(max(p, _EPS), 1 - _EPS)
    return math.log(p / (1 - p))


class PropensityModel:
    """Predict P(purchase within the horizon) from a feature dict; learn one example at a time.

    >>> model = PropensityModel()
    >>> model.predict_propensity({"recency_days": 3.0})
    0.5
    >>> model.version
    'logreg-v2-n0'
    """

    def __init__(self, learning_rate: float = 0.002, kind: ModelKind = "logreg", seed: int = 42) -> None:
        self.kind = kind
        self.scaler = preprocessing.StandardScaler()
        self.classifier = linear_model.LogisticRegression(optimizer=optim.SGD(learning_rate))
        self.forest = forest.ARFClassifier(n_models=10, seed=seed) if kind == "forest" else None
        self.pipeline = compose.Pipeline(self.scaler, self.classifier)
        # Running means of the inputs of positive examples: the forest's perturbation baseline.
        self.means: dict[str, stats.Mean] = {}
        self.examples_learned = 0

    @property
    def version(self) -> str:
        return f"{MODEL_FAMILIES[self.kind]}-n{self.examples_learned}"

    def predict_propensity(self, features: dict[str, float]) -> float:
        """Return P(purchase within the horizon); `features` may be all of them or the model inputs."""
        features = model_inputs(features)
        if self.forest is not None:
            if self.examples_learned == 0:
                return 0.5
            return float(self.forest.predict_proba_one(features).get(True, 0.0))
        return float(self.pipeline.predict_proba_one(features).get(True, 0.0))

    def learn(self, features: dict[str, float], purchased: bool) -> None:
        features = model_inputs(features)
        # learn_one in a fixed order rather than learn_many: a mini-batch step depends on
        # where batch boundaries fall, and a replay must end in the same model as live.
        if self.forest is not None:
            self.forest.learn_one(features, purchased)
            for name in REASON_CANDIDATES if purchased else ():
                if name in features:
                    self.means.setdefault(name, stats.Mean()).update(features[name])
        else:
            self.pipeline.learn_one(features, purchased)
        self.examples_learned += 1

    def churn_contributions(self, features: dict[str, float]) -> dict[str, float]:
        """Return each model input's signed contribution to the churn-risk log-odds."""
        features = model_inputs(features)
        if self.forest is not None:
            if self.examples_learned == 0:
                return {}
            base = _logit(self.predict_propensity(features))
            contributions = {}
            for name, mean in self.means.items():
                if name in features:
                    swapped = _logit(self.predict_propensity(features | {name: mean.get()}))
                    # Churn log-odds = -propensity log-odds; positive means "raises churn risk".
                    contributions[name] = swapped - base
            return contributions
        scaled = self.scaler.transform_one(features)
        weights = self.classifier.weights
        return {name: -weights.get(name, 0.0) * value for name, value in scaled.items()}

    def reason_codes(self, features: dict[str, float], count: int) -> list[tuple[str, float]]:
        """Return the `count` largest contributions to churn risk by size, signed, zeros left out."""
        contributions = self.churn_contributions(features)
        ranked = sorted(contributions.items(), key=lambda item: (-abs(item[1]), item[0]))
        return [(name, value) for name, value in ranked[:count] if value != 0.0]


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
        self.examples += 1
        self.roc_auc.update(purchased, {True: propensity, False: 1.0 - propensity})
        self.log_loss.update(purchased, {True: propensity, False: 1.0 - propensity})
        self.brier.update((propensity - float(purchased)) ** 2)
        self.calibration.update(purchased, propensity)
        clipped = min(max(propensity, 1e-9), 1 - 1e-9)
        self.detector.update(-math.log(clipped if purchased else 1.0 - clipped))
        return bool(self.detector.drift_detected)


@dataclass
class Learner:
    """Everything a worker learns online: model, its quality, RFM quantiles; what a checkpoint holds."""

    model: PropensityModel
    quality: PrequentialQuality = field(default_factory=PrequentialQuality)
    # Mean purchases in a label window among windows with at least one: turns
    # P(buy in window) into an expected purchase count.
    purchases_per_positive: stats.Mean = field(default_factory=stats.Mean)
    rfm_quantiles: RfmQuantiles = field(default_factory=RfmQuantiles)

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
        if not all(hasattr(learner, a) for a in ("purchases_per_positive", "rfm_quantiles")) or not hasattr(
            learner.model, "kind"
        ):
            raise IncompatibleCheckpoint("checkpoint was written by an older scoring version")
        return learner


class IncompatibleCheckpoint(TypeError):
    """The stored checkpoint cannot serve this version or these settings."""
