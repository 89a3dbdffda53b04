"""RFM segment from online quantiles, and lifecycle stage from thresholds in settings.

RFM: each worker keeps P² quantile sketches (River `stats.Quantile`) of recency (days
since the last purchase), frequency (purchases) and monetary (total spend) over the
buyers it scores, updated at every scoring of a buyer (touchpoints and as-of rescores, so
silent customers count too). They live in the Learner and are checkpointed with the model.
A customer gets a 1-5 score per dimension by quintile (R = 5 is the most recent) and
FM = round((F + M) / 2). The segment is the first row that matches:

| segment | R | FM |
|---|---|---|
| prospect | (never bought) | |
| champions | 4-5 | 4-5 |
| loyal | 3-5 | 3-5 |
| potential_loyalist | 4-5 | 2-3 |
| new | 5 | 1 |
| promising | 4 | 1 |
| need_attention | 3 | 2-3 |
| about_to_sleep | 3 | 1 |
| cant_lose_them | 1-2 | 5 |
| at_risk | 1-2 | 3-4 |
| hibernating | 2 | 1-2 |
| lost | 1 | 1-2 |

Until a sketch has seen WARM_UP observations, fixed cut points stand in for it.

Lifecycle stages (StageRules, from settings): prospect (never bought); churned (no
purchase for `churned_days`); at_risk (none for `at_risk_days`); won_back (the last
purchase came after a gap longer than `won_back_gap_days`); loyal (at least
`loyal_min_purchases`); habit_forming (at least `habit_min_purchases`); new otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from river import stats

from services.scoring.labels import DAY_MS
from services.scoring.state import CustomerState

QUINTILES = (0.2, 0.4, 0.6, 0.8)
WARM_UP = 50
# Stand-ins before the sketches warm up: days, purchases, spend at the 20/40/60/80% marks.
DEFAULT_CUTS = {"recency": (14.0, 45.0, 90.0, 180.0), "frequency": (1.0, 2.0, 3.0, 5.0),
                "monetary": (20.0, 50.0, 100.0, 250.0)}
SEGMENT_TABLE: tuple[tuple[str, tuple[int, int], tuple[int, int]], ...] = (
    ("champions", (4, 5), (4, 5)),
    ("loyal", (3, 5), (3, 5)),
    ("potential_loyalist", (4, 5), (2, 3)),
    ("new", (5, 5), (1, 1)),
    ("promising", (4, 4), (1, 1)),
    ("need_attention", (3, 3), (2, 3)),
    ("about_to_sleep", (3, 3), (1, 1)),
    ("cant_lose_them", (1, 2), (5, 5)),
    ("at_risk", (1, 2), (3, 4)),
    ("hibernating", (2, 2), (1, 2)),
    ("lost", (1, 1), (1, 2)),
)


@dataclass(frozen=True)
class StageRules:
    """Thresholds of the lifecycle stages (and the horizon-based ones used elsewhere)."""

    at_risk_days: float = 90.0
    churned_days: float = 180.0
    won_back_gap_days: float = 90.0
    habit_min_purchases: int = 2
    loyal_min_purchases: int = 3


@dataclass
class QuintileSketch:
    """Four P² quantile sketches (20/40/60/80%) of one RFM dimension."""

    name: str
    quantiles: list[stats.Quantile] = field(default_factory=lambda: [stats.Quantile(q) for q in QUINTILES])
    seen: int = 0

    def update(self, value: float) -> None:
        self.seen += 1
        for q in self.quantiles:
            q.update(value)

    def cuts(self) -> tuple[float, ...]:
        if self.seen < WARM_UP:
            return DEFAULT_CUTS[self.name]
        return tuple(float(q.get() or 0.0) for q in self.quantiles)

    def score(self, value: float, higher_is_better: bool = True) -> int:
        """Return the 1-5 quintile score of `value`."""
        above = sum(value > cut for cut in self.cuts())
        return 1 + above if higher_is_better else 5 - above


@dataclass
class RfmQuantiles:
    """The worker's RFM quantile sketches."""

    recency: QuintileSketch = field(default_factory=lambda: QuintileSketch("recency"))
    frequency: QuintileSketch = field(default_factory=lambda: QuintileSketch("frequency"))
    monetary: QuintileSketch = field(default_factory=lambda: QuintileSketch("monetary"))

    def observe(self, state: CustomerState, t_ms: int) -> None:
        """Account one scoring of a buyer."""
        recency = _recency_days(state, t_ms)
        if recency is None:
            return
        self.recency.update(recency)
        self.frequency.update(float(state.purchase_count))
        self.monetary.update(state.monetary_total)

    def scores(self, state: CustomerState, t_ms: int) -> tuple[int, int, int] | None:
        """Return (R, F, M) 1-5 scores, None for a customer who never bought."""
        recency = _recency_days(state, t_ms)
        if recency is None:
            return None
        return (
            self.recency.score(recency, higher_is_better=False),
            self.frequency.score(float(state.purchase_count)),
            self.monetary.score(state.monetary_total),
        )


def segment_of(r: int, f: int, m: int) -> str:
    """Name the RFM segment of quintile scores.

    >>> segment_of(5, 5, 4), segment_of(5, 1, 1), segment_of(1, 5, 5), segment_of(1, 1, 2)
    ('champions', 'new', 'cant_lose_them', 'lost')
    """
    fm = round((f + m) / 2 + 1e-9)
    for name, (r_lo, r_hi), (fm_lo, fm_hi) in SEGMENT_TABLE:
        if r_lo <= r <= r_hi and fm_lo <= fm <= fm_hi:
            return name
    # Unreachable for scores in 1..5 (the table covers every cell); kept as a safe default.
    return "need_attention"


def rfm_segment(state: CustomerState, t_ms: int, quantiles: RfmQuantiles) -> str:
    """Name the customer's RFM segment at `t_ms` against the worker's quantiles."""
    scores = quantiles.scores(state, t_ms)
    return "prospect" if scores is None else segment_of(*scores)


def _recency_days(state: CustomerState, t_ms: int) -> float | None:
    if state.last_purchase_ms is None:
        return None
    return max(0, t_ms - state.last_purchase_ms) / DAY_MS


def lifecycle_stage(state: CustomerState, t_ms: int, rules: StageRules) -> str:
    """Name the customer's lifecycle stage at `t_ms`.

    >>> won_back = CustomerState(purchase_count=3, last_purchase_ms=200 * DAY_MS,
    ...                          purchase_times=[0, 50 * DAY_MS, 200 * DAY_MS])
    >>> lifecycle_stage(won_back, 201 * DAY_MS, StageRules())
    'won_back'
    """
    recency = _recency_days(state, t_ms)
    if recency is None:
        return "prospect"
    if recency > rules.churned_days:
        return "churned"
    if recency > rules.at_risk_days:
        return "at_risk"
    gap = state.gap_before_last_purchase_ms
    if gap is not None and gap / DAY_MS > rules.won_back_gap_days:
        return "won_back"
    if state.purchase_count >= rules.loyal_min_purchases:
        return "loyal"
    return "habit_forming" if state.purchase_count >= rules.habit_min_purchases else "new"
