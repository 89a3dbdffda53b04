"""Signed checkpoints: nothing is unpickled unless the configured key signed it."""

from __future__ import annotations

import pickle

import pytest

from services.scoring.checkpoint import FORMAT, TAG_BYTES, UntrustedCheckpoint, signed_checkpoint, verified_payload
from services.scoring.model import Learner, PropensityModel
from services.scoring.settings import DEV_CHECKPOINT_KEY, ScoringSettings
from touchstream.startup import ConfigurationError

KEY = b"unit-test-checkpoint-key"
unpickled: list[str] = []


def record_unpickling(what: str) -> None:
    unpickled.append(what)


class RunsCodeWhenUnpickled:
    """What an attacker who can write Redis would store: unpickling it calls a function of their choice."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return record_unpickling, ("attacker code ran",)


@pytest.fixture(autouse=True)
def _nothing_unpickled_yet() -> None:
    unpickled.clear()


def test_the_exploit_fixture_does_run_code_when_unpickled() -> None:
    pickle.loads(pickle.dumps(RunsCodeWhenUnpickled()))
    assert unpickled == ["attacker code ran"]


def test_a_signed_checkpoint_round_trips() -> None:
    learner = Learner(PropensityModel())
    checkpoint = learner.to_bytes(KEY)
    assert checkpoint.startswith(FORMAT)
    assert Learner.from_bytes(checkpoint, KEY).model.version == learner.model.version


@pytest.mark.parametrize(
    ("checkpoint", "reason"),
    [(pickle.dumps(RunsCodeWhenUnpickled()), "unsigned"),
     (FORMAT + pickle.dumps(RunsCodeWhenUnpickled()), "bad_signature"),
     (signed_checkpoint(pickle.dumps(RunsCodeWhenUnpickled()), b"someone else's key"), "bad_signature"),
     (signed_checkpoint(pickle.dumps(Learner(PropensityModel())), KEY)[: len(FORMAT) + TAG_BYTES]
      + pickle.dumps(RunsCodeWhenUnpickled()), "bad_signature"),
     (FORMAT[:-1], "unsigned"), (b"", "unsigned")],
)
def test_an_unsigned_or_tampered_checkpoint_is_refused_before_unpickling(checkpoint: bytes, reason: str) -> None:
    with pytest.raises(UntrustedCheckpoint) as refused:
        Learner.from_bytes(checkpoint, KEY)
    assert refused.value.reason == reason
    assert unpickled == []


def test_every_single_flipped_byte_is_noticed() -> None:
    checkpoint = bytearray(signed_checkpoint(b"a small payload", KEY))
    for position in range(len(FORMAT), len(checkpoint)):
        tampered = bytearray(checkpoint)
        tampered[position] ^= 0x01
        with pytest.raises(UntrustedCheckpoint, match="signature does not match"):
            verified_payload(bytes(tampered), KEY)


def test_the_key_is_a_setting_whose_placeholder_production_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ScoringSettings().checkpoint_key.get_secret_value() == DEV_CHECKPOINT_KEY
    ScoringSettings().refuse_placeholders(production=False)
    with pytest.raises(ConfigurationError, match="TOUCHSTREAM_SCORING_CHECKPOINT_KEY is the dev placeholder"):
        ScoringSettings().refuse_placeholders(production=True)
    monkeypatch.setenv("TOUCHSTREAM_SCORING_CHECKPOINT_KEY", "a-real-secret-from-the-vault")
    settings = ScoringSettings()
    settings.refuse_placeholders(production=True)
    assert "a-real-secret" not in repr(settings)
    monkeypatch.setenv("TOUCHSTREAM_SCORING_CHECKPOINT_KEY", "short")
    with pytest.raises(ValueError, match="at least 16 characters") as refused:
        ScoringSettings()
    assert "short" not in str(refused.value)
