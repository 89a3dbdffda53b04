"""Settings of the console service, read from the environment (prefix TOUCHSTREAM_CONSOLE_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.identity.admin import DEV_ADMIN_KEY, DEV_ADMIN_KEY_SHA256
from services.triggers.rules import DEFAULT_RULES_FILE
from touchstream.client_address import TrustedProxies
from touchstream.settings import Environment, EnvironmentName


class ConsoleSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOUCHSTREAM_CONSOLE_", frozen=True, extra="ignore",
                                      populate_by_name=True)

    environment: EnvironmentName = Field(Environment.DEV,
                                         validation_alias=AliasChoices("TOUCHSTREAM_ENVIRONMENT", "environment"))
    web_port: int = Field(6070, description="Port of the pages, the JSON API, /metrics, /healthz and /readyz.")
    web_host: str = "127.0.0.1"
    admin_keys: frozenset[str] = Field(
        frozenset({DEV_ADMIN_KEY_SHA256}), description="sha256 (hex) of the keys that may log in.")
    session_ttl_s: int = Field(8 * 3600, ge=60)
    login_max_failures: int = Field(10, ge=1, description="Failed logins per client address before a 429.")
    # The console has one account (whoever holds an admin key): this bounds guessing from many
    # addresses at once, at the price that a flood of wrong keys holds new logins off for the window
    # (open sessions go on working).
    login_max_failures_per_account: int = Field(
        100, ge=1, description="Failed logins from all addresses together before every login gets a 429.")
    login_failure_window_s: int = Field(900, ge=1, description="How long failed logins count (from the first).")
    # The JSON API (GET /v1/rules/{id}/outcomes, PUT /v1/rules/backtest) takes the admin key as a bearer token:
    # a guesser gets 429 instead of a cheap 401 per try.
    api_max_failures: int = Field(
        20, ge=1, description="Wrong admin keys per client address on the JSON API before every key from it gets 429.")
    api_failure_window_s: int = Field(300, ge=1, description="How long wrong API keys count (from the first).")
    trusted_proxies: TrustedProxies = Field(
        (), description="Networks of the reverse proxies whose X-Forwarded-For names the client (default none).")
    # Browsers only send Secure cookies over https; the local stack is plain http on loopback.
    cookie_secure: bool = False
    key_prefix: str = "ts:console:"
    customer_ttl_days: float = Field(400, gt=0, description="A customer with no record for this long drops out of the "
                                     "read model (its page; the overview's counts keep it).")
    # The same rule file triggers evaluates, so thresholds drawn on charts are the live ones.
    rules_file: Path = Field(
        DEFAULT_RULES_FILE,
        validation_alias=AliasChoices("TOUCHSTREAM_CONSOLE_RULES_FILE", "TOUCHSTREAM_TRIGGERS_RULES_FILE",
                                      "rules_file"),
    )
    attribution_window_hours: float = Field(7 * 24, gt=0, description="Conversion counts this long after an action.")
    attribution_windows: dict[str, float] = Field(default_factory=dict, description="Per-rule windows in hours.")
    min_group_size: int = Field(30, ge=1, description="Treated and hold-out must both reach this before uplift shows.")
    scoring_metrics_url: str | None = Field(None, description="scoring's /metrics, for model quality on the overview.")
    triggers_metrics_url: str | None = Field(None, description="triggers' /metrics, for event-to-webhook latency.")
    ingest_metrics_url: str | None = Field(None, description="ingest's /metrics, for events/s accepted.")
    identity_metrics_url: str | None = Field(None, description="identity's /metrics, for events/s resolved.")
    pipeline_sample_s: float = Field(5.0, gt=0, description="How often the pipeline's counters are sampled.")
    live_poll_s: float = Field(1.0, gt=0, description="How often a live customer page checks for changes.")
    identity_url: str | None = Field(None, description="identity's web address: its customer API shows a customer's "
                                     "identifiers, looks identifiers up, splits and deletes (admin API).")
    identity_timeout_s: float = Field(3.0, gt=0, description="How long a customer page waits for identity's view of "
                                      "the customer before it shows the rest without it.")
    identity_admin_key: SecretStr = Field(SecretStr(DEV_ADMIN_KEY), description="Key the console presents to identity.")

    @model_validator(mode="after")
    def _refuse_dev_key_in_prod(self) -> ConsoleSettings:
        if self.environment is not Environment.PROD:
            return self
        if DEV_ADMIN_KEY_SHA256 in self.admin_keys:
            raise ValueError("TOUCHSTREAM_CONSOLE_ADMIN_KEYS must not contain the dev admin key in prod")
        if not self.cookie_secure:
            raise ValueError("TOUCHSTREAM_CONSOLE_COOKIE_SECURE must be true in prod (serve the console over https)")
        if self.identity_admin_key.get_secret_value() == DEV_ADMIN_KEY:
            raise ValueError("TOUCHSTREAM_CONSOLE_IDENTITY_ADMIN_KEY must be set to a real key in prod")
        return self

    def window_ms(self, rule_id: str) -> int:
        return int(self.attribution_windows.get(rule_id, self.attribution_window_hours) * 3600 * 1000)
