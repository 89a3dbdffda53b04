"""identity's customer view as the console reads it: what it keeps, and every shape it refuses (never guessed)."""

from __future__ import annotations

from typing import Any

import pytest

from services.console.identities import IdentityAnswerError, KnownIdentifier, identity_profile

HASH = "0f" * 32


def a_view(**overrides: Any) -> dict[str, Any]:
    view = {"customer_id": "c_1", "looked_up_id": "c_0", "first_seen_ms": 10, "last_seen_ms": 20,
            "identities": [{"type": "email", "hash": HASH, "first_seen_ms": 10, "last_seen_ms": 20, "shared": False},
                           {"type": "wechat_openid", "hash": HASH[:16], "first_seen_ms": None, "last_seen_ms": None,
                            "shared": True}],
            "merges": [{"merge_id": "g-1"}]}
    return {**view, **overrides}


def test_the_live_customer_and_its_hashed_identifiers_are_kept() -> None:
    profile = identity_profile(a_view())
    assert (profile.customer_id, profile.first_seen_ms, profile.last_seen_ms) == ("c_1", 10, 20)
    assert profile.identifiers == (KnownIdentifier("email", HASH, 10, 20, False),
                                   KnownIdentifier("wechat_openid", HASH[:16], None, None, True))
    assert identity_profile(a_view(identities=[])).identifiers == ()


@pytest.mark.parametrize(("answer", "problem"), [
    (["c_1"], "the answer is not a JSON object"),
    (a_view(customer_id=""), "customer_id is missing"),
    (a_view(customer_id=7), "customer_id is missing"),
    (a_view(identities={"type": "email"}), "identities is not a list"),
    (a_view(identities=["email:" + HASH]), r"identities\[0\] is not an object"),
    (a_view(identities=[{"type": "E-Mail", "hash": HASH}]), r"identities\[0\].type is not an identifier type"),
    (a_view(identities=[{"type": "email", "hash": "ann@example.com"}]), r"identities\[0\].hash is not a keyed hash"),
    (a_view(identities=[{"type": "email", "hash": HASH, "first_seen_ms": "yesterday"}]),
     r"identities\[0\] is not a time in ms: 'yesterday'"),
    (a_view(last_seen_ms=True), "last_seen_ms is not a time in ms: True"),
])
def test_an_answer_of_another_shape_is_refused_naming_the_field(answer: Any, problem: str) -> None:
    with pytest.raises(IdentityAnswerError, match=problem):
        identity_profile(answer)
