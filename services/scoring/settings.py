"""Scoring settings (env prefix TOUCHSTREAM_SCORING_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ScoringSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOUCHSTREAM_SCORING_", frozen=True, extra="ignore")

    web_port: int = 6068
    horizon_days: int = Field(90, ge=1, description="H in 'purchase within H days'; churn risk = 1 - that.")
    lateness_days: float = Field(
        1.0, ge=0, description="How far behind the partition's newest event time a purchase may arrive and still count."
    )
    checkpoint_interval_s: float = Field(30.0, gt=0, description="How often the model is pickled to Redis.")
    key_prefix: str = Field("ts:scoring", description="Prefix of every Redis key the service owns.")
    learning_rate: float = Field(0.05, gt=0)
    reason_count: int = Field(3, ge=0, description="Reason codes per ScoreUpdate.")
    loyal_min_purchases: int = Field(3, ge=2, description="Purchases that make an active customer loyal.")
