"""Read scoring's live model quality out of its Prometheus exposition (pure: text in, numbers out)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "touchstream_scoring_"


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

    def first(*names: str) -> float | None:
        return next((found[n] for n in names if n in found), None)

    return ModelQuality(
        roc_auc=first("prequential_roc_auc_ratio"),
        log_loss=first("prequential_log_loss_nats"),
        brier=first("prequential_brier_score_ratio"),
        calibration_error=first("prequential_calibration_error_ratio"),
        examples_learned=first("examples_learned_total"),
        pending_examples=first("pending_examples"),
        drift_alarms=first("drift_alarms_total"),
    )


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
