"""The topic catalogue: the one place topic names, keys and value schemas are written."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TopicSpec:
    name: str
    schema: str
    key: str
    compacted: bool = False


TOUCHPOINTS_RAW = TopicSpec("touchpoints.raw", "TouchpointEvent", "first strong identifier or messageId")
TOUCHPOINTS_RESOLVED = TopicSpec("touchpoints.resolved", "ResolvedTouchpoint", "customer_id")
IDENTITY_MERGES = TopicSpec("identity.merges", "IdentityMerge", "surviving customer_id")
SCORES = TopicSpec("scores", "ScoreUpdate", "customer_id")
ACTIONS = TopicSpec("actions", "RetentionAction", "customer_id")
DEADLETTER = TopicSpec("deadletter", "DeadLetter", "source")

ALL_TOPICS: tuple[TopicSpec, ...] = (
    TOUCHPOINTS_RAW,
    TOUCHPOINTS_RESOLVED,
    IDENTITY_MERGES,
    SCORES,
    ACTIONS,
    DEADLETTER,
)
