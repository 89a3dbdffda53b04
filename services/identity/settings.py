"""Settings of the identity service, read from the environment (prefix TOUCHSTREAM_IDENTITY_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.identity.admin import DEV_ADMIN_KEY, DEV_ADMIN_KEY_SHA256
from services.identity.domain import GraphRules
from services.identity.matching import MatchSettings
from touchstream.client_address import TrustedProxies
from touchstream.identifiers import DEFAULT_BLOCKLIST, STRONG_TYPES
from touchstream.privacy import IDENTITY_GRAPH_PREFIX
from touchstream.settings import Environment

__all__ = ["DEV_ADMIN_KEY", "DEV_ADMIN_KEY_SHA256", "IdentitySettings"]


class IdentitySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOUCHSTREAM_IDENTITY_", frozen=True, extra="ignore")

    web_port: int = 6067
    # 0.0.0.0 in containers, so probes and Prometheus reach /metrics, /healthz and /readyz.
    web_host: str = "127.0.0.1"
    default_phone_region: str = Field("US", description="Region assumed for phone numbers without a country code.")
    blocklist: frozenset[str] = Field(DEFAULT_BLOCKLIST, description="Identifier values never used for matching.")
    strong_types: frozenset[str] = Field(STRONG_TYPES, description="Identifier types of which two values never merge.")
    type_limits: dict[str, int] = Field(
        default_factory=lambda: {"user_id": 1, "wechat_unionid": 1},
        description="Most values of a type one customer may hold; a value beyond it is not attached.",
    )
    default_type_limit: int = Field(5, ge=1, description="The limit for types not in type_limits.")
    shared_identifier_max_customers: int = Field(
        3, ge=1, description="An identifier seen with more distinct customers than this stops being used for matching.",
    )
    admin_keys: frozenset[str] = Field(
        frozenset({DEV_ADMIN_KEY_SHA256}),
        description="sha256 (hex) of the keys allowed on /v1/customers (Bearer, or Basic with the key as password).",
    )
    # A key guesser gets 429 instead of a cheap 401 per try (per client address, across workers).
    admin_max_failures: int = Field(
        20, ge=1, description="Wrong admin keys per client address before every request from it gets 429.")
    admin_failure_window_s: int = Field(300, ge=1, description="How long wrong admin keys count (from the first).")
    trusted_proxies: TrustedProxies = Field(
        (), description="Networks of the reverse proxies whose X-Forwarded-For names the client (default none).")
    matching: MatchSettings = Field(default_factory=MatchSettings)
    # The braces are a Redis Cluster hash tag: every graph key lands in one slot, so the
    # one Lua script per event stays legal there (at the price of one primary for the graph).
    graph_key_prefix: str = IDENTITY_GRAPH_PREFIX
    # Long enough to cover any redelivery after a crash or a consumer-group rebalance.
    event_ttl_s: int = Field(7 * 24 * 3600, ge=60, description=(
        "How long an API operation's answer is remembered (a record's: until its offset is committed, "
        "this long at most)."))

    def refuse_placeholders(self, environment: Environment) -> None:
        """Refuse the dev admin key in prod, as CoreSettings refuses the dev PII key.

        >>> IdentitySettings().refuse_placeholders(Environment.PROD)
        Traceback (most recent call last):
        ...
        ValueError: TOUCHSTREAM_IDENTITY_ADMIN_KEYS holds the dev admin key; set real key hashes in prod
        """
        if environment is Environment.PROD and DEV_ADMIN_KEY_SHA256 in self.admin_keys:
            raise ValueError("TOUCHSTREAM_IDENTITY_ADMIN_KEYS holds the dev admin key; set real key hashes in prod")

    def graph_rules(self) -> GraphRules:
        return GraphRules(self.strong_types, dict(self.type_limits), self.default_type_limit,
                          self.shared_identifier_max_customers)
