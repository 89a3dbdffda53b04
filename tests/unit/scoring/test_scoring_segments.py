"""RFM segments from online quantiles, and lifecycle stages from thresholds."""

from __future__ import annotations

import itertools
import pickle
import random

import pytest

from services.scoring.segments import (
    SEGMENT_TABLE,
    WARM_UP,
    RfmQuantiles,
    StageRules,
    lifecycle_stage,
    rfm_segment,
    segment_of,
)
from services.scoring.state import CustomerState
from touchstream.eventtime import DAY_MS

RULES = StageRules(at_risk_days=90, churned_days=180, won_back_gap_days=90, habit_min_purchases=2,
                   loyal_min_purchases=3)
NOW = 1000 * DAY_MS


def customer(
    purchases: int, recency_days: float | None, spend: float = 0.0, gap_days: float | None = None
) -> CustomerState:
    if recency_days is None:
        return CustomerState(first_touch_ms=0)
    last = NOW - int(recency_days * DAY_MS)
    times = [last] if gap_days is None else [last - int(gap_days * DAY_MS), last]
    return CustomerState(purchase_count=purchases, monetary_total=spend, last_purchase_ms=last, purchase_times=times)


def warmed_quantiles(seed: int = 3) -> RfmQuantiles:
    """Quantiles over a population with recency uniform in 0..500 days, frequency 1..10, spend 10..1000."""
    rng = random.Random(seed)
    quantiles = RfmQuantiles()
    for _ in range(3000):
        n = rng.randint(1, 10)
        quantiles.observe(customer(n, rng.uniform(0, 500), spend=n * rng.uniform(10, 100)), NOW)
    return quantiles


def test_quantile_cut_points_follow_the_observed_population() -> None:
    quantiles = warmed_quantiles()
    cuts = quantiles.recency.cuts()
    # Uniform 0..500 days: quintile marks near 100, 200, 300, 400.
    for cut, expected in zip(cuts, (100, 200, 300, 400), strict=True):
        assert abs(cut - expected) < 25
    assert quantiles.frequency.seen == 3000


@pytest.mark.parametrize(
    ("purchases", "recency", "spend", "segment"),
    [
        (0, None, 0.0, "prospect"),
        (10, 5, 900.0, "champions"),
        (1, 5, 15.0, "new"),
        (10, 480, 900.0, "cant_lose_them"),
        (1, 480, 15.0, "lost"),
        (1, 330, 15.0, "hibernating"),
        (6, 350, 300.0, "at_risk"),
    ],
)
def test_segments_by_quintile(purchases: int, recency: float | None, spend: float, segment: str) -> None:
    assert rfm_segment(customer(purchases, recency, spend), NOW, warmed_quantiles()) == segment


def test_the_same_customer_moves_segment_when_the_population_changes() -> None:
    quantiles = RfmQuantiles()
    for n in range(WARM_UP * 4):
        # A population of heavy, recent buyers: 4 purchases and 60 days is below average there.
        quantiles.observe(customer(20 + n % 10, n % 30, spend=2000.0), NOW)
    middling = customer(4, 60, spend=200.0)
    assert rfm_segment(middling, NOW, quantiles) in {"lost", "hibernating"}
    assert rfm_segment(middling, NOW, RfmQuantiles()) not in {"lost", "hibernating"}


def test_segment_table_names_every_score_cell() -> None:
    names = {name for name, _, _ in SEGMENT_TABLE}
    for r, f, m in itertools.product(range(1, 6), repeat=3):
        assert segment_of(r, f, m) in names


def test_quantiles_survive_a_checkpoint() -> None:
    quantiles = warmed_quantiles()
    restored = pickle.loads(pickle.dumps(quantiles))
    assert restored.recency.cuts() == quantiles.recency.cuts()


@pytest.mark.parametrize(
    ("purchases", "recency", "gap", "stage"),
    [
        (0, None, None, "prospect"),
        (1, 5, None, "new"),
        (2, 5, 20, "habit_forming"),
        (5, 5, 20, "loyal"),
        (4, 120, 20, "at_risk"),
        (4, 400, 20, "churned"),
        (4, 1, 120, "won_back"),
    ],
)
def test_lifecycle_stages(purchases: int, recency: float | None, gap: float | None, stage: str) -> None:
    assert lifecycle_stage(customer(purchases, recency, gap_days=gap), NOW, RULES) == stage


def test_stage_thresholds_come_from_the_rules() -> None:
    state = customer(4, 100, gap_days=20)
    assert lifecycle_stage(state, NOW, RULES) == "at_risk"
    assert lifecycle_stage(state, NOW, StageRules(at_risk_days=120, churned_days=240)) == "loyal"
