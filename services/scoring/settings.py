"""Scoring settings (env prefix TOUCHSTREAM_SCORING_).

How each value was chosen is in services/scoring/README.md ("Settings and how they were chosen").
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.scoring.model_defaults import LEARNING_RATES
from services.triggers.settings import DEFAULT_RULES_FILE
from touchstream.startup import ConfigurationError

DEV_CHECKPOINT_KEY = "dev-only-checkpoint-key-change-me"
CHECKPOINT_KEY_MIN_CHARS = 16


class ScoringSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOUCHSTREAM_SCORING_", frozen=True, extra="ignore",
                                      hide_input_in_errors=True, populate_by_name=True)

    web_port: int = 6068
    # 0.0.0.0 in containers, so probes and Prometheus reach /metrics, /healthz and /readyz.
    web_host: str = "127.0.0.1"
    horizon_days: int = Field(90, ge=1, description="H in 'purchase within H days'; churn risk = 1 - that.")
    step_days: float = Field(
        14.0, gt=0, description="Label window of every example (the model's hazard step); a silent customer "
        "makes one example per step.")
    lateness_days: float = Field(
        1.0, ge=0, description="How far behind the partition's newest event time a purchase may arrive and still count."
    )
    checkpoint_interval_s: float = Field(30.0, gt=0, description="How often the model is pickled to Redis.")
    # Anyone who can write Redis could otherwise make scoring unpickle (run) their bytes.
    checkpoint_key: SecretStr = Field(
        SecretStr(DEV_CHECKPOINT_KEY),
        description="HMAC-SHA256 key that signs model checkpoints; a checkpoint it did not sign is never loaded.")
    key_prefix: str = Field("ts:scoring", description="Prefix of every Redis key the service owns.")
    model: Literal["logreg"] = Field("logreg", description="BG/NBD prior + logistic regression hazard (model.py).")
    learning_rates: tuple[float, ...] = Field(
        LEARNING_RATES, min_length=1, description="Candidate step sizes, learned side by side; the one with the "
        "lowest recent prequential log-loss predicts.")
    reason_count: int = Field(3, ge=0, description="Reason codes per ScoreUpdate.")
    value_horizon_days: int = Field(365, ge=1, description="Predicted value covers this many days (12 months).")
    max_silence_days: float = Field(
        730.0, gt=0, description="A customer silent this long makes no more examples and no more crossing checks.")
    # The same rule file triggers evaluates: a crossing of a rule's threshold by time alone is
    # what makes scoring send a ScoreUpdate for a silent customer.
    rules_file: Path = Field(
        DEFAULT_RULES_FILE,
        validation_alias=AliasChoices("TOUCHSTREAM_SCORING_RULES_FILE", "TOUCHSTREAM_TRIGGERS_RULES_FILE",
                                      "rules_file"),
    )
    stage_at_risk_days: float | None = Field(None, gt=0, description="No purchase this long: at_risk (default H).")
    stage_churned_days: float | None = Field(None, gt=0, description="No purchase this long: churned (default 2H).")
    stage_won_back_gap_days: float | None = Field(
        None, gt=0, description="A purchase after a gap this long: won_back (default H)."
    )
    habit_min_purchases: int = Field(2, ge=1, description="Purchases that make a customer habit_forming.")
    loyal_min_purchases: int = Field(3, ge=2, description="Purchases that make an active customer loyal.")

    @field_validator("checkpoint_key")
    @classmethod
    def _long_enough(cls, key: SecretStr) -> SecretStr:
        if len(key.get_secret_value()) < CHECKPOINT_KEY_MIN_CHARS:
            raise ValueError(f"must be at least {CHECKPOINT_KEY_MIN_CHARS} characters of a random secret "
                             "(e.g. `openssl rand -hex 32`)")
        return key

    def refuse_placeholders(self, production: bool) -> None:
        """Refuse the dev checkpoint key in production, as CoreSettings refuses the dev PII key.

        >>> ScoringSettings().refuse_placeholders(production=True)
        Traceback (most recent call last):
        ...
        touchstream.startup.ConfigurationError: TOUCHSTREAM_SCORING_CHECKPOINT_KEY is the dev placeholder; ...
        >>> ScoringSettings(checkpoint_key="a-real-secret-from-the-vault").refuse_placeholders(production=True)
        """
        if production and self.checkpoint_key.get_secret_value() == DEV_CHECKPOINT_KEY:
            raise ConfigurationError(
                "TOUCHSTREAM_SCORING_CHECKPOINT_KEY is the dev placeholder; set a real secret in prod")
