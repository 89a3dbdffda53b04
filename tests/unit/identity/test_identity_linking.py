"""Deciding a batch without Redis: candidates in order, transitive links, the review band, the household guard."""

from __future__ import annotations

from services.identity.linking import BatchComparer, CandidatePair, NewRecord, compare_batch, decide_record
from services.identity.matching import LEVEL_COUNTS, PersonAttributes, blocking_keys, compare_people
from tests.identity_models import typical_model

ANN = PersonAttributes("ann", "lee", "19900102", "12", "main street", "", "canberra", "2600", "act")
ANN_TYPO = ANN._replace(surname="lea", postcode="2606")
SPOUSE = ANN._replace(given_name="bob", date_of_birth="19870530")
EXACT = tuple(n - 1 for n in LEVEL_COUNTS)


MODEL = typical_model(0.2)


def record(customer_id: str, person: PersonAttributes, *stored: tuple[str, PersonAttributes],
           matchable: bool = True) -> NewRecord:
    return NewRecord(customer_id, person, tuple(blocking_keys(person)), stored, matchable)


def test_a_record_is_compared_with_stored_candidates_and_earlier_records_of_its_batch() -> None:
    batch = [record("c1", ANN), record("c2", ANN_TYPO, ("c0", ANN)), record("c3", SPOUSE)]

    compared = compare_batch(batch)

    assert [[p.customer_id for p in pairs] for pairs in compared.pairs] == [[], ["c0", "c1"], ["c1", "c2"]]
    assert compared.pairs[1][0].pattern == compare_people(ANN_TYPO, ANN)
    # ANN_TYPO against ANN, then SPOUSE against ANN and ANN_TYPO; the second ANN pair is memoised.
    assert compared.comparisons == 3
    assert sum(compared.pattern_counts().values()) == 4


def test_a_key_shared_by_more_earlier_records_than_the_largest_block_brings_none_of_them() -> None:
    namesakes = [record(f"c{n}", ANN._replace(street_number=str(n), address_1="", suburb="", postcode=""))
                 for n in range(4)]

    capped = BatchComparer(max_block_size=2).compare(namesakes)

    assert [len(pairs) for pairs in capped.pairs] == [0, 1, 2, 0]


def test_an_anchored_record_is_only_a_candidate_for_later_ones() -> None:
    batch = [record("c1", ANN, ("c0", ANN), matchable=False), record("c2", ANN_TYPO)]

    compared = compare_batch(batch)

    assert compared.pairs[0] == [] and [p.customer_id for p in compared.pairs[1]] == ["c1"]


def test_a_record_matching_two_customers_links_both() -> None:
    pairs = [CandidatePair("c1", EXACT), CandidatePair("c2", compare_people(ANN_TYPO, ANN)),
             CandidatePair("c9", tuple(0 for _ in LEVEL_COUNTS))]

    decision = decide_record(pairs, MODEL.scorer(), 0.5, 0.05, household_guard=True)

    assert [d.customer_id for d in decision.links] == ["c1", "c2"] and not decision.possible
    assert all(d.probability >= 0.5 and d.weight > 0 for d in decision.links)


def test_a_customer_is_judged_by_its_best_record() -> None:
    pairs = [CandidatePair("c1", tuple(0 for _ in LEVEL_COUNTS)), CandidatePair("c1", EXACT)]

    [link] = decide_record(pairs, MODEL.scorer(), 0.5, 0.05, household_guard=False).links

    assert link.customer_id == "c1" and link.probability > 0.99


def test_plausible_pairs_below_the_match_probability_are_kept_for_review() -> None:
    scorer = MODEL.scorer()
    # Names, birth date and suburb agree, the street and postcode differ (moved): in between.
    moved = (3, 3, 2, 0, 0, -1, 3, 0, -1)
    _, probability = scorer.score(moved)
    assert 0.05 < probability < 0.99

    decision = decide_record([CandidatePair("c1", moved)], scorer, 0.99, 0.05, household_guard=True)

    assert not decision.links and [d.customer_id for d in decision.possible] == ["c1"]


def test_the_household_guard_keeps_a_spouse_apart_and_counts_it() -> None:
    pattern = compare_people(ANN, SPOUSE)
    assert MODEL.scorer().score(pattern)[1] >= 0.5  # the shared address outweighs both disagreements

    guarded = decide_record([CandidatePair("c1", pattern)], MODEL.scorer(), 0.5, 0.05, household_guard=True)
    unguarded = decide_record([CandidatePair("c1", pattern)], MODEL.scorer(), 0.5, 0.05, household_guard=False)

    assert not guarded.links and guarded.household_refused == 1
    assert [d.customer_id for d in unguarded.links] == ["c1"]
