"""The identity graph in Redis: each event, merge or split is one atomic Lua script; a batch is one pipeline.

The scripts and the key layout are in `scripts.py`; the rules (what may merge) in `domain.GraphRules`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from services.identity.domain import (
    Erasure,
    GraphLayout,
    GraphRules,
    Identifier,
    Resolution,
    ResolutionRequest,
    erase_call,
    merge_call,
    parse_erasure,
    parse_resolution,
    script_call,
    unmerge_call,
)
from services.identity.matching import PersonAttributes, blocking_keys
from services.identity.scripts import ERASE_SCRIPT, MERGE_SCRIPT, RESOLVE_SCRIPT, UNMERGE_SCRIPT, script_sha

RESOLVE_SCRIPT_SHA = script_sha(RESOLVE_SCRIPT)
MERGE_SCRIPT_SHA = script_sha(MERGE_SCRIPT)
UNMERGE_SCRIPT_SHA = script_sha(UNMERGE_SCRIPT)
ERASE_SCRIPT_SHA = script_sha(ERASE_SCRIPT)
_SCRIPTS = {RESOLVE_SCRIPT_SHA: RESOLVE_SCRIPT, MERGE_SCRIPT_SHA: MERGE_SCRIPT, UNMERGE_SCRIPT_SHA: UNMERGE_SCRIPT,
            ERASE_SCRIPT_SHA: ERASE_SCRIPT}

Call = tuple[str, list[str], list[str]]  # (script sha, KEYS, ARGV)


class IdentityGraph:
    """Resolve events against the identity graph, a whole batch per Redis round trip."""

    def __init__(self, client: aioredis.Redis, layout: GraphLayout, rules: GraphRules, event_ttl_s: int) -> None:
        self.client = client
        self.layout = layout
        self.rules = rules
        self._event_ttl_s = event_ttl_s

    async def load_script(self) -> None:
        """Register the graph's scripts so calls can name them by SHA."""
        for script in _SCRIPTS.values():
            await self.client.script_load(script)

    def resolve_call(self, request: ResolutionRequest) -> Call:
        keys, args = script_call(request, self.layout, self.rules, self._event_ttl_s)
        return RESOLVE_SCRIPT_SHA, keys, args

    async def resolve(self, requests: Sequence[ResolutionRequest]) -> list[Resolution]:
        """Resolve each request in order; the answers are in the same order."""
        return await self.run([self.resolve_call(r) for r in requests])

    async def merge_customers(
        self, op_id: str, time_ms: int, customers: tuple[str, str], reason: str, score: float | None
    ) -> Resolution:
        """Merge two customers (whatever they were merged into since) unless a rule refuses it."""
        args = merge_call(op_id, time_ms, customers, reason, score, self.layout, self.rules, self._event_ttl_s)
        # The one KEY routes the call on Redis Cluster; every key it touches shares its hash tag.
        [answer] = await self.run([(MERGE_SCRIPT_SHA, [self.layout.customer_key(customers[0])], args)])
        return answer

    async def merge_many(
        self, merges: Sequence[tuple[str, int, tuple[str, str], str, float | None]]
    ) -> list[Resolution]:
        """Run several merges (op id, time, customers, reason, score) in one pipeline, in order."""
        return await self.run([
            (MERGE_SCRIPT_SHA, [self.layout.customer_key(customers[0])],
             merge_call(op_id, time_ms, customers, reason, score, self.layout, self.rules, self._event_ttl_s))
            for op_id, time_ms, customers, reason, score in merges])

    async def unmerge(
        self, op_id: str, time_ms: int, customer_id: str, identifiers: Sequence[Identifier], reason: str
    ) -> Resolution:
        """Split `identifiers` off `customer_id` into a new customer; raises GraphRefused if it cannot."""
        args = unmerge_call(op_id, time_ms, customer_id, identifiers, reason, self.layout, self.rules,
                            self._event_ttl_s)
        [answer] = await self.run([(UNMERGE_SCRIPT_SHA, [self.layout.customer_key(customer_id)], args)])
        return answer

    async def erase(self, op_id: str, time_ms: int, customer_id: str, mode: str) -> Erasure:
        """Suppress a customer's identifiers ("plan"), or suppress and delete its graph entries ("erase")."""
        args = erase_call(op_id, time_ms, customer_id, mode, self.layout, self.rules, self._event_ttl_s)
        keys = [self.layout.customer_key(customer_id)]
        try:
            answer = await self.client.evalsha(ERASE_SCRIPT_SHA, len(keys), *keys, *args)
        except NoScriptError:
            await self.load_script()
            answer = await self.client.evalsha(ERASE_SCRIPT_SHA, len(keys), *keys, *args)
        return parse_erasure(answer)

    async def sweep(self, customer_ids: Sequence[str], identifiers: Sequence[Identifier], chunk: int = 1000) -> int:
        """Remove what the erase script cannot find by key: the per-event answers (`event:*`, kept
        `event_ttl_s` for redeliveries) that name the customer, and its ids in other identifiers'
        shared-use sets and in the matching blocks. One SCAN over the graph's keys; returns keys changed.
        """
        needles = [n for n in (*customer_ids, *(i.value for i in identifiers)) if n]
        if not needles:
            return 0
        changed = 0
        prefix = self.layout.prefix
        batch: list[bytes] = []

        async def flush() -> int:
            events = [k for k in batch if k.startswith(f"{prefix}event:".encode())]
            sets = [k for k in batch if k.endswith(b":customers") or k.startswith(f"{prefix}block:".encode())]
            done = 0
            values = await self.client.mget(events) if events else []
            async with self.client.pipeline(transaction=False) as pipe:
                for key, value in zip(events, values, strict=True):
                    if value is not None and any(n.encode() in value for n in needles):
                        pipe.delete(key)
                        done += 1
                for key in sets:
                    pipe.srem(key, *customer_ids)
                replies = await pipe.execute()
            return done + sum(1 for r in replies[done:] if r)

        async for key in self.client.scan_iter(match=f"{_glob_escape(prefix)}*", count=chunk):
            batch.append(key if isinstance(key, bytes) else str(key).encode())
            if len(batch) >= chunk:
                changed += await flush()
                batch = []
        if batch:
            changed += await flush()
        return changed

    async def run(self, calls: Sequence[Call]) -> list[Resolution]:
        """Run script calls in one pipeline, in order, and parse their answers."""
        if not calls:
            return []
        answers = await self._evalsha_all(calls)
        if any(isinstance(a, NoScriptError) for a in answers):
            # Redis restarted or flushed its scripts. Rerunning the whole batch is safe:
            # calls that did run answer again from their event key.
            await self.load_script()
            answers = await self._evalsha_all(calls)
        resolutions = []
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
            if not isinstance(answer, str | bytes):
                raise TypeError(f"graph script answered {type(answer).__name__}, expected JSON text")
            resolutions.append(parse_resolution(answer))
        return resolutions

    async def _evalsha_all(self, calls: Sequence[Call]) -> list[object]:
        async with self.client.pipeline(transaction=False) as pipe:
            for sha, keys, args in calls:
                pipe.evalsha(sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))


def _glob_escape(text: str) -> str:
    """Escape Redis glob characters in a key prefix.

    >>> _glob_escape("ts:identity:{graph}:")
    'ts:identity:{graph}:'
    >>> len(_glob_escape("a*b[c]"))
    9
    """
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


class PersonIndex:
    """Personal attributes and blocking keys for probabilistic matching, under the graph's prefix.

    - ``person:<customer_id>``  JSON of the latest attributes seen for that customer. These are
      clear personal data (fuzzy comparison cannot work on hashes): they stay in the identity
      graph's Redis, are never emitted, and are only written when matching is switched on.
    - ``block:<hmac>``         set of customer ids sharing a blocking key; the key is hashed so
      key names carry no personal data.
    """

    def __init__(self, client: aioredis.Redis, layout: GraphLayout, hash_key: bytes, max_block_size: int) -> None:
        self.client = client
        self.layout = layout
        self._hash_key = hash_key
        self._max_block_size = max_block_size

    def block_key(self, blocking_key: str) -> str:
        digest = hmac.new(self._hash_key, blocking_key.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{self.layout.prefix}block:{digest}"

    def person_key(self, customer_id: str) -> str:
        return f"{self.layout.prefix}person:{customer_id}"

    async def candidates_many(self, people: Sequence[PersonAttributes]) -> list[dict[str, PersonAttributes]]:
        """Return, for each person, the customers sharing a blocking key with it and their attributes."""
        if not people:
            return []
        keys = [[self.block_key(k) for k in blocking_keys(p)] for p in people]
        async with self.client.pipeline(transaction=False) as pipe:
            for person_keys in keys:
                for key in person_keys:
                    pipe.scard(key)
                    pipe.smembers(key)
            answers = iter(await pipe.execute())
        wanted: list[set[str]] = []
        for person_keys in keys:
            ids: set[str] = set()
            for _ in person_keys:
                size, members = next(answers), next(answers)
                # A blocking key shared by too many says too little: skip rather than compare them all.
                if size <= self._max_block_size:
                    ids.update(m.decode() for m in members)
            wanted.append(ids)
        every = sorted(set().union(*wanted))
        records = await self.client.mget([self.person_key(i) for i in every]) if every else []
        known = {i: PersonAttributes.from_json(r) for i, r in zip(every, records, strict=True) if r is not None}
        return [{i: known[i] for i in sorted(ids) if i in known} for ids in wanted]

    async def add_many(self, entries: Sequence[tuple[str, PersonAttributes]]) -> None:
        """Index each person under its customer id so later events can be matched to it."""
        async with self.client.pipeline(transaction=False) as pipe:
            for customer_id, person in entries:
                pipe.set(self.person_key(customer_id), person.to_json())
                for key in blocking_keys(person):
                    pipe.sadd(self.block_key(key), customer_id)
            await pipe.execute()
