"""The identity worker's batch logic on the in-memory graph (held to the Lua's contract by
tests/integration/test_identity_graph_contract.py): raw touchpoints in, resolved records, merges and dead
letters out, with neither broker nor Redis."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from services.identity.domain import GraphRules
from services.identity.matching import MatchSettings
from services.identity.metrics import IdentityMetrics
from services.identity.resolver import IdentityResolver
from services.identity.service import TouchpointResolver
from services.identity.settings import IdentitySettings
from tests.unit.identity.fakes import InMemoryIdentityGraph
from tests.unit.triggers.fakes import SentRecords
from touchstream import avro
from touchstream.identifiers import STRONG_TYPES
from touchstream.streams import Record
from touchstream.topics import IDENTITY_MERGES, TOUCHPOINTS_RAW, TOUCHPOINTS_RESOLVED

RULES = GraphRules(STRONG_TYPES, {"user_id": 1, "wechat_unionid": 1}, 5, 3)


def raw(message_id: str, timestamp_ms: int, *identifiers: tuple[str, str]) -> Record:
    value = {"message_id": message_id, "type": "track", "event": "Order Completed", "timestamp_ms": timestamp_ms,
             "received_at_ms": timestamp_ms + 5, "identifiers": [{"type": k, "value": v} for k, v in identifiers]}
    encoded = avro.encode(TOUCHPOINTS_RAW.schema, value)
    decoded = avro.decode(TOUCHPOINTS_RAW.schema, encoded)
    return Record(TOUCHPOINTS_RAW.name, 0, 0, message_id.encode(), encoded, decoded)


def worker(graph: InMemoryIdentityGraph) -> tuple[TouchpointResolver, SentRecords]:
    api_outbox = SentRecords()
    metrics = IdentityMetrics(CollectorRegistry())
    resolver = TouchpointResolver(IdentityResolver(graph, None, MatchSettings()), metrics,
                                  IdentitySettings(), b"k" * 32, lambda: api_outbox, event_time_tolerance_s=300)
    return resolver, api_outbox


def sent(outbox: SentRecords, topic: str) -> list[dict[str, object]]:
    spec = {TOUCHPOINTS_RESOLVED.name: TOUCHPOINTS_RESOLVED, IDENTITY_MERGES.name: IDENTITY_MERGES}[topic]
    return [avro.decode(spec.schema, value) for name, _, value in outbox.sent if name == topic]


async def test_a_batch_resolves_links_and_announces_the_merge_and_dead_letters_what_it_cannot_use() -> None:
    resolver, _ = worker(InMemoryIdentityGraph(RULES))
    now_ms = int(time.time() * 1000)
    outbox = SentRecords()
    await resolver.resolve_batch([
        raw("m1", now_ms - 3000, ("email", "ann@example.com")),
        raw("m2", now_ms - 2000, ("phone", "+14155550100")),
        raw("m3", now_ms - 1000, ("email", "Ann@Example.com"), ("phone", "+1 415 555 0100")),  # links the two
        raw("m4", now_ms, ("email", "not an e-mail")),
        raw("m5", now_ms + 3_600_000, ("email", "ann@example.com")),  # an hour ahead of the clock
    ], outbox)
    resolved = sent(outbox, TOUCHPOINTS_RESOLVED.name)
    assert [r["event"]["message_id"] for r in resolved] == ["m1", "m2", "m3"]  # type: ignore[index]
    ann = resolved[0]["customer_id"]
    assert resolved[2]["customer_id"] == ann != resolved[1]["customer_id"]
    [merge] = sent(outbox, IDENTITY_MERGES.name)
    assert (merge["survivor_id"], merge["merged_id"]) == (ann, resolved[1]["customer_id"])
    reasons = [reason.decode() for name, _, reason in outbox.sent if name == "deadletter"]
    assert reasons[0].startswith("no usable identifier") and reasons[1].startswith("timestamp_ms")


async def test_a_redelivered_batch_gets_the_same_customers_and_announces_no_second_customer() -> None:
    graph = InMemoryIdentityGraph(RULES)
    resolver, _ = worker(graph)
    now_ms = int(time.time() * 1000)
    batch = [raw("m1", now_ms - 2000, ("user_id", "u-1")), raw("m2", now_ms - 1000, ("user_id", "u-1"),
                                                                ("email", "bob@example.com"))]
    first, again = SentRecords(), SentRecords()
    await resolver.resolve_batch(batch, first)
    await resolver.resolve_batch(batch, again)
    def customers(outbox: SentRecords) -> list[object]:
        return [r["customer_id"] for r in sent(outbox, TOUCHPOINTS_RESOLVED.name)]

    assert customers(again) == customers(first) and len(set(customers(first))) == 1
    assert sent(again, IDENTITY_MERGES.name) == sent(first, IDENTITY_MERGES.name) == []
    assert len({c for c, row in graph.customers.items() if row.get("status") == "active"}) == 1


async def test_an_operator_split_is_announced_on_identity_merges() -> None:
    graph = InMemoryIdentityGraph(RULES)
    resolver, api_outbox = worker(graph)
    now_ms = int(time.time() * 1000)
    outbox = SentRecords()
    await resolver.resolve_batch([raw("m1", now_ms, ("email", "cy@example.com"), ("phone", "+14155550111"))],
                                 outbox)
    customer = sent(outbox, TOUCHPOINTS_RESOLVED.name)[0]["customer_id"]
    phone = resolver.hashed_lookup("phone", "+14155550111")
    result = await resolver.unmerge("split-1", str(customer), [phone])
    [split] = sent(api_outbox, IDENTITY_MERGES.name)
    assert split["kind"] == "unmerge" and split["survivor_id"] == customer == result.customer_id
    assert api_outbox.flushed == 1
