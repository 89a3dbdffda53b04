"""Settings shared by every service, read from the environment (prefix TOUCHSTREAM_).

Each service adds its own frozen settings class with its own prefix. Settings are built
in a service's `__main__`, never at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_PLACEHOLDER_SECRET = "dev-only-pii-key-change-me"


class CoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOUCHSTREAM_", frozen=True, extra="ignore")

    environment: str = Field("dev", description="dev, test or prod; placeholder secrets are refused in prod.")
    kafka_bootstrap: str = "127.0.0.1:9092"
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
    batch_within_s: float = Field(0.02, gt=0, description="Max wait to fill a batch.")
    state_dir: Path = Field(Path(".run/state"), description="Where Faust keeps its local files.")
    # Read when the topics are created (touchstream.embedded.create_topics): retention.ms of the
    # topics that carry events as sent (touchpoints.raw, touchpoints.resolved). They are not
    # compacted, so an erased customer's events stay there until they age out.
    raw_retention_hours: float = Field(168.0, gt=0, description="Retention of the raw event topics, in hours.")

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> CoreSettings:
        if self.environment == "prod" and self.pii_hash_key.get_secret_value() == DEV_PLACEHOLDER_SECRET:
            raise ValueError("TOUCHSTREAM_PII_HASH_KEY must be set to a real secret in prod")
        return self

    @property
    def kafka_url(self) -> str:
        return "kafka://" + ";".join(self.kafka_bootstrap.split(","))
