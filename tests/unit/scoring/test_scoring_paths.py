"""Silent paths: the vectorised model inputs agree with features_at, whatever the state."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scoring.features import MODEL_FEATURES, features_at, path_model_inputs, silent_path
from services.scoring.state import CHANNELS, CustomerState, Touchpoint, apply_touchpoint
from touchstream.eventtime import DAY_MS

touchpoints = st.builds(
    lambda n, day, amount, complaint, rating, channel: Touchpoint(
        f"m{n}", int(day * DAY_MS), 0, order_amount=amount, is_complaint=complaint, rating=rating, channel=channel
    ),
    n=st.integers(0, 10_000),
    day=st.floats(0, 400, allow_nan=False),
    amount=st.one_of(st.none(), st.floats(0, 500, allow_nan=False)),
    complaint=st.booleans(),
    rating=st.one_of(st.none(), st.integers(1, 5)),
    channel=st.sampled_from((*CHANNELS, "fax")),
)


@settings(max_examples=200, deadline=None)
@given(events=st.lists(touchpoints, max_size=12), ahead_days=st.lists(st.floats(-30, 900), min_size=1, max_size=5))
def test_path_inputs_equal_features_at_for_any_state_and_time(events: list[Touchpoint],
                                                              ahead_days: list[float]) -> None:
    state = CustomerState()
    for touch in events:
        apply_touchpoint(state, touch)
    base = state.last_touch_ms or 0
    times = [base + int(days * DAY_MS) for days in ahead_days]
    inputs, _ = path_model_inputs(np.repeat(silent_path(state)[None, :], len(times), axis=0), np.array(times))
    for row, t in zip(inputs, times, strict=True):
        expected = features_at(state, t)
        for name, value in zip(MODEL_FEATURES, row, strict=True):
            assert math.isclose(value, expected[name], rel_tol=1e-9, abs_tol=1e-9), (name, value, expected[name])


def test_btyd_summary_counts_repeats_and_ages_from_the_first_purchase() -> None:
    state = CustomerState()
    apply_touchpoint(state, Touchpoint("visit", 0, 0))
    prospect_inputs = path_model_inputs(silent_path(state)[None, :], np.array([5.0 * DAY_MS]))[1]
    assert (prospect_inputs.repeats[0], prospect_inputs.age[0]) == (0.0, 5.0)
    for n, day in enumerate((10, 17, 40)):
        apply_touchpoint(state, Touchpoint(f"p{n}", day * DAY_MS, 0, order_amount=5.0))
    btyd = path_model_inputs(silent_path(state)[None, :], np.array([100.0 * DAY_MS]))[1]
    assert (btyd.repeats[0], btyd.last_purchase_age[0], btyd.age[0]) == (2.0, 30.0, 90.0)
