"""Settings of the identity service, read from the environment (prefix TOUCHSTREAM_IDENTITY_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from touchstream.identifiers import DEFAULT_BLOCKLIST, STRONG_TYPES


class IdentitySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOUCHSTREAM_IDENTITY_", frozen=True, extra="ignore")

    web_port: int = 6067
    default_phone_region: str = Field("US", description="Region assumed for phone numbers without a country code.")
    blocklist: frozenset[str] = Field(DEFAULT_BLOCKLIST, description="Identifier values never used for matching.")
    strong_types: frozenset[str] = Field(STRONG_TYPES, description="Identifier types of which two values never merge.")
    # The braces are a Redis Cluster hash tag: every graph key lands in one slot, so the
    # one Lua script per event stays legal there (at the price of one primary for the graph).
    graph_key_prefix: str = "ts:identity:{graph}:"
    # Long enough to cover any redelivery after a crash or a consumer-group rebalance.
    event_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="How long an event's resolution is remembered.")
