"""Where a backtest's scores come from: the `scores` topic read from its start, or a JSON Lines file.

`scores` is compacted: once the broker has compacted a segment it keeps only each customer's
latest score there, so the topic holds the full history only as far back as compaction has not
reached. A file (`--save-scores` writes one from the topic) keeps a history for later backtests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.triggers.backtest import score_from_json
from services.triggers.events import ScoreUpdated
from touchstream import avro
from touchstream.topics import SCORES

MAX_PROBLEMS_SHOWN = 20


class ScoreHistoryError(ValueError):
    """A history that cannot be read; `problems` are `file:line: message` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class ScoreHistory:
    scores: list[ScoreUpdated] = field(default_factory=list)
    # Records of the topic that are not scores of a version this release reads (counted, not replayed).
    unreadable: int = 0
    records: list[dict[str, object]] = field(default_factory=list)


def read_score_file(path: Path) -> ScoreHistory:
    """Read a JSON Lines file of ScoreUpdate records; refuse it listing every bad line (the first 20)."""
    history = ScoreHistory()
    problems: list[str] = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise ScoreHistoryError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    with handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                history.scores.append(score_from_json(json.loads(line)))
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                problems.append(f"{path}:{line_number}: {exc}")
    if problems:
        more = len(problems) - MAX_PROBLEMS_SHOWN
        raise ScoreHistoryError(problems[:MAX_PROBLEMS_SHOWN] + ([f"... and {more} more"] if more > 0 else []))
    return history


async def scores_partitions(bootstrap: str) -> list[TopicPartition]:
    """Return the partitions of `scores` on the broker; refuse a broker without the topic."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([SCORES.name])
    finally:
        await admin.close()
    if described.get("error_code") or not described.get("partitions"):
        raise ScoreHistoryError([f"{bootstrap}: no topic {SCORES.name!r} on this broker"])
    return [TopicPartition(SCORES.name, p["partition"]) for p in sorted(described["partitions"],
                                                                        key=lambda p: p["partition"])]


async def read_scores_topic(bootstrap: str, keep_records: bool = False, idle_s: float = 5.0) -> ScoreHistory:
    """Read `scores` from its start up to its end as of now (tombstones left out)."""
    partitions = await scores_partitions(bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    history = ScoreHistory()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        remaining = {tp for tp in partitions if ends[tp] > 0}
        quiet_s = 0.0
        while remaining and quiet_s < idle_s:
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            quiet_s = 0.0 if batch else quiet_s + 0.5
            for tp, messages in batch.items():
                for message in messages:
                    if message.value is not None:
                        _add(history, message.value, keep_records)
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    return history


def _add(history: ScoreHistory, value: bytes, keep_record: bool) -> None:
    try:
        record = avro.decode(SCORES.schema, value)
    except avro.DecodeError:
        history.unreadable += 1
        return
    history.scores.append(ScoreUpdated.from_record(record))
    if keep_record:
        history.records.append(record)


def score_lines(records: list[dict[str, object]]) -> Iterator[str]:
    """Return the JSON Lines of a score history file, one ScoreUpdate record per line."""
    for record in records:
        yield json.dumps(record, separators=(",", ":"), sort_keys=True)
