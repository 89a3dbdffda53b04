"""Customer-360 reads of the identity graph, shared by the identity service's API and the console.

Everything here only reads Redis. A customer id that was merged away answers with the customer
it lives on as now (``looked_up_id`` keeps the id asked for).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis

from services.identity.domain import GraphLayout, Identifier, identifier_ref, parse_identifier_ref

MAX_MERGE_HOPS = 64


@dataclass(frozen=True)
class IdentityView:
    type: str
    hash: str
    first_seen_ms: int | None
    last_seen_ms: int | None
    shared: bool


@dataclass(frozen=True)
class CustomerView:
    customer_id: str
    looked_up_id: str
    first_seen_ms: int | None
    last_seen_ms: int | None
    identities: tuple[IdentityView, ...]
    merges: tuple[dict[str, Any], ...]
    # Customers probabilistic matching found plausibly the same person, kept for review (never merged).
    possible_matches: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _int(value: bytes | str | None) -> int | None:
    return int(value) if value is not None else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def live_customer_id(client: aioredis.Redis, layout: GraphLayout, customer_id: str) -> str | None:
    """Follow merges from `customer_id` to the customer that holds its identifiers now, or None if unknown."""
    current = customer_id
    for _ in range(MAX_MERGE_HOPS):
        status, into = await client.hmget(layout.customer_key(current), ["status", "merged_into"])
        if status is None:
            return None
        if into is None:
            return current
        current = _text(into)
    return current


async def read_customer(client: aioredis.Redis, layout: GraphLayout, customer_id: str) -> CustomerView | None:
    """Return the 360 view of a customer (or of the one it was merged into), or None if unknown."""
    live = await live_customer_id(client, layout, customer_id)
    if live is None:
        return None
    first, last = await client.hmget(layout.customer_key(live), ["first_seen_ms", "last_seen_ms"])
    refs = sorted(_text(m) for m in await client.smembers(layout.members_key(live)))
    async with client.pipeline(transaction=False) as pipe:
        for ref in refs:
            pipe.hmget(layout.identifier_key(ref), ["first_ms", "last_ms", "shared"])
        rows = await pipe.execute()
    identities = []
    for ref, (seen_first, seen_last, shared) in zip(refs, rows, strict=True):
        identifier = parse_identifier_ref(ref)
        identities.append(IdentityView(identifier.type, identifier.value, _int(seen_first), _int(seen_last),
                                       shared in (b"1", "1")))
    merges = tuple(json.loads(entry) for entry in await client.lrange(layout.history_key(live), 0, -1))
    return CustomerView(live, customer_id, _int(first), _int(last), tuple(identities), merges,
                        await _possible_matches(client, layout, live, merges))


async def _possible_matches(client: aioredis.Redis, layout: GraphLayout, live: str,
                            merges: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
    """The possible matches noted on the customer or any id merged into it, by the other's live id, best first."""
    ids = [live, *(m["merged_id"] for m in merges if m.get("kind") == "merge" and m.get("merged_id"))]
    best: dict[str, dict[str, Any]] = {}
    for own in ids:
        for other, entry in (await client.hgetall(layout.match_possible_key(own))).items():
            other_live = await live_customer_id(client, layout, _text(other))
            if other_live is None or other_live == live:
                continue
            noted = {**json.loads(entry), "customer_id": other_live}
            if other_live not in best or noted["probability"] > best[other_live]["probability"]:
                best[other_live] = noted
    return tuple(sorted(best.values(), key=lambda m: (-m["probability"], m["customer_id"])))


async def read_review(client: aioredis.Redis, layout: GraphLayout, limit: int) -> list[dict[str, Any]]:
    """Return the latest possible matches, newest first, each with the customers' live ids now.

    A pair merged since (by an identifier, an operator or a later match) is left out.
    """
    entries = []
    for text in await client.lrange(layout.match_key("review"), 0, limit - 1):
        entry = json.loads(text)
        now = [await live_customer_id(client, layout, c) for c in entry["customer_ids"]]
        if None in now or now[0] == now[1]:
            continue
        entries.append({**entry, "live_customer_ids": now})
    return entries


async def find_customer(client: aioredis.Redis, layout: GraphLayout, identifier: Identifier) -> CustomerView | None:
    """Return the 360 view of the customer owning a hashed identifier, or None."""
    owner = await client.hget(layout.identifier_key(identifier_ref(identifier)), "owner")
    return await read_customer(client, layout, _text(owner)) if owner is not None else None
