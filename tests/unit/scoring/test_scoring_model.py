"""The online model: reason codes and checkpoints."""

from __future__ import annotations

from services.scoring.model import Learner, PropensityModel


def trained_model() -> PropensityModel:
    model = PropensityModel(learning_rate=0.1)
    for i in range(400):
        recent = i % 2 == 0
        model.learn({"recency_days": 5.0 if recent else 200.0, "complaints": float(i % 3)}, recent)
    return model


def test_reason_codes_are_signed_toward_churn_risk() -> None:
    model = trained_model()
    reasons = dict(model.reason_codes({"recency_days": 200.0, "complaints": 1.0}, 2))
    assert reasons["recency_days"] > 0
    assert dict(model.reason_codes({"recency_days": 5.0, "complaints": 1.0}, 2))["recency_days"] < 0


def test_an_untrained_model_gives_no_reasons() -> None:
    assert PropensityModel().reason_codes({"recency_days": 3.0}, 3) == []


def test_checkpoint_round_trip_keeps_predictions_and_quality() -> None:
    learner = Learner(trained_model())
    learner.quality.update(True, 0.8)
    restored = Learner.from_bytes(learner.to_bytes())
    features = {"recency_days": 30.0, "complaints": 0.0}
    assert restored.model.predict_propensity(features) == learner.model.predict_propensity(features)
    assert restored.model.version == learner.model.version == "logreg-v1-n400"
    assert restored.quality.examples == 1
