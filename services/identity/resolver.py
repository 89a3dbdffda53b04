"""Resolve prepared events against the graph, then (opt-in) match the unanchored ones on personal attributes.

This is the whole resolution path without Kafka: the worker (app.py) and the benchmarks call it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from redis.exceptions import NoScriptError

from services.identity.domain import MERGE_REASON_PROBABILISTIC, PossibleMatch, Resolution, ResolutionRequest
from services.identity.graph import (
    CommandChannel,
    GraphStore,
    IdentityGraph,
    MatchState,
    PersonIndex,
    PossibleMatchEntry,
    run_commands,
)
from services.identity.linking import BatchComparer, CandidatePair, NewRecord, decide_record
from services.identity.match_model import (
    MatchModel,
    ModelState,
    PatternScorer,
    fit_match_model,
    implausible_fields,
    merge_pattern_counts,
    parse_pattern_key,
    pattern_chunk,
    pattern_key,
    refit_due,
    window_chunks,
)
from services.identity.matching import MatchSettings, Pattern, PersonAttributes, blocking_keys, person_attributes

# Events per chunk when matching: Redis resolves and indexes one chunk while Python compares the
# one before, so the two cores work at once; smaller chunks overlap more but cost more round trips.
CHUNK_EVENTS = 100


@dataclass(frozen=True)
class EventToResolve:
    request: ResolutionRequest
    person: PersonAttributes | None = None

    @classmethod
    def of(cls, event: dict[str, Any], request: ResolutionRequest, matching: bool) -> EventToResolve:
        """Pair a request with the event's attributes when matching is on (parsing them costs time otherwise)."""
        return cls(request, person_attributes(event.get("properties_json")) if matching else None)


class MatchObserver(Protocol):
    """Where the resolver reports what matching did (the service's metrics)."""

    def count_comparisons(self, pairs: int, household_refused: int) -> None: ...

    def count_model_fit(self, model: MatchModel, used: bool) -> None: ...


@dataclass(frozen=True)
class RedisMatching:
    """What probabilistic matching needs: the graph in Redis and its person index.

    Matching pipelines the graph's commands and the index's on one connection (see IdentityResolver),
    so it needs the Redis graph itself, not any `GraphStore`; resolving without matching does not.
    """

    graph: IdentityGraph
    persons: PersonIndex


class _ScriptsMissing(Exception):
    """Redis answered NOSCRIPT: it restarted or flushed its scripts."""


@dataclass(frozen=True)
class _Link:
    """A merge matching decided: of the event at `n`'s customer, or (n None) of a pair left pending."""

    n: int | None
    op_id: str
    time_ms: int
    customers: tuple[str, str]
    weight: float


@dataclass
class _Batch:
    """What matching one batch gathers as its chunks come back."""

    items: Sequence[EventToResolve]
    resolutions: list[Resolution | None]
    keys: dict[int, tuple[str, ...]] = field(default_factory=dict)
    digests: dict[int, tuple[str, ...]] = field(default_factory=dict)
    comparer: BatchComparer = field(default_factory=BatchComparer)
    parsed: dict[bytes, list[PersonAttributes]] = field(default_factory=dict)
    state: MatchState | None = None
    scorer: PatternScorer | None = None  # the model the batch is decided with (fixed at its start)
    patterns: dict[Pattern, int] = field(default_factory=dict)  # of first-time events only
    new_records: int = 0
    pending: list[bytes] = field(default_factory=list)
    links: list[_Link] = field(default_factory=list)
    merge_answers: list[Resolution] = field(default_factory=list)
    possible: list[tuple[int | None, str, PossibleMatch]] = field(default_factory=list)  # (n, own id, match)
    household: int = 0
    drop_pending: bool = False
    # Customers this batch's links joined, each to one of its group, so a later record of the batch
    # sees one customer where its candidates name several (the merges are not all made yet).
    joined: dict[str, str] = field(default_factory=dict)

    @property
    def new_pairs(self) -> int:
        return sum(self.patterns.values())

    def customer_of(self, customer_id: str) -> str:
        while customer_id in self.joined:
            customer_id = self.joined[customer_id]
        return customer_id


class IdentityResolver:
    """Resolve a batch in order; with matching on, link the records no identifier anchored.

    Without matching: one pipelined round trip. With it, the batch goes in chunks over one
    connection: one call resolving a chunk's events and one person-index call (candidates, then
    indexing), then its merges once Python decided them, while Redis already works on the next chunks;
    one more call per batch records its patterns and counters (and, when due, the refitted
    model). Decisions use the model as it was when the batch began.
    """

    def __init__(self, graph: GraphStore, matching: RedisMatching | None, match: MatchSettings,
                 observer: MatchObserver | None = None) -> None:
        self.graph = graph
        self._matching = matching if match.enabled else None
        self.match = match
        self._observer = observer
        self._state_text: bytes | None = None
        self._state = ModelState()
        self._scorer: PatternScorer | None = None
        self._scripts_loaded = False

    @property
    def matching(self) -> bool:
        """Whether events with personal attributes are matched (on in the settings, with a person index)."""
        return self._matching is not None

    @property
    def person_index(self) -> PersonIndex | None:
        """The index of personal attributes matching uses (None when matching is off)."""
        return self._matching.persons if self._matching is not None else None

    @property
    def _redis(self) -> RedisMatching:
        assert self._matching is not None, "only the matching path uses the Redis graph and index"
        return self._matching

    @property
    def model_state(self) -> ModelState:
        """The matching model as of the last batch."""
        return self._state

    async def resolve(self, items: Sequence[EventToResolve]) -> list[Resolution]:
        if self._matching is None or not any(item.person for item in items):
            return await self.graph.resolve([item.request for item in items])
        if not self._scripts_loaded:
            await self._load_scripts()
        try:
            return await self._resolve_matching(items)
        except _ScriptsMissing:
            # Redis lost its scripts mid-batch. Rerunning the batch is safe: what did run answers
            # again from its op ids (as a redelivery, so its pairs are not counted again).
            await self._load_scripts()
            return await self._resolve_matching(items)

    async def _load_scripts(self) -> None:
        await self._redis.graph.load_script()
        await self._redis.persons.load_scripts()
        self._scripts_loaded = True

    async def _resolve_matching(self, items: Sequence[EventToResolve]) -> list[Resolution]:
        """Resolve and match a batch chunk by chunk (see the class), then record what it leaves.

        Only a customer the event just created lacks an anchor; a known one was matched exactly,
        and its attributes are only indexed. Earlier events of the same batch are candidates too,
        as if indexed one by one. A redelivered event runs again: its merges answer from their op
        ids if they were made, and its pairs are not counted twice. Pairs compared while no model
        is usable wait in the index and are decided by the first usable fit.
        """
        batch = _Batch(items, [None] * len(items), comparer=BatchComparer(self.match.max_block_size))
        chunks = [range(start, min(start + CHUNK_EVENTS, len(items))) for start in range(0, len(items), CHUNK_EVENTS)]
        queue: deque[tuple[str, Any, int]] = deque()  # what was sent, in order: (kind, payload, commands)
        async with CommandChannel(self._redis.graph.client) as channel:

            async def send_chunk(chunk: range) -> None:
                commands = self._chunk_commands(batch, chunk)
                await channel.send(commands)
                queue.append(("chunk", chunk, len(commands)))

            for chunk in chunks[:2]:
                await send_chunk(chunk)
            following = iter(chunks[2:])
            while queue:
                kind, payload, count = queue.popleft()
                answers = await channel.receive(count)
                if any(isinstance(a, NoScriptError) for a in answers):
                    raise _ScriptsMissing
                if kind == "merges":
                    batch.merge_answers.extend(self._redis.graph.parse_many_answer(answers[0]))
                    continue
                links = self._match_chunk(batch, payload, answers)
                if links:
                    await channel.send([self._merges_command(links)])
                    queue.append(("merges", None, 1))
                upcoming = next(following, None)
                if upcoming is not None:
                    await send_chunk(upcoming)
        await self._finish(batch)
        return self._with_matches(batch)

    def _chunk_commands(self, batch: _Batch, chunk: range) -> list[tuple[Any, ...]]:
        """One call resolving a chunk's events, then one person-index call for those with attributes."""
        commands = [self._redis.graph.resolve_many_command([batch.items[n].request for n in chunk])]
        records = []
        for n in chunk:
            item = batch.items[n]
            if item.person is not None:
                batch.keys[n] = tuple(blocking_keys(item.person))
                batch.digests[n] = tuple(self._redis.persons.block_digest(k) for k in batch.keys[n])
                records.append((item.request.message_id, item.request.answer_slot, item.person, batch.digests[n]))
        if records:
            commands.append(self._redis.persons.exchange_command(records))
        return commands

    def _match_chunk(self, batch: _Batch, chunk: range, answers: Sequence[object]) -> list[_Link]:
        """Read a chunk's answers, compare its new records, and decide them (or leave them pending)."""
        for n, answer in zip(chunk, self._redis.graph.parse_many_answer(answers[0]), strict=True):
            batch.resolutions[n] = answer
        people = [n for n in chunk if n in batch.digests]
        if not people:
            return []
        state, exchanged = self._redis.persons.parse_exchange(answers[-1], batch.parsed)
        if batch.state is None:
            batch.state = state
            self._load_state(state.model_state)
            batch.scorer = self._scorer
        new_records = []
        for n, seen in zip(people, exchanged, strict=True):
            resolution = self._resolution(batch, n)
            if resolution.suppressed or not seen.customer_id:
                continue
            person = batch.items[n].person
            assert person is not None
            new_records.append((n, NewRecord(resolution.customer_id, person, batch.keys[n], tuple(seen.candidates),
                                             resolution.created)))
        comparison = batch.comparer.compare([record for _, record in new_records])
        links: list[_Link] = []
        for (n, record), pairs in zip(new_records, comparison.pairs, strict=True):
            resolution = self._resolution(batch, n)
            request = batch.items[n].request
            if not resolution.replayed:
                batch.new_records += 1
                for pair in pairs:
                    batch.patterns[pair.pattern] = batch.patterns.get(pair.pattern, 0) + 1
            if batch.scorer is not None:
                own = batch.customer_of(record.customer_id)
                grouped = [CandidatePair(batch.customer_of(p.customer_id), p.pattern) for p in pairs]
                decided = self._decide(batch, n, record.customer_id, request.message_id, request.event_time_ms,
                                       [p for p in grouped if p.customer_id != own])
                for link in decided:
                    if batch.customer_of(link.customers[1]) != own:
                        batch.joined[batch.customer_of(link.customers[1])] = own
                links.extend(decided)
            elif not resolution.replayed:
                batch.pending.extend(orjson.dumps([record.customer_id, pair.customer_id, pattern_key(pair.pattern),
                                                   request.message_id, request.event_time_ms]) for pair in pairs)
        batch.links.extend(links)
        return links

    def _decide(self, batch: _Batch, n: int | None, own: str, message_id: str, time_ms: int,
                pairs: Sequence[CandidatePair]) -> list[_Link]:
        """Decide one record's pairs: a merge per customer it matches, a possible match per plausible one."""
        assert batch.scorer is not None
        decision = decide_record(pairs, batch.scorer, self.match.match_probability, self.match.review_probability,
                                 self.match.household_guard)
        batch.household += decision.household_refused
        batch.possible.extend((n, own, PossibleMatch(d.customer_id, d.probability, d.weight))
                              for d in decision.possible)
        return [_Link(n, f"{message_id}:match:{link.customer_id}", time_ms, (own, link.customer_id), link.weight)
                for link in decision.links]

    async def _finish(self, batch: _Batch) -> None:
        """Refit the model if due (deciding the pending pairs if it is the first usable one), then record
        the batch's patterns, counters and possible matches, and the merges of pairs that were pending."""
        if batch.state is None:  # no event of the batch had attributes left to match
            return
        records = batch.state.records + batch.new_records
        pairs = batch.state.pairs + batch.new_pairs
        state_to_store = None
        late: list[_Link] = []
        if batch.new_pairs and refit_due(self._state, records, pairs, self.match.refit_growth,
                                         self.match.refit_every_records, self.match.min_pairs_to_fit):
            state_to_store = await self._refit(batch.state.records, records, pairs, batch.patterns)
        # Pairs wait while no model is usable; the first batch to finish with one decides them (another
        # worker may have left some after the first usable fit was made).
        if self._scorer is not None and (batch.pending or batch.state.pending):
            batch.scorer = self._scorer
            late = await self._decide_pending(batch)
        if self._observer is not None:
            self._observer.count_comparisons(batch.new_pairs, batch.household)
        finish = self._redis.persons.finish_command(
            {pattern_key(pattern): count for pattern, count in batch.patterns.items()},
            pattern_chunk(batch.state.records, self.match.window_records), batch.new_records, batch.new_pairs,
            [PossibleMatchEntry(own, match.customer_id, self._review_entry(own, match, batch, n))
             for n, own, match in batch.possible if n is None or not self._resolution(batch, n).replayed],
            state_to_store, [] if batch.drop_pending else batch.pending, self.match.window_records,
            batch.drop_pending)
        merges = [self._merges_command(late)] if late else []
        answers = await run_commands(self._redis.graph.client, [*merges, finish])
        if any(isinstance(a, NoScriptError) for a in answers):
            raise _ScriptsMissing
        if isinstance(answers[-1], Exception):
            raise answers[-1]
        if late:
            batch.links.extend(late)
            batch.merge_answers.extend(self._redis.graph.parse_many_answer(answers[0]))

    def _merges_command(self, links: Sequence[_Link]) -> tuple[Any, ...]:
        return self._redis.graph.merge_many_command([
            (link.op_id, link.time_ms, link.customers, MERGE_REASON_PROBABILISTIC, link.weight) for link in links])

    async def _decide_pending(self, batch: _Batch) -> list[_Link]:
        """Decide the pairs compared before there was a usable model (this batch's too), oldest first."""
        by_record: dict[tuple[str, str, int], list[CandidatePair]] = {}
        for entry in [*await self._redis.persons.pending(), *batch.pending]:
            own, other, key, message_id, time_ms = orjson.loads(entry)
            by_record.setdefault((own, message_id, time_ms), []).append(CandidatePair(other, parse_pattern_key(key)))
        batch.drop_pending = True
        return [link for (own, message_id, time_ms), pairs in by_record.items()
                for link in self._decide(batch, None, own, message_id, time_ms, pairs)]

    def _load_state(self, text: bytes | None) -> None:
        """Take the stored model (another worker may have refitted it); parse it only when it changed."""
        if text != self._state_text:
            self._state_text = text
            self._state = ModelState.from_json(text)
            self._scorer = self._state.model.scorer() if self._state.model is not None else None

    async def _refit(self, records_before: int, records: int, pairs: int, batch_patterns: dict[Pattern, int]) -> str:
        """Fit the model on the window's pairs and this batch's; use it only if it looks like matches."""
        chunks = window_chunks(records_before, self.match.window_records)
        stored = await self._redis.persons.window_patterns(chunks)
        window = merge_pattern_counts({parse_pattern_key(k): n for k, n in stored.items()}, batch_patterns)
        fitted = fit_match_model(window, self._state.model, self.match.max_em_iterations, self.match.em_tolerance,
                                 records)
        rejected = implausible_fields(fitted)
        used = fitted if not rejected else self._state.model
        if self._observer is not None:
            self._observer.count_model_fit(fitted, not rejected)
        self._state = ModelState(used, records, pairs, tuple(rejected))
        self._scorer = used.scorer() if used is not None else None
        text = self._state.to_json()
        self._state_text = text.encode()
        await self._redis.persons.drop_chunks(range(max(chunks[0] - len(chunks), 0), chunks[0]))
        return text

    @staticmethod
    def _resolution(batch: _Batch, n: int) -> Resolution:
        resolution = batch.resolutions[n]
        assert resolution is not None
        return resolution

    @staticmethod
    def _review_entry(own: str, match: PossibleMatch, batch: _Batch, n: int | None) -> str:
        return json.dumps({
            "customer_ids": [own, match.customer_id],
            "probability": round(match.probability, 6), "weight_bits": round(match.weight, 3),
            "caused_by": batch.items[n].request.message_id if n is not None else None,
            "noted_at_ms": int(time.time() * 1000),
        })

    @classmethod
    def _with_matches(cls, batch: _Batch) -> list[Resolution]:
        """Fold each event's merges (its customer is the last merge's survivor) and possible matches into its
        answer. Merges of pairs that were pending go with the batch's last event, whose customer they leave alone."""
        updated = [cls._resolution(batch, n) for n in range(len(batch.items))]
        last = len(updated) - 1
        for link, merged in zip(batch.links, batch.merge_answers, strict=True):
            at = last if link.n is None else link.n
            resolution = updated[at]
            customer_id = resolution.customer_id if link.n is None else merged.customer_id or resolution.customer_id
            updated[at] = dataclasses.replace(resolution, customer_id=customer_id,
                                              merges=resolution.merges + merged.merges,
                                              refused=resolution.refused + merged.refused)
        for n, _, match in batch.possible:
            at = last if n is None else n
            updated[at] = dataclasses.replace(updated[at], possible_matches=(*updated[at].possible_matches, match))
        return updated
