"""The topic catalogue: the one place topic names, keys and value schemas are written.

A deployment may prefix every name it owns on the broker (TOUCHSTREAM_TOPIC_PREFIX, default
empty): its topics, its consumer groups and its Faust apps (whose internal topics are named
after the app). Two stacks with different prefixes then share a broker without reading each
other's records or joining each other's groups; the tests give each test or stack its own.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache

TOPIC_PREFIX_SETTING = "TOUCHSTREAM_TOPIC_PREFIX"
# Kafka's topic names are at most 249 of these characters; the longest name built on the prefix
# (a Faust app's leader topic, `<prefix>touchstream-identity-worker-__assignor-__leader`) adds ~50.
_KAFKA_NAME_CHARACTERS = re.compile(r"[A-Za-z0-9._-]*")
MAX_TOPIC_PREFIX_LENGTH = 150


@lru_cache(maxsize=64)
def validate_topic_prefix(prefix: str) -> str:
    """Return `prefix` if it can begin a Kafka topic name, or say which setting is wrong and why.

    >>> validate_topic_prefix("test-3f2a.")
    'test-3f2a.'
    >>> validate_topic_prefix("a b")
    Traceback (most recent call last):
    ...
    ValueError: TOUCHSTREAM_TOPIC_PREFIX: 'a b' has ' ', not one of Kafka's topic-name characters (A-Z a-z 0-9 . _ -)
    """
    if not _KAFKA_NAME_CHARACTERS.fullmatch(prefix):
        bad = next(c for c in prefix if not _KAFKA_NAME_CHARACTERS.fullmatch(c))
        raise ValueError(f"{TOPIC_PREFIX_SETTING}: {prefix[:40]!r} has {bad!r}, not one of Kafka's topic-name "
                         "characters (A-Z a-z 0-9 . _ -)")
    if len(prefix) > MAX_TOPIC_PREFIX_LENGTH:
        raise ValueError(f"{TOPIC_PREFIX_SETTING} is {len(prefix)} characters long; at most {MAX_TOPIC_PREFIX_LENGTH} "
                         "leave room for the names built on it within Kafka's 249")
    return prefix


def topic_prefix() -> str:
    """The prefix of this process's names on the broker: TOUCHSTREAM_TOPIC_PREFIX, validated ("" if unset).

    Read from the environment at each use rather than once, so that a test can give each test
    (or each stack it starts) its own prefix; the validation is cached per value.
    """
    return validate_topic_prefix(os.environ.get(TOPIC_PREFIX_SETTING, ""))


def prefixed(name: str, prefix: str | None = None) -> str:
    """`name` (a topic, consumer group or Faust app id) as this deployment names it on the broker.

    `prefix`: a stack's own prefix, for tools that manage a stack other than their own process's.

    >>> prefixed("touchstream-scoring", prefix="ci-7.")
    'ci-7.touchstream-scoring'
    """
    return (topic_prefix() if prefix is None else validate_topic_prefix(prefix)) + name


@dataclass(frozen=True)
class TopicSpec:
    # The name without the deployment's prefix; `name` is the one to use on the broker.
    stem: str
    schema: str
    key: str
    # Compacted: the broker keeps the latest record per key, and a null value (tombstone) erases the key.
    compacted: bool = False
    # Carries events as sent (personal data): kept only TOUCHSTREAM_RAW_RETENTION_HOURS (see embedded.topic_configs).
    bounded_retention: bool = False

    @property
    def name(self) -> str:
        """The topic's name on this process's broker: TOUCHSTREAM_TOPIC_PREFIX followed by the stem."""
        return prefixed(self.stem)

    def name_with(self, prefix: str) -> str:
        """The topic's name in a stack whose prefix is `prefix` (not necessarily this process's)."""
        return prefixed(self.stem, prefix)


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
