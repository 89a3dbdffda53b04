"""Ingest settings (env prefix TOUCHSTREAM_INGEST_)."""

from __future__ import annotations

import hashlib

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_WRITE_KEY = "dev-write-key"


def hash_write_key(key: str) -> str:
    """Return the stored form of a write key.

    >>> hash_write_key("k")[:16]
    '8254c329a92850f6'
    """
    return hashlib.sha256(key.encode()).hexdigest()


class IngestSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOUCHSTREAM_INGEST_", frozen=True, extra="ignore")

    host: str = "127.0.0.1"
    port: int = 6066
    # Source name -> sha256 of its write key; only hashes are ever configured or stored.
    write_keys: dict[str, str] = Field(default_factory=lambda: {"dev": hash_write_key(DEV_WRITE_KEY)})
    dedupe_ttl_s: int = Field(24 * 3600, ge=1, description="How long a messageId is remembered per source.")
    max_event_bytes: int = 32 * 1024
    max_batch_bytes: int = 500 * 1024
    max_batch_events: int = 2500
    default_channel: str = "web"
