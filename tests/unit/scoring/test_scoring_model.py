"""The online model: the prior, mini-batches, the learning rate it picks, calibration, reasons, checkpoints."""

from __future__ import annotations

import numpy as np

from services.scoring.btyd import BtydInputs
from services.scoring.features import MODEL_FEATURES
from services.scoring.model import (
    MINI_BATCH,
    Learner,
    PlattScaling,
    PrequentialQuality,
    PropensityModel,
    SilenceCalibration,
)

RECENCY = MODEL_FEATURES.index("log_recency_days")
COMPLAINTS = MODEL_FEATURES.index("log_complaints")

KEY = b"unit-test-checkpoint-key"


def examples(count: int, seed: int = 0) -> tuple[np.ndarray, BtydInputs, np.ndarray]:
    """Recent customers buy within the step four times in five, long-silent ones one time in ten."""
    rng = np.random.default_rng(seed)
    recent = rng.random(count) < 0.5
    inputs = np.zeros((count, len(MODEL_FEATURES)))
    inputs[:, RECENCY] = np.where(recent, 1.5, 5.3) + rng.normal(0, 0.1, count)
    inputs[:, COMPLAINTS] = rng.integers(0, 3, count)
    btyd = BtydInputs(np.ones(count), np.full(count, 10.0), np.full(count, 40.0))
    bought = rng.random(count) < np.where(recent, 0.8, 0.1)
    return inputs, btyd, bought


def trained_model(count: int = 4000) -> PropensityModel:
    model = PropensityModel()
    model.learn_many(*examples(count))
    return model


def test_reason_codes_are_signed_toward_churn_risk() -> None:
    model = trained_model()
    customers = np.zeros((2, len(MODEL_FEATURES)))
    customers[0, RECENCY], customers[1, RECENCY] = 5.3, 1.5
    terms = model.input_terms(customers)
    # Long silence raises churn risk, a recent purchase lowers it.
    assert terms[0, RECENCY] > 0 > terms[1, RECENCY]


def test_an_untrained_model_gives_no_reasons() -> None:
    model = PropensityModel()
    inputs, btyd, _ = examples(3)
    assert not model.input_terms(inputs).any() and not model.prior_terms(btyd).any()


def test_learning_does_not_depend_on_where_the_stream_was_cut_into_batches() -> None:
    inputs, btyd, bought = examples(10 * MINI_BATCH + 7)
    whole, pieces = PropensityModel(), PropensityModel()
    whole.learn_many(inputs, btyd, bought)
    for start, end in ((0, 5), (5, 40), (40, 41), (41, 200), (200, len(bought))):
        part = BtydInputs(btyd.repeats[start:end], btyd.last_purchase_age[start:end], btyd.age[start:end])
        pieces.learn_many(inputs[start:end], part, bought[start:end])
    assert np.array_equal(whole.weights, pieces.weights) and np.array_equal(whole.prior.params, pieces.prior.params)
    assert whole.examples_learned == pieces.examples_learned == len(bought)


def test_the_learning_rate_that_predicts_is_the_one_with_the_lowest_recent_log_loss() -> None:
    model = trained_model(20_000)
    assert model.active == int(np.argmin(model.recent_log_loss))
    # A strong, simple signal is learned faster by the larger rates: the smallest one does not win.
    assert model.learning_rates[model.active] > min(model.learning_rates)
    inputs, btyd, _ = examples(2000, seed=1)
    hazards, recent = model.hazards(inputs, btyd), inputs[:, RECENCY] < 3
    assert abs(hazards[recent].mean() - 0.8) < 0.1 and abs(hazards[~recent].mean() - 0.1) < 0.1


def test_platt_scaling_corrects_a_model_that_is_off_by_a_constant() -> None:
    rng = np.random.default_rng(3)
    true_logits = rng.normal(-1.0, 1.5, 20_000)
    bought = rng.random(20_000) < 1 / (1 + np.exp(-true_logits))
    platt = PlattScaling(window=20_000)
    for start in range(0, 20_000, MINI_BATCH):  # as the model hands it its mini-batches
        end = start + MINI_BATCH
        platt.observe(true_logits[start:end] + 1.0, bought[start:end])  # the model says one logit too much
    assert abs(platt.slope - 1.0) < 0.05 and abs(platt.intercept + 1.0) < 0.1


def test_checkpoint_round_trip_keeps_predictions_and_quality() -> None:
    learner = Learner(trained_model())
    learner.quality.update(True, 0.8)
    restored = Learner.from_bytes(learner.to_bytes(KEY), KEY)
    inputs, btyd, _ = examples(5, seed=2)
    assert np.array_equal(restored.model.hazards(inputs, btyd), learner.model.hazards(inputs, btyd))
    assert restored.model.version == learner.model.version == "logreg-v3-n4000"
    assert restored.quality.examples == 1


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


def test_a_platt_scaling_pickled_before_the_online_step_goes_on_from_its_window() -> None:
    old = PlattScaling()
    rng = np.random.default_rng(5)
    logits = rng.normal(0.0, 1.0, 2000)
    # What an older checkpoint held: a refitted window and its refit counters, no curvature.
    state = {**old.__dict__, "slope": 0.9, "intercept": -0.2, "seen": 2000, "logits": logits,
             "labels": (rng.random(2000) < 0.3).astype(float), "since_fit": 7, "refit_every": 5000}
    del state["curvature"]
    restored = PlattScaling.__new__(PlattScaling)
    restored.__setstate__(state)
    assert (restored.slope, restored.intercept) == (0.9, -0.2)
    assert restored.curvature[1, 1] > 100 and not hasattr(restored, "since_fit")
    restored.observe(logits[:MINI_BATCH], np.zeros(MINI_BATCH))
    assert abs(restored.intercept + 0.2) < 0.2  # a step, not a jump


def test_the_silence_calibration_corrects_each_step_of_silence_on_its_own() -> None:
    # A model right one step after a purchase and twice too hopeful five steps into a silence.
    rng = np.random.default_rng(6)
    days = rng.choice([3.0, 75.0], 40_000)
    truth = np.where(days < 14, 0.3, 0.05)
    said = np.where(days < 14, 0.3, 0.10)
    bought = rng.random(40_000) < truth
    silence = SilenceCalibration(step_days=14.0)
    for start in range(0, 40_000, MINI_BATCH):
        end = start + MINI_BATCH
        logits = np.log(said[start:end] / (1 - said[start:end]))
        silence.observe(logits, days[start:end], bought[start:end])
    logit = np.log(np.array([0.3, 0.10, 0.10]) / np.array([0.7, 0.90, 0.90]))
    corrected = 1 / (1 + np.exp(-silence.apply(logit, np.array([3.0, 75.0, 400.0]))))
    assert abs(corrected[0] - 0.3) < 0.02
    assert abs(corrected[1] - 0.05) < 0.01
    # A silence longer than any learned takes the longest learned one's correction.
    assert corrected[2] == corrected[1]


def test_a_model_pickled_before_the_silence_calibration_loads_without_offsets() -> None:
    learner = Learner(trained_model())
    inputs, btyd, _ = examples(5, seed=2)
    del learner.model.silence
    restored = Learner.from_bytes(learner.to_bytes(KEY), KEY)
    assert restored.model.silence.longest == -1
    untouched = 1 / (1 + np.exp(-restored.model.calibration.apply(restored.model.raw_logits(inputs, btyd)[1])))
    assert np.allclose(restored.model.hazards(inputs, btyd), untouched)


def test_quality_accounts_a_batch_of_examples_as_one_by_one() -> None:
    """update_many counts ROC AUC's confusion matrices per batch; every figure must end as river's own updates."""
    from river import metrics as river_metrics

    from services.scoring.model import PrequentialQuality

    rng = np.random.default_rng(3)
    propensity = rng.beta(1, 6, 3000)
    purchased = rng.uniform(0, 1, 3000) < propensity
    batched, reference = PrequentialQuality(), river_metrics.ROCAUC(n_thresholds=50)
    one_by_one = PrequentialQuality()
    alarms = 0
    for start in range(0, 3000, 700):
        alarms += batched.update_many(purchased[start : start + 700], propensity[start : start + 700])
    for y, p in zip(purchased.tolist(), propensity.tolist(), strict=True):
        reference.update(y, {True: p, False: 1.0 - p})
        one_by_one.update(y, p)
    assert batched.roc_auc.get() == reference.get() == one_by_one.roc_auc.get()
    assert [dict(m.data[True]) | {"n": m.n_samples} for m in batched.roc_auc.cms] == [
        dict(m.data[True]) | {"n": m.n_samples} for m in reference.cms]
    assert batched.log_loss.get() == one_by_one.log_loss.get()
    assert batched.brier.get() == one_by_one.brier.get()
    assert batched.calibration.get() == one_by_one.calibration.get()
    assert batched.examples == one_by_one.examples == 3000
    assert alarms == 0
