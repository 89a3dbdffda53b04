"""Probabilistic matching without I/O: person attributes, blocking keys and graded field comparisons.

An event that carries personal attributes but shares no identifier with a known customer can
still be the same person. The attributes are read from the event's ``properties_json``, from a
``traits`` object if there is one, else from the top level. Fields read (any missing is fine):

==================  ==========================================================================
field               names accepted
==================  ==========================================================================
given name          ``given_name``, ``first_name``, ``firstName``
surname             ``surname``, ``last_name``, ``lastName``
date of birth       ``date_of_birth``, ``dob``, ``birthday`` (``YYYY-MM-DD``, ``YYYY/MM/DD`` or ``YYYYMMDD``)
street number       ``street_number``, or ``address.street_number``
address lines       ``address_1``/``address_2``, or ``address.line1``/``address.line2``
suburb / city       ``suburb``, ``city``, or ``address.suburb``/``address.city``
postcode            ``postcode``, ``postal_code``, ``zip``, or the same under ``address``
state               ``state``, or ``address.state``
==================  ==========================================================================

Two records compare field by field into a *comparison pattern*: one agreement level per field
(0 = disagree up to the field's exact level, MISSING when either side lacks the field). How
much each level says about a match is not set here: `match_model.py` learns it from the
patterns of the stream's own candidate pairs (Fellegi-Sunter, fitted by EM).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jellyfish
import orjson
from pydantic import BaseModel, ConfigDict, Field
from rapidfuzz.distance import OSA, JaroWinkler

_NOT_DIGIT = re.compile(r"\D")

MISSING = -1  # the level of a field one side lacks: it says nothing either way


class PersonAttributes(NamedTuple):
    """Normalised personal attributes of one event (empty string = not given).

    A named tuple rather than a dataclass: records are hashed and compared in the matcher's
    inner loop, and a tuple does both in C.
    """

    given_name: str = ""
    surname: str = ""
    date_of_birth: str = ""  # YYYYMMDD
    street_number: str = ""
    address_1: str = ""
    address_2: str = ""
    suburb: str = ""
    postcode: str = ""
    state: str = ""

    def is_matchable(self) -> bool:
        """Say whether there is enough to compare: a name or street, and a birth date, postcode or suburb."""
        return bool((self.given_name or self.surname or self.address_1)
                    and (self.date_of_birth or self.postcode or self.suburb))

    def to_record(self) -> bytes:
        """Serialise as a compact JSON array (the person index stores one per record).

        >>> PersonAttributes("ann", "lee").to_record()
        b'["ann","lee","","","","","","",""]'
        """
        return orjson.dumps(list(self))

    @classmethod
    def from_record(cls, text: str | bytes) -> PersonAttributes:
        """Read what `to_record` wrote.

        >>> PersonAttributes.from_record(PersonAttributes("ann", postcode="2600").to_record()).postcode
        '2600'
        """
        return cls(*orjson.loads(text))


def _clean(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    # split() with no argument takes any run of whitespace and the ends: a third of a regex's cost.
    return " ".join(str(value).lower().split())


def _first(sources: Iterable[Mapping[str, Any]], *names: str) -> str:
    for source in sources:
        for name in names:
            if source.get(name) not in (None, ""):
                return _clean(source[name])
    return ""


def normalise_date(value: str) -> str:
    """Return a birth date as YYYYMMDD, or "" when it is not a date.

    >>> normalise_date("1956-04-09"), normalise_date("19560409"), normalise_date("April")
    ('19560409', '19560409', '')
    """
    digits = _NOT_DIGIT.sub("", value)
    return digits if len(digits) == 8 else ""


def person_attributes(properties_json: str | None) -> PersonAttributes | None:
    """Read the personal attributes of an event, or None if it has none worth matching on.

    >>> person_attributes('{"traits": {"firstName": "Ann ", "lastName": "Lee", "birthday": "1990-01-02"}}')
    PersonAttributes(given_name='ann', surname='lee', date_of_birth='19900102', street_number='', address_1='', \
address_2='', suburb='', postcode='', state='')
    >>> person_attributes('{"page": "home"}') is None
    True
    """
    if not properties_json:
        return None
    try:
        data = orjson.loads(properties_json)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    traits = data.get("traits")
    top: dict[str, Any] = traits if isinstance(traits, dict) else data
    nested = top.get("address")
    address: dict[str, Any] = nested if isinstance(nested, dict) else {}
    sources = (top, address)
    person = PersonAttributes(
        given_name=_first(sources, "given_name", "first_name", "firstName"),
        surname=_first(sources, "surname", "last_name", "lastName"),
        date_of_birth=normalise_date(_first(sources, "date_of_birth", "dob", "birthday")),
        street_number=_first(sources, "street_number"),
        address_1=_first((top,), "address_1") or _first((address,), "line1", "address_1"),
        address_2=_first((top,), "address_2") or _first((address,), "line2", "address_2"),
        suburb=_first(sources, "suburb", "city"),
        postcode=_first(sources, "postcode", "postal_code", "zip"),
        state=_first(sources, "state"),
    )
    return person if person.is_matchable() else None


def _soundex(text: str) -> str:
    return jellyfish.soundex(text) if text else ""


def blocking_keys(person: PersonAttributes) -> list[str]:
    """Return the blocking keys of a person, one per pass; a candidate must share at least one.

    Each pass joins two of seven fields (surname, given name and street name as Soundex codes,
    birth date, postcode, street number, suburb), so a key is rare among people who differ,
    and most typos in a name keep its Soundex code. The passes are all pairs inside two groups,
    {birth date, postcode, street number, surname} and {given name, suburb, street}: any three
    fields hold two of one group, so whichever four fields are wrong or missing, the other
    three still share a key (Turan's construction: the fewest pairs with that property).
    Postcode and suburb, which mostly say the same thing, are kept in different groups so that
    no pass is as wide as a whole suburb.

    >>> blocking_keys(PersonAttributes(given_name="ann", surname="lee", date_of_birth="19900102", postcode="2600"))
    ['dp|19900102|2600', 'ds|19900102|L000', 'ps|2600|L000']
    """
    p = person
    given, surname = _soundex(p.given_name), _soundex(p.surname)
    street = _soundex(p.address_1.split(" ")[0]) if p.address_1 else ""
    one = (("d", p.date_of_birth), ("p", p.postcode), ("n", p.street_number), ("s", surname))
    other = (("g", given), ("u", p.suburb), ("a", street))
    keys = []
    for group in (one, other):
        for i, (name_a, value_a) in enumerate(group):
            for name_b, value_b in group[i + 1:]:
                if value_a and value_b:
                    keys.append(f"{name_a}{name_b}|{value_a}|{value_b}")
    return keys


@dataclass(frozen=True)
class ComparedField:
    """A field of the comparison pattern and the names of its levels, from disagree (0) to exact."""

    name: str
    levels: tuple[str, ...]


# Names and places: exact, then Jaro-Winkler at 0.9 and 0.7 (the thresholds of Splink's
# JaroWinklerAtThresholds and of the US Census Bureau's matchers). Codes (date, postcode,
# street number): exact, then one keying error (one digit changed, inserted, dropped, or two
# swapped; for a date also day and month swapped).
COMPARED_FIELDS: tuple[ComparedField, ...] = (
    ComparedField("given_name", ("else", "jw>=0.7", "jw>=0.9", "exact")),
    ComparedField("surname", ("else", "jw>=0.7", "jw>=0.9", "exact")),
    ComparedField("date_of_birth", ("else", "one_edit", "exact")),
    ComparedField("street_number", ("else", "one_edit", "exact")),
    ComparedField("address_1", ("else", "jw>=0.7", "jw>=0.9", "exact")),
    ComparedField("address_2", ("else", "jw>=0.7", "jw>=0.9", "exact")),
    ComparedField("suburb", ("else", "jw>=0.7", "jw>=0.9", "exact")),
    ComparedField("postcode", ("else", "one_edit", "exact")),
    ComparedField("state", ("else", "exact")),
)
LEVEL_COUNTS = tuple(len(f.levels) for f in COMPARED_FIELDS)
Pattern = tuple[int, ...]


def _text_level(a: str, b: str) -> int:
    if not a or not b:
        return MISSING
    if a == b:
        return 3
    similarity = JaroWinkler.similarity(a, b)
    return 2 if similarity >= 0.9 else 1 if similarity >= 0.7 else 0


def _code_level(a: str, b: str) -> int:
    if not a or not b:
        return MISSING
    if a == b:
        return 2
    return 1 if OSA.distance(a, b) <= 1 else 0


def _date_level(a: str, b: str) -> int:
    if not a or not b:
        return MISSING
    if a == b:
        return 2
    if OSA.distance(a, b) <= 1 or (a[:4] == b[:4] and a[4:6] == b[6:8] and a[6:8] == b[4:6]):
        return 1
    return 0


def _better_of_swapped(direct: tuple[int, int], swapped: tuple[int, int]) -> tuple[int, int]:
    # Two fields keyed the wrong way round swap together: take whichever reading agrees more.
    agree_swapped = max(swapped[0], 0) + max(swapped[1], 0)
    return swapped if agree_swapped > max(direct[0], 0) + max(direct[1], 0) else direct


def compare_people(a: PersonAttributes, b: PersonAttributes) -> Pattern:
    """Return the comparison pattern of two people: one level per field of COMPARED_FIELDS.

    >>> ann = PersonAttributes("ann", "lee", "19900102", "12", "main street", "", "canberra", "2600", "act")
    >>> compare_people(ann, ann)
    (3, 3, 2, 2, 3, -1, 3, 2, 1)
    >>> compare_people(ann, PersonAttributes("lee", "anne", "19900201", "12", "main stret", "", "canbera", "2606"))
    (2, 3, 1, 2, 2, -1, 2, 1, -1)
    """
    names = (_text_level(a.given_name, b.given_name), _text_level(a.surname, b.surname))
    if names != (3, 3) and a.given_name and a.surname and b.given_name and b.surname:
        names = _better_of_swapped(names, (_text_level(a.given_name, b.surname), _text_level(a.surname, b.given_name)))
    lines = (_text_level(a.address_1, b.address_1), _text_level(a.address_2, b.address_2))
    if lines != (3, 3) and (a.address_1 or a.address_2) and (b.address_1 or b.address_2):
        lines = _better_of_swapped(lines, (_text_level(a.address_1, b.address_2),
                                           _text_level(a.address_2, b.address_1)))
    state = MISSING if not a.state or not b.state else 1 if a.state == b.state else 0
    return (names[0], names[1], _date_level(a.date_of_birth, b.date_of_birth),
            _code_level(a.street_number, b.street_number), lines[0], lines[1],
            _text_level(a.suburb, b.suburb), _code_level(a.postcode, b.postcode), state)


_GIVEN_NAME = 0
_DATE_OF_BIRTH = 2


def is_household_pattern(pattern: Pattern) -> bool:
    """Say whether a comparison looks like two members of one household: given name and birth date both differ.

    >>> is_household_pattern((0, 3, 0, 2, 3, -1, 3, 2, 1)), is_household_pattern((0, 3, -1, 2, 3, -1, 3, 2, 1))
    (True, False)
    """
    return pattern[_GIVEN_NAME] == 0 and pattern[_DATE_OF_BIRTH] == 0


# m and u of each field's levels (each sums to 1) and the prior: what EM estimates.
FREE_PARAMETERS = 2 * sum(levels - 1 for levels in LEVEL_COUNTS) + 1


class MatchSettings(BaseModel):
    """Opt-in probabilistic matching (TOUCHSTREAM_IDENTITY_MATCHING as JSON, e.g. '{"enabled": true}').

    README.md ("Probabilistic matching") says how each value was chosen.
    """

    model_config = ConfigDict(frozen=True)

    enabled: bool = False
    match_probability: float = Field(
        0.5, gt=0, lt=1, description="Least posterior match probability for a merge (Bayes decision, equal costs).")
    review_probability: float = Field(
        0.05, gt=0, lt=1, description="Least posterior for a possible match: kept for review, never merged.")
    # A blocking key shared by more records than this says too little to compare them all.
    max_block_size: int = Field(200, ge=1)
    # Two people at one address with one surname but different given names and birth dates
    # are a household, not one person, however much the address fields agree.
    household_guard: bool = True
    min_pairs_to_fit: int = Field(
        FREE_PARAMETERS, ge=1,
        description="Candidate pairs seen before the first EM fit (no merge is made without a fit): at least one "
                    "per free parameter of the model.")
    refit_growth: float = Field(
        2.0, gt=1, description="Refit once the records matched grew by this factor since the last fit...")
    refit_every_records: int = Field(
        50_000, ge=100, description="...or by this many records, whichever comes first.")
    window_records: int = Field(
        200_000, ge=1000, description="The model is fitted on the candidate pairs of the latest this many records.")
    max_em_iterations: int = Field(500, ge=1)
    em_tolerance: float = Field(
        1e-7, gt=0, description="EM stops when the log-likelihood per pair gains less than this.")
