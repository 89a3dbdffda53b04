"""Settings of the triggers service (env prefix TOUCHSTREAM_TRIGGERS_)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from standardwebhooks import Webhook

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_RULES_FILE = REPO_ROOT / "deploy" / "rules" / "default.yaml"


class WebhookEndpoint(BaseModel):
    """A registered receiver: where actions are POSTed and the secret that signs them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    secret: SecretStr = Field(description="Standard Webhooks secret, `whsec_` + base64.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint url must be http(s)://host/..., got {url!r}")
        return url

    @field_validator("secret")
    @classmethod
    def _usable_secret(cls, secret: SecretStr) -> SecretStr:
        try:
            Webhook(secret.get_secret_value())
        except Exception as exc:  # the library raises binascii.Error or its own error types
            raise ValueError(f"endpoint secret is not a Standard Webhooks secret (whsec_<base64>): {exc}") from exc
        return secret


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
    delivery_concurrency: int = Field(32, ge=1, description="Webhook requests in flight per worker.")
    delivery_timeout_s: float = Field(5.0, gt=0)
    delivery_max_attempts: int = Field(3, ge=1, description="Tries before an action goes to deadletter.")
    delivery_backoff_s: float = Field(0.5, ge=0, description="First retry delay; doubles on each retry.")
    delivered_ttl_days: int = Field(30, ge=1, description="How long a delivered action id is remembered.")
    # A customer's armed/disarmed state expires after this long without a score, which
    # re-arms them; it bounds Redis memory for customers who never come back.
    state_ttl_days: int = Field(90, ge=1)
