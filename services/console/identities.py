"""What the customer page shows of identity's customer API (`GET /v1/customers/{id}`): pure, no I/O.

The console never reads identity's Redis: it asks identity over HTTP (web.py) and turns the JSON
answer into these values, refusing a shape it does not understand instead of guessing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# A keyed hash as identity shows it (hex of an HMAC); anything else is not put into a split link.
_HASH = re.compile(r"[0-9a-f]{16,128}")
_TYPE = re.compile(r"[a-z][a-z0-9_]{0,31}")


class IdentityAnswerError(ValueError):
    """identity answered something that is not a customer view; the message says what was wrong."""


@dataclass(frozen=True)
class KnownIdentifier:
    """One identifier identity holds for the customer: its type and keyed hash, never a clear value."""

    type: str
    hash: str
    first_seen_ms: int | None
    last_seen_ms: int | None
    shared: bool

    @property
    def ref(self) -> str:
        """The reference identity's un-merge takes.

        >>> KnownIdentifier("email", "ab" * 8, None, None, False).ref
        'email:abababababababab'
        """
        return f"{self.type}:{self.hash}"


@dataclass(frozen=True)
class IdentityProfile:
    """identity's view of a customer: the live id, when it was first and last seen, its identifiers."""

    customer_id: str
    first_seen_ms: int | None
    last_seen_ms: int | None
    identifiers: tuple[KnownIdentifier, ...]


def _optional_ms(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise IdentityAnswerError(f"{where} is not a time in ms: {value!r}"[:200])
    return value


def identity_profile(answer: Any) -> IdentityProfile:
    """Read identity's JSON customer view; raise IdentityAnswerError naming the first field that is off.

    >>> p = identity_profile({"customer_id": "c_1", "first_seen_ms": 5, "last_seen_ms": None,
    ...                       "identities": [{"type": "email", "hash": "ab" * 16, "first_seen_ms": 5,
    ...                                       "last_seen_ms": 9, "shared": False}], "merges": []})
    >>> p.customer_id, [i.ref[:12] for i in p.identifiers]
    ('c_1', ['email:ababab'])
    >>> identity_profile({"customer_id": "c_1", "identities": [{"type": "email", "hash": "<b>"}]})
    Traceback (most recent call last):
    ...
    services.console.identities.IdentityAnswerError: identities[0].hash is not a keyed hash
    """
    if not isinstance(answer, Mapping):
        raise IdentityAnswerError("the answer is not a JSON object")
    customer_id = answer.get("customer_id")
    if not isinstance(customer_id, str) or not customer_id:
        raise IdentityAnswerError("customer_id is missing")
    entries = answer.get("identities", [])
    if not isinstance(entries, list):
        raise IdentityAnswerError("identities is not a list")
    identifiers = []
    for n, entry in enumerate(entries):
        where = f"identities[{n}]"
        if not isinstance(entry, Mapping):
            raise IdentityAnswerError(f"{where} is not an object")
        kind, digest = entry.get("type"), entry.get("hash")
        if not isinstance(kind, str) or not _TYPE.fullmatch(kind):
            raise IdentityAnswerError(f"{where}.type is not an identifier type")
        if not isinstance(digest, str) or not _HASH.fullmatch(digest):
            raise IdentityAnswerError(f"{where}.hash is not a keyed hash")
        identifiers.append(KnownIdentifier(kind, digest, _optional_ms(entry.get("first_seen_ms"), where),
                                           _optional_ms(entry.get("last_seen_ms"), where),
                                           entry.get("shared") is True))
    return IdentityProfile(customer_id, _optional_ms(answer.get("first_seen_ms"), "first_seen_ms"),
                           _optional_ms(answer.get("last_seen_ms"), "last_seen_ms"), tuple(identifiers))
