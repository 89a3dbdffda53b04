"""Late labels: sampling, positive windows, maturity."""

from __future__ import annotations

from services.scoring.labels import PendingExample, is_prediction_point, label_with_purchase, split_matured
from touchstream.eventtime import DAY_MS

H = 90 * DAY_MS


def example(t_day: float) -> PendingExample:
    t = int(t_day * DAY_MS)
    return PendingExample(t, t + H, {}, 0.5)


def test_at_most_one_prediction_point_per_day() -> None:
    assert is_prediction_point(-1, 10 * DAY_MS + 5, H, 0)
    assert not is_prediction_point(10, 10 * DAY_MS + 999, H, 0)
    assert is_prediction_point(10, 11 * DAY_MS, H, 0)


def test_no_prediction_point_when_its_window_already_closed() -> None:
    assert not is_prediction_point(-1, 0, H, H)


def test_purchase_labels_only_windows_that_contain_it() -> None:
    waiting = [example(0), example(50), example(100)]
    label_with_purchase(waiting, 90 * DAY_MS)
    # Window (t, t+H]: day 0 includes day 90, day 50 includes it, day 100 starts after it.
    assert [e.positive for e in waiting] == [True, True, False]
    same_instant = [example(90)]
    label_with_purchase(same_instant, 90 * DAY_MS)
    assert not same_instant[0].positive


def test_examples_mature_only_when_the_cutoff_passes_their_due_time() -> None:
    waiting = [example(0), example(10)]
    matured, rest = split_matured(waiting, 95 * DAY_MS)
    assert [e.t_ms for e in matured] == [0] and [e.t_ms for e in rest] == [10 * DAY_MS]
