"""Core package: codec, settings, identifiers, dataset reader, receiver log."""

from __future__ import annotations

import itertools

import pytest
from pydantic import SecretStr, ValidationError

from touchstream import avro
from touchstream.datasets import cdnow_purchases, purchase_to_track_call
from touchstream.identifiers import Identifier, InvalidIdentifier, normalise, partition_key, pseudonymise
from touchstream.receiver import WebhookLog
from touchstream.settings import CoreSettings, Environment
from touchstream.topics import ALL_TOPICS

EVENT = {"message_id": "m1", "type": "track", "event": "Order Completed", "timestamp_ms": 1, "received_at_ms": 2,
         "identifiers": [{"type": "email", "value": "a@b.co"}], "order": {"amount": 3.5, "items": []}}


def test_every_topic_schema_round_trips() -> None:
    assert {t.schema for t in ALL_TOPICS} == set(avro.SCHEMA_IDS)
    encoded = avro.encode("TouchpointEvent", EVENT)
    assert encoded[0] == 0 and encoded[1:5] == (1).to_bytes(4, "big")
    decoded = avro.decode("TouchpointEvent", encoded)
    assert decoded["order"]["amount"] == 3.5 and decoded["channel"] == "web"


@pytest.mark.parametrize(("data", "reason"), [
    (b"\x00\x00", "shorter than the 5-byte"),
    (b"\x01\x00\x00\x00\x01xx", "magic byte is 1"),
    (b"\x00\x00\x00\x00\x04xx", "schema id 4 is not TouchpointEvent"),
    (b"\x00\x00\x00\x00\x01\x06", "invalid TouchpointEvent body"),
])
def test_decode_errors_say_why(data: bytes, reason: str) -> None:
    with pytest.raises(avro.DecodeError, match=reason):
        avro.decode("TouchpointEvent", data)


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(avro.DecodeError, match="trailing"):
        avro.decode("TouchpointEvent", avro.encode("TouchpointEvent", EVENT) + b"x")


def test_validation_names_the_field() -> None:
    problems = avro.validation_errors("TouchpointEvent", {**EVENT, "timestamp_ms": "soon"})
    assert any("timestamp_ms" in p for p in problems)


def test_placeholder_secret_refused_in_prod() -> None:
    with pytest.raises(ValidationError, match="PII_HASH_KEY"):
        CoreSettings(environment="prod")
    assert CoreSettings(environment="prod", pii_hash_key=SecretStr("real")).environment is Environment.PROD


@pytest.mark.parametrize("name", ["production", "Production", "staging", "", "prod-eu", "1"])
def test_an_unknown_environment_is_refused_naming_the_setting(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # "production" used to pass as "not prod" and switch every production check off.
    monkeypatch.setenv("TOUCHSTREAM_ENVIRONMENT", name)
    with pytest.raises(ValidationError, match="TOUCHSTREAM_ENVIRONMENT must be one of dev, test, prod"):
        CoreSettings()


@pytest.mark.parametrize("name", ["prod", "PROD", " Prod "])
def test_prod_in_any_case_turns_the_production_checks_on(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOUCHSTREAM_ENVIRONMENT", name)
    with pytest.raises(ValidationError, match="PII_HASH_KEY"):
        CoreSettings()
    monkeypatch.setenv("TOUCHSTREAM_PII_HASH_KEY", "a-real-secret")
    assert CoreSettings().environment is Environment.PROD


def test_identifier_normalisation_and_hashing() -> None:
    assert normalise(Identifier("EMAIL", " Ann@Example.ORG ")) == Identifier("email", "ann@example.org")
    assert normalise(Identifier("phone", "+44 20 7946 0958")).value == "+442079460958"
    with pytest.raises(InvalidIdentifier, match="blocklist"):
        normalise(Identifier("email", "test@test.com"))
    with pytest.raises(InvalidIdentifier):
        normalise(Identifier("phone", "12"))
    hashed = pseudonymise(Identifier("email", "ann@example.org"), b"key")
    assert hashed.value != "ann@example.org" and len(hashed.value) == 64
    assert hashed != pseudonymise(Identifier("email", "ann@example.org"), b"other-key")
    assert partition_key([Identifier("email", "e"), Identifier("user_id", "u")], "m") == "user_id:u"
    assert partition_key([], "m") == "m"


def test_cdnow_is_read_from_the_installed_package_in_event_time_order() -> None:
    purchases = cdnow_purchases()
    assert len(purchases) == 69_659
    assert len({p.customer for p in purchases}) == 23_570
    assert all(a.timestamp_ms <= b.timestamp_ms for a, b in itertools.pairwise(purchases))
    call = purchase_to_track_call(purchases[0])
    assert call["userId"] == "cdnow-00001" and call["order"]["amount"] == 11.77


def test_receiver_log_dedupes_on_webhook_id() -> None:
    log = WebhookLog()
    assert log.record("w1", {"received_at_ms": 1000}, 1250)
    assert not log.record("w1", {"received_at_ms": 1000}, 1300)
    assert log.record("w2", {}, 1300)
    stats = log.stats()
    assert stats["unique"] == 2 and stats["duplicates"] == 1 and stats["requests"] == 3
    assert stats["latency_p50_s"] == 0.25
