"""Probabilistic matching through IdentityResolver (graph script + person index + EM) on a real Valkey."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.identity.customer360 import read_customer, read_review
from services.identity.domain import GraphLayout, Resolution, prepare_identifiers, resolution_request
from services.identity.graph import IdentityGraph, PersonIndex
from services.identity.match_model import MatchModel, ModelState
from services.identity.matching import MatchSettings
from services.identity.resolver import CHUNK_EVENTS, EventToResolve, IdentityResolver, RedisMatching
from services.identity.settings import IdentitySettings
from tests.identity_models import ANN, ANN_MOVED, ANN_TYPO, NEAR_CERTAINTY, store_fitted_model

pytestmark = pytest.mark.integration

KEY = b"matching-test-key"
LAYOUT = GraphLayout("test:match:{graph}:")


def item(message_id: str, time_ms: int, identifier: tuple[str, str], traits: dict[str, Any] | None) -> EventToResolve:
    event = {"message_id": message_id, "timestamp_ms": time_ms,
             "properties_json": json.dumps({"traits": traits}) if traits else None}
    hashed = prepare_identifiers([{"type": identifier[0], "value": identifier[1]}], KEY, "US", ()).hashed
    return EventToResolve.of(event, resolution_request(event, hashed), matching=True)


def resolver(client: aioredis.Redis, **match: Any) -> IdentityResolver:
    settings = MatchSettings(enabled=True, **match)
    graph = IdentityGraph(client, LAYOUT, IdentitySettings().graph_rules(), 3600)
    return IdentityResolver(graph, RedisMatching(graph, PersonIndex(client, LAYOUT, KEY, settings.max_block_size)),
                            settings)


def graph_of(identity: IdentityResolver) -> IdentityGraph:
    """The Redis graph under a resolver built here (erasure and the sweep are Redis-only)."""
    assert isinstance(identity.graph, IdentityGraph)
    return identity.graph


async def seed_model(client: aioredis.Redis) -> MatchModel:
    return await store_fitted_model(client, LAYOUT)


async def test_a_second_channel_record_of_the_same_person_merges_with_its_weight(redis_client: aioredis.Redis) -> None:
    await seed_model(redis_client)
    identity = resolver(redis_client)

    [crm] = await identity.resolve([item("crm-1", 1000, ("crm_id", "A1"), ANN)])
    [pos] = await identity.resolve([item("pos-1", 2000, ("pos_id", "B7"), ANN_TYPO)])

    assert pos.customer_id == crm.customer_id
    [merge] = pos.merges
    assert (merge.survivor_id, merge.reason) == (crm.customer_id, "probabilistic")
    assert merge.score is not None and merge.score > 0
    history = [json.loads(e) for e in await redis_client.lrange(LAYOUT.history_key(crm.customer_id), 0, -1)]
    assert [(h["reason"], h["score"]) for h in history] == [("probabilistic", merge.score)]
    # Nothing personal in the index's key names: blocking keys are digests.
    names = b" ".join(await redis_client.keys("*"))
    assert b"lee" not in names.lower() and b"2600" not in names


async def test_no_merge_is_made_before_a_model_was_fitted(redis_client: aioredis.Redis) -> None:
    identity = resolver(redis_client)

    answers = await identity.resolve([item("crm-1", 1000, ("crm_id", "A1"), ANN),
                                      item("pos-1", 2000, ("pos_id", "B7"), ANN)])

    assert answers[0].customer_id != answers[1].customer_id
    assert identity.model_state.model is None  # one pair, fewer than the model has parameters
    assert await redis_client.get(LAYOUT.match_key("pairs")) == b"1"
    assert await redis_client.llen(LAYOUT.match_key("pending")) == 1  # kept for the first plausible fit
    # Erasing either customer takes the pair out of what waits.
    erased = await graph_of(identity).erase("erase:1", 3000, answers[1].customer_id, "erase")
    await graph_of(identity).sweep(list(erased.customer_ids), list(erased.identifiers))
    assert await redis_client.llen(LAYOUT.match_key("pending")) == 0


async def test_pairs_left_pending_by_one_worker_are_decided_by_the_next_batch_with_a_model(
        redis_client: aioredis.Redis) -> None:
    first = await resolver(redis_client).resolve([item("crm-1", 1000, ("crm_id", "A1"), ANN),
                                                  item("pos-1", 2000, ("pos_id", "B7"), ANN_TYPO)])
    assert first[0].customer_id != first[1].customer_id  # no model yet: the pair waits
    await seed_model(redis_client)  # another worker fitted one

    [other] = await resolver(redis_client).resolve([item("crm-2", 3000, ("crm_id", "A2"), {**ANN_MOVED, **{
        "first_name": "Bob", "birthday": "1970-03-05"}})])

    assert [m.merged_id for m in other.merges] == [first[1].customer_id]  # announced with that batch
    assert other.customer_id != first[0].customer_id  # whose own customer it leaves alone
    assert await _live(redis_client, first[1].customer_id) == first[0].customer_id
    assert await redis_client.llen(LAYOUT.match_key("pending")) == 0


async def test_the_model_is_learned_from_the_stream_and_links_its_duplicates(redis_client: aioredis.Redis) -> None:
    rng = random.Random(7)

    def word() -> str:
        return "".join(rng.choice("bcdfghklmnprstvwz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))

    people = [{"first_name": word(), "last_name": word(), "birthday": f"19{rng.randint(30, 99)}-"
               f"{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}", "address": {
                   "street_number": str(rng.randint(1, 150)), "line1": f"{word()} road", "city": word(),
                   "postcode": str(rng.randint(2000, 7999))}}
              for _ in range(400)]

    def typo(text: str) -> str:
        at = rng.randrange(len(text))
        return text[:at] + rng.choice("aeiouxyz") + text[at + 1:]

    def duplicate(person: dict[str, Any]) -> dict[str, Any]:
        # One keying error in one field, as a second channel would make it.
        field = rng.choice(["first_name", "last_name", "line1", "city", "postcode"])
        if field in person:
            return {**person, field: typo(person[field])}
        return {**person, "address": {**person["address"], field: typo(person["address"][field])}}

    duplicates = [duplicate(p) for p in people[:150]]
    records = [(f"p{i}", p) for i, p in enumerate(people)] + [(f"p{i}", p) for i, p in enumerate(duplicates)]
    rng.shuffle(records)
    identity = resolver(redis_client)

    customer_of: dict[str, set[str]] = {}
    for start in range(0, len(records), 100):
        batch = records[start:start + 100]
        answers = await identity.resolve([item(f"m{start + n}", start + n, ("crm_record", f"r{start + n}"), traits)
                                          for n, (_, traits) in enumerate(batch)])
        for (person, _), answer in zip(batch, answers, strict=True):
            customer_of.setdefault(person, set()).add(answer.customer_id)

    state = ModelState.from_json(await redis_client.get(LAYOUT.match_key("model")))
    assert state.model is not None and state.model.converged and not state.rejected_fields
    final = {p: {await _live(redis_client, c) for c in ids} for p, ids in customer_of.items()}
    linked = sum(1 for p in (f"p{i}" for i in range(150)) if len(final[p]) == 1)
    assert linked >= 140  # a few may come in a batch before the first fit
    everyone = [c for ids in final.values() for c in ids]
    assert len(everyone) == len(set(everyone))  # no two people ever share a customer


async def _live(client: aioredis.Redis, customer_id: str) -> str:
    while (into := await client.hget(LAYOUT.customer_key(customer_id), "merged_into")) is not None:
        customer_id = into.decode()
    return customer_id


async def test_records_in_one_batch_match_each_other_and_replays_merge_once(redis_client: aioredis.Redis) -> None:
    await seed_model(redis_client)
    identity = resolver(redis_client)
    batch = [item("crm-1", 1000, ("crm_id", "A1"), ANN), item("pos-1", 2000, ("pos_id", "B7"), ANN)]

    first = await identity.resolve(batch)
    again = await identity.resolve(batch)

    assert first[0].customer_id == first[1].customer_id == again[1].customer_id
    assert [m.reason for m in first[1].merges] == ["probabilistic"]
    assert again[1].replayed and again[1].merges == first[1].merges
    assert await redis_client.get(LAYOUT.match_key("records")) == b"2"  # the replay is not counted again


async def test_a_record_matching_two_customers_joins_them(redis_client: aioredis.Redis) -> None:
    await seed_model(redis_client)
    identity = resolver(redis_client)
    moved = {**ANN, "address": {"street_number": "3", "line1": "high street", "city": "sydney", "postcode": "2000"}}
    both = {**ANN, "address": {**moved["address"], "line2": "main street"}}

    one, other = await identity.resolve([item("crm-1", 1000, ("crm_id", "A1"), ANN),
                                         item("crm-2", 1001, ("crm_id", "A2"), {**moved, "birthday": "1971-03-05"})])
    assert one.customer_id != other.customer_id
    [bridge] = await identity.resolve([item("pos-1", 2000, ("pos_id", "B1"), {**both, "birthday": "1990-01-02"}),
                                       ])

    assert {m.merged_id for m in bridge.merges} | {bridge.customer_id} >= {one.customer_id}
    assert await _live(redis_client, one.customer_id) == bridge.customer_id


async def test_people_who_differ_stay_apart_and_a_spouse_is_not_merged(redis_client: aioredis.Redis) -> None:
    await seed_model(redis_client)
    identity = resolver(redis_client)
    spouse = {**ANN, "first_name": "Bob", "birthday": "1987-05-30"}
    namesake = {**ANN, "birthday": "1975-09-11", "address": {"street_number": "3", "line1": "high street",
                                                               "city": "sydney", "postcode": "4870"}}

    answers = await identity.resolve([item("crm-1", 1000, ("crm_id", "A1"), ANN),
                                      item("pos-1", 2000, ("pos_id", "B1"), spouse),
                                      item("pos-2", 3000, ("pos_id", "B2"), namesake)])

    assert len({a.customer_id for a in answers}) == 3 and not any(a.merges for a in answers)


async def ann_and_a_possible_match(client: aioredis.Redis) -> tuple[IdentityResolver, Resolution, Resolution]:
    """Resolve Ann, then a record that is only possibly her; return the resolver and both answers."""
    await seed_model(client)
    identity = resolver(client, match_probability=NEAR_CERTAINTY)
    [ann] = await identity.resolve([item("crm-1", 1000, ("crm_id", "A1"), ANN)])
    [maybe] = await identity.resolve([item("pos-1", 2000, ("pos_id", "B1"), ANN_MOVED)])
    return identity, ann, maybe


async def test_possible_matches_are_kept_for_review_and_shown_not_merged(redis_client: aioredis.Redis) -> None:
    _, ann, maybe = await ann_and_a_possible_match(redis_client)

    assert maybe.customer_id != ann.customer_id and not maybe.merges
    [possible] = maybe.possible_matches
    assert possible.customer_id == ann.customer_id and 0.05 <= possible.probability < NEAR_CERTAINTY
    [entry] = await read_review(redis_client, LAYOUT, 10)
    assert entry["live_customer_ids"] == [maybe.customer_id, ann.customer_id]
    view = await read_customer(redis_client, LAYOUT, ann.customer_id)
    assert view is not None and [m["customer_id"] for m in view.possible_matches] == [maybe.customer_id]


async def test_matching_never_overrides_conflicting_strong_ids(redis_client: aioredis.Redis) -> None:
    await seed_model(redis_client)
    identity = resolver(redis_client)
    await identity.resolve([item("crm-1", 1000, ("user_id", "u1"), ANN)])

    [other] = await identity.resolve([item("pos-1", 2000, ("user_id", "u2"), ANN)])

    assert not other.merges and [r.reason for r in other.refused] == ["conflicting_strong_id"]


async def test_erasure_takes_the_customer_out_of_the_person_index(redis_client: aioredis.Redis) -> None:
    identity, ann, maybe = await ann_and_a_possible_match(redis_client)
    assert maybe.possible_matches

    erased = await graph_of(identity).erase("erase:1", 3000, ann.customer_id, "erase")
    await graph_of(identity).sweep(list(erased.customer_ids), list(erased.identifiers))

    assert await redis_client.get(LAYOUT.match_person_key(ann.customer_id)) is None
    for key in await redis_client.keys(f"{LAYOUT.prefix}match:blocks:*"):
        assert not any(ann.customer_id.encode() in v for v in (await redis_client.hgetall(key)).values())
    assert await redis_client.hgetall(LAYOUT.match_possible_key(maybe.customer_id)) == {}
    assert await read_review(redis_client, LAYOUT, 10) == []
    assert await redis_client.get(LAYOUT.match_person_key(maybe.customer_id)) is not None  # the other stays


async def test_with_matching_off_attributes_are_ignored(redis_client: aioredis.Redis) -> None:
    graph = IdentityGraph(redis_client, LAYOUT, IdentitySettings().graph_rules(), 3600)
    identity = IdentityResolver(graph, RedisMatching(graph, PersonIndex(redis_client, LAYOUT, KEY, 200)),
                                MatchSettings(enabled=False))
    await graph.load_script()

    answers = await identity.resolve([item("crm-1", 1000, ("crm_id", "A1"), ANN),
                                      item("pos-1", 2000, ("pos_id", "B1"), ANN)])

    assert answers[0].customer_id != answers[1].customer_id
    assert not await redis_client.keys(f"{LAYOUT.prefix}match:*")


async def test_a_batch_larger_than_a_chunk_matches_across_its_chunks(redis_client: aioredis.Redis) -> None:
    await seed_model(redis_client)
    identity = resolver(redis_client)
    filler = [item(f"f{i}", 1000 + i, ("crm_id", f"F{i}"), None) for i in range(CHUNK_EVENTS + 20)]
    batch = [item("crm-1", 999, ("crm_id", "A1"), ANN), *filler, item("pos-1", 5000, ("pos_id", "B7"), ANN_TYPO),
             *filler[:CHUNK_EVENTS], item("pos-2", 6000, ("pos_id", "B8"), ANN)]

    answers = await identity.resolve(batch)

    ann, typo, again = answers[0], answers[CHUNK_EVENTS + 21], answers[-1]
    assert ann.created and typo.merges and again.merges
    assert await _live(redis_client, ann.customer_id) == await _live(redis_client, typo.customer_id) == \
        await _live(redis_client, again.customer_id)
    assert not any(a.merges for a in answers[1:CHUNK_EVENTS + 21])


async def test_lost_scripts_are_loaded_again_and_the_batch_still_matches(redis_client: aioredis.Redis) -> None:
    await seed_model(redis_client)
    identity = resolver(redis_client)
    [ann] = await identity.resolve([item("crm-1", 1000, ("crm_id", "A1"), ANN)])
    await redis_client.script_flush()  # as after a Redis restart

    [typo] = await identity.resolve([item("pos-1", 2000, ("pos_id", "B7"), ANN_TYPO)])

    assert [m.survivor_id for m in typo.merges] == [ann.customer_id] and typo.customer_id == ann.customer_id


async def test_a_block_shared_by_more_than_the_largest_compared_is_no_longer_used(
        redis_client: aioredis.Redis) -> None:
    await seed_model(redis_client)
    identity = resolver(redis_client, max_block_size=2)
    # Three people born the same day in one postcode: only their birth date + postcode block is shared.
    people = [{"first_name": given, "last_name": family, "birthday": "1990-01-02", "address": {"postcode": "2600"}}
              for given, family in (("ann", "lee"), ("bob", "ng"), ("cat", "okafor"))]
    await identity.resolve([item(f"m{n}", 1000 + n, ("crm_id", f"A{n}"), p) for n, p in enumerate(people)])
    blocks = {v for key in await redis_client.keys(f"{LAYOUT.prefix}match:blocks:*")
              for v in (await redis_client.hgetall(key)).values()}
    assert b"*" in blocks

    [late] = await identity.resolve([item("m9", 2000, ("crm_id", "A9"), {**people[0], "first_name": "dan",
                                                                           "last_name": "smith"})])

    assert late.created and not late.merges and not late.possible_matches
    assert await redis_client.get(LAYOUT.match_key("pairs")) == b"3"  # the full block brought no pair
