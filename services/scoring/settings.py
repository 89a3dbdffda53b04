"""Scoring settings (env prefix TOUCHSTREAM_SCORING_)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from touchstream.startup import ConfigurationError

DEV_CHECKPOINT_KEY = "dev-only-checkpoint-key-change-me"
CHECKPOINT_KEY_MIN_CHARS = 16


class ScoringSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOUCHSTREAM_SCORING_", frozen=True, extra="ignore",
                                      hide_input_in_errors=True)

    web_port: int = 6068
    # 0.0.0.0 in containers, so probes and Prometheus reach /metrics, /healthz and /readyz.
    web_host: str = "127.0.0.1"
    horizon_days: int = Field(90, ge=1, description="H in 'purchase within H days'; churn risk = 1 - that.")
    lateness_days: float = Field(
        1.0, ge=0, description="How far behind the partition's newest event time a purchase may arrive and still count."
    )
    checkpoint_interval_s: float = Field(30.0, gt=0, description="How often the model is pickled to Redis.")
    # Anyone who can write Redis could otherwise make scoring unpickle (run) their bytes.
    checkpoint_key: SecretStr = Field(
        SecretStr(DEV_CHECKPOINT_KEY),
        description="HMAC-SHA256 key that signs model checkpoints; a checkpoint it did not sign is never loaded.")
    key_prefix: str = Field("ts:scoring", description="Prefix of every Redis key the service owns.")
    model: Literal["logreg", "forest"] = Field(
        "logreg", description="logreg: scaler + logistic regression; forest: River adaptive random forest."
    )
    # Measured on CDNOW: 0.05 overshoots (AUC 0.72), 0.001-0.002 ranks best (0.772).
    learning_rate: float = Field(0.002, gt=0, description="SGD step of the logistic regression.")
    reason_count: int = Field(3, ge=0, description="Reason codes per ScoreUpdate.")
    tick_days: float = Field(
        14.0, gt=0, description="Rescore a silent customer this long after its last prediction point."
    )
    tick_max_silence_days: float = Field(730.0, gt=0, description="Stop rescoring a customer silent this long.")
    emit_rescores: bool = Field(False, description="Send a ScoreUpdate (event_type 'rescore') for each as-of rescore.")
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
