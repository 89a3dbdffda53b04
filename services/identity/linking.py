"""From candidates to decisions, without I/O: compare, then link, hold for review or leave.

Every new record is compared with the stored records sharing a blocking key and with the
earlier records of its batch, giving each candidate pair's comparison pattern (the patterns
also feed the model's next fit). Then the model decides: a record links to every customer one
of whose records it matches (transitive linking: one record matching two customers joins them),
and a customer the model finds plausible but not likely is a possible match, kept for review.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from services.identity.match_model import PatternScorer
from services.identity.matching import Pattern, PersonAttributes, compare_people, is_household_pattern


@dataclass(frozen=True)
class NewRecord:
    """A record to match: its customer (just created for it) and its attributes."""

    customer_id: str
    person: PersonAttributes
    keys: tuple[str, ...]
    # Stored records sharing a key, as (customer id, attributes); earlier records of the batch are added.
    stored: tuple[tuple[str, PersonAttributes], ...] = ()
    matchable: bool = True  # False: only indexed (it was matched exactly), compared with nothing


@dataclass(frozen=True)
class CandidatePair:
    customer_id: str
    pattern: Pattern


@dataclass(frozen=True)
class PairDecision:
    customer_id: str
    weight: float  # match weight in bits: log2 of the likelihood ratio
    probability: float  # posterior match probability under the fitted prior


@dataclass(frozen=True)
class RecordDecision:
    links: tuple[PairDecision, ...] = ()
    possible: tuple[PairDecision, ...] = ()
    household_refused: int = 0


@dataclass
class BatchComparison:
    pairs: list[list[CandidatePair]] = field(default_factory=list)
    comparisons: int = 0

    def pattern_counts(self) -> dict[Pattern, int]:
        counts: dict[Pattern, int] = {}
        for record_pairs in self.pairs:
            for pair in record_pairs:
                counts[pair.pattern] = counts.get(pair.pattern, 0) + 1
        return counts


class BatchComparer:
    """Compare a batch's records in order, a chunk at a time: each with its stored candidates and the
    earlier records of the batch (the index only had those before the batch began)."""

    def __init__(self, max_block_size: int = 200) -> None:
        self._max_block_size = max_block_size
        self._earlier: dict[str, list[tuple[str, PersonAttributes]]] = {}
        # The same pair of attribute values compares the same: identical records (a customer
        # sending the same traits twice) cost one comparison.
        self._memo: dict[tuple[PersonAttributes, PersonAttributes], Pattern] = {}

    def compare(self, records: Sequence[NewRecord]) -> BatchComparison:
        result = BatchComparison()
        memo, earlier = self._memo, self._earlier
        for record in records:
            pairs: list[CandidatePair] = []
            if record.matchable:
                seen: set[tuple[str, PersonAttributes]] = set()
                candidates: list[tuple[str, PersonAttributes]] = list(record.stored)
                for key in record.keys:
                    block = earlier.get(key, ())
                    # As in the index: a key shared by more records than this says too little.
                    if len(block) <= self._max_block_size:
                        candidates.extend(block)
                for candidate in candidates:
                    if candidate[0] == record.customer_id or candidate in seen:
                        continue
                    seen.add(candidate)
                    pattern = memo.get((record.person, candidate[1]))
                    if pattern is None:
                        pattern = memo[(record.person, candidate[1])] = compare_people(record.person, candidate[1])
                        result.comparisons += 1
                    pairs.append(CandidatePair(candidate[0], pattern))
            result.pairs.append(pairs)
            for key in record.keys:
                earlier.setdefault(key, []).append((record.customer_id, record.person))
        return result


def compare_batch(records: Sequence[NewRecord]) -> BatchComparison:
    """Compare each matchable record with its stored candidates and the earlier records of the batch, in order.

    >>> from services.identity.matching import blocking_keys
    >>> ann = PersonAttributes("ann", "lee", "19900102", postcode="2600")
    >>> bob = PersonAttributes("bob", "ng", "19700305", postcode="2000")
    >>> batch = [NewRecord("c1", ann, tuple(blocking_keys(ann))), NewRecord("c2", bob, tuple(blocking_keys(bob))),
    ...          NewRecord("c3", ann, tuple(blocking_keys(ann)), stored=(("c0", ann),))]
    >>> [[p.customer_id for p in pairs] for pairs in compare_batch(batch).pairs]
    [[], [], ['c0', 'c1']]
    """
    return BatchComparer().compare(records)


def decide_record(pairs: Iterable[CandidatePair], scorer: PatternScorer, match_probability: float,
                  review_probability: float, household_guard: bool) -> RecordDecision:
    """Decide one record's pairs: link every customer whose best pair is a likely match, list the plausible ones.

    >>> from services.identity.match_model import MatchModel
    >>> model = MatchModel(0.5, ((0.1, 0.9), (0.1, 0.9)), ((0.9, 0.1), (0.9, 0.1)))
    >>> decision = decide_record([CandidatePair("c1", (1, 1)), CandidatePair("c2", (1, 0)),
    ...                           CandidatePair("c3", (0, 0))], model.scorer(), 0.6, 0.05, False)
    >>> [d.customer_id for d in decision.links], [d.customer_id for d in decision.possible]
    (['c1'], ['c2'])
    """
    best: dict[str, PairDecision] = {}
    household = 0
    for pair in pairs:
        if household_guard and is_household_pattern(pair.pattern):
            household += 1
            continue
        weight, probability = scorer.score(pair.pattern)
        known = best.get(pair.customer_id)
        if known is None or probability > known.probability:
            best[pair.customer_id] = PairDecision(pair.customer_id, weight, probability)
    ordered = sorted(best.values(), key=lambda d: (-d.probability, d.customer_id))
    return RecordDecision(
        links=tuple(d for d in ordered if d.probability >= match_probability),
        possible=tuple(d for d in ordered if review_probability <= d.probability < match_probability),
        household_refused=household,
    )

