"""Erasure and consent helpers shared by ingest, identity and scoring.

Suppression: when a customer is erased, identity puts a *suppression token* of each of its
identifiers on a Redis set, and every later event carrying one of them is dropped (at ingest
for HTTP, at identity for records produced straight to Kafka). A token is
sha1("suppress:<type>:<keyed hash>"): one more one-way step on top of the identity graph's
keyed hash (HMAC-SHA256 with TOUCHSTREAM_PII_HASH_KEY), so the list holds neither the clear
identifiers nor the hashes the graph and the topics used, yet anyone with the hash key can test a
clear identifier against it. identity's Lua computes the same value with redis.sha1hex.

Consent: an event's `consent` list replaces the customer's consent when it is not empty;
an empty list says nothing (it is the Avro default, so producers that never send consent
do not wipe it). To withdraw every category send the single category CONSENT_WITHDRAWN
("none"); over HTTP an explicit `"consent": []` is translated to it by ingest.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from functools import lru_cache

import redis.asyncio as aioredis

from touchstream.identifiers import Identifier, InvalidIdentifier, normalise, pseudonymise

# identity's graph prefix + "suppressed": the set must share the graph's hash slot ({graph}).
DEFAULT_SUPPRESSION_KEY = "ts:identity:{graph}:suppressed"
CONSENT_WITHDRAWN = "none"
# The rule_id of the `customer.deleted` notice triggers puts on `actions` after an erasure: not a
# rule, but it names the action in triggers' metrics, and the console never read-models it.
DELETED_RULE_ID = "customer.deleted"


def suppression_token(hashed: Identifier) -> str:
    """Return the suppression-list entry of a pseudonymised identifier.

    >>> suppression_token(Identifier("email", "ab12"))[:12]
    '12c57bb99357'
    """
    return hashlib.sha1(f"suppress:{hashed.type}:{hashed.value}".encode()).hexdigest()


def event_suppression_tokens(identifiers: Iterable[dict[str, str]], hash_key: bytes,
                             default_region: str = "US") -> list[str]:
    """Normalise and hash an event's clear identifiers as identity does, and return their tokens.

    Identifiers identity would refuse (malformed) are skipped: they never reach the graph.

    >>> a = event_suppression_tokens([{"type": "email", "value": " Ann@Example.com"}], b"k")
    >>> a == event_suppression_tokens([{"type": "email", "value": "ann@example.com"}, {"type": "phone", "value": "x"}],
    ...                               b"k")
    True
    """
    tokens = []
    for item in identifiers:
        token = _clear_token(item["type"], item["value"], hash_key, default_region)
        if token is not None:
            tokens.append(token)
    return tokens


# Customers send many events with the same identifiers; normalising a phone number alone costs
# tens of microseconds, so ingest remembers recent answers.
@lru_cache(maxsize=100_000)
def _clear_token(kind: str, value: str, hash_key: bytes, default_region: str) -> str | None:
    try:
        clear = normalise(Identifier(kind, value), default_region, ())
    except InvalidIdentifier:
        return None
    return suppression_token(pseudonymise(clear, hash_key))


def consent_update(current: Sequence[str] | None, event_consent: Sequence[str]) -> tuple[str, ...] | None:
    """Return the customer's consent after an event: None if the event says nothing about it.

    >>> consent_update(("email",), []) is None
    True
    >>> consent_update(("email",), ["sms", "email", "sms"]), consent_update(("email",), ["none"])
    (('email', 'sms'), ())
    """
    del current  # the latest statement replaces the previous one whole
    if not event_consent:
        return None
    return tuple(sorted({c for c in event_consent if c != CONSENT_WITHDRAWN}))


class SuppressionList:
    """An ingest worker's view of the suppression set.

    Up to `max_cached` tokens are kept in memory and reloaded when identity raises the set's
    version (checked at most every `refresh_s`), so a request costs no Redis round trip and no
    hashing while the list is empty. Beyond `max_cached` every request asks Redis (SMISMEMBER).
    """

    def __init__(self, redis: aioredis.Redis, key: str = DEFAULT_SUPPRESSION_KEY, refresh_s: float = 0.5,
                 max_cached: int = 100_000) -> None:
        self._redis = redis
        self.key = key
        self._refresh_s = refresh_s
        self._max_cached = max_cached
        self._checked_at = -1e18
        self._version: bytes | str | None = None
        self._tokens: frozenset[str] = frozenset()
        self._remote = False

    @property
    def active(self) -> bool:
        """Whether events need checking at all (something is suppressed)."""
        return self._remote or bool(self._tokens)

    async def refresh(self) -> None:
        """Reload the set if identity changed it since the last look (at most every refresh_s)."""
        now = time.monotonic()
        if now - self._checked_at < self._refresh_s:
            return
        self._checked_at = now
        version = await self._redis.get(self.key + ":version")
        if version == self._version:
            return
        size = int(await self._redis.scard(self.key))
        if size > self._max_cached:
            self._remote, self._tokens = True, frozenset()
        else:
            members = await self._redis.smembers(self.key)
            self._remote = False
            self._tokens = frozenset(m.decode() if isinstance(m, bytes) else str(m) for m in members)
        self._version = version

    async def suppressed(self, tokens_per_event: Sequence[Sequence[str]]) -> list[bool]:
        """Say, per event, whether any of its tokens is on the list."""
        if not self._remote:
            tokens = self._tokens
            return [any(t in tokens for t in event) for event in tokens_per_event]
        flat = [t for event in tokens_per_event for t in event]
        if not flat:
            return [False] * len(tokens_per_event)
        found = iter(await self._redis.smismember(self.key, flat))
        return [any([bool(next(found)) for _ in event]) for event in tokens_per_event]
