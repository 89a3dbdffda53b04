"""The online model (River: StandardScaler | LogisticRegression) and its live quality."""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field

from river import compose, drift, linear_model, metrics, optim, preprocessing

MODEL_FAMILY = "logreg-v1"


class PropensityModel:
    """Predict P(purchase within the horizon) from a feature dict; learn one example at a time.

    >>> model = PropensityModel()
    >>> model.predict_propensity({"recency_days": 3.0})
    0.5
    >>> model.version
    'logreg-v1-n0'
    """

    def __init__(self, learning_rate: float = 0.05) -> None:
        self.scaler = preprocessing.StandardScaler()
        self.classifier = linear_model.LogisticRegression(optimizer=optim.SGD(learning_rate))
        self.pipeline = compose.Pipeline(self.scaler, self.classifier)
        self.examples_learned = 0

    @property
    def version(self) -> str:
        return f"{MODEL_FAMILY}-n{self.examples_learned}"

    def predict_propensity(self, features: dict[str, float]) -> float:
        return float(self.pipeline.predict_proba_one(features).get(True, 0.0))

    def learn(self, features: dict[str, float], purchased: bool) -> None:
        # learn_one in a fixed order rather than learn_many: a mini-batch step depends on
        # where batch boundaries fall, and a replay must end in the same model as live.
        self.pipeline.learn_one(features, purchased)
        self.examples_learned += 1

    def churn_contributions(self, features: dict[str, float]) -> dict[str, float]:
        """Return each feature's signed contribution to the churn-risk log-odds (weight x scaled value)."""
        scaled = self.scaler.transform_one(features)
        weights = self.classifier.weights
        return {name: -weights.get(name, 0.0) * value for name, value in scaled.items()}

    def reason_codes(self, features: dict[str, float], count: int) -> list[tuple[str, float]]:
        """Return the `count` largest contributions to churn risk by size, signed, zeros left out."""
        contributions = self.churn_contributions(features)
        ranked = sorted(contributions.items(), key=lambda item: (-abs(item[1]), item[0]))
        return [(name, value) for name, value in ranked[:count] if value != 0.0]


@dataclass
class QualityReport:
    """Live quality after the latest matured examples."""

    roc_auc: float
    log_loss: float
    drift_alarms: int


@dataclass
class PrequentialQuality:
    """Track ROC AUC, log-loss and drift of the scores that were emitted, as their labels mature."""

    roc_auc: metrics.ROCAUC = field(default_factory=lambda: metrics.ROCAUC(n_thresholds=50))
    log_loss: metrics.LogLoss = field(default_factory=metrics.LogLoss)
    # ADWIN watches the per-example log-loss: a shift in its mean is a shift in how well
    # yesterday's model explains today's customers.
    detector: drift.ADWIN = field(default_factory=drift.ADWIN)
    examples: int = 0

    def update(self, purchased: bool, propensity: float) -> bool:
        """Account one matured example; return True when drift is detected."""
        self.examples += 1
        self.roc_auc.update(purchased, {True: propensity, False: 1.0 - propensity})
        self.log_loss.update(purchased, {True: propensity, False: 1.0 - propensity})
        clipped = min(max(propensity, 1e-9), 1 - 1e-9)
        self.detector.update(-math.log(clipped if purchased else 1.0 - clipped))
        return bool(self.detector.drift_detected)


@dataclass
class Learner:
    """The model with its quality tracker: what a checkpoint holds."""

    model: PropensityModel
    quality: PrequentialQuality = field(default_factory=PrequentialQuality)

    def to_bytes(self) -> bytes:
        return pickle.dumps(self)

    @staticmethod
    def from_bytes(data: bytes) -> Learner:
        # Checkpoints come only from this service's own Redis keys, never from users.
        learner = pickle.loads(data)
        if not isinstance(learner, Learner):
            raise TypeError(f"checkpoint holds a {type(learner).__name__}, not a Learner")
        return learner
