"""The topic catalogue: the one place topic names, keys and value schemas are written."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TopicSpec:
    name: str
    schema: str
    key: str
    # Compacted: the broker keeps the latest record per key, and a null value (tombstone) erases the key.
    compacted: bool = False
    # Carries events as sent (personal data): kept only TOUCHSTREAM_RAW_RETENTION_HOURS (see embedded.topic_configs).
    bounded_retention: bool = False


TOUCHPOINTS_RAW = TopicSpec("touchpoints.raw", "TouchpointEvent", "first strong identifier or messageId",
                            bounded_retention=True)
TOUCHPOINTS_RESOLVED = TopicSpec("touchpoints.resolved", "ResolvedTouchpoint", "customer_id", bounded_retention=True)
IDENTITY_MERGES = TopicSpec("identity.merges", "IdentityMerge", "surviving customer_id")
# The latest score per customer is what matters; a deletion writes a tombstone per customer id.
SCORES = TopicSpec("scores", "ScoreUpdate", "customer_id", compacted=True)
ACTIONS = TopicSpec("actions", "RetentionAction", "customer_id")
# How each fired action's delivery ended (delivered or dead-lettered): triggers -> console.
ACTION_DELIVERIES = TopicSpec("actions.deliveries", "ActionDeliveryEnded", "customer_id")
DEADLETTER = TopicSpec("deadletter", "DeadLetter", "source")
# Erasures: identity -> scoring, triggers, console (each forgets the customer ids listed).
CUSTOMER_DELETIONS = TopicSpec("customers.deletions", "CustomerDeletion", "customer_id")

ALL_TOPICS: tuple[TopicSpec, ...] = (
    TOUCHPOINTS_RAW,
    TOUCHPOINTS_RESOLVED,
    IDENTITY_MERGES,
    SCORES,
    ACTIONS,
    ACTION_DELIVERIES,
    DEADLETTER,
    CUSTOMER_DELETIONS,
)
