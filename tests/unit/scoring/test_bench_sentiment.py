"""The sentiment benchmark: the vendored samples are the pinned ones, and accuracy counts what it says."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[3] / "bench"
sys.path.insert(0, str(BENCH))

import bench_sentiment  # noqa: E402


def test_the_vendored_samples_match_their_pins_and_are_balanced() -> None:
    for name, sha256, _ in bench_sentiment.CORPORA.values():
        items = bench_sentiment.labelled(name, sha256)
        assert len(items) == 2000 and sum(label for label, _ in items) == 1000
        assert all(text.strip() for _, text in items)


def test_accuracy_counts_no_sentiment_and_zero_as_wrong() -> None:
    items = [(1, "Great, I love it!"), (0, "Awful, broken on arrival."), (1, "It is a phone."), (0, "")]
    result = bench_sentiment.measure("en", items)
    assert result["scored"] == 3 and result["unscored"] == {"empty": 1}
    assert result["scored_exactly_zero"] == 1
    assert result["accuracy"] == 0.5 and result["accuracy_scored"] == round(2 / 3, 4)
