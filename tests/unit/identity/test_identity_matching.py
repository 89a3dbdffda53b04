"""Probabilistic matching without Redis: attributes, blocking keys, Fellegi-Sunter scores, the household guard."""

from __future__ import annotations

import dataclasses
import json

import pytest

from services.identity.admin import hash_admin_key, is_admin
from services.identity.matching import (
    MatchSettings,
    PersonAttributes,
    best_match,
    blocking_keys,
    field_levels,
    match_score,
    person_attributes,
)
from services.identity.settings import IdentitySettings

THRESHOLD = MatchSettings().threshold
ANN = PersonAttributes("ann", "lee", "19900102", "12", "main street", "unit 4", "canberra", "2600", "act")


def test_attributes_come_from_traits_and_a_nested_address() -> None:
    person = person_attributes(json.dumps({"traits": {
        "first_name": " Ann", "last_name": "LEE", "dob": "1990/01/02",
        "address": {"street_number": 12, "line1": "Main  Street", "city": "Canberra", "postal_code": "2600"},
    }}))

    assert person == PersonAttributes("ann", "lee", "19900102", "12", "main street", "", "canberra", "2600", "")


@pytest.mark.parametrize("properties", [None, "", "not json", "[1, 2]", '{"traits": {"first_name": "ann"}}'])
def test_events_without_enough_attributes_are_not_matched(properties: str | None) -> None:
    assert person_attributes(properties) is None


def test_one_typo_anywhere_still_shares_a_blocking_key() -> None:
    typos = [dataclasses.replace(ANN, postcode="2606"), dataclasses.replace(ANN, date_of_birth="19900103"),
             dataclasses.replace(ANN, surname="lea", given_name="anne"),
             dataclasses.replace(ANN, given_name="lee", surname="ann")]

    assert all(set(blocking_keys(ANN)) & set(blocking_keys(typo)) for typo in typos)


def test_the_same_person_with_keying_errors_scores_above_the_threshold() -> None:
    keyed = PersonAttributes("lee", "ann", "19900201", "12", "unit 4", "main stret", "canbera", "2606", "act")

    levels = field_levels(ANN, keyed)

    assert levels["given_name"] == levels["surname"] == 2  # swapped names compared crosswise
    assert levels["date_of_birth"] == 1 and levels["postcode"] == 1
    assert match_score(ANN, keyed) >= THRESHOLD


def test_a_namesake_elsewhere_scores_below_the_threshold() -> None:
    namesake = PersonAttributes("ann", "lee", "19750911", "3", "high street", "", "sydney", "2000", "nsw")

    assert match_score(ANN, namesake) < THRESHOLD


def test_missing_fields_weigh_nothing() -> None:
    sparse = PersonAttributes(given_name="ann", surname="lee", date_of_birth="19900102")

    assert set(field_levels(ANN, sparse)) == {"given_name", "surname", "date_of_birth"}
    assert match_score(ANN, sparse) >= THRESHOLD


def test_the_household_guard_keeps_a_spouse_at_the_same_address_apart() -> None:
    spouse = dataclasses.replace(ANN, given_name="bob", date_of_birth="19870530")

    assert match_score(ANN, spouse) >= THRESHOLD  # the address alone outweighs both disagreements
    assert best_match(ANN, {"c_spouse": spouse}, THRESHOLD) is None
    assert best_match(ANN, {"c_spouse": spouse}, THRESHOLD, household_guard=False) == (
        "c_spouse", match_score(ANN, spouse))


def test_best_match_takes_the_highest_score() -> None:
    close = dataclasses.replace(ANN, suburb="canbera")
    exact = ANN

    assert best_match(ANN, {"c_close": close, "c_exact": exact}, THRESHOLD) == ("c_exact", match_score(ANN, ANN))


def test_matching_and_admin_keys_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOUCHSTREAM_IDENTITY_MATCHING", '{"enabled": true, "threshold": 15}')
    monkeypatch.setenv("TOUCHSTREAM_IDENTITY_ADMIN_KEYS", json.dumps([hash_admin_key("ops-key")]))
    monkeypatch.setenv("TOUCHSTREAM_IDENTITY_TYPE_LIMITS", '{"email": 2}')

    settings = IdentitySettings()

    assert settings.matching.enabled and settings.matching.threshold == 15
    assert is_admin("Bearer ops-key", settings.admin_keys) and not is_admin("Bearer dev-admin-key",
                                                                            settings.admin_keys)
    assert settings.graph_rules().limit_of("email") == 2 and settings.graph_rules().limit_of("phone") == 5
