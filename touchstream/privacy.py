"""Erasure and consent helpers shared by ingest, identity and scoring.

Suppression: when a customer is erased, identity puts a *suppression token* of each of its
identifiers on a Redis set, and every later event carrying one of them is dropped (at ingest
for HTTP, at identity for records produced straight to Kafka). A token is
sha1("suppress:<type>:<keyed hash>"): one more one-way step on top of the identity graph's
keyed hash (HMAC-SHA256 with TOUCHSTREAM_PII_HASH_KEY), so the list holds neither the clear
identifiers nor the hashes the graph and the topics used, yet anyone with the hash key can test a
clear identifier against it. identity's Lua computes the same value with redis.sha1hex.

Erased customers: scoring, triggers and the console each keep their own durable record of the
customer ids erased (`ErasedCustomers`, fed from customers.deletions), checked whenever they load
a customer's state or queue an action, so a consumer that restarts or lags and reads the event logs
again (kept `raw_retention_hours`) does not bring an erased customer back. It holds one-way tokens,
sha1("erased:<customer id>"), never the ids.

Consent: an event's `consent` list replaces the customer's consent when it is not empty;
an empty list says nothing (it is the Avro default, so producers that never send consent
do not wipe it). To withdraw every category send the single category CONSENT_WITHDRAWN
("none"); over HTTP an explicit `"consent": []` is translated to it by ingest. A list of
withdrawals only (`-category`, what ingest makes of an unsubscribe event) removes those categories
and leaves the others standing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from functools import lru_cache

import redis.asyncio as aioredis

from touchstream.eventtime import DAY_S
from touchstream.identifiers import Identifier, InvalidIdentifier, normalise, pseudonymise

# identity's Redis keys all start with this (IdentitySettings.graph_key_prefix's default): one hash
# slot ({graph}), so each batch is one script call. Named here because ingest reads one of them.
IDENTITY_GRAPH_PREFIX = "ts:identity:{graph}:"
# identity's graph prefix + "suppressed": the set must share the graph's hash slot ({graph}).
DEFAULT_SUPPRESSION_KEY = IDENTITY_GRAPH_PREFIX + "suppressed"
# CoreSettings.erased_customer_ttl_s with its defaults (168 h retention + 168 h), for the stores' constructors.
DEFAULT_ERASED_TTL_S = 14 * DAY_S
CONSENT_WITHDRAWN = "none"
# `-email` in an event's consent withdraws that one category (an unsubscribe), the rest stands.
CONSENT_WITHDRAW_PREFIX = "-"
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


def erased_token(customer_id: str) -> str:
    """Return the entry of an erased customer id in an `ErasedCustomers` set.

    >>> erased_token("c_1")[:12]
    '464541e4b911'
    """
    return hashlib.sha1(f"erased:{customer_id}".encode()).hexdigest()


class ErasedCustomers:
    """One service's durable record of erased customer ids: a sorted set of `erased_token`s scored by
    the time of the erasure, each kept at least `ttl_s` (longer than the event logs keep the erased
    customer's events). Written before the service forgets the customer, so a crash in between
    leaves it erased; a replayed erasure only refreshes the time.
    """

    def __init__(self, redis: aioredis.Redis, key: str, ttl_s: int) -> None:
        self._redis = redis
        self.key = key
        self.ttl_s = ttl_s

    async def add(self, customer_ids: Iterable[str]) -> None:
        """Record `customer_ids` as erased now; drop entries older than the TTL."""
        tokens = [erased_token(c) for c in dict.fromkeys(customer_ids)]
        if not tokens:
            return
        now_ms = int(time.time() * 1000)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zadd(self.key, dict.fromkeys(tokens, now_ms))
            pipe.zremrangebyscore(self.key, "-inf", now_ms - self.ttl_s * 1000)
            pipe.expire(self.key, self.ttl_s)
            await pipe.execute()

    async def among(self, customer_ids: Iterable[str]) -> set[str]:
        """Return those of `customer_ids` that were erased, in one round trip."""
        ids = list(dict.fromkeys(customer_ids))
        if not ids:
            return set()
        found = await self._redis.zmscore(self.key, [erased_token(c) for c in ids])
        return {cid for cid, erased_at in zip(ids, found, strict=True) if erased_at is not None}


def consent_update(current: Sequence[str] | None, event_consent: Sequence[str]) -> tuple[str, ...] | None:
    """Return the customer's consent after an event: None if the event says nothing about it.

    >>> consent_update(("email",), []) is None
    True
    >>> consent_update(("email",), ["sms", "email", "sms"]), consent_update(("email",), ["none"])
    (('email', 'sms'), ())
    >>> consent_update(("email", "loyalty", "marketing"), ["-email", "-marketing"])  # an unsubscribe
    ('loyalty',)
    """
    if not event_consent:
        return None
    withdrawn = {c[len(CONSENT_WITHDRAW_PREFIX):] for c in event_consent if c.startswith(CONSENT_WITHDRAW_PREFIX)}
    granted = {c for c in event_consent if not c.startswith(CONSENT_WITHDRAW_PREFIX) and c != CONSENT_WITHDRAWN}
    if withdrawn and not granted and CONSENT_WITHDRAWN not in event_consent:
        return tuple(sorted(set(current or ()) - withdrawn))
    # Otherwise the latest statement replaces the previous one whole.
    return tuple(sorted(granted - withdrawn))


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
