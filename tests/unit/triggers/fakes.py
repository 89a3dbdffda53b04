"""In-memory fakes of triggers' store Protocols and of the kernel's outbox, for service tests without Redis or Kafka."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from services.triggers.crossing import CrossingState, StateKey
from services.triggers.delivery import FailedDelivery
from touchstream.topics import TopicSpec


class InMemoryRuleStates:
    """`RuleStates` in dicts, with the Redis store's rules: caps and the watermark never go down."""

    def __init__(self) -> None:
        self.states: dict[StateKey, CrossingState] = {}
        self.timers: dict[StateKey, int] = {}
        self.caps: dict[tuple[str, str], int] = {}
        self.watermark_ms = 0

    async def load(self, keys: Iterable[StateKey]) -> dict[StateKey, CrossingState]:
        return {key: self.states[key] for key in keys if key in self.states}

    async def save(self, states: Mapping[StateKey, CrossingState], silence_rules: Iterable[str] = ()) -> None:
        silence = set(silence_rules)
        for key, state in states.items():
            self.states[key] = state
            if key[0] in silence:
                if state.timer_due_ms:
                    self.timers[key] = state.timer_due_ms
                else:
                    self.timers.pop(key, None)

    async def load_caps(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
        return {key: self.caps[key] for key in keys if key in self.caps}

    async def save_caps(self, counts: Mapping[tuple[str, str], int]) -> None:
        for key, count in counts.items():
            self.caps[key] = max(count, self.caps.get(key, 0))

    async def raise_watermark(self, event_time_ms: int, ceiling_ms: int) -> int:
        self.watermark_ms = min(max(self.watermark_ms, event_time_ms), ceiling_ms)
        return self.watermark_ms

    async def due_timers(self, watermark_ms: int, limit: int = 1000) -> list[StateKey]:
        return sorted((key for key, due in self.timers.items() if due <= watermark_ms), key=self.timers.get)[:limit]


class NoneErased:
    """An erased set with nobody in it, or with the ids given."""

    def __init__(self, erased: Iterable[str] = ()) -> None:
        self.erased = set(erased)

    async def among(self, customer_ids: Iterable[str]) -> set[str]:
        return self.erased.intersection(customer_ids)


class QueuedActions:
    """Delivery's `enqueue`, remembering what was queued; every action is accepted."""

    def __init__(self) -> None:
        self.queued: list[Mapping[str, Any]] = []

    async def enqueue(self, actions: Sequence[Mapping[str, Any]]) -> list[FailedDelivery]:
        self.queued += [a for a in actions if a["outcome"] == "fired"]
        return []


class SentRecords:
    """The kernel's `Outbox`, keeping (topic, key, value) in order; `flushed` counts the acknowledged sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, bytes]] = []
        self.flushed = 0

    async def send(self, topic: TopicSpec | str, key: Any, value: bytes) -> None:
        self.sent.append((topic if isinstance(topic, str) else topic.name, key, value))

    async def dead_letter(self, source: str, reason: str, key: bytes | None, original: bytes | None) -> None:
        self.sent.append(("deadletter", key, reason.encode()))

    async def flush(self) -> None:
        self.flushed = len(self.sent)
