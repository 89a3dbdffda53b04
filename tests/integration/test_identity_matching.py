"""Probabilistic matching through IdentityResolver (graph script + person index) on a real Valkey."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.identity.domain import GraphLayout, prepare_identifiers, resolution_request
from services.identity.graph import IdentityGraph, PersonIndex
from services.identity.matching import MatchSettings
from services.identity.resolver import EventToResolve, IdentityResolver
from services.identity.settings import IdentitySettings

pytestmark = pytest.mark.integration

KEY = b"matching-test-key"
LAYOUT = GraphLayout("test:match:{graph}:")
ANN = {"first_name": "Ann", "last_name": "Lee", "birthday": "1990-01-02",
       "address": {"street_number": "12", "line1": "main street", "city": "canberra", "postcode": "2600"}}


def item(message_id: str, time_ms: int, identifier: tuple[str, str], traits: dict[str, Any] | None) -> EventToResolve:
    event = {"message_id": message_id, "timestamp_ms": time_ms,
             "properties_json": json.dumps({"traits": traits}) if traits else None}
    hashed = prepare_identifiers([{"type": identifier[0], "value": identifier[1]}], KEY, "US", ()).hashed
    return EventToResolve.of(event, resolution_request(event, hashed), matching=True)


def resolver(client: aioredis.Redis, **match: Any) -> IdentityResolver:
    settings = MatchSettings(enabled=True, **match)
    graph = IdentityGraph(client, LAYOUT, IdentitySettings().graph_rules(), 3600)
    return IdentityResolver(graph, PersonIndex(client, LAYOUT, KEY, settings.max_block_size), settings)


async def test_a_second_channel_record_of_the_same_person_merges_with_a_score(redis_client: aioredis.Redis) -> None:
    identity = resolver(redis_client)
    await identity.graph.load_script()
    typo = {**ANN, "last_name": "Lea", "address": {**ANN["address"], "postcode": "2606"}}

    [crm] = await identity.resolve([item("crm-1", 1000, ("crm_id", "A1"), ANN)])
    [pos] = await identity.resolve([item("pos-1", 2000, ("pos_id", "B7"), typo)])

    assert pos.customer_id == crm.customer_id
    [merge] = pos.merges
    assert (merge.survivor_id, merge.reason) == (crm.customer_id, "probabilistic")
    assert merge.score is not None and merge.score >= MatchSettings().threshold
    history = [json.loads(e) for e in await redis_client.lrange(LAYOUT.history_key(crm.customer_id), 0, -1)]
    assert [(h["reason"], h["score"]) for h in history] == [("probabilistic", merge.score)]
    # Nothing personal in the index's key names: blocking keys are hashed.
    names = b" ".join(await redis_client.keys("*"))
    assert b"lee" not in names.lower() and b"2600" not in names


async def test_records_in_one_batch_match_each_other_and_replays_merge_once(redis_client: aioredis.Redis) -> None:
    identity = resolver(redis_client)
    await identity.graph.load_script()
    batch = [item("crm-1", 1000, ("crm_id", "A1"), ANN), item("pos-1", 2000, ("pos_id", "B7"), ANN)]

    first = await identity.resolve(batch)
    again = await identity.resolve(batch)

    assert first[0].customer_id == first[1].customer_id == again[1].customer_id
    assert [m.reason for m in first[1].merges] == ["probabilistic"]
    assert again[1].replayed and again[1].merges == first[1].merges


async def test_people_who_differ_stay_apart(redis_client: aioredis.Redis) -> None:
    identity = resolver(redis_client)
    await identity.graph.load_script()
    spouse = {**ANN, "first_name": "Bob", "birthday": "1987-05-30"}
    namesake = {**ANN, "birthday": "1975-09-11", "address": {"street_number": "3", "line1": "high street",
                                                               "city": "sydney", "postcode": "2000"}}

    answers = await identity.resolve([item("crm-1", 1000, ("crm_id", "A1"), ANN),
                                      item("pos-1", 2000, ("pos_id", "B1"), spouse),
                                      item("pos-2", 3000, ("pos_id", "B2"), namesake)])

    assert len({a.customer_id for a in answers}) == 3 and not any(a.merges for a in answers)


async def test_matching_never_overrides_conflicting_strong_ids(redis_client: aioredis.Redis) -> None:
    identity = resolver(redis_client)
    await identity.graph.load_script()
    await identity.resolve([item("crm-1", 1000, ("user_id", "u1"), ANN)])

    [other] = await identity.resolve([item("pos-1", 2000, ("user_id", "u2"), ANN)])

    assert not other.merges and [r.reason for r in other.refused] == ["conflicting_strong_id"]


async def test_with_matching_off_attributes_are_ignored(redis_client: aioredis.Redis) -> None:
    graph = IdentityGraph(redis_client, LAYOUT, IdentitySettings().graph_rules(), 3600)
    identity = IdentityResolver(graph, PersonIndex(redis_client, LAYOUT, KEY, 200), MatchSettings(enabled=False))
    await graph.load_script()

    answers = await identity.resolve([item("crm-1", 1000, ("crm_id", "A1"), ANN),
                                      item("pos-1", 2000, ("pos_id", "B1"), ANN)])

    assert answers[0].customer_id != answers[1].customer_id
    assert not await redis_client.keys(f"{LAYOUT.prefix}person:*")
