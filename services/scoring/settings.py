"""Scoring settings (env prefix TOUCHSTREAM_SCORING_).

How each value was chosen is in services/scoring/README.md ("Settings and how they were chosen").
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.scoring.model import LEARNING_RATES
from services.triggers.settings import DEFAULT_RULES_FILE


class ScoringSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOUCHSTREAM_SCORING_", frozen=True, extra="ignore",
                                      populate_by_name=True)

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
    key_prefix: str = Field("ts:scoring", description="Prefix of every Redis key the service owns.")
    model: Literal["logreg"] = Field("logreg", description="BG/NBD prior + logistic regression hazard (model.py).")
    learning_rates: tuple[float, ...] = Field(
        LEARNING_RATES, min_length=1, description="Candidate step sizes, learned side by side; the one with the "
        "lowest recent prequential log-loss predicts.")
    reason_count: int = Field(3, ge=0, description="Reason codes per ScoreUpdate.")
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
