"""The online model: reason codes and checkpoints."""

from __future__ import annotations

import math

from services.scoring.model import Learner, PrequentialQuality, PropensityModel

KEY = b"unit-test-checkpoint-key"


def trained_model() -> PropensityModel:
    model = PropensityModel(learning_rate=0.1)
    for i in range(400):
        recent = i % 2 == 0
        model.learn({"log_recency_days": 1.5 if recent else 5.3, "log_complaints": float(i % 3)}, recent)
    return model


def test_reason_codes_are_signed_toward_churn_risk() -> None:
    model = trained_model()
    reasons = dict(model.reason_codes({"log_recency_days": 5.3, "log_complaints": 1.0}, 2))
    assert reasons["log_recency_days"] > 0
    assert dict(model.reason_codes({"log_recency_days": 1.5, "log_complaints": 1.0}, 2))["log_recency_days"] < 0


def test_an_untrained_model_gives_no_reasons() -> None:
    assert PropensityModel().reason_codes({"log_recency_days": 3.0}, 3) == []


def test_checkpoint_round_trip_keeps_predictions_and_quality() -> None:
    learner = Learner(trained_model())
    learner.quality.update(True, 0.8)
    restored = Learner.from_bytes(learner.to_bytes(KEY), KEY)
    features = {"log_recency_days": 3.4, "log_complaints": 0.0}
    assert restored.model.predict_propensity(features) == learner.model.predict_propensity(features)
    assert restored.model.version == learner.model.version == "logreg-v2-n400"
    assert restored.quality.examples == 1


def test_the_forest_option_learns_and_explains_by_perturbation() -> None:
    model = PropensityModel(kind="forest")
    assert model.version == "arf-v1-n0" and model.predict_propensity({"log_recency_days": 5.0}) == 0.5
    for i in range(600):
        recent = i % 2 == 0
        days = 5.0 + i % 7 if recent else 200.0 + i % 11
        model.learn({"log_recency_days": math.log1p(days), "log_complaints": float(i % 3)}, recent)
    assert model.predict_propensity({"log_recency_days": math.log1p(6), "log_complaints": 1.0}) > 0.8
    assert model.predict_propensity({"log_recency_days": math.log1p(205), "log_complaints": 1.0}) < 0.2
    reasons = dict(model.reason_codes({"log_recency_days": math.log1p(205), "log_complaints": 1.0}, 2))
    # Replacing a long recency by the average one lowers churn risk: recency is why it is high.
    assert reasons["log_recency_days"] > 0
    restored = Learner.from_bytes(Learner(model).to_bytes(KEY), KEY)
    assert restored.model.version == "arf-v1-n600"


def test_live_quality_tracks_brier_and_calibration_error() -> None:
    calibrated, overconfident = PrequentialQuality(), PrequentialQuality()
    for i in range(1000):
        bought = i % 10 < 3
        calibrated.update(bought, 0.3)
        overconfident.update(bought, 0.9)
    assert abs(calibrated.brier.get() - 0.21) < 1e-9
    assert calibrated.calibration.get() < 1e-9
    assert abs(overconfident.calibration.get() - 0.6) < 1e-9
    assert overconfident.brier.get() > calibrated.brier.get()
