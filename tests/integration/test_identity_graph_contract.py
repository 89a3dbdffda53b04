"""The identity graph's contract, run against the Redis graph (its Lua scripts, on a real Valkey) and against
the in-memory fake the fast tests use (tests/unit/identity/fakes.py): the same answers, the same views.

Random operation sequences compare the two step by step (every answer and every customer's view after
each step), so the fake cannot drift from the Lua; the named cases say what the rules are.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.identity.domain import GraphLayout, GraphRefused, GraphRules, Resolution, new_customer_id
from services.identity.graph import GraphStore, IdentityGraph
from tests.identity_graphs import request
from tests.unit.identity.fakes import InMemoryIdentityGraph
from touchstream.identifiers import STRONG_TYPES, Identifier

pytestmark = pytest.mark.integration

LAYOUT = GraphLayout("test:contract:{graph}:")
# Small limits, so a short random run meets every rule (limits, shared identifiers) many times.
RULES = GraphRules(STRONG_TYPES, {"user_id": 1, "wechat_unionid": 1, "email": 2}, 3, 2)
EMAIL_A, EMAIL_B = Identifier("email", "aa11"), Identifier("email", "bb22")
PHONE, DEVICE = Identifier("phone", "cc33"), Identifier("device_id", "dd44")
USER_1, USER_2 = Identifier("user_id", "u1"), Identifier("user_id", "u2")


@pytest.fixture(params=["redis", "in-memory"])
def graph(request: pytest.FixtureRequest) -> GraphStore:
    if request.param == "in-memory":
        return InMemoryIdentityGraph(RULES)
    # The graph loads its scripts when Redis answers NOSCRIPT (the first call).
    return IdentityGraph(request.getfixturevalue("redis_client"), LAYOUT, RULES, event_ttl_s=3600)


async def test_unknown_identifiers_create_a_known_one_attaches_and_a_link_merges_into_the_oldest(
        graph: GraphStore) -> None:
    [younger] = await graph.resolve([request("m1", 5000, EMAIL_B)])
    [older] = await graph.resolve([request("m2", 1000, EMAIL_A, PHONE)])
    assert younger.created and younger.customer_id == new_customer_id([EMAIL_B])
    [linking] = await graph.resolve([request("m3", 6000, EMAIL_A, EMAIL_B, DEVICE)])
    assert linking.customer_id == older.customer_id and not linking.created
    [merge] = linking.merges
    assert (merge.survivor_id, merge.merged_id, merge.linking_identifiers) == (
        older.customer_id, younger.customer_id, (EMAIL_B,))
    view = await graph.customer(younger.customer_id)  # a merged-away id answers with where it lives
    assert view is not None and view.customer_id == older.customer_id and view.looked_up_id == younger.customer_id
    assert {(i.type, i.hash) for i in view.identities} == {(i.type, i.value) for i in (EMAIL_A, EMAIL_B, PHONE,
                                                                                       DEVICE)}
    assert (view.first_seen_ms, view.last_seen_ms) == (1000, 6000)
    # A redelivered event gets the very same answer, marked as a replay, and changes nothing.
    [again] = await graph.resolve([request("m3", 6000, EMAIL_A, EMAIL_B, DEVICE)])
    assert again.replayed and (again.customer_id, again.merges) == (linking.customer_id, linking.merges)


async def test_two_strong_ids_never_merge_and_a_limit_refuses_what_goes_beyond_it(graph: GraphStore) -> None:
    [first] = await graph.resolve([request("m1", 1000, USER_1, EMAIL_A)])
    [second] = await graph.resolve([request("m2", 2000, USER_2, EMAIL_B)])
    [linking] = await graph.resolve([request("m3", 3000, EMAIL_A, EMAIL_B)])
    assert linking.customer_id == first.customer_id and not linking.merges
    assert [(r.customer_id, r.reason) for r in linking.refused] == [(second.customer_id, "conflicting_strong_id")]
    # email's limit is 2: a second e-mail attaches, a third stays out of the graph.
    [attached] = await graph.resolve([request("m4", 4000, USER_1, Identifier("email", "ee55"))])
    assert attached.customer_id == first.customer_id and not attached.refused
    [beyond] = await graph.resolve([request("m5", 5000, USER_1, Identifier("email", "ff66"))])
    assert [(r.customer_id, r.reason) for r in beyond.refused] == [("", "type_limit")]
    view = await graph.find(Identifier("email", "ff66"))
    assert view is None


async def test_an_operator_split_is_never_merged_back(graph: GraphStore) -> None:
    [customer] = await graph.resolve([request("m1", 1000, EMAIL_A, PHONE, DEVICE)])
    split = await graph.unmerge("op-1", 2000, customer.customer_id, [PHONE], "operator")
    [made] = split.merges
    assert made.kind == "unmerge" and made.linking_identifiers == (PHONE,)
    [linking] = await graph.resolve([request("m2", 3000, EMAIL_A, PHONE)])
    assert [r.reason for r in linking.refused] == ["operator_split"]
    with pytest.raises(GraphRefused):
        await graph.unmerge("op-2", 4000, customer.customer_id, [PHONE], "operator")  # no longer its identifier


async def test_an_earlier_event_renames_the_customer_after_itself(graph: GraphStore) -> None:
    [late] = await graph.resolve([request("m1", 5000, EMAIL_A)])
    [early] = await graph.resolve([request("m2", 1000, USER_1, EMAIL_A)])
    assert early.customer_id == new_customer_id([USER_1, EMAIL_A]) != late.customer_id
    assert [(m.merged_id, m.reason) for m in early.merges] == [(late.customer_id, "earlier_event")]


def _answer(resolution: Resolution | str) -> Any:
    return resolution if isinstance(resolution, str) else (
        resolution.customer_id, resolution.created, resolution.replayed, resolution.suppressed,
        resolution.merges, resolution.refused)


@pytest.mark.parametrize("seed", range(4))
async def test_random_operations_get_the_same_answers_from_the_lua_and_the_fake(
        redis_client: aioredis.Redis, seed: int) -> None:
    real = IdentityGraph(redis_client, GraphLayout(f"test:contract{seed}:{{graph}}:"), RULES, event_ttl_s=3600)
    fake = InMemoryIdentityGraph(RULES)
    rng = random.Random(seed)
    pool = [Identifier("email", f"e{n}") for n in range(8)] + [Identifier("phone", f"p{n}") for n in range(6)] + [
        Identifier("device_id", f"d{n}") for n in range(4)] + [Identifier("user_id", f"u{n}") for n in range(4)]
    customers: list[str] = []
    for step in range(160):
        roll = rng.random()
        graphs: list[GraphStore] = [real, fake]
        if roll < 0.8 or not customers:
            carried = rng.sample(pool, rng.randint(1, 3))
            # Some redeliveries; event times out of order, with ties.
            message = f"m{rng.randrange(step + 1)}" if rng.random() < 0.1 else f"m{step}"
            event = request(message, rng.randrange(20) * 1000, *carried)
            answers = [_answer((await g.resolve([event]))[0]) for g in graphs]
        elif roll < 0.9:
            pair = (rng.choice(customers), rng.choice(customers))
            answers = [_answer(await g.merge_customers(f"g{step}", step * 1000, pair, "probabilistic", 7.5))
                       for g in graphs]
        else:
            split = rng.sample(pool, rng.randint(1, 2))
            answers = []
            for g in graphs:
                try:
                    answers.append(_answer(await g.unmerge(f"u{step}", step * 1000, customers[step % len(customers)],
                                                           split, "operator")))
                except GraphRefused as refused:
                    answers.append(str(refused))
        assert answers[0] == answers[1], f"seed {seed}, step {step}"
        if isinstance(answers[0], tuple) and answers[0][0]:
            if answers[0][0] not in customers:
                customers.append(answers[0][0])
            # The views the step touched now; every customer's at the end.
            touched = {answers[0][0], *(m.merged_id for m in answers[0][4]), *(r.customer_id for r in answers[0][5])}
            for customer_id in sorted(touched - {""}):
                assert await real.customer(customer_id) == await fake.customer(customer_id), f"seed {seed}, {step}"
    for customer_id in customers:
        assert await real.customer(customer_id) == await fake.customer(customer_id), f"seed {seed}, {customer_id}"
