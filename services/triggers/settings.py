"""Settings of the triggers service (env prefix TOUCHSTREAM_TRIGGERS_)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from standardwebhooks import Webhook

from services.triggers.webhooks import RETRY_SCHEDULE_S

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_RULES_FILE = REPO_ROOT / "deploy" / "rules" / "default.yaml"


class WebhookEndpoint(BaseModel):
    """A registered receiver: where actions are POSTed and the secret(s) that sign them.

    During a secret rotation list both secrets (`secrets`, or `secret` plus `secrets`):
    every request carries one `v1,` signature per secret, so the receiver verifies with
    either the old or the new one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    secret: SecretStr | None = Field(None, description="Standard Webhooks secret, `whsec_` + base64.")
    secrets: tuple[SecretStr, ...] = Field((), description="More secrets to sign with (rotation).")

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint url must be http(s)://host/..., got {url!r}")
        return url

    @field_validator("secret")
    @classmethod
    def _usable_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None:
            _check_secret(secret)
        return secret

    @field_validator("secrets")
    @classmethod
    def _usable_secrets(cls, secrets: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for secret in secrets:
            _check_secret(secret)
        return secrets

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


def _check_secret(secret: SecretStr) -> None:
    try:
        Webhook(secret.get_secret_value())
    except Exception as exc:  # the library raises binascii.Error or its own error types
        raise ValueError(f"endpoint secret is not a Standard Webhooks secret (whsec_<base64>): {exc}") from exc


class TriggersSettings(BaseSettings):
    """Rules, webhook endpoints and delivery limits.

    Endpoints come as JSON, e.g.
    TOUCHSTREAM_TRIGGERS_ENDPOINTS='{"marketing": {"url": "https://crm.example/hook", "secret": "whsec_..."}}'.
    """

    model_config = SettingsConfigDict(env_prefix="TOUCHSTREAM_TRIGGERS_", frozen=True, extra="ignore")

    web_port: int = 6069
    web_host: str = "127.0.0.1"
    rules_file: Path = DEFAULT_RULES_FILE
    endpoints: dict[str, WebhookEndpoint] = Field(default_factory=dict)
    # Loopback and private receivers are an SSRF risk in production; the local demo
    # receiver listens on 127.0.0.1, so it has to be allowed explicitly.
    allow_private_endpoints: bool = False
    # Networks (CIDR or single addresses) a receiver may resolve to even though they are
    # private, e.g. a partner reached over a VPN; checked at registration and at connect.
    endpoint_allowlist: tuple[str, ...] = ()
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
    # Where `customer.deleted` notices go when a customer is erased (names of registered endpoints);
    # unset: every registered endpoint, since each may hold actions about the customer.
    deletion_endpoints: tuple[str, ...] | None = None

    def deletion_notice_endpoints(self) -> list[str]:
        """Return the endpoints that get a `customer.deleted` notice."""
        return sorted(self.endpoints) if self.deletion_endpoints is None else list(self.deletion_endpoints)

    @field_validator("retry_schedule_s")
    @classmethod
    def _waits_not_negative(cls, schedule: tuple[float, ...]) -> tuple[float, ...]:
        if any(wait < 0 for wait in schedule):
            raise ValueError(f"retry waits must be >= 0 seconds, got {list(schedule)}")
        return schedule
