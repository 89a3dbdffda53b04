"""Resolve prepared events against the graph, then (opt-in) match the unanchored ones on personal attributes.

This is the whole resolution path without Kafka: the worker (app.py) and the benchmarks call it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from services.identity.domain import MERGE_REASON_PROBABILISTIC, PossibleMatch, Resolution, ResolutionRequest
from services.identity.graph import IdentityGraph, IndexedRecord, PersonIndex, PossibleMatchEntry
from services.identity.linking import BatchComparison, CandidatePair, NewRecord, compare_batch, decide_record
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
from services.identity.matching import MatchSettings, PersonAttributes, blocking_keys, person_attributes


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
class _Person:
    n: int  # position in the batch
    person: PersonAttributes
    keys: tuple[str, ...]  # blocking keys
    digests: tuple[str, ...]  # the same, as the index names them
    matchable: bool  # the event created its customer: no identifier anchored it


@dataclass(frozen=True)
class _Link:
    """A merge matching decided: of the event at `n`'s customer, or (n None) of a pair left pending."""

    n: int | None
    op_id: str
    time_ms: int
    customers: tuple[str, str]
    weight: float


@dataclass
class _Decisions:
    links: list[_Link] = field(default_factory=list)
    possible: list[tuple[int | None, str, PossibleMatch]] = field(default_factory=list)  # (n, own id, match)
    household: int = 0
    drop_pending: bool = False


class IdentityResolver:
    """One batch: one pipelined graph round trip, then probabilistic matching in three more.

    Matching costs two person-index script calls and one pipeline of merges per batch, plus,
    when the model is refitted, one read of EM's window.
    """

    def __init__(self, graph: IdentityGraph, persons: PersonIndex | None, match: MatchSettings,
                 observer: MatchObserver | None = None) -> None:
        self.graph = graph
        self.persons = persons if match.enabled else None
        self.match = match
        self._observer = observer
        self._state_text: bytes | None = None
        self._state = ModelState()
        self._scorer: PatternScorer | None = None

    @property
    def model_state(self) -> ModelState:
        """The matching model as of the last batch."""
        return self._state

    async def resolve(self, items: Sequence[EventToResolve]) -> list[Resolution]:
        resolutions = await self.graph.resolve([item.request for item in items])
        if self.persons is None or not any(item.person for item in items):
            return resolutions
        return await self._match_batch(items, resolutions)

    async def _match_batch(self, items: Sequence[EventToResolve], resolutions: list[Resolution]) -> list[Resolution]:
        """Compare the batch's new records with their candidates, refit the model if due, then link.

        Only a customer the event just created lacks an anchor; a known one was matched exactly,
        and its attributes are only indexed. Earlier events of the same batch are candidates too,
        as if indexed one by one. A redelivered event runs again: its merges answer from their op
        ids if they were made, and its pairs are not counted twice. Pairs compared while no model
        is usable wait in the index and are decided by the first usable fit.
        """
        assert self.persons is not None
        people = self._people(items, resolutions)
        matchable = [p for p in people if p.matchable]
        match_state, stored = await self.persons.candidates([p.digests for p in matchable])
        stored_of = dict(zip((p.n for p in matchable), stored, strict=True))
        comparison = compare_batch([
            NewRecord(resolutions[p.n].customer_id, p.person, p.keys, tuple(stored_of.get(p.n, ())), p.matchable)
            for p in people])
        fresh = [not resolutions[p.n].replayed for p in people]
        batch_patterns = BatchComparison(
            [pairs for pairs, new in zip(comparison.pairs, fresh, strict=True) if new]).pattern_counts()
        new_records, new_pairs = sum(fresh), sum(batch_patterns.values())
        records, pairs = match_state.records + new_records, match_state.pairs + new_pairs

        self._load_state(match_state.model_state)
        decisions = _Decisions()
        state_to_store = None
        if new_pairs and refit_due(self._state, records, pairs, self.match.refit_growth,
                                   self.match.refit_every_records, self.match.min_pairs_to_fit):
            had_model = self._state.model is not None
            state_to_store = await self._refit(match_state.records, records, pairs, batch_patterns)
            if not had_model and self._scorer is not None:
                await self._decide_pending(decisions)
        pending: list[bytes] = []
        for p, pairs_of_record in zip(people, comparison.pairs, strict=True):
            own = resolutions[p.n].customer_id
            if self._scorer is None:
                if not resolutions[p.n].replayed:
                    request = items[p.n].request
                    pending.extend(orjson.dumps([own, pair.customer_id, pattern_key(pair.pattern),
                                                 request.message_id, request.event_time_ms])
                                   for pair in pairs_of_record)
                continue
            self._decide(decisions, p.n, own, items[p.n].request, pairs_of_record)
        if self._observer is not None:
            self._observer.count_comparisons(new_pairs, decisions.household)

        answers = await self.graph.merge_many([
            (link.op_id, link.time_ms, link.customers, MERGE_REASON_PROBABILISTIC, link.weight)
            for link in decisions.links])
        await self.persons.index(
            [IndexedRecord(resolutions[p.n].customer_id, p.person, p.digests) for p in people],
            {pattern_key(pattern): count for pattern, count in batch_patterns.items()},
            pattern_chunk(match_state.records, self.match.window_records), new_records, new_pairs,
            [PossibleMatchEntry(own, match.customer_id, self._review_entry(own, match, items, n))
             for n, own, match in decisions.possible if n is None or not resolutions[n].replayed],
            state_to_store, pending, self.match.window_records, decisions.drop_pending)
        return self._with_matches(resolutions, decisions, answers)

    def _people(self, items: Sequence[EventToResolve], resolutions: Sequence[Resolution]) -> list[_Person]:
        assert self.persons is not None
        people = []
        for n, item in enumerate(items):
            if item.person is not None and not resolutions[n].suppressed:
                keys = tuple(blocking_keys(item.person))
                digests = tuple(self.persons.block_digest(k) for k in keys)
                people.append(_Person(n, item.person, keys, digests, resolutions[n].created))
        return people

    def _decide(self, decisions: _Decisions, n: int | None, own: str, request: ResolutionRequest | tuple[str, int],
                pairs: Sequence[CandidatePair]) -> None:
        """Decide one record's pairs: a merge per customer it matches, a possible match per plausible one."""
        assert self._scorer is not None
        message_id, time_ms = (request.message_id, request.event_time_ms) if isinstance(
            request, ResolutionRequest) else request
        decision = decide_record(pairs, self._scorer, self.match.match_probability, self.match.review_probability,
                                 self.match.household_guard)
        decisions.household += decision.household_refused
        decisions.links.extend(_Link(n, f"{message_id}:match:{link.customer_id}", time_ms,
                                     (own, link.customer_id), link.weight) for link in decision.links)
        decisions.possible.extend((n, own, PossibleMatch(d.customer_id, d.probability, d.weight))
                                  for d in decision.possible)

    async def _decide_pending(self, decisions: _Decisions) -> None:
        """Decide the pairs compared before there was a usable model, record by record, oldest first."""
        assert self.persons is not None
        by_record: dict[tuple[str, str, int], list[CandidatePair]] = {}
        for entry in await self.persons.pending():
            own, other, key, message_id, time_ms = orjson.loads(entry)
            by_record.setdefault((own, message_id, time_ms), []).append(
                CandidatePair(other, parse_pattern_key(key)))
        for (own, message_id, time_ms), pairs in by_record.items():
            self._decide(decisions, None, own, (message_id, time_ms), pairs)
        decisions.drop_pending = True

    def _load_state(self, text: bytes | None) -> None:
        """Take the stored model (another worker may have refitted it); parse it only when it changed."""
        if text != self._state_text:
            self._state_text = text
            self._state = ModelState.from_json(text)
            self._scorer = self._state.model.scorer() if self._state.model is not None else None

    async def _refit(self, records_before: int, records: int, pairs: int,
                     batch_patterns: dict[tuple[int, ...], int]) -> str:
        """Fit the model on the window's pairs and this batch's; use it only if it looks like matches."""
        assert self.persons is not None
        chunks = window_chunks(records_before, self.match.window_records)
        stored = await self.persons.window_patterns(chunks)
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
        await self.persons.drop_chunks(range(max(chunks[0] - len(chunks), 0), chunks[0]))
        return text

    @staticmethod
    def _review_entry(own: str, match: PossibleMatch, items: Sequence[EventToResolve], n: int | None) -> str:
        return json.dumps({
            "customer_ids": [own, match.customer_id],
            "probability": round(match.probability, 6), "weight_bits": round(match.weight, 3),
            "caused_by": items[n].request.message_id if n is not None else None,
            "noted_at_ms": int(time.time() * 1000),
        })

    @staticmethod
    def _with_matches(resolutions: Sequence[Resolution], decisions: _Decisions,
                      answers: Sequence[Resolution]) -> list[Resolution]:
        """Fold each event's merges (its customer is the last merge's survivor) and possible matches into its
        answer. Merges of pairs that were pending go with the batch's last event, whose customer they leave alone."""
        updated = list(resolutions)
        last = len(updated) - 1
        for link, merged in zip(decisions.links, answers, strict=True):
            resolution = updated[last if link.n is None else link.n]
            customer_id = resolution.customer_id if link.n is None else merged.customer_id or resolution.customer_id
            updated[last if link.n is None else link.n] = dataclasses.replace(
                resolution, customer_id=customer_id, merges=resolution.merges + merged.merges,
                refused=resolution.refused + merged.refused)
        for n, _, match in decisions.possible:
            at = last if n is None else n
            updated[at] = dataclasses.replace(updated[at], possible_matches=(*updated[at].possible_matches, match))
        return updated
