"""Ingest settings (env prefix TOUCHSTREAM_INGEST_)."""

from __future__ import annotations

import math

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from touchstream.client_address import TrustedProxies
from touchstream.privacy import DEFAULT_SUPPRESSION_KEY
from touchstream.write_keys import hash_write_key

__all__ = ["DEV_WRITE_KEY", "IngestSettings", "hash_write_key"]

DEV_WRITE_KEY = "dev-write-key"


class IngestSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOUCHSTREAM_INGEST_", frozen=True, extra="ignore",
                                      populate_by_name=True)

    # Named like every service's web address; TOUCHSTREAM_INGEST_HOST / _PORT still work.
    web_host: str = Field("127.0.0.1", validation_alias=AliasChoices("TOUCHSTREAM_INGEST_WEB_HOST",
                                                                     "TOUCHSTREAM_INGEST_HOST"),
                          description="Address of the HTTP API, /metrics, /healthz and /readyz.")
    web_port: int = Field(6066, validation_alias=AliasChoices("TOUCHSTREAM_INGEST_WEB_PORT", "TOUCHSTREAM_INGEST_PORT"))
    # Bootstrap keys: source name -> sha256 of its write key; only hashes are ever configured or
    # stored. Keys added at run time live in Redis (`touchstream keys add`); `touchstream keys
    # revoke SOURCE` refuses both kinds at once on every worker.
    write_keys: dict[str, str] = Field(default_factory=lambda: {"dev": hash_write_key(DEV_WRITE_KEY)})
    rate_limit_events_per_s: float = Field(
        5000.0, ge=0, description="Sustained events/s allowed per source, across all workers; 0 turns it off.")
    rate_limit_burst_events: int = Field(
        10_000, ge=1, description="Events a source may send at once above the sustained rate.")
    rate_limits: dict[str, float] = Field(default_factory=dict, description="Per-source events/s overrides.")
    # A key guesser, or a client stuck on a revoked key, gets 429 instead of a cheap 401 per try.
    auth_max_failures: int = Field(
        20, ge=1, description="Failed authentications per client address before every request from it gets 429.")
    auth_failure_window_s: int = Field(60, ge=1, description="How long failed authentications count (from the first).")
    trusted_proxies: TrustedProxies = Field(
        (), description="Networks of the reverse proxies whose X-Forwarded-For names the client (default none).")
    produce_timeout_s: float = Field(10.0, gt=0, description="How long a request waits for the broker's ack.")
    dedupe_ttl_s: int = Field(24 * 3600, ge=1, description="How long a messageId is remembered per source.")
    # A messageId is claimed provisionally for the produce timeout plus this margin, and kept for
    # dedupe_ttl_s only once the broker acknowledged its event: a worker that dies in between
    # leaves a claim that expires, so the client's retry is produced, not answered as a duplicate.
    claim_margin_s: float = Field(
        5.0, gt=0, description="How long a provisional messageId claim outlives the produce timeout.")
    max_event_bytes: int = 32 * 1024
    max_batch_bytes: int = 500 * 1024
    max_batch_events: int = 2500
    default_channel: str = "web"
    # Erasure: events carrying an identifier on identity's suppression list are dropped here.
    suppression_key: str = Field(DEFAULT_SUPPRESSION_KEY,
                                 description="identity's graph prefix + 'suppressed' (same Redis as identity).")
    suppression_refresh_s: float = Field(
        0.5, ge=0, description="How often a worker looks for a new erasure; identity drops what slips through.")
    # Phones are hashed as identity hashes them, so both must assume the same region.
    default_phone_region: str = Field(
        "US", validation_alias=AliasChoices("TOUCHSTREAM_INGEST_DEFAULT_PHONE_REGION",
                                            "TOUCHSTREAM_IDENTITY_DEFAULT_PHONE_REGION"))

    @property
    def provisional_claim_ttl_ms(self) -> int:
        """How long a messageId claim lasts until the broker's ack makes it final."""
        return math.ceil((self.produce_timeout_s + self.claim_margin_s) * 1000)
