"""The scoring Redis adapter and service against the real Valkey from the session fixtures."""

from __future__ import annotations

import pickle
import time

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from services.scoring.checkpoint import FORMAT, TAG_BYTES
from services.scoring.labels import DAY_MS
from services.scoring.metrics import ScoringMetrics
from services.scoring.service import MergeInput, ResolvedInput, ScoringService
from services.scoring.settings import ScoringSettings
from services.scoring.state import CustomerState, Touchpoint, apply_touchpoint
from services.scoring.store import RedisScoringStore, StateChanges, customer_of
from tests.unit.scoring.test_scoring_checkpoint import RunsCodeWhenUnpickled, unpickled
from touchstream import avro

pytestmark = pytest.mark.integration

PREFIX = "test:scoring"


def purchase(message_id: str, day: float, amount: float = 10.0) -> Touchpoint:
    t = int(day * DAY_MS)
    return Touchpoint(message_id, t, t, event_name="Order Completed", order_amount=amount)


def new_service(redis_client: aioredis.Redis, **overrides: object) -> ScoringService:
    # Rescores off (a tick longer than any test) unless a test is about them.
    settings = ScoringSettings(key_prefix=PREFIX, **({"tick_days": 10_000} | overrides))  # type: ignore[arg-type]
    return ScoringService(RedisScoringStore(redis_client, PREFIX), settings, ScoringMetrics(CollectorRegistry()))


async def test_state_round_trip(redis_client: aioredis.Redis) -> None:
    store = RedisScoringStore(redis_client, PREFIX)
    state = CustomerState()
    apply_touchpoint(state, purchase("m1", 3, 42.0))
    await store.save(StateChanges(states={"c1": state}, watermarks={0: 3 * DAY_MS}))
    loaded, watermarks = await store.load(["c1", "absent"], [0, 1])
    assert loaded == {"c1": state}
    assert watermarks == {0: 3 * DAY_MS}


async def test_replaying_the_same_message_does_not_double_count(redis_client: aioredis.Redis) -> None:
    service = new_service(redis_client)
    batch = [ResolvedInput(0, "c1", purchase("m1", 1, 20.0)), ResolvedInput(0, "c1", purchase("m2", 2, 5.0))]
    first = await service.score_touchpoints(batch)
    # A crash after saving but before committing offsets redelivers the whole batch.
    replayed = await service.score_touchpoints(batch)
    states, _ = await service.store.load(["c1"])
    assert (states["c1"].purchase_count, states["c1"].monetary_total) == (2, 25.0)
    assert [r["message_id"] for r in replayed] == ["m1", "m2"]
    assert replayed[-1]["features"] == first[-1]["features"]
    assert await service.store.pending_counts([0]) == {0: 2}


async def test_pending_examples_survive_a_new_adapter_and_mature_there(redis_client: aioredis.Redis) -> None:
    first = new_service(redis_client)
    await first.score_touchpoints(
        [ResolvedInput(1, "c1", purchase("m1", 0)), ResolvedInput(1, "c2", purchase("m2", 0))]
    )
    await first.score_touchpoints([ResolvedInput(1, "c1", purchase("m3", 40))])
    await first.checkpoint()

    restarted = new_service(redis_client)
    assert await restarted.store.pending_counts([1]) == {1: 3}
    # Event time moves past day 0 + 90 + 1 day of lateness: both day-0 examples mature.
    await restarted.score_touchpoints([ResolvedInput(1, "c3", purchase("m4", 92))])
    learner = restarted.engine.learner
    assert learner.model.examples_learned == 2
    assert learner.quality.examples == 2
    states, _ = await restarted.store.load(["c1", "c2"])
    assert [e.t_ms for e in states["c1"].pending] == [40 * DAY_MS]
    assert states["c2"].pending == []
    assert await restarted.store.pending_counts([1]) == {1: 2}


async def checkpointed_service(redis_client: aioredis.Redis) -> ScoringService:
    """Return a service whose model learned one example and was checkpointed to Redis."""
    service = new_service(redis_client)
    await service.score_touchpoints(
        [ResolvedInput(0, "c1", purchase("m1", 0)), ResolvedInput(0, "c2", purchase("m2", 100))]
    )
    assert service.engine.learner.model.examples_learned == 1
    await service.checkpoint()
    return service


def refused_checkpoints(service: ScoringService, reason: str) -> float | None:
    return service.metrics.service.registry.get_sample_value(
        "touchstream_scoring_checkpoints_refused_total", {"reason": reason})


async def test_model_checkpoint_is_restored(redis_client: aioredis.Redis) -> None:
    await checkpointed_service(redis_client)
    restarted = new_service(redis_client)
    await restarted.restore_model()
    assert restarted.engine.learner.model.version == "logreg-v2-n1"


async def test_merge_moves_state_to_the_survivor_once(redis_client: aioredis.Redis) -> None:
    service = new_service(redis_client)
    await service.score_touchpoints(
        [ResolvedInput(0, "survivor", purchase("m1", 10, 30.0)), ResolvedInput(1, "merged", purchase("m2", 5, 12.0))]
    )
    merge = MergeInput(0, "merge-1", "survivor", "merged")
    await service.apply_merges([merge])
    await service.apply_merges([merge])

    states, _ = await service.store.load(["survivor", "merged"])
    assert "merged" not in states
    survivor = states["survivor"]
    assert (survivor.purchase_count, survivor.monetary_total) == (2, 42.0)
    assert survivor.first_purchase_ms == 5 * DAY_MS and survivor.last_purchase_ms == 10 * DAY_MS
    # The merged customer's day-5 example is now the survivor's, labelled by the day-10 purchase.
    assert [(e.t_ms, e.positive) for e in survivor.pending] == [(5 * DAY_MS, True), (10 * DAY_MS, False)]
    assert await service.store.pending_counts([0]) == {0: 2}

    # Its stale due member in partition 1 is dropped when it comes due; nothing is learned twice.
    await service.score_touchpoints([ResolvedInput(1, "other", purchase("m3", 97))])
    await service.score_touchpoints([ResolvedInput(0, "other0", purchase("m4", 102))])
    assert service.engine.learner.model.examples_learned == 2
    assert await service.store.pending_counts([0, 1]) == {0: 1, 1: 1}


async def test_silent_customers_are_rescored_as_event_time_passes_their_ticks(redis_client: aioredis.Redis) -> None:
    service = new_service(redis_client, tick_days=14, emit_rescores=True)
    await service.score_touchpoints([ResolvedInput(0, "quiet", purchase("m1", 0, 25.0))])
    assert await service.store.due_ticks({0: 100 * DAY_MS}) == {0: [("quiet", 14 * DAY_MS)]}

    # Another customer's event moves partition 0 to day 30: "quiet" is rescored as of days 14 and 28.
    records = await service.score_touchpoints([ResolvedInput(0, "busy", purchase("m2", 30))])
    rescores = [r for r in records if r["event_type"] == "rescore"]
    assert [(r["customer_id"], r["event_time_ms"] // DAY_MS) for r in rescores] == [("quiet", 14), ("quiet", 28)]
    assert rescores[1]["features"]["recency_days"] == 28.0
    assert rescores[1]["consent"] == [] and rescores[1]["channel"] is None
    for record in records:
        assert avro.validation_errors("ScoreUpdate", record) == []
    assert records[-1]["message_id"] == "m2" and records[-1]["channel"] == "web"

    states, _ = await service.store.load(["quiet"])
    assert [e.t_ms // DAY_MS for e in states["quiet"].pending] == [0, 14, 28]
    assert await service.store.pending_counts([0]) == {0: 4}
    assert await service.store.due_ticks({0: 100 * DAY_MS}) == {0: [("quiet", 42 * DAY_MS), ("busy", 44 * DAY_MS)]}
    # Repeating the batch (a redelivery) rescores nobody twice.
    again = await service.score_touchpoints([ResolvedInput(0, "busy", purchase("m2", 30))])
    assert [r["event_type"] for r in again] == ["track"]


async def test_rescores_are_not_sent_unless_asked_but_still_make_prediction_points(
    redis_client: aioredis.Redis,
) -> None:
    service = new_service(redis_client, tick_days=14)
    await service.score_touchpoints([ResolvedInput(0, "quiet", purchase("m1", 0))])
    records = await service.score_touchpoints([ResolvedInput(0, "busy", purchase("m2", 20))])
    assert [r["customer_id"] for r in records] == ["busy"]
    states, _ = await service.store.load(["quiet"])
    assert [e.t_ms // DAY_MS for e in states["quiet"].pending] == [0, 14]


async def test_forecasts_read_states_as_of_a_time(redis_client: aioredis.Redis) -> None:
    service = new_service(redis_client)
    batch = [ResolvedInput(0, "c1", purchase("m1", 0)), ResolvedInput(1, "c2", purchase("m2", 3))]
    await service.score_touchpoints(batch)
    forecasts = await service.forecasts(["c1", "c2", "absent"], 100 * DAY_MS, 273)
    assert set(forecasts) == {"c1", "c2"}
    assert forecasts["c1"].horizon_days == 273 and 0 < forecasts["c1"].propensity < 1
    states, _ = await service.store.load(["c1"])
    assert service.engine.forecast(states["c1"], 100 * DAY_MS, 273) == forecasts["c1"]


async def test_a_checkpoint_of_another_model_kind_is_not_restored(redis_client: aioredis.Redis) -> None:
    await checkpointed_service(redis_client)
    forest = new_service(redis_client, model="forest")
    await forest.restore_model()
    assert forest.engine.learner.model.version == "arf-v1-n0"
    same = new_service(redis_client)
    await same.restore_model()
    assert same.engine.learner.model.version == "logreg-v2-n1"


async def test_a_tampered_or_unsigned_checkpoint_in_redis_is_never_unpickled(redis_client: aioredis.Redis) -> None:
    store = (await checkpointed_service(redis_client)).store
    signed = await store.load_checkpoint()
    assert signed is not None and signed.startswith(FORMAT)
    exploit = pickle.dumps(RunsCodeWhenUnpickled())
    planted_checkpoints = [
        (exploit, "unsigned"),  # what an attacker who can write Redis would plant
        (signed[: len(FORMAT) + TAG_BYTES] + exploit, "bad_signature"),  # a real signature, another payload
    ]
    for planted, reason in planted_checkpoints:
        unpickled.clear()
        await redis_client.set(store.model_key, planted)
        restarted = new_service(redis_client)
        await restarted.restore_model()
        assert unpickled == [], "the planted checkpoint was unpickled"
        assert restarted.engine.learner.model.version == "logreg-v2-n0"  # a fresh model instead
        assert refused_checkpoints(restarted, reason) == 1
        assert await redis_client.get(store.refused_model_key) == planted  # kept for whoever investigates
        # Scoring goes on, and its next checkpoint is signed again.
        await restarted.score_touchpoints([ResolvedInput(0, "c3", purchase(f"m-{reason}", 101))])
        await restarted.checkpoint()
        again = new_service(redis_client)
        await again.restore_model()
        assert refused_checkpoints(again, reason) == 0
    assert unpickled == []


async def test_a_checkpoint_signed_with_another_key_is_not_restored(redis_client: aioredis.Redis) -> None:
    await checkpointed_service(redis_client)
    rotated = new_service(redis_client, checkpoint_key="the-key-after-a-rotation")
    await rotated.restore_model()
    assert rotated.engine.learner.model.version == "logreg-v2-n0"
    assert refused_checkpoints(rotated, "bad_signature") == 1
    same_key = new_service(redis_client)
    await same_key.restore_model()
    assert same_key.engine.learner.model.version == "logreg-v2-n1"


async def test_an_event_stamped_in_2099_matures_no_label_and_passes_no_rescore_early(
        redis_client: aioredis.Redis) -> None:
    service = new_service(redis_client, tick_days=14)
    registry = service.metrics.service.registry
    now_days = time.time() * 1000 / DAY_MS
    # Two customers bought in the last days: their examples are due about 90 days from now.
    await service.score_touchpoints([ResolvedInput(0, "ann", purchase("m1", now_days - 2)),
                                     ResolvedInput(0, "bob", purchase("m2", now_days - 1))])
    # Someone's event stamped in 2099 on the same partition, then a real one of ann's.
    await service.score_touchpoints([ResolvedInput(0, "eve", purchase("m3", 4_086_000_000_000 / DAY_MS))])
    await service.score_touchpoints([ResolvedInput(0, "ann", purchase("m4", now_days - 0.01))])

    def counted(name: str, **labels: str) -> float:
        return registry.get_sample_value(f"touchstream_scoring_{name}_total", labels) or 0.0

    assert counted("examples_learned", label="positive") + counted("examples_learned", label="negative") == 0
    assert {customer_of(m) for m in await service.store.due_members(0, 2**62)} >= {"ann", "bob"}
    assert counted("rescores") == 0
    assert counted("events_late") == 0
    _, watermarks = await service.store.load([], [0])
    assert watermarks[0] <= time.time() * 1000 + 300_000
    assert counted("events_ahead") == 1


async def test_an_erased_customer_stays_erased_for_a_restarted_worker_that_reads_its_records_again(
        redis_client: aioredis.Redis) -> None:
    history = [ResolvedInput(0, "ann", purchase("m1", 1)), ResolvedInput(1, "ann_old", purchase("m2", 1)),
               ResolvedInput(0, "bob", purchase("m3", 1))]
    first = new_service(redis_client)
    await first.score_touchpoints(history)
    await first.forget_customers(["ann", "ann_old"], range(2))

    restarted = new_service(redis_client)  # a new process: nothing in memory
    records = await restarted.score_touchpoints([*history, ResolvedInput(0, "ann", purchase("m4", 2))])
    await restarted.apply_merges([MergeInput(0, "mg1", "ann", "ann_old"), MergeInput(0, "mg2", "bob", "ann")])
    assert [r["customer_id"] for r in records] == ["bob"]
    states, _ = await restarted.store.load(["ann", "ann_old", "bob"])
    assert set(states) == {"bob"}
    keys = [k.decode() async for k in redis_client.scan_iter(match=f"{PREFIX}:customer:*")]
    assert keys == [f"{PREFIX}:customer:bob"]
    members = await restarted.store.due_members(0, 2**62) + await restarted.store.due_members(1, 2**62)
    assert {customer_of(m) for m in members} == {"bob"}
    assert "ann" not in str(await redis_client.zrange(f"{PREFIX}:erased", 0, -1))  # one-way tokens only
