"""Numbers for the overview: scoring's model quality and the pipeline's counters read out of Prometheus
expositions (pure: text in, numbers out), and the small in-memory windows that turn samples into rates
and latencies into quantiles."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "touchstream_scoring_"
# ModelQuality's field -> the series of scoring's /metrics it is read from (without PREFIX);
# tests/unit/test_deploy_monitoring.py checks scoring exposes each one.
QUALITY_SERIES = {
    "roc_auc": "prequential_roc_auc_ratio",
    "log_loss": "prequential_log_loss_nats",
    "brier": "prequential_brier_score_ratio",
    "calibration_error": "prequential_calibration_error_ratio",
    "examples_learned": "examples_learned_total",
    "pending_examples": "pending_examples",
    "drift_alarms": "drift_alarms_total",
}


@dataclass(frozen=True)
class ModelQuality:
    roc_auc: float | None
    log_loss: float | None
    brier: float | None
    calibration_error: float | None
    examples_learned: float | None
    pending_examples: float | None
    drift_alarms: float | None


def model_quality(exposition: str) -> ModelQuality:
    """Pick the model-quality series out of scoring's /metrics text (labelled series are summed).

    >>> q = model_quality("touchstream_scoring_prequential_roc_auc_ratio 0.81\\n"
    ...                   'touchstream_scoring_examples_learned_total{label="1"} 3.0\\n'
    ...                   'touchstream_scoring_examples_learned_total{label="0"} 4.0\\n')
    >>> q.roc_auc, q.examples_learned, q.log_loss
    (0.81, 7.0, None)
    """
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name.startswith(PREFIX):
                name = sample.name[len(PREFIX):]
                found[name] = found.get(name, 0.0) + sample.value

    return ModelQuality(**{field: found.get(series) for field, series in QUALITY_SERIES.items()})


def latency_quantiles(exposition: str, metric: str, quantiles: tuple[float, ...] = (0.5, 0.95, 0.99)
                      ) -> dict[float, float] | None:
    """Estimate quantiles of a Prometheus histogram as the upper bound of the bucket holding each one.

    >>> text = ('x_seconds_bucket{le="0.1"} 50.0\\nx_seconds_bucket{le="0.5"} 95.0\\n'
    ...         'x_seconds_bucket{le="1.0"} 100.0\\nx_seconds_bucket{le="+Inf"} 100.0\\n')
    >>> latency_quantiles(text, "x_seconds")
    {0.5: 0.1, 0.95: 0.5, 0.99: 1.0}
    >>> latency_quantiles("", "x_seconds") is None
    True
    """
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == f"{metric}_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value  # summed over other labels
    if not buckets or buckets.get(float("inf"), 0.0) == 0:
        return None
    total = buckets[float("inf")]
    answer = {}
    for q in quantiles:
        answer[q] = next(bound for bound in sorted(buckets) if buckets[bound] >= q * total)
    return answer


def latency_words(quantiles: dict[float, float]) -> dict[float, str]:
    """Say each quantile as a bound; one that fell in the +Inf bucket is only known to exceed the largest bound.

    >>> latency_words({0.5: 0.25, 0.99: float("inf")})
    {0.5: '≤ 0.25 s', 0.99: 'more than the largest bucket'}
    """
    return {q: f"≤ {v:g} s" if v != float("inf") else "more than the largest bucket" for q, v in quantiles.items()}


class RateMeter:
    """Count events over a sliding window (one-second slots), to say how fast the read model is fed."""

    def __init__(self, window_s: int = 60) -> None:
        self.window_s = window_s
        self._slots: dict[int, int] = {}

    def add(self, count: int, now_s: float) -> None:
        slot = int(now_s)
        self._slots[slot] = self._slots.get(slot, 0) + count
        for old in [s for s in self._slots if s <= slot - self.window_s]:
            del self._slots[old]

    def per_second(self, now_s: float) -> float:
        """Return the mean rate over the window ending now.

        >>> meter = RateMeter(10)
        >>> meter.add(50, 100.2); meter.add(50, 105.0)
        >>> meter.per_second(105.5), meter.per_second(200.0)
        (10.0, 0.0)
        """
        start = int(now_s) - self.window_s
        return sum(n for slot, n in self._slots.items() if slot > start) / self.window_s


def counter_total(exposition: str, metric: str, labels: Mapping[str, str] | None = None) -> float | None:
    """Sum a counter's series whose labels include `labels` (None when the metric is absent).

    >>> text = ('t_events_in_total{topic="a"} 5.0\\nt_events_in_total{topic="b"} 7.0\\n'
    ...         't_events_in_total{topic="a",worker="2"} 1.0\\n')
    >>> counter_total(text, "t_events_in_total"), counter_total(text, "t_events_in_total", {"topic": "a"})
    (13.0, 6.0)
    >>> counter_total(text, "t_other_total") is None
    True
    """
    total: float | None = None
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == metric and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total = (total or 0.0) + sample.value
    return total


class CounterRate:
    """The rate of a Prometheus counter from samples taken over time, over (about) the last `window_s`.

    The oldest sample kept is the newest one at or before the window's start, so once the console has
    run a window long the rate spans the whole window. A counter that went down (its process restarted)
    starts the samples over; a rate needs two samples a second apart.
    """

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, value: float, now_s: float) -> None:
        if self._samples and value < self._samples[-1][1]:
            self._samples.clear()
        self._samples.append((now_s, value))
        while len(self._samples) > 2 and self._samples[1][0] <= now_s - self.window_s:
            self._samples.popleft()

    def per_second(self, now_s: float) -> float | None:
        """Return the rate between the oldest and newest sample kept; None without two recent samples.

        >>> rate = CounterRate(60)
        >>> rate.add(100, 0.0); rate.add(400, 30.0); rate.add(700, 60.0); rate.add(1300, 90.0)
        >>> rate.per_second(90.0)  # (1300 - 400) / (90 - 30): the sample at 0 s is older than the window
        15.0
        >>> rate.add(5, 95.0)  # the service restarted
        >>> rate.per_second(95.0) is None, rate.per_second(1000.0) is None
        (True, True)
        """
        if len(self._samples) < 2:
            return None
        (t0, v0), (t1, v1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 1.0 or now_s - t1 > 2 * self.window_s:
            return None
        return (v1 - v0) / (t1 - t0)


class LatencyWindow:
    """Latencies seen over the last `window_s` seconds, per label (the newest `cap` of each), for exact quantiles."""

    def __init__(self, window_s: float = 60.0, cap: int = 10_000) -> None:
        self.window_s = window_s
        self.cap = cap
        self._seen: dict[str, deque[tuple[float, float]]] = {}

    def add(self, label: str, latency_s: float, now_s: float) -> None:
        self._seen.setdefault(label, deque(maxlen=self.cap)).append((now_s, latency_s))

    def quantiles(self, label: str, now_s: float, quantiles: tuple[float, ...] = (0.5, 0.95, 0.99)
                  ) -> tuple[int, dict[float, float]] | None:
        """Return (how many, {quantile: seconds}) over the window (nearest rank), None if nothing was seen.

        >>> w = LatencyWindow(60)
        >>> for i in range(1, 101): w.add("scores", i / 100, 1000.0)
        >>> w.add("scores", 99.0, 900.0)  # older than the window: left out
        >>> w.quantiles("scores", 1010.0)
        (100, {0.5: 0.5, 0.95: 0.95, 0.99: 0.99})
        >>> w.quantiles("scores", 1100.0) is None, w.quantiles("actions", 1000.0) is None
        (True, True)
        """
        seen = self._seen.get(label)
        if not seen:
            return None
        while seen and seen[0][0] <= now_s - self.window_s:
            seen.popleft()
        values = sorted(latency for at, latency in seen if at > now_s - self.window_s)
        if not values:
            return None
        return len(values), {q: values[max(0, math.ceil(q * len(values)) - 1)] for q in quantiles}


def seconds_in_words(seconds: float) -> str:
    """Say a latency briefly.

    >>> seconds_in_words(0.0123), seconds_in_words(2.345), seconds_in_words(125.0)
    ('12 ms', '2.35 s', '2.1 min')
    """
    if seconds < 1.0:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60.0:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"
