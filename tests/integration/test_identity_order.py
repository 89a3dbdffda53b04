"""Order independence of the graph's resolve script, property-tested against a real Valkey.

What is order-independent (tested exactly): when no protection rule fires, the final graph is
the same whatever order or interleaving the events arrive in: the identifiers are partitioned
into the connected components of the events, and each customer is named after the earliest
event of its component (by event time, ties by candidate id), which is what processing the
events one by one in event-time order gives.

What is order-dependent by nature (tested as invariants only): the protection rules decide
between claims in arrival order. A non-strong identifier carried with two different strong ids
stays with whichever customer claimed it first; which values of a type fill a customer's limit
depends on which came first; an identifier only stops matching once it has been seen with more
than N customers, and merges it made before that stay (an operator can split them). In every
order, though: no customer holds two values of a strong type or more values of a type than its
limit, every identifier has one owner that lists it, and every merged customer leads to a live one.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.identity.domain import (
    GraphLayout,
    GraphRules,
    ResolutionRequest,
    identifier_ref,
    new_customer_id,
    parse_identifier_ref,
)
from services.identity.graph import IdentityGraph
from touchstream.identifiers import STRONG_TYPES, Identifier

pytestmark = pytest.mark.integration

RULES = GraphRules(STRONG_TYPES, {"user_id": 1, "wechat_unionid": 1}, 5, 3)
TIGHT_RULES = GraphRules(STRONG_TYPES, {"user_id": 1, "wechat_unionid": 1, "email": 2}, 5, 2)


@dataclass(frozen=True)
class Scenario:
    events: tuple[ResolutionRequest, ...]
    order: tuple[int, ...]
    worker_of: tuple[int, ...]
    batch_size: int


def _person_identifiers(person: int, has_user: bool, emails: int, devices: int) -> list[Identifier]:
    found = [Identifier("email", f"p{person}e{i}") for i in range(emails)]
    found += [Identifier("device_id", f"p{person}d{i}") for i in range(devices)]
    if has_user:
        found.append(Identifier("user_id", f"p{person}u"))
    return found


@st.composite
def scenarios(draw: st.DrawFn, shared_devices: bool) -> Scenario:
    people = []
    for person in range(draw(st.integers(1, 4))):
        people.append(_person_identifiers(person, draw(st.booleans()), draw(st.integers(1, 3)),
                                          draw(st.integers(0, 2))))
    if shared_devices:
        tablets = [Identifier("device_id", f"tablet{t}") for t in range(2)]
        people = [ids + tablets for ids in people]
    events = []
    for n in range(draw(st.integers(1, 12))):
        ids = people[draw(st.integers(0, len(people) - 1))]
        chosen = draw(st.lists(st.sampled_from(ids), min_size=1, max_size=4, unique=True))
        # Few distinct times, so ties in event time are common.
        time_ms = 1000 * draw(st.integers(1, 5))
        events.append(ResolutionRequest(f"ev{n}", time_ms, tuple(chosen), new_customer_id(chosen)))
    order = draw(st.permutations(range(len(events))))
    worker_of = tuple(draw(st.lists(st.integers(0, 1), min_size=len(events), max_size=len(events))))
    return Scenario(tuple(events), tuple(order), worker_of, draw(st.integers(1, 4)))


def expected_graph(events: tuple[ResolutionRequest, ...]) -> dict[str, str]:
    """Return identifier ref -> customer id: components of the events, named after their earliest event."""
    parent: dict[str, str] = {}

    def find(ref: str) -> str:
        while parent.setdefault(ref, ref) != ref:
            ref = parent[ref]
        return ref

    for event in events:
        refs = [identifier_ref(i) for i in event.identifiers]
        for ref in refs[1:]:
            parent[find(ref)] = find(refs[0])
    earliest: dict[str, tuple[int, str]] = {}
    for event in events:
        root = find(identifier_ref(event.identifiers[0]))
        key = (event.event_time_ms, event.new_customer_id)
        earliest[root] = min(earliest.get(root, key), key)
    return {ref: earliest[find(ref)][1] for ref in parent}


async def run_scenario(redis_url: str, scenario: Scenario, rules: GraphRules) -> tuple[dict[str, str], GraphLayout]:
    """Resolve the events in the scenario's order, split over two concurrent workers; return the owners."""
    layout = GraphLayout(f"prop:{uuid.uuid4().hex[:12]}:{{graph}}:")
    clients = [aioredis.from_url(redis_url), aioredis.from_url(redis_url)]
    try:
        graphs = [IdentityGraph(c, layout, rules, event_ttl_s=600) for c in clients]
        await graphs[0].load_script()
        queues: list[list[ResolutionRequest]] = [[], []]
        for index in scenario.order:
            queues[scenario.worker_of[index]].append(scenario.events[index])

        async def work(graph: IdentityGraph, queue: list[ResolutionRequest]) -> None:
            for start in range(0, len(queue), scenario.batch_size):
                await graph.resolve(queue[start:start + scenario.batch_size])
                await asyncio.sleep(0)

        await asyncio.gather(*(work(g, q) for g, q in zip(graphs, queues, strict=True)))
        await check_invariants(clients[0], layout, rules)
        owners = {}
        for ref in {identifier_ref(i) for e in scenario.events for i in e.identifiers}:
            owner = await clients[0].hget(layout.identifier_key(ref), "owner")
            if owner is not None:
                owners[ref] = owner.decode()
        await clients[0].delete(*[k async for k in clients[0].scan_iter(f"{layout.prefix}*")] or ["-"])
        return owners, layout
    finally:
        for client in clients:
            await client.aclose()


async def check_invariants(client: aioredis.Redis, layout: GraphLayout, rules: GraphRules) -> None:
    customers = defaultdict(set)
    for key in [k.decode() async for k in client.scan_iter(f"{layout.prefix}ident:*")]:
        if key.endswith(":customers"):
            continue
        ref = key.removeprefix(layout.prefix + "ident:")
        owner = await client.hget(key, "owner")
        assert owner is not None
        customers[owner.decode()].add(ref)
    for customer_id, refs in customers.items():
        assert await client.hget(layout.customer_key(customer_id), "status") == b"active"
        members = {m.decode() for m in await client.smembers(layout.members_key(customer_id))}
        assert members == refs, f"{customer_id} lists {members}, owns {refs}"
        by_type = defaultdict(set)
        for ref in refs:
            by_type[parse_identifier_ref(ref).type].add(ref)
        for kind, values in by_type.items():
            assert len(values) <= rules.limit_of(kind), f"{customer_id} holds {values}"
    for key in [k.decode() async for k in client.scan_iter(f"{layout.prefix}customer:*")]:
        if key.count(":") != layout.prefix.count(":") + 1:
            continue
        live = key.removeprefix(layout.prefix + "customer:")
        for _ in range(64):
            into = await client.hget(layout.customer_key(live), "merged_into")
            if into is None:
                break
            live = into.decode()
        assert await client.hget(layout.customer_key(live), "status") == b"active"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios(shared_devices=False))
def test_any_order_and_interleaving_ends_in_the_event_time_order_graph(redis_url: str, scenario: Scenario) -> None:
    owners, _ = asyncio.run(run_scenario(redis_url, scenario, RULES))

    assert owners == expected_graph(scenario.events)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios(shared_devices=True))
def test_protection_rules_hold_in_any_order(redis_url: str, scenario: Scenario) -> None:
    owners, _ = asyncio.run(run_scenario(redis_url, scenario, TIGHT_RULES))

    # Persons never share an e-mail or a user id, so two user ids in one customer would be a wrong merge.
    users_of: dict[str, set[str]] = defaultdict(set)
    for ref, owner in owners.items():
        if ref.startswith("user_id:"):
            users_of[owner].add(ref)
    assert all(len(users) == 1 for users in users_of.values())


def test_the_expected_graph_is_what_event_time_order_gives() -> None:
    a, b, c = (Identifier("email", x) for x in "abc")
    events = (ResolutionRequest("1", 2000, (b,), new_customer_id([b])),
              ResolutionRequest("2", 1000, (a,), new_customer_id([a])),
              ResolutionRequest("3", 3000, (a, b), new_customer_id([a, b])),
              ResolutionRequest("4", 1000, (c,), new_customer_id([c])))

    graph = expected_graph(events)

    assert graph == {"email:a": new_customer_id([a]), "email:b": new_customer_id([a]), "email:c": new_customer_id([c])}
