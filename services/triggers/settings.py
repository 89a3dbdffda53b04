"""Settings of the triggers service (env prefix TOUCHSTREAM_TRIGGERS_)."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.triggers.rules import DEFAULT_RULES_FILE
from services.triggers.ssrf import Network, allowlist_refusal, parse_network
from services.triggers.webhooks import RETRY_SCHEDULE_S

# The Standard Webhooks spec: a secret is 24 to 64 random bytes, sent as `whsec_` + base64.
SECRET_PREFIX = "whsec_"
SECRET_BYTES_MIN, SECRET_BYTES_MAX = 24, 64


def secret_problem(secret: str) -> str | None:
    """Say what is wrong with a webhook signing secret, or None if it is a usable Standard Webhooks secret.

    The message never repeats the secret.

    >>> secret_problem("whsec_" + "A" * 32) is None
    True
    >>> secret_problem("whsec_AA==")
    'decodes to 1 bytes; use 24 to 64 random bytes (whsec_ + base64 of 32 random bytes is typical)'
    >>> secret_problem("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    'must start with whsec_ (Standard Webhooks format: whsec_ + base64)'
    """
    if not secret.startswith(SECRET_PREFIX):
        return f"must start with {SECRET_PREFIX} (Standard Webhooks format: {SECRET_PREFIX} + base64)"
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        return f"is not {SECRET_PREFIX} + valid base64"
    if not SECRET_BYTES_MIN <= len(key) <= SECRET_BYTES_MAX:
        return (f"decodes to {len(key)} bytes; use {SECRET_BYTES_MIN} to {SECRET_BYTES_MAX} random bytes "
                f"({SECRET_PREFIX} + base64 of 32 random bytes is typical)")
    return None


def _usable_secret(secret: SecretStr) -> SecretStr:
    problem = secret_problem(secret.get_secret_value())
    if problem:
        raise ValueError(f"endpoint secret {problem}")
    return secret


SigningSecret = Annotated[SecretStr, AfterValidator(_usable_secret)]


def _network(value: Any) -> Any:
    return parse_network(value) if isinstance(value, str) else value


AllowedNetwork = Annotated[Network, BeforeValidator(_network)]


def _refuse_useless_networks(networks: tuple[Network, ...]) -> tuple[Network, ...]:
    for network in networks:
        refusal = allowlist_refusal(network, production=False)
        if refusal:
            raise ValueError(f"{network} {refusal}")
    return networks


class WebhookEndpoint(BaseModel):
    """A registered receiver: where actions are POSTed and the secret(s) that sign them.

    During a secret rotation list both secrets (`secrets`, or `secret` plus `secrets`):
    every request carries one `v1,` signature per secret, so the receiver verifies with
    either the old or the new one.
    """

    # Errors name the field and the reason, never the value: it may be a secret.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    url: str
    secret: SigningSecret | None = Field(None, description="Standard Webhooks secret: whsec_ + base64 of 24-64 bytes.")
    secrets: tuple[SigningSecret, ...] = Field((), description="More secrets to sign with (rotation).")
    # A receiver on a non-public address (loopback, a private network) is an SSRF risk, so it
    # is reachable only if its network is listed here; refused in production.
    allow_networks: tuple[AllowedNetwork, ...] = Field(
        (), description="Non-public networks (CIDR or one address) this endpoint may resolve to.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint url must be http(s)://host/..., got {url!r}")
        return url

    @field_validator("allow_networks")
    @classmethod
    def _openable_networks(cls, networks: tuple[Network, ...]) -> tuple[Network, ...]:
        return _refuse_useless_networks(networks)

    @model_validator(mode="after")
    def _at_least_one_secret(self) -> WebhookEndpoint:
        if not self.signing_secrets:
            raise ValueError("endpoint needs a `secret` (or `secrets` during a rotation)")
        return self

    @property
    def signing_secrets(self) -> tuple[str, ...]:
        """Every secret to sign with, without repeats, in the order given."""
        values = ([self.secret] if self.secret is not None else []) + list(self.secrets)
        return tuple(dict.fromkeys(s.get_secret_value() for s in values))


class TriggersSettings(BaseSettings):
    """Rules, webhook endpoints and delivery limits.

    Endpoints come as JSON, e.g.
    TOUCHSTREAM_TRIGGERS_ENDPOINTS='{"marketing": {"url": "https://crm.example/hook", "secret": "whsec_..."}}'.
    """

    model_config = SettingsConfigDict(env_prefix="TOUCHSTREAM_TRIGGERS_", frozen=True, extra="ignore",
                                      hide_input_in_errors=True)

    web_port: int = 6069
    web_host: str = "127.0.0.1"
    rules_file: Path = DEFAULT_RULES_FILE
    endpoints: dict[str, WebhookEndpoint] = Field(default_factory=dict)
    # Non-public networks (CIDR or single addresses) every endpoint may resolve to, on top of
    # each endpoint's own `allow_networks`: e.g. '["127.0.0.0/8"]' for the local demo receiver.
    # Checked at registration and at every connect; link-local and metadata addresses stay
    # refused whatever is listed, and production refuses any non-public network here.
    allow_networks: tuple[AllowedNetwork, ...] = ()
    endpoint_concurrency: int = Field(8, ge=1, description="Webhook requests in flight per endpoint per worker.")
    delivery_timeout_s: float = Field(5.0, gt=0)
    breaker_threshold: int = Field(5, ge=1, description="Failures in a row that open an endpoint's circuit.")
    breaker_cool_off_s: float = Field(30.0, gt=0, description="Open circuit's pause before one probe request.")
    # Seconds to wait before each try (the first entry, the first try, is at once): ten tries
    # over about three days by default, the Standard Webhooks schedule. The fault tests run a
    # scaled-down copy, e.g. '[0, 0.0125, 0.75, 4.5, 18, 45, 90, 126, 180, 216]'.
    retry_schedule_s: tuple[float, ...] = Field(
        RETRY_SCHEDULE_S, min_length=1,
        description="Waits in seconds before each try, JSON list; its length is the number of tries.")
    # A claimed action whose worker died is tried again after this long.
    delivery_lease_s: float = Field(60.0, gt=0)
    dispatch_poll_s: float = Field(0.5, gt=0, description="Longest sleep of the retry timer between scans.")
    # Silence timers fire once the event-time watermark (latest event time seen, minus this
    # allowance for late events) passes their deadline.
    timer_lateness_s: float = Field(60.0, ge=0)
    delivered_ttl_days: int = Field(30, ge=1, description="How long a delivered action id is remembered.")
    # A customer's armed/disarmed state expires after this long without a score, which
    # re-arms them; it bounds Redis memory for customers who never come back.
    state_ttl_days: int = Field(90, ge=1)
    # History (`touchstream import`, a consumer catching up on old events) trains the models and fills
    # customer state, but a webhook about a moment long past would reach a customer days late: a
    # decision about an event stamped further back than this from the wall clock is recorded as a
    # `backfill` outcome (on `actions`, in the metrics), never delivered.
    backfill_horizon_hours: float = Field(
        72.0, ge=0, description="Events older than this (event time vs wall clock) only make backfill outcomes; "
                                "0 acts on every event, however old.")
    # Where `customer.deleted` notices go when a customer is erased (names of registered endpoints);
    # unset: every registered endpoint, since each may hold actions about the customer.
    deletion_endpoints: tuple[str, ...] | None = None

    def networks_allowed_for(self, endpoint: str) -> tuple[Network, ...]:
        """Return the non-public networks `endpoint` may reach: the global ones and its own."""
        return (*self.allow_networks, *self.endpoints[endpoint].allow_networks)

    def allowlist_refusals(self, production: bool) -> list[str]:
        """Say which allowlisted networks may not be opened (every non-public one, in production)."""
        listed = [("TOUCHSTREAM_TRIGGERS_ALLOW_NETWORKS", n) for n in self.allow_networks]
        listed += [(f"endpoint {name!r}: allow_networks", n)
                   for name, endpoint in sorted(self.endpoints.items()) for n in endpoint.allow_networks]
        return [f"{where}: {network} {refusal}" for where, network in listed
                if (refusal := allowlist_refusal(network, production))]

    @field_validator("allow_networks")
    @classmethod
    def _openable_networks(cls, networks: tuple[Network, ...]) -> tuple[Network, ...]:
        return _refuse_useless_networks(networks)

    def deletion_notice_endpoints(self) -> list[str]:
        """Return the endpoints that get a `customer.deleted` notice."""
        return sorted(self.endpoints) if self.deletion_endpoints is None else list(self.deletion_endpoints)

    @field_validator("retry_schedule_s")
    @classmethod
    def _waits_not_negative(cls, schedule: tuple[float, ...]) -> tuple[float, ...]:
        if any(wait < 0 for wait in schedule):
            raise ValueError(f"retry waits must be >= 0 seconds, got {list(schedule)}")
        return schedule
