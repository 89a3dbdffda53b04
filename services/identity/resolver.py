"""Resolve prepared events against the graph, then (opt-in) match the unanchored ones on personal attributes.

This is the whole resolution path without Kafka: the worker (app.py) and the benchmarks call it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.identity.domain import MERGE_REASON_PROBABILISTIC, Resolution, ResolutionRequest
from services.identity.graph import IdentityGraph, PersonIndex
from services.identity.matching import (
    MatchSettings,
    PersonAttributes,
    best_match,
    blocking_keys,
    person_attributes,
)


@dataclass(frozen=True)
class EventToResolve:
    request: ResolutionRequest
    person: PersonAttributes | None = None

    @classmethod
    def of(cls, event: dict[str, Any], request: ResolutionRequest, matching: bool) -> EventToResolve:
        """Pair a request with the event's attributes when matching is on (parsing them costs time otherwise)."""
        return cls(request, person_attributes(event.get("properties_json")) if matching else None)


class IdentityResolver:
    """One batch: one pipelined graph round trip, then probabilistic matching event by event, in order."""

    def __init__(self, graph: IdentityGraph, persons: PersonIndex | None, match: MatchSettings) -> None:
        self.graph = graph
        self.persons = persons if match.enabled else None
        self.match = match

    async def resolve(self, items: Sequence[EventToResolve]) -> list[Resolution]:
        resolutions = await self.graph.resolve([item.request for item in items])
        if self.persons is None or not any(item.person for item in items):
            return resolutions
        return await self._match_batch(items, resolutions)

    async def _match_batch(self, items: Sequence[EventToResolve], resolutions: list[Resolution]) -> list[Resolution]:
        """Match a batch in four Redis round trips; decisions are taken event by event, in order.

        Only a customer the event just created lacks an anchor; a known one was matched exactly.
        Earlier events of the same batch are candidates too, as if indexed one by one. A
        redelivered event runs again: its merge answers from its op id if it was made.
        """
        assert self.persons is not None
        people = [(n, item.person) for n, item in enumerate(items)
                  if item.person is not None and not resolutions[n].suppressed]
        unanchored = [(n, person) for n, person in people if resolutions[n].created]
        stored = await self.persons.candidates_many([person for _, person in unanchored])
        in_batch: dict[str, list[tuple[str, PersonAttributes]]] = {}
        merges: list[tuple[int, str, float]] = []
        stored_by_event = dict(zip((n for n, _ in unanchored), stored, strict=True))
        for n, person in people:
            own = resolutions[n].customer_id
            if n in stored_by_event:
                candidates = dict(stored_by_event[n])
                for key in blocking_keys(person):
                    candidates.update(in_batch.get(key, []))
                candidates.pop(own, None)
                found = best_match(person, candidates, self.match.threshold, self.match.household_guard)
                if found is not None:
                    merges.append((n, found[0], found[1]))
            for key in blocking_keys(person):
                in_batch.setdefault(key, []).append((own, person))
        answers = await self.graph.merge_many([
            (f"{items[n].request.message_id}:match", items[n].request.event_time_ms,
             (resolutions[n].customer_id, other), MERGE_REASON_PROBABILISTIC, score)
            for n, other, score in merges])
        resolutions = list(resolutions)
        for (n, _, _), merged in zip(merges, answers, strict=True):
            resolution = resolutions[n]
            resolutions[n] = dataclasses.replace(
                resolution, customer_id=merged.customer_id if merged.merges else resolution.customer_id,
                merges=resolution.merges + merged.merges, refused=resolution.refused + merged.refused,
            )
        await self.persons.add_many([(resolutions[n].customer_id, person) for n, person in people])
        return resolutions
