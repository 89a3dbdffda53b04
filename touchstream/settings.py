"""Settings shared by every service, read from the environment (prefix TOUCHSTREAM_).

Each service adds its own frozen settings class with its own prefix. Settings are built
in a service's `__main__`, never at import time.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from touchstream.eventtime import DEFAULT_EVENT_TIME_TOLERANCE_S

DEV_PLACEHOLDER_SECRET = "dev-only-pii-key-change-me"


class CoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOUCHSTREAM_", frozen=True, extra="ignore")

    environment: str = Field("dev", description="dev, test or prod; placeholder secrets are refused in prod.")
    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    partitions: int = Field(4, ge=1, description="Partitions per topic (the unit of scale).")
    replication_factor: int = Field(1, ge=1)
    # Tansu (the embedded broker) cannot do InitProducerId; Apache Kafka can.
    idempotent_producer: bool = False
    # Tansu makes a group join wait half the session timeout, so keep it short locally.
    session_timeout_s: float = 10.0
    # Tansu answers a fetch only when this wait is over, even if records arrived meanwhile;
    # Apache Kafka answers early, so 500 there costs nothing.
    fetch_max_wait_ms: int = Field(20, ge=1, le=5000)
    heartbeat_interval_s: float = 1.0
    pii_hash_key: SecretStr = SecretStr(DEV_PLACEHOLDER_SECRET)
    batch_size: int = Field(500, ge=1, description="Max events a stream handles per batch.")
    batch_within_s: float = Field(0.02, gt=0, description="Max wait to fill a batch.")
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

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> CoreSettings:
        if self.environment == "prod" and self.pii_hash_key.get_secret_value() == DEV_PLACEHOLDER_SECRET:
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
    def kafka_url(self) -> str:
        return "kafka://" + ";".join(self.kafka_bootstrap.split(","))
