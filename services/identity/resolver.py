"""Resolve prepared events against the graph, then (opt-in) match the unanchored ones on personal attributes.

This is the whole resolution path without Kafka: the worker (app.py) and the benchmarks call it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from services.identity.domain import MERGE_REASON_PROBABILISTIC, PossibleMatch, Resolution, ResolutionRequest
from services.identity.graph import IdentityGraph, IndexedRecord, PersonIndex, PossibleMatchEntry
from services.identity.linking import BatchComparison, NewRecord, compare_batch, decide_record
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


class IdentityResolver:
    """One batch: one pipelined graph round trip, then probabilistic matching in three more."""

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
        ids if they were made, and its pairs are not counted twice.
        """
        assert self.persons is not None
        people = []
        for n, item in enumerate(items):
            if item.person is not None and not resolutions[n].suppressed:
                keys = tuple(blocking_keys(item.person))
                digests = tuple(self.persons.block_digest(k) for k in keys)
                people.append(_Person(n, item.person, keys, digests, resolutions[n].created))
        matchable = [p for p in people if p.matchable]
        match_state, stored = await self.persons.candidates([p.digests for p in matchable])
        stored_of = dict(zip((p.n for p in matchable), stored, strict=True))
        comparison = compare_batch([
            NewRecord(resolutions[p.n].customer_id, p.person, p.keys, tuple(stored_of.get(p.n, ())), p.matchable)
            for p in people])
        fresh = [not resolutions[p.n].replayed for p in people]
        counted = BatchComparison([pairs for pairs, new in zip(comparison.pairs, fresh, strict=True) if new])
        batch_patterns = counted.pattern_counts()
        new_records = sum(fresh)
        new_pairs = sum(batch_patterns.values())
        records, pairs = match_state.records + new_records, match_state.pairs + new_pairs
        state_to_store = None
        self._load_state(match_state.model_state)
        if new_pairs and refit_due(self._state, records, pairs, self.match.refit_growth,
                                   self.match.refit_every_records, self.match.min_pairs_to_fit):
            state_to_store = await self._refit(match_state.records, records, pairs, batch_patterns)

        merges: list[tuple[int, str, float]] = []
        possible: list[tuple[int, PossibleMatch]] = []
        household = 0
        if self._scorer is not None:
            for p, pairs_of_record in zip(people, comparison.pairs, strict=True):
                decision = decide_record(pairs_of_record, self._scorer, self.match.match_probability,
                                         self.match.review_probability, self.match.household_guard)
                household += decision.household_refused
                merges.extend((p.n, link.customer_id, link.weight) for link in decision.links)
                possible.extend((p.n, PossibleMatch(d.customer_id, d.probability, d.weight))
                                for d in decision.possible)
        if self._observer is not None:
            self._observer.count_comparisons(new_pairs, household)

        answers = await self.graph.merge_many([
            (f"{items[n].request.message_id}:match:{other}", items[n].request.event_time_ms,
             (resolutions[n].customer_id, other), MERGE_REASON_PROBABILISTIC, weight)
            for n, other, weight in merges])
        await self.persons.index(
            [IndexedRecord(resolutions[p.n].customer_id, p.person, p.digests) for p in people],
            {pattern_key(pattern): count for pattern, count in batch_patterns.items()},
            pattern_chunk(match_state.records, self.match.window_records), new_records, new_pairs,
            [PossibleMatchEntry(resolutions[n].customer_id, match.customer_id, self._review_entry(items[n], n,
                                                                                              resolutions, match))
             for n, match in possible if not resolutions[n].replayed],
            state_to_store)
        return self._with_matches(resolutions, merges, answers, possible)

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
    def _review_entry(item: EventToResolve, n: int, resolutions: Sequence[Resolution], match: PossibleMatch) -> str:
        return json.dumps({
            "customer_ids": [resolutions[n].customer_id, match.customer_id],
            "probability": round(match.probability, 6), "weight_bits": round(match.weight, 3),
            "event_time_ms": item.request.event_time_ms, "caused_by": item.request.message_id,
            "noted_at_ms": int(time.time() * 1000),
        })

    @staticmethod
    def _with_matches(resolutions: Sequence[Resolution], merges: Sequence[tuple[int, str, float]],
                      answers: Sequence[Resolution], possible: Sequence[tuple[int, PossibleMatch]]) -> list[Resolution]:
        """Fold each event's merges (its customer is the last merge's survivor) and possible matches into its answer."""
        updated = list(resolutions)
        for (n, _, _), merged in zip(merges, answers, strict=True):
            resolution = updated[n]
            updated[n] = dataclasses.replace(
                resolution, customer_id=merged.customer_id or resolution.customer_id,
                merges=resolution.merges + merged.merges, refused=resolution.refused + merged.refused,
            )
        for n, match in possible:
            updated[n] = dataclasses.replace(updated[n], possible_matches=(*updated[n].possible_matches, match))
        return updated
