"""Identifier normalisation and pseudonymisation, shared by ingest, identity and console.

Everything here is pure: no I/O. The same clear value always gives the same keyed hash,
so a service agent can look a customer up by typing an e-mail and never see the hash key.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass

import phonenumbers

KNOWN_TYPES = (
    "user_id",
    "email",
    "phone",
    "device_id",
    "anonymous_id",
    "wechat_openid",
    "wechat_unionid",
    "loyalty_card",
)
# Strong identifiers name one person for sure; two different ones never merge.
STRONG_TYPES = frozenset({"user_id", "wechat_unionid"})
# Ordered so the first identifier found is the most stable key for touchpoints.raw.
KEY_PRIORITY = (
    "user_id", "wechat_unionid", "loyalty_card", "email", "phone", "wechat_openid", "device_id", "anonymous_id",
)

DEFAULT_BLOCKLIST = frozenset(
    {"test@test.com", "test@example.com", "noreply@example.com", "+10000000000", "00000000000",
     "unknown", "null", "none", "undefined", "n/a", "0", "-"}
)


class InvalidIdentifier(ValueError):
    """An identifier value that cannot be used (malformed or blocklisted)."""


@dataclass(frozen=True)
class Identifier:
    type: str
    value: str


# Provider rules, applied after trimming and lower-casing (local parts are case-insensitive at
# every provider we know of, although RFC 5321 allows otherwise):
# - domains that are one mailbox namespace are folded (googlemail.com -> gmail.com); hotmail.com,
#   live.com and outlook.com are NOT: the same name there can be three different people;
# - providers that deliver "name+tag@" to "name@" (plus addressing) lose the tag;
# - Gmail ignores dots in the local part, so they go too. Elsewhere dots are significant.
# Other domains keep their local part as typed: "+" is a legal, meaningful character there.
EMAIL_DOMAIN_ALIASES = {"googlemail.com": "gmail.com"}
PLUS_ADDRESSING_DOMAINS = frozenset({"gmail.com", "outlook.com", "hotmail.com", "live.com", "icloud.com",
                                     "proton.me", "protonmail.com", "fastmail.com"})
DOTS_IGNORED_DOMAINS = frozenset({"gmail.com"})


def normalise_email(value: str) -> str:
    """Trim and lower-case an e-mail, then apply the provider rules above.

    >>> normalise_email("  John.Doe+promo@GMail.com ")
    'johndoe@gmail.com'
    >>> normalise_email("Ann@Example.org"), normalise_email("ann+news@example.org")
    ('ann@example.org', 'ann+news@example.org')
    >>> normalise_email("ann.lee+shop@hotmail.com"), normalise_email("j.doe@googlemail.com")
    ('ann.lee@hotmail.com', 'jdoe@gmail.com')
    """
    email = value.strip().lower()
    local, sep, domain = email.rpartition("@")
    if not sep or not local or "." not in domain:
        raise InvalidIdentifier(f"email {value!r} is not an address")
    domain = EMAIL_DOMAIN_ALIASES.get(domain, domain)
    if domain in PLUS_ADDRESSING_DOMAINS:
        local = local.split("+", 1)[0]
    if domain in DOTS_IGNORED_DOMAINS:
        local = local.replace(".", "")
    if not local:
        raise InvalidIdentifier(f"email {value!r} is not an address")
    return f"{local}@{domain}"


def normalise_phone(value: str, default_region: str = "US") -> str:
    """Return the phone number in E.164.

    >>> normalise_phone("(415) 555-2671")
    '+14155552671'
    >>> normalise_phone("138 0013 8000", default_region="CN")
    '+8613800138000'
    """
    try:
        number = phonenumbers.parse(value, default_region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidIdentifier(f"phone {value!r}: {exc}") from exc
    if not phonenumbers.is_possible_number(number):
        raise InvalidIdentifier(f"phone {value!r} is not a possible number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalise(identifier: Identifier, default_region: str = "US",
              blocklist: Iterable[str] = DEFAULT_BLOCKLIST) -> Identifier:
    """Normalise one identifier or raise InvalidIdentifier saying why."""
    kind = identifier.type.strip().lower()
    if not kind:
        raise InvalidIdentifier("identifier type is empty")
    raw = identifier.value.strip()
    if not raw:
        raise InvalidIdentifier(f"{kind} is empty")
    if kind == "email":
        value = normalise_email(raw)
    elif kind == "phone":
        value = normalise_phone(raw, default_region)
    else:
        value = raw
    if value.lower() in blocklist or raw.lower() in blocklist:
        raise InvalidIdentifier(f"{kind} value is on the blocklist")
    return Identifier(kind, value)


def keyed_hash(text: str, key: bytes) -> str:
    """Return HMAC-SHA256(key, text) in hex: without the key, no dictionary of e-mails or phones reverses it.

    >>> keyed_hash("email:a@b.co", b"k")[:12]
    'e8154de8bf08'
    """
    return hmac.digest(key, text.encode(), "sha256").hex()


def pseudonymise(identifier: Identifier, key: bytes) -> Identifier:
    """Replace the value by HMAC-SHA256(key, "type:value") in hex.

    >>> pseudonymise(Identifier("email", "a@b.co"), b"k").value[:12]
    'e8154de8bf08'
    """
    return Identifier(identifier.type, keyed_hash(f"{identifier.type}:{identifier.value}", key))


def partition_key(identifiers: Iterable[Identifier], fallback: str) -> str:
    """Pick the most stable identifier as the raw topic's key, else `fallback`."""
    by_type = {i.type: i.value for i in identifiers}
    for kind in KEY_PRIORITY:
        if kind in by_type:
            return f"{kind}:{by_type[kind]}"
    return fallback


def raw_topic_key(partition_text: str, key: bytes) -> bytes:
    """Return touchpoints.raw's record key for `partition_key`'s pick: its keyed hash (the PII hash key).

    The key is copied wherever the record goes (dead letters keep it for good), so it must not be
    a clear identifier or an unkeyed hash a dictionary reverses. The same pick always gives the same
    key, so one customer's events still share a partition.

    >>> raw_topic_key("email:ann@example.com", b"k") == raw_topic_key("email:ann@example.com", b"k")
    True
    >>> raw_topic_key("email:ann@example.com", b"k") != raw_topic_key("email:ann@example.com", b"other")
    True
    """
    return keyed_hash(partition_text, key).encode()
