"""Redis adapter: customer states and silent paths, per-partition schedules and watermarks, model checkpoint.

Key layout (prefix from settings, default `ts:scoring`):
  {prefix}:customer:{customer_id}  string, CustomerState in the compact encoding of
                                   `codec.encode_state` (waiting examples, stamped with their
                                   path layout, and the recently applied message/merge ids inside
                                   it, so one SET makes an update and its idempotency record
                                   atomic); JSON written before it still reads
  {prefix}:path:{customer_id}      string, the customer's silent path (b"P", the path layout's
                                   id as uint32, then features.PATH_FIELDS as little-endian
                                   float64; codec.py): its model inputs at any later time
                                   while it stays silent, without loading the state
  {prefix}:due:{partition}         sorted set, member "{customer_id}|{t_ms}" per waiting
                                   example, score = its due time (t + step)
  {prefix}:silent:{partition}      sorted set, member customer_id, score = event time of its
                                   next silent example not yet made (learned from its path
                                   once its step has passed)
  {prefix}:tick:{partition}        sorted set, member customer_id, score = event time of its
                                   next crossing check (one member per customer)
  {prefix}:watermark:{partition}   string, newest event time seen on the partition (ms)
  {prefix}:model                   string, pickled Learner checkpoint, signed (checkpoint.py)
  {prefix}:model:refused           string, the last checkpoint refused for a missing or wrong
                                   signature, kept as found for whoever investigates (never loaded)
  {prefix}:erased                  sorted set, erased customers' tokens (touchstream.privacy.ErasedCustomers):
                                   their events, merges and checks are dropped, never scored again

Due, silent and tick sets and watermarks are per partition because only the partition's owner may
touch its customers' states; the owner is the single writer of all of them. The one exception is
an erasure (`forget`), which removes a customer's members from every partition's sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from services.scoring.codec import decode_path, decode_state, encode_path, encode_state
from services.scoring.state import CustomerState
from touchstream.privacy import DEFAULT_ERASED_TTL_S, ErasedCustomers, erased_token

# Commands per pipeline round trip.
PIPELINE_CHUNK = 500

@dataclass
class StateChanges:
    """Everything one batch writes back."""

    states: dict[str, CustomerState] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    due_added: dict[int, dict[str, int]] = field(default_factory=dict)
    due_removed: dict[int, set[str]] = field(default_factory=dict)
    watermarks: dict[int, int] = field(default_factory=dict)
    ticks: dict[int, dict[str, int]] = field(default_factory=dict)
    ticks_removed: dict[int, set[str]] = field(default_factory=dict)
    silent: dict[int, dict[str, int]] = field(default_factory=dict)
    silent_removed: dict[int, set[str]] = field(default_factory=dict)
    paths: dict[str, np.ndarray] = field(default_factory=dict)
    paths_deleted: set[str] = field(default_factory=set)

    def add_due(self, partition: int, customer_id: str, t_ms: int, due_ms: int) -> None:
        self.due_added.setdefault(partition, {})[due_member(customer_id, t_ms)] = due_ms

    def remove_due(self, partition: int, members: Iterable[str]) -> None:
        self.due_removed.setdefault(partition, set()).update(members)

    def schedule_tick(self, partition: int, customer_id: str, t_ms: int | None) -> None:
        """Set (or, for None, clear) the customer's next as-of rescore in `partition`."""
        if t_ms is None:
            self.ticks.get(partition, {}).pop(customer_id, None)
            self.ticks_removed.setdefault(partition, set()).add(customer_id)
        else:
            self.ticks_removed.get(partition, set()).discard(customer_id)
            self.ticks.setdefault(partition, {})[customer_id] = t_ms

    def schedule_silent(self, partition: int, customer_id: str, t_ms: int | None, path: np.ndarray | None) -> None:
        """Set the customer's next silent example and its path (None: no more of them; the path goes too)."""
        if t_ms is None or path is None:
            self.silent.get(partition, {}).pop(customer_id, None)
            self.silent_removed.setdefault(partition, set()).add(customer_id)
            self.paths.pop(customer_id, None)
            self.paths_deleted.add(customer_id)
        else:
            self.silent_removed.get(partition, set()).discard(customer_id)
            self.silent.setdefault(partition, {})[customer_id] = t_ms
            self.paths_deleted.discard(customer_id)
            self.paths[customer_id] = path

    def advance_silent(self, partition: int, customer_id: str, t_ms: int) -> None:
        """Move the customer's next silent example on; its path stays as stored."""
        self.silent.setdefault(partition, {})[customer_id] = t_ms


@dataclass(frozen=True)
class BatchSchedules:
    """What a batch of touchpoints needs from Redis before its states are loaded (one round trip)."""

    erased: set[str]
    # Per partition, (customer_id, check time) of the crossing checks due, oldest first.
    checks: dict[int, list[tuple[str, int]]]
    # Next silent example time of each customer of the batch that has one.
    silent_next: dict[str, int]


@dataclass(frozen=True)
class MaturedMembers:
    """Per partition, the waiting examples due and the silent customers whose next example is due."""

    due: dict[int, list[str]]
    silent: dict[int, list[tuple[str, int]]]


def _text(member: Any) -> str:
    return member.decode() if isinstance(member, bytes) else str(member)


def due_member(customer_id: str, t_ms: int) -> str:
    """Return the due-set member of one waiting example.

    >>> due_member("c-1", 42)
    'c-1|42'
    """
    return f"{customer_id}|{t_ms}"


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def customer_of(member: str) -> str:
    """Return the customer id inside a due-set member.

    >>> customer_of("a|b|42")
    'a|b'
    """
    return member.rsplit("|", 1)[0]


class RedisScoringStore:
    """Load and save scoring state in Redis, a batch per round trip."""

    def __init__(self, redis: aioredis.Redis, prefix: str = "ts:scoring", erased_ttl_s: int = DEFAULT_ERASED_TTL_S
                 ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.erased = ErasedCustomers(redis, f"{prefix}:erased", erased_ttl_s)

    def customer_key(self, customer_id: str) -> str:
        return f"{self.prefix}:customer:{customer_id}"

    def due_key(self, partition: int) -> str:
        return f"{self.prefix}:due:{partition}"

    def watermark_key(self, partition: int) -> str:
        return f"{self.prefix}:watermark:{partition}"

    def tick_key(self, partition: int) -> str:
        return f"{self.prefix}:tick:{partition}"

    def silent_key(self, partition: int) -> str:
        return f"{self.prefix}:silent:{partition}"

    def path_key(self, customer_id: str) -> str:
        return f"{self.prefix}:path:{customer_id}"

    @property
    def model_key(self) -> str:
        return f"{self.prefix}:model"

    async def load(
        self, customer_ids: Iterable[str], partitions: Iterable[int] = ()
    ) -> tuple[dict[str, CustomerState], dict[int, int]]:
        """Return the stored states of `customer_ids` (absent ones left out) and the partitions' watermarks."""
        ids, parts = list(dict.fromkeys(customer_ids)), list(dict.fromkeys(partitions))
        keys = [self.customer_key(c) for c in ids] + [self.watermark_key(p) for p in parts]
        replies: list[bytes | None] = []
        # Single GETs in a pipeline instead of MGET: MGET across hash slots fails on Redis Cluster.
        for start in range(0, len(keys), PIPELINE_CHUNK):
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys[start : start + PIPELINE_CHUNK]:
                    pipe.get(key)
                replies.extend(await pipe.execute())
        states = {cid: decode_state(raw) for cid, raw in zip(ids, replies, strict=False) if raw}
        watermarks = {p: int(raw) for p, raw in zip(parts, replies[len(ids) :], strict=True) if raw is not None}
        return states, watermarks

    async def due_members(self, partition: int, maturity_cutoff_ms: int) -> list[str]:
        """Return the partition's waiting examples due by the cutoff."""
        return [_text(m) for m in await self.redis.zrangebyscore(self.due_key(partition), "-inf", maturity_cutoff_ms)]

    async def batch_schedules(self, customers: dict[int, list[str]], checks_up_to_ms: dict[int, int]
                              ) -> BatchSchedules:
        """Return, in one round trip, which of `customers` (by partition) were erased, each partition's
        crossing checks due by its `checks_up_to_ms`, and the customers' next silent example times."""
        ids = list(dict.fromkeys(c for group in customers.values() for c in group))
        check_parts = list(checks_up_to_ms)
        silent_parts = [p for p, group in customers.items() if group]
        async with self.redis.pipeline(transaction=False) as pipe:
            if ids:
                pipe.zmscore(self.erased.key, [erased_token(c) for c in ids])
            for partition in check_parts:
                pipe.zrangebyscore(self.tick_key(partition), "-inf", checks_up_to_ms[partition], withscores=True)
            for partition in silent_parts:
                pipe.zmscore(self.silent_key(partition), customers[partition])
            replies = list(await pipe.execute())
        erased_at = replies.pop(0) if ids else []
        checks = {p: [(_text(m), int(score)) for m, score in replies.pop(0)] for p in check_parts}
        silent_next = {cid: int(score) for p in silent_parts
                       for cid, score in zip(customers[p], replies.pop(0), strict=True) if score is not None}
        erased = {cid for cid, at in zip(ids, erased_at, strict=True) if at is not None}
        return BatchSchedules(erased, checks, silent_next)

    async def matured_members(self, due_by_ms: dict[int, int], silent_by_ms: dict[int, int]) -> MaturedMembers:
        """Return each partition's waiting examples due by `due_by_ms` and silent customers due by
        `silent_by_ms` (its next example at or before it), in one round trip."""
        due_parts, silent_parts = list(due_by_ms), list(silent_by_ms)
        if not due_parts and not silent_parts:
            return MaturedMembers({}, {})
        async with self.redis.pipeline(transaction=False) as pipe:
            for partition in due_parts:
                pipe.zrangebyscore(self.due_key(partition), "-inf", due_by_ms[partition])
            for partition in silent_parts:
                pipe.zrangebyscore(self.silent_key(partition), "-inf", silent_by_ms[partition], withscores=True)
            replies = list(await pipe.execute())
        due = {p: [_text(m) for m in reply] for p, reply in zip(due_parts, replies, strict=False)}
        silent = {p: [(_text(m), int(score)) for m, score in reply]
                  for p, reply in zip(silent_parts, replies[len(due_parts):], strict=True)}
        return MaturedMembers(due, silent)

    async def due_ticks(self, up_to_ms: dict[int, int]) -> dict[int, list[tuple[str, int]]]:
        """Return each partition's (customer_id, crossing check time) due by its `up_to_ms`, oldest first."""
        return await self._scheduled_by(self.tick_key, up_to_ms)

    async def due_silent(self, up_to_ms: dict[int, int]) -> dict[int, list[tuple[str, int]]]:
        """Return each partition's (customer_id, next silent example time) at or before its `up_to_ms`."""
        return await self._scheduled_by(self.silent_key, up_to_ms)

    async def _scheduled_by(
        self, key: Callable[[int], str], up_to_ms: dict[int, int]
    ) -> dict[int, list[tuple[str, int]]]:
        parts = list(up_to_ms)
        if not parts:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for partition in parts:
                pipe.zrangebyscore(key(partition), "-inf", up_to_ms[partition], withscores=True)
            replies = await pipe.execute()
        return {
            p: [(_text(m), int(score)) for m, score in reply] for p, reply in zip(parts, replies, strict=True)
        }

    async def silent_schedule(self, customers: dict[int, list[str]]) -> dict[str, int]:
        """Return the next silent example time of each of `customers` (by partition) that has one."""
        parts = [p for p, ids in customers.items() if ids]
        if not parts:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for partition in parts:
                pipe.zmscore(self.silent_key(partition), customers[partition])
            replies = await pipe.execute()
        return {cid: int(score) for p, reply in zip(parts, replies, strict=True)
                for cid, score in zip(customers[p], reply, strict=True) if score is not None}

    async def load_paths(self, customer_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """Return the stored silent paths of `customer_ids` (absent ones left out)."""
        ids = list(dict.fromkeys(customer_ids))
        replies: list[bytes | None] = []
        for start in range(0, len(ids), PIPELINE_CHUNK):
            async with self.redis.pipeline(transaction=False) as pipe:
                for cid in ids[start : start + PIPELINE_CHUNK]:
                    pipe.get(self.path_key(cid))
                replies.extend(await pipe.execute())
        # A path stored under another layout (features.PATH_FIELDS changed) reads as absent (see codec).
        decoded = {cid: decode_path(raw) for cid, raw in zip(ids, replies, strict=True) if raw}
        return {cid: path for cid, path in decoded.items() if path is not None}

    async def save(self, changes: StateChanges, count_pending: Iterable[int] = ()) -> dict[int, int]:
        """Write a batch's changes in one round trip; return how many examples then wait in each of the
        `count_pending` partitions (counted in the same round trip, after the writes).

        Not a MULTI (it would fail across hash slots on Redis Cluster); instead the order
        makes any prefix that a crash leaves harmless: a due member whose example is not
        in the state yet is skipped when it comes due, a state is never saved before its
        examples' due members, and matured members go last.
        """
        commands: list[tuple[Any, ...]] = []
        for partition, members in changes.due_added.items():
            if members:
                commands.append(("zadd", self.due_key(partition), members))
        for partition, watermark in changes.watermarks.items():
            commands.append(("set", self.watermark_key(partition), watermark))
        for customer_id, state in changes.states.items():
            commands.append(("set", self.customer_key(customer_id), encode_state(state)))
        if changes.deleted:
            commands.append(("delete", *[self.customer_key(c) for c in changes.deleted]))
        for partition, removed in changes.due_removed.items():
            if removed:
                commands.append(("zrem", self.due_key(partition), *removed))
        # After the states: a lost tick update only delays or repeats a check (the state says
        # which check is current), and a state saved without its path and silent schedule is
        # repaired by the redelivered batch, which writes both from the state again.
        for partition, ticks in changes.ticks.items():
            if ticks:
                commands.append(("zadd", self.tick_key(partition), ticks))
        for partition, gone in changes.ticks_removed.items():
            if gone:
                commands.append(("zrem", self.tick_key(partition), *gone))
        for customer_id, path in changes.paths.items():
            commands.append(("set", self.path_key(customer_id), encode_path(path)))
        if changes.paths_deleted:
            commands.append(("delete", *[self.path_key(c) for c in changes.paths_deleted]))
        for partition, silent in changes.silent.items():
            if silent:
                commands.append(("zadd", self.silent_key(partition), silent))
        for partition, gone in changes.silent_removed.items():
            if gone:
                commands.append(("zrem", self.silent_key(partition), *gone))
        counted = list(count_pending)
        commands += [("zcard", self.due_key(partition)) for partition in counted]
        # In chunks, in order: one huge write (a batch that passes thousands of rescores)
        # would outlast redis-py's 5 s socket timeout on a busy host.
        replies: list[Any] = []
        for start in range(0, len(commands), PIPELINE_CHUNK):
            async with self.redis.pipeline(transaction=False) as pipe:
                for name, *args in commands[start : start + PIPELINE_CHUNK]:
                    getattr(pipe, name)(*args)
                replies.extend(await pipe.execute())
        return {p: int(n) for p, n in zip(counted, replies[len(replies) - len(counted):], strict=True)}

    async def forget(self, customer_ids: Iterable[str], partitions: Iterable[int]) -> int:
        """Delete every key and set member of `customer_ids` (an erasure): their states (with the
        examples waiting for a label) and silent paths, their due-set members, silent schedules
        and crossing checks in `partitions`; first record them as erased, so nothing brings them back.
        Idempotent; returns how many keys and members went."""
        ids = sorted(set(customer_ids))
        if not ids:
            return 0
        await self.erased.add(ids)
        parts = list(partitions)
        members: dict[int, list[str]] = {}
        for partition in parts:
            for cid in ids:
                pattern = _glob_escape(cid) + "|*"
                async for member, _ in self.redis.zscan_iter(self.due_key(partition), match=pattern, count=1000):
                    members.setdefault(partition, []).append(member.decode() if isinstance(member, bytes) else member)
        async with self.redis.pipeline(transaction=False) as pipe:
            for cid in ids:
                pipe.delete(self.customer_key(cid), self.path_key(cid))
            for partition in parts:
                pipe.zrem(self.tick_key(partition), *ids)
                pipe.zrem(self.silent_key(partition), *ids)
                if members.get(partition):
                    pipe.zrem(self.due_key(partition), *members[partition])
            replies = await pipe.execute()
        return sum(int(r) for r in replies)

    async def pending_counts(self, partitions: Iterable[int]) -> dict[int, int]:
        """Return how many examples wait in each partition's due set."""
        parts = list(partitions)
        async with self.redis.pipeline(transaction=False) as pipe:
            for partition in parts:
                pipe.zcard(self.due_key(partition))
            counts = await pipe.execute()
        return {p: int(n) for p, n in zip(parts, counts, strict=True)}

    async def load_checkpoint(self) -> bytes | None:
        raw = await self.redis.get(self.model_key)
        return raw.encode() if isinstance(raw, str) else raw

    async def save_checkpoint(self, data: bytes) -> None:
        await self.redis.set(self.model_key, data)

    @property
    def refused_model_key(self) -> str:
        return f"{self.prefix}:model:refused"

    async def keep_refused_checkpoint(self, data: bytes) -> None:
        """Keep a checkpoint refused as untrusted aside; the next checkpoint overwrites the model key."""
        await self.redis.set(self.refused_model_key, data)
