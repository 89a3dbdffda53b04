"""The scoring store's compact state encoding: every field comes back, older JSON states still read."""

from __future__ import annotations

import dataclasses
import math

import orjson

from services.scoring.features import silent_path
from services.scoring.labels import PendingExample
from services.scoring.state import CustomerState, Touchpoint, apply_touchpoint, state_to_dict
from services.scoring.store import STATE_POSITIONS, decode_state, encode_state


def _busy_state() -> CustomerState:
    state = CustomerState()
    apply_touchpoint(state, Touchpoint("m-1", 1_764_800_000_123, 0, order_amount=23.0))
    apply_touchpoint(state, Touchpoint("m-2", 1_764_900_000_000, 0, order_amount=7.5))
    state.pending = [
        PendingExample(1_764_800_000_123, 1_766_009_600_123, silent_path(state).tolist(), 0.2587, False, 0),
        PendingExample(1_764_900_000_000, 1_766_109_600_000, [1.0, math.nan, 3.0], math.nan, True, 2),
    ]
    state.consent = ["marketing"]
    state.time_zone = "Europe/Paris"
    return state


def _as_json(state: CustomerState) -> bytes:
    # NaN != NaN: compare the states as their JSON (NaN written as null), which is what they mean.
    return orjson.dumps(state_to_dict(state))


def test_every_field_round_trips_and_the_encoding_is_smaller_than_json() -> None:
    state = _busy_state()
    encoded = encode_state(state)
    assert _as_json(decode_state(encoded)) == _as_json(state)
    assert len(encoded) < 0.7 * len(_as_json(state))


def test_a_state_written_as_json_before_the_compact_encoding_still_reads() -> None:
    state = _busy_state()
    assert _as_json(decode_state(_as_json(state))) == _as_json(state)


def test_every_state_field_but_the_waiting_examples_has_a_position() -> None:
    names = {f.name for f in dataclasses.fields(CustomerState)} - {"pending"}
    assert set(STATE_POSITIONS) == names
    assert len(set(STATE_POSITIONS)) == len(STATE_POSITIONS)
