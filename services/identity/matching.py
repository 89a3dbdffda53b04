"""Probabilistic matching without I/O: person attributes, blocking keys and Fellegi-Sunter scores.

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

Scoring is Fellegi-Sunter: each field compares as agree, partly agree or disagree (a missing
value on either side weighs nothing), and each outcome adds log2(m/u), where m is how often
true matches show it and u how often non-matches do. The m/u values below are set a priori
(typical error rates of hand-keyed personal data and the rough cardinality of each field),
not fitted to the benchmark data.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import jellyfish
from pydantic import BaseModel, ConfigDict, Field
from rapidfuzz.distance import OSA, JaroWinkler
from rapidfuzz.fuzz import ratio, token_set_ratio

_SPACES = re.compile(r"\s+")
_NOT_DIGIT = re.compile(r"\D")


class MatchSettings(BaseModel):
    """Opt-in probabilistic matching (TOUCHSTREAM_IDENTITY_MATCHING as JSON, e.g. '{"enabled": true}')."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = False
    threshold: float = Field(12.0, description="Least total log2 weight for a match.")
    # A blocking key shared by more records than this says too little to compare them all.
    max_block_size: int = Field(200, ge=1)
    # Two people at one address with one surname but different given names and birth dates
    # are a household, not one person, however high the address fields push the score.
    # FEBRL4's generator makes such pairs true links (22 of 5,000), so its F1 is higher without.
    household_guard: bool = True


@dataclass(frozen=True)
class PersonAttributes:
    """Normalised personal attributes of one event (empty string = not given)."""

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

    def to_json(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)})

    @classmethod
    def from_json(cls, text: str | bytes) -> PersonAttributes:
        return cls(**json.loads(text))


def _clean(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return _SPACES.sub(" ", str(value)).strip().lower()


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
        data = json.loads(properties_json)
    except json.JSONDecodeError:
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


def blocking_keys(person: PersonAttributes) -> list[str]:
    """Return the blocking keys of a person, one per pass; a candidate must share at least one.

    Several passes on different fields, so one typo (in the postcode, the birth date, the
    surname) cannot hide a true match from every pass.

    >>> blocking_keys(PersonAttributes(given_name="ann", surname="lee", date_of_birth="19900102", postcode="2600"))
    ['pc|2600', 'sx|L000|1990', 'gd|ann|19900102', 'dob|19900102', 'ng|lee|a|2600', 'nm|A500|L000']
    """
    p = person
    year = p.date_of_birth[:4]
    street = p.address_1.split(" ")[0] if p.address_1 else ""
    # Soundex of both names, sorted: given name and surname keyed the wrong way round still meet.
    names = "|".join(sorted(jellyfish.soundex(n) for n in (p.given_name, p.surname))) if p.given_name and \
        p.surname else ""
    candidates = [
        ("pc", p.postcode),
        ("sx", p.surname and year and f"{jellyfish.soundex(p.surname)}|{year}"),
        ("gd", p.given_name and p.date_of_birth and f"{p.given_name}|{p.date_of_birth}"),
        ("dob", p.date_of_birth),
        ("ng", p.surname and p.given_name and p.postcode and f"{p.surname}|{p.given_name[:1]}|{p.postcode}"),
        ("nm", names),
        ("ad", p.street_number and street and f"{p.street_number}|{street}"),
        ("ss", p.suburb and p.street_number and f"{p.suburb}|{p.street_number}"),
        ("a2", p.address_2),
    ]
    return [f"{name}|{value}" for name, value in candidates if value]


@dataclass(frozen=True)
class FieldModel:
    """m/u probabilities of a field's agree and partly-agree outcomes (disagree takes the rest)."""

    m_agree: float
    u_agree: float
    m_partial: float = 0.0
    u_partial: float = 0.0

    def weight(self, level: int) -> float:
        """Return the log2 likelihood ratio of outcome `level` (2 agree, 1 partial, 0 disagree)."""
        if level == 2:
            return math.log2(self.m_agree / self.u_agree)
        if level == 1:
            return math.log2(self.m_partial / self.u_partial)
        return math.log2((1 - self.m_agree - self.m_partial) / (1 - self.u_agree - self.u_partial))


FIELD_MODELS: dict[str, FieldModel] = {
    "given_name": FieldModel(0.85, 0.005, 0.10, 0.02),
    "surname": FieldModel(0.85, 0.002, 0.10, 0.01),
    "date_of_birth": FieldModel(0.85, 0.0002, 0.12, 0.002),
    "street_number": FieldModel(0.85, 0.01, 0.05, 0.01),
    "address_1": FieldModel(0.80, 0.001, 0.12, 0.005),
    "address_2": FieldModel(0.75, 0.01, 0.12, 0.02),
    "suburb": FieldModel(0.85, 0.005, 0.10, 0.02),
    "postcode": FieldModel(0.85, 0.001, 0.10, 0.01),
    "state": FieldModel(0.95, 0.25),
}


def _string_level(a: str, b: str, high: float = 0.92, low: float = 0.80) -> int:
    similarity = JaroWinkler.normalized_similarity(a, b)
    return 2 if similarity >= high else 1 if similarity >= low else 0


def _address_level(a: str, b: str) -> int:
    # Token sets forgive word order; the plain ratio forgives a lost space ("victoriaktreet").
    similarity = max(token_set_ratio(a, b), ratio(a, b)) / 100
    return 2 if similarity >= 0.9 else 1 if similarity >= 0.75 else 0


def _date_level(a: str, b: str) -> int:
    if a == b:
        return 2
    # One mistyped or two transposed digits, or day and month swapped.
    if OSA.distance(a, b) <= 1 or (a[:4] == b[:4] and a[4:6] == b[6:8] and a[6:8] == b[4:6]):
        return 1
    return 0


def _code_level(a: str, b: str) -> int:
    return 2 if a == b else 1 if OSA.distance(a, b) <= 1 else 0


def field_levels(a: PersonAttributes, b: PersonAttributes) -> dict[str, int]:
    """Compare two people field by field: 2 agree, 1 partly agree, 0 disagree; missing fields are left out."""
    compare = {
        "given_name": _string_level, "surname": _string_level, "suburb": _string_level,
        "address_1": _address_level, "address_2": _address_level,
        "date_of_birth": _date_level, "postcode": _code_level,
        "street_number": lambda x, y: 2 if x == y else 0, "state": lambda x, y: 2 if x == y else 0,
    }
    levels = {}
    for name, level_of in compare.items():
        x, y = getattr(a, name), getattr(b, name)
        if x and y:
            levels[name] = level_of(x, y)
    # Given name and surname, or the two address lines, keyed the wrong way round are common
    # errors: compare crosswise too and keep the better outcome.
    for one, other, level_of in (("given_name", "surname", _string_level), ("address_1", "address_2", _address_level)):
        x1, x2, y1, y2 = getattr(a, one), getattr(a, other), getattr(b, one), getattr(b, other)
        if one in levels and x1 and y2:
            levels[one] = max(levels[one], level_of(x1, y2))
        if other in levels and x2 and y1:
            levels[other] = max(levels[other], level_of(x2, y1))
    return levels


def is_household_pair(levels: Mapping[str, int]) -> bool:
    """Say whether a comparison looks like two members of one household: given name and birth date both differ.

    >>> is_household_pair({"given_name": 0, "date_of_birth": 0, "surname": 2}), is_household_pair({"given_name": 0})
    (True, False)
    """
    return levels.get("given_name") == 0 and levels.get("date_of_birth") == 0


def match_score(a: PersonAttributes, b: PersonAttributes) -> float:
    """Return the Fellegi-Sunter total weight (log2 odds) that `a` and `b` are one person.

    >>> ann = PersonAttributes("ann", "lee", "19900102", "12", "main st", "", "canberra", "2600", "act")
    >>> round(match_score(ann, ann), 1), round(match_score(ann, PersonAttributes("bob", "ng", "19700305",
    ...     "3", "high st", "", "sydney", "2000", "nsw")), 1)
    (63.3, -25.4)
    """
    return sum(FIELD_MODELS[name].weight(level) for name, level in field_levels(a, b).items())


def best_match(
    person: PersonAttributes, candidates: Mapping[str, PersonAttributes], threshold: float,
    household_guard: bool = True,
) -> tuple[str, float] | None:
    """Return the best-scoring candidate at or above `threshold` as (customer id, score), ties by id."""
    best: tuple[float, str] | None = None
    for customer_id, other in candidates.items():
        levels = field_levels(person, other)
        if household_guard and is_household_pair(levels):
            continue
        score = sum(FIELD_MODELS[name].weight(level) for name, level in levels.items())
        if score >= threshold and (best is None or (score, customer_id) > (best[0], best[1])):
            best = (score, customer_id)
    return (best[1], best[0]) if best else None
