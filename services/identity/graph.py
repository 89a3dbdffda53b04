"""The identity graph in Redis: each event, merge or split is one atomic Lua script; a batch is one pipeline.

The scripts and the key layout are in `scripts.py`; the rules (what may merge) in `domain.GraphRules`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from services.identity.customer360 import CustomerView, find_customer, read_customer
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
from services.identity.match_model import ModelState
from services.identity.matching import PersonAttributes
from services.identity.scripts import (
    ANSWERS_FORGET_SCRIPT,
    ERASE_SCRIPT,
    MATCH_EXCHANGE_SCRIPT,
    MATCH_FINISH_SCRIPT,
    MATCH_FORGET_SCRIPT,
    MERGE_MANY_SCRIPT,
    MERGE_SCRIPT,
    RESOLVE_MANY_SCRIPT,
    RESOLVE_SCRIPT,
    UNMERGE_SCRIPT,
    script_sha,
)

RESOLVE_SCRIPT_SHA = script_sha(RESOLVE_SCRIPT)
RESOLVE_MANY_SHA = script_sha(RESOLVE_MANY_SCRIPT)
MERGE_MANY_SHA = script_sha(MERGE_MANY_SCRIPT)
MERGE_SCRIPT_SHA = script_sha(MERGE_SCRIPT)
UNMERGE_SCRIPT_SHA = script_sha(UNMERGE_SCRIPT)
ERASE_SCRIPT_SHA = script_sha(ERASE_SCRIPT)
MATCH_EXCHANGE_SHA = script_sha(MATCH_EXCHANGE_SCRIPT)
MATCH_FINISH_SHA = script_sha(MATCH_FINISH_SCRIPT)
MATCH_FORGET_SHA = script_sha(MATCH_FORGET_SCRIPT)
ANSWERS_FORGET_SHA = script_sha(ANSWERS_FORGET_SCRIPT)
_SCRIPTS = {ANSWERS_FORGET_SHA: ANSWERS_FORGET_SCRIPT,
            RESOLVE_SCRIPT_SHA: RESOLVE_SCRIPT, MERGE_SCRIPT_SHA: MERGE_SCRIPT, UNMERGE_SCRIPT_SHA: UNMERGE_SCRIPT,
            ERASE_SCRIPT_SHA: ERASE_SCRIPT, RESOLVE_MANY_SHA: RESOLVE_MANY_SCRIPT, MERGE_MANY_SHA: MERGE_MANY_SCRIPT}

Call = tuple[str, list[str], list[str]]  # (script sha, KEYS, ARGV)
Argument = str | int | bytes


def pack_command(args: Sequence[Argument]) -> bytes:
    r"""Encode one command in RESP, as Redis reads it.

    redis-py's general packer costs about three times as much per argument, and a batch of
    events sends thousands of arguments.

    >>> pack_command(["GET", "k"]), pack_command(["SET", "k", 7])
    (b'*2\r\n$3\r\nGET\r\n$1\r\nk\r\n', b'*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n7\r\n')
    """
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else arg.encode() if isinstance(arg, str) else str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class CommandChannel:
    """One connection held for a batch: commands go out as soon as they are ready, their answers are
    read later in the order sent, so Redis works on one part of a batch while Python works on another.

    An error answer is returned in its place (as the exception), not raised. Leaving the channel
    with answers unread, or on an exception, drops the connection (its state is unknown).
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._pool = client.connection_pool
        self._connection: Any = None
        self._unread = 0

    async def __aenter__(self) -> CommandChannel:
        self._connection = await self._pool.get_connection()
        return self

    async def __aexit__(self, exc_type: object, exc: object, traceback: object) -> None:
        try:
            if exc_type is not None or self._unread:
                await self._connection.disconnect()
        finally:
            await self._pool.release(self._connection)

    async def send(self, commands: Sequence[Sequence[Argument]]) -> None:
        if commands:
            await self._connection.send_packed_command(b"".join(pack_command(c) for c in commands),
                                                       check_health=False)
            self._unread += len(commands)

    async def receive(self, count: int) -> list[Any]:
        """Read the answers of the next `count` commands sent."""
        answers: list[Any] = []
        for _ in range(count):
            try:
                answers.append(await self._connection.read_response())
            except ResponseError as error:
                answers.append(error)
            self._unread -= 1
        return answers


async def run_commands(client: aioredis.Redis, commands: Sequence[Sequence[Argument]]) -> list[Any]:
    """Send commands in one write on one connection and read their answers in order (errors in place)."""
    async with CommandChannel(client) as channel:
        await channel.send(commands)
        return await channel.receive(len(commands))


def evalsha(sha: str, keys: Sequence[str], args: Sequence[Argument]) -> tuple[Argument, ...]:
    return ("EVALSHA", sha, len(keys), *keys, *args)


def parse_answer(answer: object) -> Resolution:
    """Read one graph script's answer; an error answer is raised."""
    if isinstance(answer, Exception):
        raise answer
    if not isinstance(answer, str | bytes):
        raise TypeError(f"graph script answered {type(answer).__name__}, expected JSON text")
    return parse_resolution(answer)


class GraphStore(Protocol):
    """The identity graph as the deterministic resolver and the customer API use it.

    `IdentityGraph` keeps it in Redis, its rules in Lua (scripts.py) so every worker applies them
    atomically. `tests/unit/identity/fakes.py` holds a Python in-memory version of the same rules;
    `tests/integration/test_identity_graph_contract.py` runs one suite against both (the real one on
    Valkey), so the fake cannot drift from the Lua, and fast tests of the resolver's logic run on the fake.
    Probabilistic matching, erasure and the sweep stay Redis-only (they are tested on Valkey).
    """

    async def resolve(self, requests: Sequence[ResolutionRequest]) -> list[Resolution]: ...

    async def merge_customers(
        self, op_id: str, time_ms: int, customers: tuple[str, str], reason: str, score: float | None
    ) -> Resolution: ...

    async def unmerge(
        self, op_id: str, time_ms: int, customer_id: str, identifiers: Sequence[Identifier], reason: str
    ) -> Resolution: ...

    async def customer(self, customer_id: str) -> CustomerView | None: ...

    async def find(self, identifier: Identifier) -> CustomerView | None: ...


class IdentityGraph:
    """Resolve events against the identity graph, a whole batch per Redis round trip (the `GraphStore` in Redis)."""

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

    def resolve_many_command(self, requests: Sequence[ResolutionRequest]) -> tuple[Argument, ...]:
        """One command resolving several events in order, each as `resolve` would (see `script_for_many`)."""
        return self._many(RESOLVE_MANY_SHA, [script_call(r, self.layout, self.rules, self._event_ttl_s)
                                             for r in requests])

    def merge_many_command(
        self, merges: Sequence[tuple[str, int, tuple[str, str], str, float | None]]
    ) -> tuple[Argument, ...]:
        """One command making several merges (op id, time, customers, reason, score) in order."""
        return self._many(MERGE_MANY_SHA, [
            ([self.layout.customer_key(customers[0])],
             merge_call(op_id, time_ms, customers, reason, score, self.layout, self.rules, self._event_ttl_s))
            for op_id, time_ms, customers, reason, score in merges])

    def _many(self, sha: str, calls: Sequence[tuple[list[str], list[str]]]) -> tuple[Argument, ...]:
        keys: list[str] = []
        args: list[Argument] = [self.layout.prefix, self.rules.to_json(), "", "0", self._event_ttl_s]
        for call_keys, call_args in calls:
            # Every call's ARGV starts with prefix, rules, op id, time, ttl (domain._common_args).
            keys.extend(call_keys)
            args.extend((call_args[2], call_args[3], len(call_keys), len(call_args) - 5, *call_args[5:]))
        return evalsha(sha, keys, args)

    @staticmethod
    def parse_many_answer(answer: object) -> list[Resolution]:
        """Read the answer of a `..._many_command`; an error answer is raised."""
        if isinstance(answer, Exception):
            raise answer
        if not isinstance(answer, bytes):
            raise TypeError(f"graph script answered {type(answer).__name__}, expected text")
        return [parse_resolution(one) for one in answer.split(b"\x1e")] if answer else []

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

    async def unmerge(
        self, op_id: str, time_ms: int, customer_id: str, identifiers: Sequence[Identifier], reason: str
    ) -> Resolution:
        """Split `identifiers` off `customer_id` into a new customer; raises GraphRefused if it cannot."""
        args = unmerge_call(op_id, time_ms, customer_id, identifiers, reason, self.layout, self.rules,
                            self._event_ttl_s)
        [answer] = await self.run([(UNMERGE_SCRIPT_SHA, [self.layout.customer_key(customer_id)], args)])
        return answer

    async def customer(self, customer_id: str) -> CustomerView | None:
        """The customer-360 view of a customer (or of the one it was merged into), or None if unknown."""
        return await read_customer(self.client, self.layout, customer_id)

    async def find(self, identifier: Identifier) -> CustomerView | None:
        """The customer-360 view of the customer owning a hashed identifier, or None."""
        return await find_customer(self.client, self.layout, identifier)

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

    async def forget_answers(self, committed: Mapping[str, int]) -> int:
        """Drop the answers kept for redeliveries of records below each partition's committed offset.

        `committed`: "<topic>:<partition>" -> the offset the consumer group committed (the next to read).
        Returns how many answers went.
        """
        if not committed:
            return 0
        args: list[Argument] = [self.layout.prefix]
        for partition, offset in committed.items():
            args.extend((partition, offset))
        keys = [self.layout.customer_key("")]
        try:
            return int(await self.client.evalsha(ANSWERS_FORGET_SHA, len(keys), *keys, *args))
        except NoScriptError:
            await self.load_script()
            return int(await self.client.evalsha(ANSWERS_FORGET_SHA, len(keys), *keys, *args))

    async def sweep(self, customer_ids: Sequence[str], identifiers: Sequence[Identifier], chunk: int = 1000) -> int:
        """Remove what the erase script cannot find by key: the answers kept for redeliveries (`event:*`,
        and the fields of `answers:*` not yet committed) that name the customer, and its ids in other identifiers'
        shared-use sets, in the matching blocks, among other customers' possible matches, and in
        the review and pending lists. One SCAN over the graph's keys; returns keys changed.
        """
        needles = [n for n in (*customer_ids, *(i.value for i in identifiers)) if n]
        if not needles:
            return 0
        changed = 0
        prefix = self.layout.prefix
        batch: list[bytes] = []

        async def flush() -> int:
            events = [k for k in batch if k.startswith(f"{prefix}event:".encode())]
            answers = [k for k in batch if k.startswith(f"{prefix}answers:".encode())]
            # block: is where matching kept its blocks before match:blocks:.
            sets = [k for k in batch if k.endswith(b":customers") or k.startswith(f"{prefix}block:".encode())]
            possible = [k for k in batch if k.startswith(f"{prefix}match:possible:".encode())]
            blocks = [k for k in batch if k.startswith(f"{prefix}match:blocks:".encode())]
            lists = [k for k in batch if k in (f"{prefix}match:review".encode(), f"{prefix}match:pending".encode())]
            done = 0
            values = await self.client.mget(events) if events else []
            entries = [(key, entry) for key in lists for entry in await self.client.lrange(key, 0, -1)]
            async with self.client.pipeline(transaction=False) as pipe:
                for key, value in zip(events, values, strict=True):
                    if value is not None and any(n.encode() in value for n in needles):
                        pipe.delete(key)
                        done += 1
                for key, entry in entries:
                    if any(n.encode() in entry for n in needles):
                        pipe.lrem(key, 0, entry.decode() if isinstance(entry, bytes) else entry)
                        done += 1
                for key in sets:
                    pipe.srem(key, *customer_ids)
                for key in possible:
                    pipe.hdel(key, *customer_ids)
                replies = await pipe.execute()
            return (done + sum(1 for r in replies[done:] if r) + sum([await drop_from_blocks(k) for k in blocks])
                    + sum([await drop_answers(k) for k in answers]))

        async def drop_answers(key: bytes) -> int:
            # Answers kept per partition until their offsets are committed: the fields naming the customer.
            fields = [field async for field, value in self.client.hscan_iter(key, count=chunk)
                      if any(n.encode() in value for n in needles)]
            return int(await self.client.hdel(key, *fields)) if fields else 0

        async def drop_from_blocks(key: bytes) -> int:
            # A block's value is its customer ids, space-separated: find the blocks naming the
            # customer, then take it out with a script that re-reads each (the index may have grown it).
            gone = {c.encode() for c in customer_ids}
            fields = [field async for field, value in self.client.hscan_iter(key, count=chunk)
                      if gone & set(value.split(b" "))]
            if not fields:
                return 0
            args = [len(customer_ids), *customer_ids, *fields]
            try:
                return int(await self.client.evalsha(MATCH_FORGET_SHA, 1, key, *args))
            except NoScriptError:
                await self.client.script_load(MATCH_FORGET_SCRIPT)
                return int(await self.client.evalsha(MATCH_FORGET_SHA, 1, key, *args))

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
        return [parse_answer(answer) for answer in answers]

    async def _evalsha_all(self, calls: Sequence[Call]) -> list[object]:
        return await run_commands(self.client, [evalsha(sha, keys, args) for sha, keys, args in calls])


def _glob_escape(text: str) -> str:
    """Escape Redis glob characters in a key prefix.

    >>> _glob_escape("ts:identity:{graph}:")
    'ts:identity:{graph}:'
    >>> len(_glob_escape("a*b[c]"))
    9
    """
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


@dataclass(frozen=True)
class MatchState:
    """What the person index says about matching as a whole: the model state JSON and the counters."""

    model_state: bytes | None
    records: int
    pairs: int
    pending: int = 0  # pairs waiting for a usable model


@dataclass(frozen=True)
class ExchangedRecord:
    """A record as the index saw it: its customer ("" if its event was suppressed), whether its event
    created that customer, and (if so) the stored records sharing one of its blocks."""

    customer_id: str
    created: bool
    candidates: list[tuple[str, PersonAttributes]]


@dataclass(frozen=True)
class PossibleMatchEntry:
    customer_id: str
    other_customer_id: str
    entry_json: str


class PersonIndex:
    """Records' personal attributes, their blocking keys and the matching model, under the graph's prefix.

    The key layout is in `scripts.py` (``match:*``). Attributes are clear personal data (fuzzy
    comparison cannot work on hashes): they stay in the identity graph's Redis, are never
    emitted, and are only written when matching is switched on. A chunk of records costs one
    script call (find candidates, index the records), a batch one more (patterns, counters,
    possible matches), and a refit one read of EM's window.
    """

    def __init__(self, client: aioredis.Redis, layout: GraphLayout, hash_key: bytes, max_block_size: int,
                 max_records_per_customer: int = 20, review_length: int = 1000) -> None:
        self.client = client
        self.layout = layout
        # A key of its own for blocking keys (BLAKE2b takes at most 64 bytes), apart from the identifiers' HMACs.
        self._digest_key = hashlib.sha256(b"touchstream-identity-blocking|" + hash_key).digest()
        self._max_block_size = max_block_size
        self._max_records = max_records_per_customer
        self._review_length = review_length
        self.model_key = layout.match_key("model")

    def block_digest(self, blocking_key: str) -> str:
        # 64 bits: a collision only adds a candidate, and shorter names keep the index smaller.
        return hashlib.blake2b(blocking_key.encode(), key=self._digest_key, digest_size=8).hexdigest()

    def exchange_command(self, records: Sequence[tuple[str, str, PersonAttributes, Sequence[str]]],
                         ) -> tuple[Argument, ...]:
        """The command finding candidates for, then indexing, records given as (event op id, its answer slot,
        attributes, digests).

        It must follow the resolve calls of those events in the same connection: it reads their answers.
        """
        args: list[Argument] = [self.layout.prefix, self._max_block_size, self._max_records]
        for op_id, slot, person, digests in records:
            args.extend((op_id, slot, person.to_record(), len(digests)))
            args.extend(digests)
        return evalsha(MATCH_EXCHANGE_SHA, [self.model_key], args)

    @staticmethod
    def parse_exchange(answer: object, parsed: dict[bytes, list[PersonAttributes]]) -> tuple[
            MatchState, list[ExchangedRecord]]:
        """Read an exchange answer; `parsed` caches record texts across the calls of a batch."""
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, list)
        model_state, records, pairs, pending, body = answer
        exchanged = []
        for part in body.split(b"\x1e") if body else ():
            customer_id, created, *flat = part.split(b"\x1f")
            candidates: list[tuple[str, PersonAttributes]] = []
            for k in range(0, len(flat), 2):
                blob = flat[k + 1]
                people = parsed.get(blob)
                if people is None:
                    people = parsed[blob] = [PersonAttributes.from_record(r) for r in blob.split(b"\n")]
                candidate = flat[k].decode()
                candidates.extend((candidate, person) for person in people)
            exchanged.append(ExchangedRecord(customer_id.decode(), created == b"1", candidates))
        return MatchState(model_state, int(records), int(pairs), int(pending)), exchanged

    def finish_command(
        self, patterns: Mapping[str, int], chunk: int, new_records: int, new_pairs: int,
        possible: Sequence[PossibleMatchEntry], model_state: str | None, pending: Sequence[bytes],
        max_pending: int, drop_pending: bool,
    ) -> tuple[Argument, ...]:
        """The command recording what a batch's matching leaves: pattern counts, counters, possible matches,
        pairs left pending (or dropped, once decided) and a refitted model."""
        args: list[Argument] = [self.layout.prefix, self._review_length, chunk, new_records, new_pairs, max_pending,
                                "1" if drop_pending else "0", model_state or "", len(patterns)]
        for key, count in patterns.items():
            args.extend((key, count))
        args.append(len(possible))
        for entry in possible:
            args.extend((entry.customer_id, entry.other_customer_id, entry.entry_json))
        args.append(len(pending))
        args.extend(pending)
        return evalsha(MATCH_FINISH_SHA, [self.model_key], args)

    async def window_patterns(self, chunks: Sequence[int]) -> dict[str, int]:
        """Add up the pattern counts of the chunks that make up EM's window."""
        async with self.client.pipeline(transaction=False) as pipe:
            for chunk in chunks:
                pipe.hgetall(self.layout.match_patterns_key(chunk))
            answers = await pipe.execute()
        total: dict[str, int] = {}
        for counts in answers:
            for key, count in counts.items():
                name = key.decode()
                total[name] = total.get(name, 0) + int(count)
        return total

    async def pending(self) -> list[bytes]:
        """Return the pairs compared while no model was usable, oldest first."""
        return cast(list[bytes], await self.client.lrange(self.layout.match_key("pending"), 0, -1))

    async def drop_chunks(self, chunks: Sequence[int]) -> None:
        """Forget pattern counts that slid out of the window."""
        if chunks:
            await self.client.delete(*(self.layout.match_patterns_key(c) for c in chunks))

    async def describe_model(self) -> dict[str, Any]:
        """Return the matching model in use as an operator reads it, with the last fit tried and the counters."""
        state_text, records, pairs = await self.client.mget(
            self.model_key, self.layout.match_key("records"), self.layout.match_key("pairs"))
        state = ModelState.from_json(state_text)
        return {"model": None if state.model is None else state.model.describe(),
                "last_fit_tried_at_records": state.tried_at_records,
                "last_fit_rejected_fields": list(state.rejected_fields),
                "records": int(records or 0), "pairs": int(pairs or 0)}

    async def load_scripts(self) -> None:
        for script in (MATCH_EXCHANGE_SCRIPT, MATCH_FINISH_SCRIPT):
            await self.client.script_load(script)
