"""The Fellegi-Sunter model of the stream's candidate pairs, fitted by EM without labels; no I/O.

Every candidate pair (two records sharing a blocking key) is summarised by its comparison
pattern (`matching.compare_people`). The model says how likely each field's agreement level is
among pairs of one person (m) and among pairs of two people (u), and which share of the
candidate pairs are one person (the prior, lambda). Nothing of it is set by hand: EM finds the
m, u and lambda under which the patterns seen are most likely, taking the fields as independent
given the class (the classic Fellegi-Sunter / Winkler assumption). A pair's posterior match
probability then follows from Bayes' rule with the fitted prior.

Patterns are counted, not kept: EM runs over distinct patterns weighted by their counts, so a
fit on a million pairs costs what a few thousand distinct patterns cost.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from services.identity.matching import COMPARED_FIELDS, LEVEL_COUNTS, MISSING, Pattern

# Jeffreys' prior (half a pair per level and class) keeps a level no pair of a class showed yet
# from getting probability 0, which would make a single disagreement veto a match for ever.
PSEUDO_COUNT = 0.5
_CLAMP = 1e-9


def pattern_key(pattern: Pattern) -> str:
    """Name a pattern compactly (a Redis hash field): one character per field, '-' when missing.

    >>> pattern_key((3, 0, -1, 2)), parse_pattern_key("30-2")
    ('30-2', (3, 0, -1, 2))
    """
    return "".join("-" if level == MISSING else str(level) for level in pattern)


def parse_pattern_key(key: str) -> Pattern:
    return tuple(MISSING if c == "-" else int(c) for c in key)


@dataclass(frozen=True)
class MatchModel:
    """A fitted (or starting) Fellegi-Sunter model: m and u per field and level, and the prior."""

    prior: float
    m: tuple[tuple[float, ...], ...]
    u: tuple[tuple[float, ...], ...]
    pairs: int = 0
    log_likelihood: float = 0.0
    iterations: int = 0
    converged: bool = False
    fitted_at_records: int = 0

    def level_weights(self) -> list[list[float]]:
        """Return log2(m/u) per field and level: what each outcome adds to a pair's match weight."""
        return [[math.log2(m / u) for m, u in zip(ms, us, strict=True)] for ms, us in zip(self.m, self.u, strict=True)]

    def scorer(self) -> PatternScorer:
        return PatternScorer(self)

    def to_json(self) -> str:
        return json.dumps({
            "fields": [f.name for f in COMPARED_FIELDS], "prior": self.prior,
            "m": [list(v) for v in self.m], "u": [list(v) for v in self.u], "pairs": self.pairs,
            "log_likelihood": self.log_likelihood, "iterations": self.iterations, "converged": self.converged,
            "fitted_at_records": self.fitted_at_records,
        })

    @classmethod
    def from_json(cls, text: str | bytes) -> MatchModel:
        data = json.loads(text)
        if data.get("fields") != [f.name for f in COMPARED_FIELDS] or [len(v) for v in data["m"]] != list(
                LEVEL_COUNTS):
            raise ValueError("the stored model compares other fields or levels; it is refitted from scratch")
        return cls(data["prior"], tuple(tuple(v) for v in data["m"]), tuple(tuple(v) for v in data["u"]),
                   data["pairs"], data["log_likelihood"], data["iterations"], data["converged"],
                   data["fitted_at_records"])

    def describe(self) -> dict[str, object]:
        """Return the model as an operator reads it: per field and level, m, u and the weight in bits."""
        weights = self.level_weights()
        return {
            "prior": self.prior, "pairs": self.pairs, "log_likelihood": self.log_likelihood,
            "iterations": self.iterations, "converged": self.converged, "fitted_at_records": self.fitted_at_records,
            "fields": {
                spec.name: {level: {"m": round(m, 6), "u": round(u, 6), "weight_bits": round(w, 3)}
                            for level, m, u, w in zip(spec.levels, ms, us, ws, strict=True)}
                for spec, ms, us, ws in zip(COMPARED_FIELDS, self.m, self.u, weights, strict=True)
            },
        }


class PatternScorer:
    """Posterior match probability of patterns under one model, memoised (patterns repeat a lot)."""

    def __init__(self, model: MatchModel) -> None:
        self._weights = model.level_weights()
        self._prior_bits = math.log2(model.prior / (1 - model.prior))
        self._cache: dict[Pattern, tuple[float, float]] = {}

    def score(self, pattern: Pattern) -> tuple[float, float]:
        """Return (match weight in bits, posterior match probability) of a pattern."""
        found = self._cache.get(pattern)
        if found is None:
            weight = sum(self._weights[f][level] for f, level in enumerate(pattern) if level != MISSING)
            odds_bits = self._prior_bits + weight
            probability = 1.0 / (1.0 + 2.0 ** -odds_bits) if odds_bits > -1000 else 0.0
            found = self._cache[pattern] = (weight, probability)
        return found


def starting_model(patterns: np.ndarray, counts: np.ndarray) -> MatchModel:
    """Return EM's starting point: u from the data, m leaning to agreement, prior a guess.

    u starts at the levels' overall frequencies (what the candidates would show if they were all
    strangers), m at 0.9 on the exact level with the rest shared evenly (records of one person
    mostly agree), the prior at 0.1. EM moves all of them; the start only decides which of the
    two classes it finds comes out as "match" (the agreeing one; see `_match_class_agrees`).
    """
    m, u = [], []
    for f, levels in enumerate(LEVEL_COUNTS):
        column = patterns[:, f]
        seen = np.array([counts[column == level].sum() for level in range(levels)], dtype=float) + PSEUDO_COUNT
        u.append(tuple(float(x) for x in seen / seen.sum()))
        m.append(tuple([0.1 / (levels - 1)] * (levels - 1) + [0.9]))
    return MatchModel(0.1, tuple(m), tuple(u))


def fit_match_model(
    pattern_counts: Mapping[Pattern, int], start: MatchModel | None = None, max_iterations: int = 500,
    tolerance: float = 1e-7, fitted_at_records: int = 0,
) -> MatchModel:
    """Fit m, u and the prior to counted comparison patterns by EM; `start` warm-starts it.

    >>> same, other = (3, 3, 2, 2, 3, 3, 3, 2, 1), (0, 0, 0, 0, 0, 0, 0, 0, 1)
    >>> fitted = fit_match_model({same: 40, other: 300, (3, 0, 0, 0, 0, 0, 1, 0, 1): 60})
    >>> round(fitted.prior, 2), fitted.converged
    (0.1, True)
    >>> [round(p, 3) for p in (fitted.scorer().score(same)[1], fitted.scorer().score(other)[1])]
    [1.0, 0.0]
    """
    if not pattern_counts:
        raise ValueError("no comparison patterns to fit")
    patterns = np.array(list(pattern_counts), dtype=np.int8)
    counts = np.array(list(pattern_counts.values()), dtype=float)
    total = counts.sum()
    model = start or starting_model(patterns, counts)
    # One-hot masks per field and level, computed once: E and M steps are then matrix products.
    masks = [np.stack([patterns[:, f] == level for level in range(levels)], axis=1).astype(float)
             for f, levels in enumerate(LEVEL_COUNTS)]
    prior = model.prior
    log_m = [np.log(np.array(v)) for v in model.m]
    log_u = [np.log(np.array(v)) for v in model.u]
    previous = -math.inf
    log_likelihood = -math.inf
    converged = False
    iterations = 0
    for iterations in range(1, max_iterations + 1):  # noqa: B007 (the count is reported)
        match_log = sum(mask @ lm for mask, lm in zip(masks, log_m, strict=True)) + math.log(prior)
        other_log = sum(mask @ lu for mask, lu in zip(masks, log_u, strict=True)) + math.log(1 - prior)
        mixed = np.logaddexp(match_log, other_log)
        log_likelihood = float((counts * mixed).sum())
        posterior = np.exp(match_log - mixed)
        in_match, in_other = counts * posterior, counts * (1 - posterior)
        prior = min(max(float(in_match.sum() / total), _CLAMP), 1 - _CLAMP)
        log_m = [np.log(_normalised(in_match @ mask)) for mask in masks]
        log_u = [np.log(_normalised(in_other @ mask)) for mask in masks]
        if log_likelihood - previous < tolerance * total:
            converged = True
            break
        previous = log_likelihood
    fitted = MatchModel(prior, tuple(tuple(float(x) for x in np.exp(lm)) for lm in log_m),
                        tuple(tuple(float(x) for x in np.exp(lu)) for lu in log_u), int(total),
                        log_likelihood, iterations, converged, fitted_at_records)
    return _match_class_agrees(fitted)


def _normalised(level_counts: np.ndarray) -> np.ndarray:
    smoothed = level_counts + PSEUDO_COUNT
    return np.clip(smoothed / smoothed.sum(), _CLAMP, 1.0)


def _match_class_agrees(model: MatchModel) -> MatchModel:
    """Name the class that agrees exactly more often the match class (EM's labels are arbitrary)."""
    agree_m = sum(ms[-1] for ms in model.m)
    agree_u = sum(us[-1] for us in model.u)
    if agree_m >= agree_u:
        return model
    return MatchModel(1 - model.prior, model.u, model.m, model.pairs, model.log_likelihood, model.iterations,
                      model.converged, model.fitted_at_records)


def implausible_fields(model: MatchModel) -> list[str]:
    """Name the fields on which the fitted match class does not look like one person's records.

    Two records of one person agree exactly on a field more often than they show any other
    level, and at least as often as two people do (a field no pair had leaves m and u alike).
    EM always splits the pairs into two classes, even when none of them is a match (a stream of
    one channel's distinct customers): the class it then calls "match" is some other kind of
    likeness (neighbours, namesakes), and it fails this. A model with any such field is not used.

    >>> person = MatchModel(0.2, ((0.1, 0.9), (0.2, 0.8)), ((0.8, 0.2), (0.9, 0.1)))
    >>> neighbours = MatchModel(0.2, ((0.1, 0.9), (0.9, 0.1)), ((0.8, 0.2), (0.5, 0.5)))
    >>> implausible_fields(person), implausible_fields(neighbours)
    ([], ['surname'])
    """
    return [spec.name for spec, ms, us in zip(COMPARED_FIELDS, model.m, model.u, strict=False)
            if ms[-1] < max(ms) or ms[-1] < us[-1]]


@dataclass(frozen=True)
class ModelState:
    """What is persisted: the model in use (None until a fit looked like matches) and the last fit tried."""

    model: MatchModel | None = None
    tried_at_records: int = 0
    tried_at_pairs: int = 0
    rejected_fields: tuple[str, ...] = ()  # why the last fit tried is not the one in use

    def to_json(self) -> str:
        return json.dumps({
            "model": None if self.model is None else json.loads(self.model.to_json()),
            "tried_at_records": self.tried_at_records, "tried_at_pairs": self.tried_at_pairs,
            "rejected_fields": list(self.rejected_fields),
        })

    @classmethod
    def from_json(cls, text: str | bytes | None) -> ModelState:
        """Read a stored state; a missing one, or one comparing other fields, is a fresh start.

        >>> ModelState.from_json(None) == ModelState()
        True
        >>> older = ModelState(MatchModel(0.2, ((0.1, 0.9),), ((0.8, 0.2),)), 500, 120)
        >>> ModelState.from_json(older.to_json()).model is None  # levels other than COMPARED_FIELDS'
        True
        """
        if not text:
            return cls()
        data = json.loads(text)
        try:
            model = None if data["model"] is None else MatchModel.from_json(json.dumps(data["model"]))
        except ValueError:
            return cls()
        return cls(model, data["tried_at_records"], data["tried_at_pairs"], tuple(data["rejected_fields"]))


def refit_due(state: ModelState, records: int, pairs: int, growth: float, every: int, min_pairs: int) -> bool:
    """Say whether to fit the model now that `records` records and `pairs` candidate pairs were seen.

    Without a usable model, a fit is tried once there are `min_pairs` pairs, then each time the
    pairs grew by the factor `growth` since the last try: a stream with no duplicates (every fit
    implausible) pays for a logarithmic number of fits, and the pairs compared meanwhile wait to
    be decided. With a usable model, it is refitted each time the records grew by `growth` since
    the last try (early fits see little data and change the most) and at least every `every`
    records (the data can drift).

    >>> refit_due(ModelState(), 300, 40, 2.0, 50_000, 45), refit_due(ModelState(), 300, 45, 2.0, 50_000, 45)
    (False, True)
    >>> tried = ModelState(tried_at_records=300, tried_at_pairs=45)
    >>> refit_due(tried, 400, 89, 2.0, 50_000, 45), refit_due(tried, 400, 90, 2.0, 50_000, 45)
    (False, True)
    >>> fitted = ModelState(MatchModel(0.1, ((0.5, 0.5),), ((0.5, 0.5),)), tried_at_records=1000)
    >>> refit_due(fitted, 1999, 10**6, 2.0, 50_000, 45), refit_due(fitted, 2000, 10**6, 2.0, 50_000, 45)
    (False, True)
    """
    if state.model is None:
        return pairs >= max(min_pairs, state.tried_at_pairs * growth)
    last = state.tried_at_records
    return records >= min(last * growth, last + every)


def merge_pattern_counts(*many: Mapping[Pattern, int]) -> dict[Pattern, int]:
    """Add pattern counts together.

    >>> merge_pattern_counts({(1, 2): 3}, {(1, 2): 1, (0, 0): 2})
    {(1, 2): 4, (0, 0): 2}
    """
    total: dict[Pattern, int] = {}
    for counts in many:
        for pattern, n in counts.items():
            total[pattern] = total.get(pattern, 0) + n
    return total


WINDOW_CHUNKS = 20


def pattern_chunk(records: int, window_records: int) -> int:
    """Return the chunk the pairs of a batch starting after `records` records are counted in.

    Pattern counts are kept per chunk of records (a twentieth of the window), so the window
    slides by dropping whole chunks.

    >>> pattern_chunk(0, 100_000), pattern_chunk(12_345, 100_000)
    (0, 2)
    """
    return records // max(window_records // WINDOW_CHUNKS, 1)


def window_chunks(records: int, window_records: int) -> list[int]:
    """Return the chunks that make up EM's window after `records` records.

    >>> window_chunks(25_000, 100_000)
    [0, 1, 2, 3, 4, 5]
    >>> window_chunks(250_000, 100_000)[:2], len(window_chunks(250_000, 100_000))
    ([30, 31], 21)
    """
    current = pattern_chunk(records, window_records)
    return list(range(max(current - WINDOW_CHUNKS, 0), current + 1))


def log2_odds(probability: float) -> float:
    """Return log2(p / (1 - p)).

    >>> log2_odds(0.5), round(log2_odds(0.8), 3)
    (0.0, 2.0)
    """
    return math.log2(probability / (1 - probability))
