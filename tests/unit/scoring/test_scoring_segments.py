"""Segment and lifecycle stage rules."""

from __future__ import annotations

import pytest

from services.scoring.labels import DAY_MS
from services.scoring.segments import StageRules, lifecycle_stage, rfm_segment
from services.scoring.state import CustomerState

RULES = StageRules(active_days=90, churned_days=180, recent_days=30, loyal_min_purchases=3)


def customer(purchases: int, last_day: float | None, gap_days: float | None = None) -> CustomerState:
    return CustomerState(
        purchase_count=purchases,
        last_purchase_ms=None if last_day is None else int(last_day * DAY_MS),
        gap_before_last_purchase_ms=None if gap_days is None else int(gap_days * DAY_MS),
    )


@pytest.mark.parametrize(
    ("purchases", "recency", "segment", "stage"),
    [
        (0, None, "prospect", "prospect"),
        (1, 5, "new", "new"),
        (2, 5, "loyal", "habit_forming"),
        (5, 5, "champions", "loyal"),
        (1, 60, "promising", "new"),
        (4, 120, "at_risk", "at_risk"),
        (1, 120, "about_to_sleep", "at_risk"),
        (4, 400, "hibernating", "churned"),
    ],
)
def test_rules_by_recency_and_frequency(purchases: int, recency: float | None, segment: str, stage: str) -> None:
    now = 500 * DAY_MS
    state = customer(purchases, None if recency is None else 500 - recency)
    assert rfm_segment(state, now, RULES) == segment
    assert lifecycle_stage(state, now, RULES) == stage


def test_a_purchase_after_a_long_gap_is_won_back() -> None:
    assert lifecycle_stage(customer(4, 100, gap_days=120), 101 * DAY_MS, RULES) == "won_back"
    assert lifecycle_stage(customer(4, 100, gap_days=20), 101 * DAY_MS, RULES) == "loyal"
