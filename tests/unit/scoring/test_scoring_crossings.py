"""Crossing checks send triggers every score it would act on, and only those."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from services.scoring.crossings import threshold_side, watched_changes
from services.scoring.settings import ScoringSettings
from services.triggers.crossing import CrossingState, next_crossing_state
from services.triggers.events import ScoreUpdated
from services.triggers.rules import ScoreCrossing, parse_rule_file


def test_the_default_rules_watch_the_churn_risk_thresholds_on_the_propensity_scale() -> None:
    settings = ScoringSettings()
    watched = watched_changes(parse_rule_file(settings.rules_file.read_text(), str(settings.rules_file)))
    assert watched.propensity_thresholds == (0.3, 0.4)  # churn risk through 0.7, re-armed below 0.6
    assert not watched.stage and not watched.segment


RULES = parse_rule_file("""
rules:
  - {id: risk, when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.6}, action: {endpoint: m}}
  - {id: buyer, when: {score: purchase_propensity, crosses_above: 0.8, rearm_below: 0.5}, action: {endpoint: m}}
""")


def fired(propensities: list[float]) -> list[tuple[str, int]]:
    """Run triggers' own crossing logic over a customer's scores; return (rule, index) of every firing."""
    states = {rule.id: CrossingState() for rule in RULES.rules}
    firings = []
    for index, p in enumerate(propensities):
        score = ScoreUpdated("c", f"m{index}", index, index, {"churn_risk": 1.0 - p, "purchase_propensity": p},
                             "", "", (), "v")
        for rule in RULES.rules:
            states[rule.id], decision = next_crossing_state(rule, states[rule.id], score)
            if decision is not None:
                firings.append((rule.id, index))
    return firings


@given(st.lists(st.integers(0, 1000).map(lambda k: k / 1000), min_size=1, max_size=60))
def test_sending_only_threshold_crossings_fires_the_same_rules_at_the_same_times(path: list[float]) -> None:
    # `path` is a customer's propensity as time goes on; the first point is an event (always sent).
    thresholds = watched_changes(RULES).propensity_thresholds
    assert all(isinstance(r.when, ScoreCrossing) for r in RULES.rules) and thresholds == (0.3, 0.4, 0.5, 0.8)
    sent = [0]
    for index in range(1, len(path)):
        if threshold_side(path[index], thresholds) != threshold_side(path[sent[-1]], thresholds):
            sent.append(index)
    every = fired(path)
    only_sent = [(rule, sent[i]) for rule, i in fired([path[i] for i in sent])]
    assert only_sent == every
    assert len(sent) <= 1 + np.count_nonzero(np.diff(threshold_side(np.array(path), thresholds)))
