"""The console read model's contract: batches, caps, idempotency, merges, rule outcomes, erasure.

Each test runs against the Redis store on a real Valkey and against the in-memory fake the console's
fast tests use (tests/unit/console/fakes.py), so the fake cannot drift from the Lua scripts; the
few that check how Redis keeps things (listpacks, TTLs, lost scripts) run on Redis only.
"""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis

from services.console.entries import ACTIONS_CAP, PURCHASES_CAP, SCORE_HISTORY_CAP, TIMELINE_CAP, DeliveryStatus
from services.console.readmodel import (
    ActionTaken,
    CustomersMerged,
    DeadLettered,
    DeliveryEnded,
    ScoreUpdated,
    TouchpointSeen,
)
from services.console.store import TRIM_SLACK, ReadModel, ReadModelStore
from tests.unit.console.fakes import InMemoryReadModel

pytestmark = pytest.mark.integration


def touch(cid: str, n: int, t: int | None = None, channel: str = "web", amount: float | None = None
          ) -> TouchpointSeen:
    return TouchpointSeen(cid, f"m-{cid}-{n}", n * 1000 if t is None else t, "track",
                          "Order Completed" if amount else "Page Viewed", channel, "test", amount,
                          "EUR" if amount else None, None, None, {"n": str(n)}, ("email",))


def score(cid: str, n: int, risk: float, segment: str = "loyal", stage: str = "active") -> ScoreUpdated:
    return ScoreUpdated(cid, f"m-{cid}-{n}", n * 1000, risk, 1 - risk, segment, stage, "v1",
                        (("recency_days", 0.4),), {"recency_days": float(n)})


def action(cid: str, rule: str, outcome: str, n: int, reason: str | None = None) -> ActionTaken:
    return ActionTaken(f"a-{rule}-{cid}-{n}", rule, cid, outcome, reason, "marketing", n * 1000, n * 1000 + 5)


@pytest.fixture(params=["redis", "in-memory"])
def store(request: pytest.FixtureRequest) -> ReadModel:
    if request.param == "in-memory":
        return InMemoryReadModel()
    return ReadModelStore(request.getfixturevalue("redis_client"))


@pytest.fixture
def redis_store(redis_client: aioredis.Redis) -> ReadModelStore:
    return ReadModelStore(redis_client)


async def stored_fields(store: ReadModel, customer_id: str) -> dict[str, str]:
    """The fields a customer's hash holds as stored (the fake keeps the same fields and values)."""
    if isinstance(store, InMemoryReadModel):
        return dict(store.hashes.get(customer_id, {}))
    assert isinstance(store, ReadModelStore)
    return {k.decode(): v.decode() for k, v in (await store.client.hgetall(store.ckey(customer_id))).items()}


async def everything_stored(store: ReadModel) -> list[tuple[str, bytes]]:
    """Every key and value the store holds, as (where, text): what an erasure must leave no trace in."""
    if isinstance(store, InMemoryReadModel):
        return [(name, repr(value).encode()) for name, value in vars(store).items()]
    assert isinstance(store, ReadModelStore)
    found = []
    async for key in store.client.scan_iter(match="*"):
        name = key.decode()
        kind = (await store.client.type(key)).decode()
        values: list[bytes] = [key]
        if kind == "hash":
            for k, v in (await store.client.hgetall(key)).items():
                values += [k, v]
        elif kind == "set":
            values += list(await store.client.smembers(key))
        elif kind == "zset":
            values += list(await store.client.zrange(key, 0, -1))
        elif kind == "string":
            values.append(await store.client.get(key))
        found += [(name, v) for v in values]
    return found


async def test_timeline_is_newest_first_capped_at_200_and_idempotent(store: ReadModel) -> None:
    events = [touch("c_1", n) for n in range(250)]
    await store.apply(events[:130])
    await store.apply(events[100:])  # an overlapping redelivery
    record = await store.customer("c_1")
    assert [e.message_id for e in record.timeline] == [f"m-c_1-{n}" for n in range(249, 49, -1)]
    # Stored: trimmed back to the cap once past it by the slack, oldest first (never more than cap + slack).
    kept = sorted(int(name.split("-")[-1]) for name in await stored_fields(store, "c_1") if name.startswith("t:"))
    assert kept == list(range(250 - len(kept), 250)) and TIMELINE_CAP <= len(kept) <= TIMELINE_CAP + TRIM_SLACK


async def test_scores_keep_history_and_the_latest_by_event_time_sets_the_segment(store: ReadModel) -> None:
    await store.apply([score("c_1", 2, 0.8, "at_risk", "lapsing"), score("c_1", 1, 0.3, "loyal", "active")])
    record = await store.customer("c_1")
    assert [s.event_time_ms for s in record.scores] == [1000, 2000]
    assert record.latest_score is not None and record.latest_score.churn_risk == 0.8
    # The older score arrived last but must not win the segment count.
    assert await store.segments() == {("at_risk", "lapsing"): 1}
    await store.apply([score("c_1", 3, 0.1, "champion", "active"), score("c_2", 1, 0.1, "champion", "active")])
    await store.apply([score("c_1", 3, 0.1, "champion", "active")])  # replayed: counted once
    assert await store.segments() == {("champion", "active"): 2}
    assert await store.segment_flow() == [("", "at_risk|lapsing", 1), ("", "champion|active", 1),
                                          ("at_risk|lapsing", "champion|active", 1)]
    # Only the last 30 days (of event time) count: a change 40 days later leaves the old ones out.
    await store.apply([score("c_2", 40 * 86_400, 0.9, "at_risk", "lapsing")])
    assert await store.segment_flow() == [("champion|active", "at_risk|lapsing", 1)]


async def test_channels_keep_their_last_event_time(store: ReadModel) -> None:
    await store.apply([touch("c_1", 5, channel="wechat"), touch("c_1", 2, channel="wechat"),
                       touch("c_1", 3, channel="store_pos")])
    assert (await store.customer("c_1")).channels == [("wechat", 5000), ("store_pos", 3000)]


async def test_a_merge_moves_timeline_scores_actions_and_rule_groups_to_the_survivor(store: ReadModel) -> None:
    await store.apply([touch("c_a", 1), touch("c_b", 2, amount=10.0), score("c_b", 2, 0.9),
                       action("c_b", "r1", "held_out", 2)])
    merge = CustomersMerged("g-1", "c_a", "c_b", "merge", "shared_identifier", 3000)
    await store.apply([merge, touch("c_b", 4)])  # a late event for the merged id lands on the survivor
    await store.apply([merge])  # replayed: changes nothing
    survivor = await store.customer("c_a")
    assert [e.message_id for e in survivor.timeline] == ["m-c_b-4", "m-c_b-2", "m-c_a-1"]
    assert [(s.event_time_ms, s.churn_risk) for s in survivor.scores] == [(2000, 0.9)]
    assert [a.action_id for a in survivor.actions] == ["a-r1-c_b-2"]
    assert survivor.merges[0]["merged_id"] == "c_b"
    merged = await store.customer("c_b")
    assert merged.customer_id == "c_a" and merged.looked_up_id == "c_b"
    counts = await store.rule_counts("r1")
    assert counts.holdout_at == {"c_a": 2000}
    assert await store.converted(counts.holdout_at, 10_000) == 0  # the purchase at 2000 was not after the action
    assert await store.customer_count() == 1
    assert await store.segments() == {("loyal", "active"): 1}  # c_b's latest score now counts for c_a
    # What stays of c_b is a redirect to its survivor.
    assert await stored_fields(store, "c_b") == {"into": "c_a"}


async def test_a_merge_into_a_customer_merged_on_since_lands_where_it_lives_now(store: ReadModel) -> None:
    await store.apply([touch("c_a", 1), touch("c_b", 2), touch("c_c", 3),
                       CustomersMerged("g-1", "c_a", "c_b", "merge", "shared_identifier", 4),
                       CustomersMerged("g-2", "c_c", "c_a", "merge", "shared_identifier", 5)])
    # A merge older than g-2, seen late: it names c_a, which already lives on c_c.
    await store.apply([touch("c_d", 6), CustomersMerged("g-0", "c_a", "c_d", "merge", "shared_identifier", 3)])
    record = await store.customer("c_d")
    assert record.customer_id == "c_c"
    assert sorted(e.message_id for e in record.timeline) == ["m-c_a-1", "m-c_b-2", "m-c_c-3", "m-c_d-6"]
    assert await store.customer_count() == 1


async def test_an_unmerge_stops_redirecting_the_split_customer(store: ReadModel) -> None:
    await store.apply([touch("c_a", 1), CustomersMerged("g-1", "c_a", "c_b", "merge", "shared_identifier", 2)])
    await store.apply([CustomersMerged("u-1", "c_a", "c_b", "unmerge", "operator", 3), touch("c_b", 4)])
    assert [e.message_id for e in (await store.customer("c_b")).timeline] == ["m-c_b-4"]
    assert [e.message_id for e in (await store.customer("c_a")).timeline] == ["m-c_a-1"]


async def test_rule_counts_are_idempotent_and_conversions_respect_the_window(store: ReadModel) -> None:
    batch = [action("c_1", "r", "fired", 1), action("c_2", "r", "fired", 1), action("c_3", "r", "held_out", 1),
             action("c_4", "r", "suppressed", 1, "cooldown"), action("c_4", "r", "suppressed", 2, "quiet_hours"),
             touch("c_1", 5, amount=20.0),   # 4 s after its action: inside a 10 s window
             touch("c_2", 30, amount=20.0),  # 29 s after: outside
             touch("c_3", 2, amount=5.0)]    # hold-out converts
    await store.apply(batch)
    await store.apply(batch)
    counts = await store.rule_counts("r")
    assert counts.counts == {"fired": 2, "held_out": 1, "suppressed:cooldown": 1, "suppressed:quiet_hours": 1}
    assert await store.converted(counts.treated_at, 10_000) == 1
    assert await store.converted(counts.holdout_at, 10_000) == 1
    assert await store.rule_ids() == ["r"]


async def test_dead_letters_are_counted_once_per_record(store: ReadModel) -> None:
    records = [DeadLettered("ingest", "schema", "d1"), DeadLettered("ingest", "schema", "d2"),
               DeadLettered("identity", "no usable identifier", "d3")]
    await store.apply(records)
    await store.apply(records[:1])
    assert await store.dead_letters() == [("ingest", "schema", 2), ("identity", "no usable identifier", 1)]


def ended(cid: str, action_id: str, outcome: str, attempts: int = 1, status: int | None = 204,
          reason: str | None = None) -> DeliveryEnded:
    return DeliveryEnded(action_id, "r", cid, "marketing", outcome, attempts, status, reason, 1000, 1400)


async def test_how_deliveries_ended_shows_on_the_actions_counts_once_and_follows_a_merge(
        store: ReadModel) -> None:
    failed = ended("c_b", "a-r-c_b-1", "dead_lettered", 10, 500, "webhook: HTTP 500 after 10 tries")
    delivered = ended("c_c", "a-r-c_c-1", "delivered")
    # The outcome may arrive before the action it is about (two topics): both orders end the same.
    await store.apply([failed, action("c_b", "r", "fired", 1), action("c_c", "r", "fired", 1), delivered])
    await store.apply([failed, delivered])  # replayed: counted once
    failed_status = DeliveryStatus(False, 10, 500, 400, "webhook: HTTP 500 after 10 tries")
    assert (await store.customer("c_b")).deliveries == {"a-r-c_b-1": failed_status}
    assert (await store.customer("c_c")).deliveries == {"a-r-c_c-1": DeliveryStatus(True, 1, 204, 400)}
    counts = await store.rule_counts("r")
    assert (counts.delivered, counts.delivery_failed) == (1, 1)
    await store.apply([CustomersMerged("g", "c_a", "c_b", "merge", "shared_identifier", 2)])
    assert (await store.customer("c_a")).deliveries == {"a-r-c_b-1": failed_status}


async def test_forget_leaves_no_trace_of_the_customer_or_the_ids_merged_into_it(store: ReadModel) -> None:
    await store.apply([touch("c_x", 1, amount=9.0), score("c_x", 1, 0.8), action("c_x", "r", "fired", 1),
                       touch("c_y", 2), action("c_y", "r", "suppressed", 2, "cooldown"),
                       CustomersMerged("g-1", "c_x", "c_y", "merge", "shared_identifier", 3),
                       CustomersMerged("u-1", "c_k", "c_x", "unmerge", "operator", 4),
                       touch("c_keep", 5), score("c_keep", 5, 0.1), action("c_keep", "r", "fired", 5),
                       ended("c_x", "a-r-c_x-1", "dead_lettered", 3, 500, "webhook: HTTP 500 after 3 tries")])
    assert await store.forget("c_y") == ["c_x", "c_y"]
    secrets = ("c_x", "c_y", "a-r-c_x-1", "a-r-c_y-2")
    found = [(name, v) for name, v in await everything_stored(store) for secret in secrets if secret.encode() in v]
    assert found == []
    kept = await store.customer("c_keep")
    assert kept.timeline and kept.actions
    counts = await store.rule_counts("r")
    assert counts.counts == {"fired": 1} and counts.treated_at == {"c_keep": 5000}
    assert await store.segments() == {("loyal", "active"): 1}


async def test_an_unknown_customer_reads_as_empty(store: ReadModel) -> None:
    record = await store.customer("c_nobody")
    assert not record.known and record.latest_score is None


async def test_the_event_clock_is_the_newest_event_time_applied(store: ReadModel) -> None:
    assert await store.event_clock() is None
    await store.apply([touch("c_1", 5), score("c_1", 3, 0.2)])
    assert await store.event_clock() == 5000
    await store.apply([touch("c_2", 2), action("c_2", "r", "fired", 4)])  # older records never move it back
    assert await store.event_clock() == 5000
    await store.apply([action("c_2", "r", "held_out", 9, "holdout")])
    assert await store.event_clock() == 9000


async def test_a_batch_still_lands_after_redis_lost_its_scripts(redis_store: ReadModelStore) -> None:
    store = redis_store
    # Batches call the scripts by sha1 without asking SCRIPT EXISTS first; a restarted Redis
    # answers NOSCRIPT, and the store loads them and sends the batch again.
    await store.apply([touch("c_1", 1), score("c_1", 1, 0.2)])
    await store.client.script_flush()
    await store.apply([touch("c_1", 2), score("c_1", 2, 0.9, "at_risk", "lapsing")])
    record = await store.customer("c_1")
    assert [e.message_id for e in record.timeline] == ["m-c_1-2", "m-c_1-1"]
    assert [s.event_time_ms for s in record.scores] == [1000, 2000]
    assert await store.segments() == {("at_risk", "lapsing"): 1}
    assert await store.client.script_exists(store._apply_script.sha, store._set_segments.sha) == [True, True]


async def test_one_customer_is_one_compact_hash_that_expires_without_records(redis_client: aioredis.Redis) -> None:
    store = ReadModelStore(redis_client, customer_ttl_s=3_600)
    purchase = TouchpointSeen("c_1", "m-c_1-1", 1000, "track", "Order Completed", "web", "test", 12.5, "EUR", None,
                              None, {}, ("user_id",))  # what a pipeline event carries: no properties
    await store.apply([purchase, score("c_1", 1, 0.4), action("c_1", "r", "fired", 1),
                       ended("c_1", "a-r-c_1-1", "delivered")])
    keys = {k.decode() async for k in redis_client.scan_iter(match="ts:console:c:*")}
    assert keys == {store.ckey("c_1")}
    # Every value within Redis's listpack limit: the whole hash is one compact listpack, not a hash table.
    assert await redis_client.object("encoding", store.ckey("c_1")) == b"listpack"
    assert 3_500 < await redis_client.ttl(store.ckey("c_1")) <= 3_600
    view = await store.customer("c_1")
    assert view.purchases_ms == [1000] and view.channels == [("web", 1000)]
    assert view.latest_score is not None and view.latest_score.reasons == (("recency_days", 0.4),)


async def test_score_points_and_actions_are_capped_and_a_dropped_actions_delivery_goes_with_it(
        store: ReadModel) -> None:
    await store.apply([score("c_1", n, 0.5) for n in range(260)])
    # Past the cap and its slack: trimmed back to the cap, the oldest first, with their deliveries.
    await store.apply([action("c_1", "r", "fired", n) for n in range(230)]
                      + [ended("c_1", f"a-r-c_1-{n}", "delivered") for n in range(230)])
    view = await store.customer("c_1")
    assert [s.event_time_ms for s in view.scores] == [n * 1000 for n in range(260 - len(view.scores), 260)]
    assert SCORE_HISTORY_CAP <= len(view.scores) <= SCORE_HISTORY_CAP + TRIM_SLACK
    assert [a.action_id for a in view.actions] == [f"a-r-c_1-{n}" for n in range(229, 229 - ACTIONS_CAP, -1)]
    assert set(view.deliveries) == {a.action_id for a in view.actions}
    # A delivery that ends after its action was trimmed is dropped at the next trim too.
    await store.apply([ended("c_1", "a-r-c_1-3", "delivered")]
                      + [action("c_1", "r", "fired", n) for n in range(230, 230 + TRIM_SLACK + 1)])
    view = await store.customer("c_1")
    assert len(view.actions) == ACTIONS_CAP and set(view.deliveries) <= {a.action_id for a in view.actions}
    counts = await store.rule_counts("r")
    assert counts.counts == {"fired": 251} and counts.delivered == 231  # the tally is never trimmed


async def test_the_newest_purchases_are_kept_for_rule_outcomes(store: ReadModel) -> None:
    await store.apply([touch("c_1", n, amount=1.0) for n in range(PURCHASES_CAP + 10)])
    await store.apply([touch("c_1", 5, amount=1.0)])  # a replay adds no second purchase
    view = await store.customer("c_1")
    assert view.purchases_ms == [n * 1000 for n in range(10, PURCHASES_CAP + 10)]


async def test_a_rescore_without_a_segment_moves_the_risk_not_the_segment(store: ReadModel) -> None:
    unexplained = ScoreUpdated("c_1", "m-c_1-2", 2000, 0.9, 0.1, "", "", "v1", (), {})  # an as-of rescore
    await store.apply([score("c_1", 1, 0.3, "loyal", "active"), unexplained])
    view = await store.customer("c_1")
    assert view.latest_score is not None
    assert (view.latest_score.churn_risk, view.latest_score.segment) == (0.9, "loyal")
    assert view.latest_score.event_time_ms == 1000 and await store.segments() == {("loyal", "active"): 1}


async def test_an_outcome_that_changes_moves_the_count_once(store: ReadModel) -> None:
    # Dead-lettered, then delivered after all (a retry that was already on the wire): one count, the last.
    await store.apply([action("c_1", "r", "fired", 1), ended("c_1", "a-r-c_1-1", "dead_lettered", 3, 500, "x")])
    await store.apply([ended("c_1", "a-r-c_1-1", "delivered"), ended("c_1", "a-r-c_1-1", "delivered")])
    counts = await store.rule_counts("r")
    assert (counts.delivered, counts.delivery_failed) == (1, 0)
    assert (await store.customer("c_1")).deliveries["a-r-c_1-1"].delivered


async def test_the_newest_explained_score_replaces_the_reasons_and_an_older_one_is_ignored(
        store: ReadModel) -> None:
    three = (("overdue_ratio", 1.2), ("recency_days", 0.4), ("log_purchase_count", -0.2))
    await store.apply([ScoreUpdated("c_1", "m-2", 2000, 0.8, 0.2, "at_risk", "lapsing", "v2", three, {})])
    one = (("tenure_days", -0.5),)
    await store.apply([ScoreUpdated("c_1", "m-3", 3000, 0.3, 0.7, "loyal", "active", "v3", one, {}),
                       ScoreUpdated("c_1", "m-1", 1000, 0.9, 0.1, "lost", "lapsed", "v1", three, {})])  # late, older
    latest = (await store.customer("c_1")).latest_score
    assert latest is not None and (latest.segment, latest.model_version) == ("loyal", "v3")
    assert latest.reasons == (("tenure_days", -0.5),)
    assert await store.segments() == {("loyal", "active"): 1}


async def test_a_record_stamped_in_2099_moves_the_event_clock_and_the_flow_no_further_than_the_tolerance(
        store: ReadModel) -> None:
    now_ms = int(time.time() * 1000)
    year_2099 = 4_086_000_000_000
    await store.apply([touch("c_1", 1, t=now_ms - 60_000),
                       ScoreUpdated("c_2", "m-c_2", year_2099, 0.5, 0.5, "new", "active", "v1", (), {})])
    clock = await store.event_clock()
    assert clock is not None and now_ms - 60_000 <= clock <= time.time() * 1000 + 300_000
    if isinstance(store, ReadModelStore):
        stored = await store.client.zscore(store.key("clock"), "event_time")
        assert stored is not None and stored <= time.time() * 1000 + 300_000
    # A real change after it still shows in the overview's flow, whose newest day is today's, not one in 2099.
    await store.apply([ScoreUpdated("c_3", "m-c_3", now_ms, 0.9, 0.1, "at_risk", "lapsing", "v1", (), {})])
    assert ("", "at_risk|lapsing", 1) in await store.segment_flow(30)


async def test_a_backfill_decision_counts_apart_and_in_neither_group(store: ReadModel) -> None:
    await store.apply([action("c_1", "r", "backfill", 1, "fired"), action("c_2", "r", "fired", 2)])
    counts = await store.rule_counts("r")
    assert counts.counts == {"backfill": 1, "fired": 1} and counts.treated_at == {"c_2": 2000}
    assert counts.holdout_at == {}


async def test_each_rules_actions_are_counted_per_event_time_day_once_and_follow_merges_and_erasure(
        store: ReadModel) -> None:
    day = 86_400_000
    t0 = 20_000 * day  # an event-time day well in the past

    def acted(cid: str, outcome: str, days: int, n: int, reason: str | None = None) -> ActionTaken:
        return ActionTaken(f"a-{cid}-{n}", "r", cid, outcome, reason, "marketing", t0 + days * day + n, 0)

    batch = [acted("c_1", "fired", 0, 1), acted("c_1", "suppressed", 0, 2, "cooldown"), acted("c_2", "fired", 0, 3),
             acted("c_2", "held_out", 1, 4), acted("c_3", "backfill", 2, 5)]
    await store.apply(batch)
    await store.apply(batch)  # redelivered: counted once
    expected = {20_000: {"fired": 2, "suppressed": 1}, 20_001: {"held_out": 1}, 20_002: {"backfill": 1}}
    assert (await store.rule_counts("r")).by_day == expected
    # A merge carries the merged customer's days into the survivor's tally: the rule's days stay the same.
    await store.apply([CustomersMerged("g-1", "c_1", "c_2", "merge", "shared_identifier", t0)])
    assert (await store.rule_counts("r")).by_day == expected
    assert (await store.customer("c_1")).tallies["r"].by_day == {20_000: {"fired": 2, "suppressed": 1},
                                                                  20_001: {"held_out": 1}}
    # Erasing a customer takes its actions out of every day.
    await store.forget("c_3")
    assert (await store.rule_counts("r")).by_day == {20_000: {"fired": 2, "suppressed": 1}, 20_001: {"held_out": 1}}


async def test_a_customers_tally_keeps_only_its_newest_days(store: ReadModel) -> None:
    from services.console.entries import TALLY_DAYS_KEPT
    day = 86_400_000
    actions = [ActionTaken(f"a-{n}", "r", "c_1", "fired", None, "marketing", (20_000 + n) * day, 0)
               for n in range(0, TALLY_DAYS_KEPT + 30, 3)]
    for n in range(0, len(actions), 7):  # several batches, as days go by
        await store.apply(actions[n:n + 7])
    tally = (await store.customer("c_1")).tallies["r"]
    newest = max(a.event_time_ms // day for a in actions)
    assert tally.counts == {"fired": len(actions)}  # the total is never trimmed
    assert min(tally.by_day) >= newest - TALLY_DAYS_KEPT and max(tally.by_day) == newest
    assert tally.by_day == {a.event_time_ms // day: {"fired": 1} for a in actions
                            if a.event_time_ms // day >= newest - TALLY_DAYS_KEPT}


def valued(cid: str, n: int, value: float, tier: int, segment: str = "loyal") -> ScoreUpdated:
    """A score carrying scoring's value features (a segment of "" for a crossing check's, which scoring does not
    explain)."""
    return ScoreUpdated(cid, f"m-{cid}-v{n}", n * 1000, 0.2, 0.8, segment, "active" if segment else "", "v1", (),
                        {"predicted_value": value, "value_tier": float(tier),
                         "expected_purchases_value_horizon": value / 50, "expected_order_value": 50.0})


async def test_the_newest_predicted_value_shows_and_counts_once_in_its_tier(store: ReadModel) -> None:
    await store.apply([valued("c_1", 2, 400.0, 4), valued("c_1", 1, 10.0, 1), valued("c_2", 1, 20.004, 1)])
    record = await store.customer("c_1")
    # The older score arrived last: it changes neither the customer's value nor the tiers.
    assert record.value is not None
    assert (record.value.predicted_value, record.value.tier, record.value.expected_purchases,
            record.value.expected_order_value) == (400.0, 4, 8.0, 50.0)
    assert [(t.tier, t.customers, t.predicted_value) for t in await store.value_tiers()] == [(4, 1, 400.0),
                                                                                           (1, 1, 20.0)]
    # A crossing check's score (no segment) moves the value too; a replay counts nothing twice.
    await store.apply([valued("c_1", 3, 30.0, 1, segment="")])
    await store.apply([valued("c_1", 3, 30.0, 1, segment="")])
    assert [(t.tier, t.customers, t.predicted_value) for t in await store.value_tiers()] == [(1, 2, 50.0)]
    assert (await store.customer("c_1")).value.predicted_value == 30.0  # type: ignore[union-attr]
    # A score without value features (an older scoring) leaves the value as it was.
    await store.apply([score("c_1", 4, 0.5)])
    assert (await store.customer("c_1")).value.predicted_value == 30.0  # type: ignore[union-attr]


async def test_predicted_values_follow_a_merge_and_leave_with_an_erasure(store: ReadModel) -> None:
    await store.apply([valued("c_a", 1, 100.0, 3), valued("c_b", 2, 900.0, 4), valued("c_keep", 1, 5.0, 1)])
    await store.apply([CustomersMerged("g-1", "c_a", "c_b", "merge", "shared_identifier", 3)])
    # c_b's value is the newer: the survivor takes it, and each customer counts once.
    assert (await store.customer("c_a")).value.predicted_value == 900.0  # type: ignore[union-attr]
    assert [(t.tier, t.customers, t.predicted_value) for t in await store.value_tiers()] == [(4, 1, 900.0),
                                                                                           (1, 1, 5.0)]
    await store.forget("c_b")
    assert [(t.tier, t.customers, t.predicted_value) for t in await store.value_tiers()] == [(1, 1, 5.0)]
