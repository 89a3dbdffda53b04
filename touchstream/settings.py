"""Settings shared by every service, read from the environment (prefix TOUCHSTREAM_).

Each service adds its own frozen settings class with its own prefix. Settings are built
in a service's `__main__`, never at import time.
"""

from __future__ import annotations

import math
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from touchstream.eventtime import DEFAULT_EVENT_TIME_TOLERANCE_S
from touchstream.topics import validate_topic_prefix

DEV_PLACEHOLDER_SECRET = "dev-only-pii-key-change-me"


class Environment(StrEnum):
    """Where a service runs; prod turns on the checks that refuse placeholder secrets and keys."""

    DEV = "dev"
    TEST = "test"
    PROD = "prod"


def parse_environment(value: Any) -> Any:
    """Read TOUCHSTREAM_ENVIRONMENT: one of dev, test, prod (any case); anything else is refused.

    No alias is accepted: "production" or "staging" silently meaning "not prod" would switch off
    every production check, so an unknown name stops the service instead.

    >>> parse_environment(" PROD ")
    <Environment.PROD: 'prod'>
    >>> parse_environment("production")
    Traceback (most recent call last):
    ...
    ValueError: TOUCHSTREAM_ENVIRONMENT must be one of dev, test, prod; 'production' is not one of them
    """
    if isinstance(value, Environment):
        return value
    known = [e.value for e in Environment]
    if isinstance(value, str) and value.strip().lower() in known:
        return Environment(value.strip().lower())
    raise ValueError(f"TOUCHSTREAM_ENVIRONMENT must be one of {', '.join(known)}; {str(value)[:40]!r} is not one "
                     "of them")


# The type of every settings field read from TOUCHSTREAM_ENVIRONMENT.
EnvironmentName = Annotated[Environment, BeforeValidator(parse_environment)]


class CoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOUCHSTREAM_", frozen=True, extra="ignore")

    environment: EnvironmentName = Field(
        Environment.DEV, description="dev, test or prod; placeholder secrets are refused in prod.")
    kafka_bootstrap: str = "127.0.0.1:9092"
    # Read where names are made (touchstream.topics, from the environment); declared here so a bad
    # value stops a service at start with the settings' error instead of at its first send.
    topic_prefix: str = Field("", description="Prefix of this deployment's topics, consumer groups and Faust apps; "
                                              "stacks with different prefixes share a broker without meeting.")
    redis_url: str = "redis://127.0.0.1:6379/0"
    partitions: int = Field(4, ge=1, description="Partitions per topic (the unit of scale).")
    replication_factor: int = Field(1, ge=1)
    # With acks=all a retried send is never written twice. Off only for the Tansu fallback,
    # which refuses InitProducerId.
    idempotent_producer: bool = True
    session_timeout_s: float = 10.0
    # Apache Kafka answers a fetch as soon as records arrive, so the wait costs no latency;
    # the Tansu fallback holds every fetch this long and runs with 20.
    fetch_max_wait_ms: int = Field(500, ge=1, le=5000)
    # Where a consumer group with no committed offset starts. `earliest`: a service that
    # joins after events were produced (a fresh deploy, a new service) still handles them.
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    heartbeat_interval_s: float = 1.0
    pii_hash_key: SecretStr = SecretStr(DEV_PLACEHOLDER_SECRET)
    batch_size: int = Field(500, ge=1, description="Max events a stream handles per batch.")
    # At a steady low rate a fetch brings 1-4 records; a stage then waits this long for more before
    # handling them (README, "The hot loop"): a few ms of latency per stage for one round of
    # per-batch costs instead of one per record. Batches of `linger_below` or more never wait.
    batch_within_s: float = Field(0.01, ge=0, description="How long a small batch waits for more records.")
    linger_below: int = Field(32, ge=0, description="Batches smaller than this wait batch_within_s for more; "
                                                   "0 turns the wait off.")
    state_dir: Path = Field(Path(".run/state"), description="Where Faust keeps its local files.")
    # Read when the topics are created (touchstream.embedded.create_topics): retention.ms of the
    # topics that carry events as sent (touchpoints.raw, touchpoints.resolved). They are not
    # compacted, so an erased customer's events stay there until they age out.
    raw_retention_hours: float = Field(168.0, gt=0, description="Retention of the raw event topics, in hours.")
    # Scoring, triggers and the console remember erased customers (touchstream.privacy.ErasedCustomers)
    # for as long as those topics may still hold their events: the retention, plus this because the
    # broker deletes a whole log segment at a time, and a segment rolls after segment.ms (7 days by default).
    erased_kept_beyond_retention_hours: float = Field(
        168.0, ge=0, description="How much longer than raw_retention_hours an erased customer id is remembered.")
    # One event stamped in 2099 would otherwise move every event-time watermark there for good:
    # every silence timer due at once, every waiting example matured with a wrong label, every
    # later real event late. Ingest refuses such an event (400), identity dead-letters it, and
    # scoring, triggers and the console cap their watermarks at the wall clock plus this.
    event_time_tolerance_s: float = Field(
        DEFAULT_EVENT_TIME_TOLERANCE_S, ge=0,
        description="How far past its receive time an event may be stamped, in seconds; "
                    "no watermark runs further ahead of the wall clock.")

    # Read by ingest (event names -> order, complaint, ...) and by `touchstream rules validate` /
    # `backtest` (which event names exist): one file, so rules and ingest agree on the names.
    event_semantics_file: Path | None = Field(
        None, description="YAML file adding to or changing the event-name meanings (touchstream/event_semantics.py); "
                          "unset: the defaults (Segment's and RudderStack's spec names).")

    @field_validator("topic_prefix")
    @classmethod
    def _kafka_name_characters(cls, value: str) -> str:
        return validate_topic_prefix(value)

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> CoreSettings:
        if self.environment is Environment.PROD and self.pii_hash_key.get_secret_value() == DEV_PLACEHOLDER_SECRET:
            raise ValueError("TOUCHSTREAM_PII_HASH_KEY must be set to a real secret in prod")
        return self

    @property
    def erased_customer_ttl_s(self) -> int:
        """How long the services remember an erased customer id, in seconds.

        >>> CoreSettings(raw_retention_hours=168, erased_kept_beyond_retention_hours=24).erased_customer_ttl_s
        691200
        """
        return math.ceil((self.raw_retention_hours + self.erased_kept_beyond_retention_hours) * 3600)

    @property
    def is_production(self) -> bool:
        """Say whether this deployment is production, where placeholders and dev-only openings are refused."""
        return self.environment == "prod"

    @property
    def kafka_url(self) -> str:
        return "kafka://" + ";".join(self.kafka_bootstrap.split(","))
