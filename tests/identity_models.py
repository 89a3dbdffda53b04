"""What the matching tests share: one person's traits as events carry them, a typical model, comparison
patterns drawn from it, and a fitted model stored in the graph."""

from __future__ import annotations

import numpy as np
import redis.asyncio as aioredis

from services.identity.domain import GraphLayout
from services.identity.match_model import MatchModel, ModelState, fit_match_model
from services.identity.matching import LEVEL_COUNTS, MISSING, Pattern

ANN = {"first_name": "Ann", "last_name": "Lee", "birthday": "1990-01-02",
       "address": {"street_number": "12", "line1": "main street", "city": "canberra", "postcode": "2600"}}
# Ann again with a keying error in her surname and in her postcode: one person.
ANN_TYPO = {**ANN, "last_name": "Lea", "address": {**ANN["address"], "postcode": "2606"}}
# Ann's name and birth date at another street and postcode of her town: plausibly her, not surely.
ANN_MOVED = {**ANN, "address": {"street_number": "3", "line1": "high street", "city": "canberra", "postcode": "4870"}}
# A merge needing near certainty makes ANN_MOVED a possible match under the stored model.
NEAR_CERTAINTY = 0.999999


def agreeing(levels: int, exact: float) -> tuple[float, ...]:
    """Level probabilities putting `exact` on the exact level and the rest evenly on the others."""
    return (*[(1 - exact) / (levels - 1)] * (levels - 1), exact)


def disagreeing(levels: int, disagree: float) -> tuple[float, ...]:
    """Level probabilities putting `disagree` on "else" and the rest evenly on the others."""
    return (disagree, *[(1 - disagree) / (levels - 1)] * (levels - 1))


def typical_model(prior: float) -> MatchModel:
    """One person's records mostly agree exactly (85%); two people's mostly disagree (90%)."""
    return MatchModel(prior, tuple(agreeing(n, 0.85) for n in LEVEL_COUNTS),
                      tuple(disagreeing(n, 0.9) for n in LEVEL_COUNTS))


def sample_patterns(model: MatchModel, pairs: int, missing: float, seed: int) -> dict[Pattern, int]:
    """Draw counted comparison patterns from `model`, each field missing with probability `missing`."""
    rng = np.random.default_rng(seed)
    is_match = rng.random(pairs) < model.prior
    columns = []
    for f, levels in enumerate(LEVEL_COUNTS):
        column = np.where(is_match, rng.choice(levels, size=pairs, p=model.m[f]),
                          rng.choice(levels, size=pairs, p=model.u[f]))
        columns.append(np.where(rng.random(pairs) < missing, MISSING, column))
    counts: dict[Pattern, int] = {}
    for row in zip(*columns, strict=True):
        pattern = tuple(int(x) for x in row)
        counts[pattern] = counts.get(pattern, 0) + 1
    return counts


async def store_fitted_model(client: aioredis.Redis, layout: GraphLayout) -> MatchModel:
    """Store a model fitted on typical pairs, last tried long enough ago that a test's few records do not refit it."""
    model = fit_match_model(sample_patterns(typical_model(0.3), 3000, missing=0.05, seed=1),
                            fitted_at_records=10_000)
    await client.set(layout.match_key("model"), ModelState(model, 10_000, 3000).to_json())
    return model
