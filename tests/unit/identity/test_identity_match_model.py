"""The Fellegi-Sunter model fitted by EM, without Redis: recovery of known parameters, plausibility, persistence."""

from __future__ import annotations

import pytest

from services.identity.match_model import (
    MatchModel,
    ModelState,
    fit_match_model,
    implausible_fields,
    merge_pattern_counts,
    parse_pattern_key,
    pattern_chunk,
    pattern_key,
    refit_due,
    window_chunks,
)
from services.identity.matching import LEVEL_COUNTS, MISSING
from tests.identity_models import agreeing, disagreeing, sample_patterns, typical_model

TRUE = typical_model(0.3)
TRUE_M, TRUE_U = TRUE.m, TRUE.u


def test_em_recovers_the_parameters_that_generated_the_pairs() -> None:
    fitted = fit_match_model(sample_patterns(TRUE, 20_000, missing=0.05, seed=1))

    assert fitted.converged and fitted.pairs == 20_000
    assert fitted.prior == pytest.approx(0.3, abs=0.01)
    for f in range(len(LEVEL_COUNTS)):
        assert fitted.m[f] == pytest.approx(TRUE_M[f], abs=0.02)
        assert fitted.u[f] == pytest.approx(TRUE_U[f], abs=0.02)
    assert implausible_fields(fitted) == []


def test_the_match_class_is_the_agreeing_one_whatever_the_prior() -> None:
    # Mostly matches: EM's two classes are found either way round; "match" must be the agreeing one.
    mostly = typical_model(0.9)

    fitted = fit_match_model(sample_patterns(mostly, 5_000, missing=0.0, seed=2))

    assert fitted.prior == pytest.approx(0.9, abs=0.02)
    scorer = fitted.scorer()
    assert scorer.score(tuple(n - 1 for n in LEVEL_COUNTS))[1] > 0.99
    assert scorer.score(tuple(0 for _ in LEVEL_COUNTS))[1] < 0.01


def test_a_warm_start_converges_in_fewer_iterations() -> None:
    counts = sample_patterns(TRUE, 10_000, missing=0.05, seed=3)
    cold = fit_match_model(counts)

    warm = fit_match_model(merge_pattern_counts(counts, sample_patterns(TRUE, 1_000, 0.05, seed=4)), start=cold)

    assert warm.converged and warm.iterations < cold.iterations
    assert warm.prior == pytest.approx(cold.prior, abs=0.01)


def test_pairs_of_different_kinds_of_strangers_give_an_implausible_model() -> None:
    # Neighbours agree on the address fields only, namesakes on names and birth date only: no class
    # agrees on everything, which EM's "match" class of two people would have to.
    neighbours = MatchModel(1.0 - 1e-9, tuple(
        agreeing(n, 0.9) if f in (3, 4, 5, 6, 7, 8) else disagreeing(n, 0.9) for f, n in enumerate(LEVEL_COUNTS)),
        TRUE_U)
    namesakes = MatchModel(1.0 - 1e-9, tuple(
        agreeing(n, 0.9) if f in (0, 1, 2) else disagreeing(n, 0.9) for f, n in enumerate(LEVEL_COUNTS)), TRUE_U)
    strangers = merge_pattern_counts(sample_patterns(neighbours, 3_000, 0.05, seed=5),
                                     sample_patterns(namesakes, 3_000, 0.05, seed=6))

    fitted = fit_match_model(strangers)

    assert implausible_fields(fitted)


def test_the_state_survives_its_json_and_a_model_of_other_levels_does_not() -> None:
    fitted = fit_match_model(sample_patterns(TRUE, 2_000, 0.05, seed=7), fitted_at_records=1234)
    state = ModelState(fitted, 1234, 2000, ("surname",))

    assert ModelState.from_json(state.to_json()) == state
    assert ModelState.from_json(state.to_json().replace('"given_name"', '"first_name"')) == ModelState()


def test_refits_come_early_then_at_growing_intervals_then_at_least_every_n_records() -> None:
    fitted = fit_match_model(sample_patterns(TRUE, 500, 0.0, seed=8))
    due = [records for records in range(1, 400_000, 500)
           if refit_due(ModelState(fitted, tried_at_records=1_000), records, 10**6, 2.0, 50_000, 45)]

    assert due[0] == 2_001
    assert not refit_due(ModelState(fitted, tried_at_records=100_000), 149_999, 10**6, 2.0, 50_000, 45)
    assert refit_due(ModelState(fitted, tried_at_records=100_000), 150_000, 10**6, 2.0, 50_000, 45)


def test_pattern_keys_and_window_chunks() -> None:
    pattern = (3, 0, MISSING, 2, 1, MISSING, 3, 2, 1)

    assert parse_pattern_key(pattern_key(pattern)) == pattern
    assert pattern_chunk(199_999, 200_000) == 19 and window_chunks(199_999, 200_000) == list(range(20))
    assert window_chunks(1_000_000, 200_000)[0] == pattern_chunk(1_000_000, 200_000) - 20
