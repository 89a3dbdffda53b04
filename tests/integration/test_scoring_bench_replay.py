"""The CDNOW quality benchmark replays only the calibration period: no holdout label reaches scoring."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

from services.scoring.codec import decode_state
from services.scoring.service import ResolvedInput, ScoringService
from touchstream.datasets import cdnow_purchases

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_scoring_cdnow as bench

pytestmark = pytest.mark.integration


def test_calibration_events_are_exactly_the_purchases_before_the_cut() -> None:
    purchases = cdnow_purchases()
    for weeks in (13, 20, 33, 39, 45):
        cutoff_ms = bench.ms(bench.cut_at(weeks))
        events = bench.calibration_events(purchases, cutoff_ms)
        assert events and max(t for _, t in events) < cutoff_ms
        assert len(events) == sum(p.timestamp_ms < cutoff_ms for p in purchases)
        assert [t for _, t in events] == sorted(t for _, t in events)


def test_the_in_stream_check_scores_inside_the_calibration_period_from_its_first_half() -> None:
    for weeks in (13, 20, 33, 39, 45):
        replayed_until, scored_until = bench.evaluation_window(weeks, in_stream=True)
        # Nothing after the cut: neither what is replayed nor what it is scored against.
        assert replayed_until < scored_until == bench.cut_at(weeks)
        assert bench.evaluation_window(weeks, in_stream=False) == (bench.cut_at(weeks), bench.HOLDOUT_END)


async def test_the_replay_hands_scoring_nothing_from_the_holdout(redis_url: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cutoff_ms = bench.ms(bench.cut_at(2))
    purchases = cdnow_purchases()
    events = bench.calibration_events(purchases, cutoff_ms)
    seen: list[ResolvedInput] = []
    score = ScoringService.score_touchpoints

    async def recording(service: ScoringService, inputs: list[ResolvedInput]) -> list[dict[str, object]]:
        seen.extend(inputs)
        return await score(service, inputs)

    monkeypatch.setattr(ScoringService, "score_touchpoints", recording)
    result = await bench.replay_through_service(redis_url, "test:bench", events, 2, 500)

    assert result["events"] == len(seen) == len(events)
    assert max(i.touch.timestamp_ms for i in seen) < cutoff_ms
    holdout_ids = {f"cdnow-{p.line}" for p in purchases if p.timestamp_ms >= cutoff_ms}
    assert not holdout_ids & {i.touch.message_id for i in seen}
    # What the forecasts will read: states built from the calibration period alone.
    redis = aioredis.from_url(redis_url)
    try:
        keys = [key async for key in redis.scan_iter("test:bench:customer:*")]
        states = [decode_state(raw) for raw in await redis.mget(keys)]
    finally:
        await redis.aclose()
    assert len(states) == len({i.customer_id for i in seen})
    assert max(s.last_touch_ms or 0 for s in states) < cutoff_ms


def test_the_extrapolation_figures_count_buyers_by_horizon_inside_the_scored_period() -> None:
    # In-stream the 13-week cut scores 49 days: the chain's shorter horizons stay inside them.
    assert bench.curve_horizons(49) == [14, 28]
    read = {"extrapolation": {
        "chain_by_horizon": {"14": {"a": 0.4, "b": 0.2, "c": 0.1}, "28": {"a": 0.6, "b": 0.4, "c": 0.2}},
        "priors_alone": {"bg_nbd": {"a": 0.9, "b": 0.5, "c": 0.1}}}}
    first_purchase_day = np.array([3.0, 20.0, np.inf])
    figures = bench.extrapolation_figures(read, ["a", "b", "c"], first_purchase_day, 49)
    assert figures is not None
    assert [(row["days"], row["buyers"]) for row in figures["chain_by_horizon"]] == [(14, 1), (28, 2)]
    assert figures["chain_by_horizon"][1]["ratio"] == 0.6
    prior = figures["priors_alone"]["bg_nbd"]
    assert prior["predicted_buyers"] == 1.5 and prior["auc"] == 1.0
    assert bench.extrapolation_figures({}, ["a"], np.array([1.0]), 49) is None
