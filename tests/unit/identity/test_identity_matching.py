"""Probabilistic matching without Redis: attributes, blocking keys, comparison patterns, the household guard."""

from __future__ import annotations

import itertools
import json

import pytest

from services.identity.admin import hash_admin_key, is_admin
from services.identity.matching import (
    COMPARED_FIELDS,
    FREE_PARAMETERS,
    LEVEL_COUNTS,
    MISSING,
    PersonAttributes,
    blocking_keys,
    compare_people,
    is_household_pattern,
    person_attributes,
)
from services.identity.settings import IdentitySettings

ANN = PersonAttributes("ann", "lee", "19900102", "12", "main street", "unit 4", "canberra", "2600", "act")
EXACT = tuple(levels - 1 for levels in LEVEL_COUNTS)

# A value for each blocking input that shares neither the value nor its Soundex code with ANN's.
WRONG = {"given_name": "zoe", "surname": "okafor", "date_of_birth": "19771231", "postcode": "4870",
         "street_number": "97", "suburb": "dubbo", "address_1": "quay road"}


def test_attributes_come_from_traits_and_a_nested_address() -> None:
    person = person_attributes(json.dumps({"traits": {
        "first_name": " Ann", "last_name": "LEE", "dob": "1990/01/02",
        "address": {"street_number": 12, "line1": "Main  Street", "city": "Canberra", "postal_code": "2600"},
    }}))

    assert person == PersonAttributes("ann", "lee", "19900102", "12", "main street", "", "canberra", "2600", "")


@pytest.mark.parametrize("properties", [None, "", "not json", "[1, 2]", '{"traits": {"first_name": "ann"}}'])
def test_events_without_enough_attributes_are_not_matched(properties: str | None) -> None:
    assert person_attributes(properties) is None


def test_records_survive_the_index_round_trip() -> None:
    assert PersonAttributes.from_record(ANN.to_record()) == ANN
    assert b"\n" not in PersonAttributes("a\nb", "lee").to_record()  # the index separates records by newlines


@pytest.mark.parametrize("wrong", list(itertools.combinations(WRONG, 4)))
def test_any_four_wrong_blocking_fields_still_share_a_key(wrong: tuple[str, ...]) -> None:
    corrupted = ANN._replace(**{name: WRONG[name] for name in wrong})

    assert set(blocking_keys(ANN)) & set(blocking_keys(corrupted))


def test_five_wrong_fields_can_hide_a_duplicate() -> None:
    # The guarantee stops at four: some five fields leave the other two in different groups.
    hidden = [wrong for wrong in itertools.combinations(WRONG, 5)
              if not set(blocking_keys(ANN)) & set(blocking_keys(ANN._replace(**{n: WRONG[n] for n in wrong})))]

    assert hidden


def test_missing_fields_make_no_keys_and_names_keyed_the_wrong_way_round_still_meet() -> None:
    sparse = PersonAttributes(given_name="ann", surname="lee", date_of_birth="19900102")
    swapped = ANN._replace(given_name="lee", surname="ann")

    assert blocking_keys(sparse) == ["ds|19900102|L000"]
    assert set(blocking_keys(ANN)) & set(blocking_keys(swapped))


def test_the_same_person_agrees_exactly_on_every_field() -> None:
    assert compare_people(ANN, ANN) == EXACT


def test_keying_errors_give_the_partial_levels() -> None:
    keyed = PersonAttributes("lee", "ann", "19900201", "12", "unit 4", "main stret", "canbera", "2606", "act")

    pattern = dict(zip((f.name for f in COMPARED_FIELDS), compare_people(ANN, keyed), strict=True))

    assert pattern["given_name"] == pattern["surname"] == 3  # swapped names, compared crosswise
    assert pattern["address_1"] == 2 and pattern["address_2"] == 3  # swapped address lines, one typo
    assert pattern["date_of_birth"] == 1  # day and month swapped
    assert pattern["postcode"] == 1 and pattern["suburb"] == 2 and pattern["state"] == 1


def test_different_people_disagree_and_missing_fields_say_nothing() -> None:
    other = PersonAttributes("bob", "ng", "19700305", "3", "high street", "", "sydney", "4870", "nsw")

    pattern = compare_people(ANN, other)

    assert pattern[0] == pattern[1] == pattern[2] == pattern[7] == pattern[8] == 0
    assert pattern[5] == MISSING  # other has no second address line


def test_the_household_pattern_needs_both_given_name_and_birth_date_to_differ() -> None:
    spouse = ANN._replace(given_name="bob", date_of_birth="19870530")
    sibling_typo = ANN._replace(given_name="bob")

    assert is_household_pattern(compare_people(ANN, spouse))
    assert not is_household_pattern(compare_people(ANN, sibling_typo))


def test_the_model_has_a_parameter_count_the_first_fit_waits_for() -> None:
    # m and u per level (less one each: they sum to 1) per field, and the prior.
    assert FREE_PARAMETERS == 2 * sum(n - 1 for n in LEVEL_COUNTS) + 1 == 45


def test_matching_and_admin_keys_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOUCHSTREAM_IDENTITY_MATCHING", '{"enabled": true, "review_probability": 0.1}')
    monkeypatch.setenv("TOUCHSTREAM_IDENTITY_ADMIN_KEYS", json.dumps([hash_admin_key("ops-key")]))
    monkeypatch.setenv("TOUCHSTREAM_IDENTITY_TYPE_LIMITS", '{"email": 2}')

    settings = IdentitySettings()

    assert settings.matching.enabled and settings.matching.review_probability == 0.1
    assert settings.matching.match_probability == 0.5
    assert is_admin("Bearer ops-key", settings.admin_keys) and not is_admin("Bearer dev-admin-key",
                                                                            settings.admin_keys)
    assert settings.graph_rules().limit_of("email") == 2 and settings.graph_rules().limit_of("phone") == 5
