"""The scoring Redis adapter and service against the real Valkey from the session fixtures."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from services.scoring.checkpoint import FORMAT, TAG_BYTES
from services.scoring.codec import decode_path, decode_state, encode_path, encode_state, layout_id
from services.scoring.crossings import threshold_side
from services.scoring.features import PATH_FIELDS, silent_path
from services.scoring.metrics import ScoringMetrics
from services.scoring.service import MergeInput, ResolvedInput, ScoringService
from services.scoring.settings import ScoringSettings
from services.scoring.state import CustomerState, Touchpoint, apply_touchpoint
from services.scoring.store import RedisScoringStore, StateChanges, customer_of
from tests.unit.scoring.test_scoring_checkpoint import RunsCodeWhenUnpickled, unpickled
from touchstream import avro
from touchstream.eventtime import DAY_MS

pytestmark = pytest.mark.integration

PREFIX = "test:scoring"
NO_RULES = "rules: []\n"
# Churn risk through 0.6 (propensity 0.4), re-armed below 0.5 (propensity 0.5).
RISK_RULE = """
rules:
  - id: risk
    when: {score: churn_risk, crosses_above: 0.6, rearm_below: 0.5}
    action: {endpoint: marketing, template: {}}
"""


def purchase(message_id: str, day: float, amount: float = 10.0) -> Touchpoint:
    t = int(day * DAY_MS)
    return Touchpoint(message_id, t, t, event_name="Order Completed", order_amount=amount)


def new_service(redis_client: aioredis.Redis, tmp_path: Path, rules: str = NO_RULES,
                **overrides: object) -> ScoringService:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules)
    settings = ScoringSettings(key_prefix=PREFIX, rules_file=rules_file, **overrides)  # type: ignore[arg-type]
    return ScoringService(RedisScoringStore(redis_client, PREFIX), settings, ScoringMetrics(CollectorRegistry()))


async def test_state_round_trip(redis_client: aioredis.Redis) -> None:
    store = RedisScoringStore(redis_client, PREFIX)
    state = CustomerState()
    apply_touchpoint(state, purchase("m1", 3, 42.0))
    await store.save(StateChanges(states={"c1": state}, watermarks={0: 3 * DAY_MS}))
    loaded, watermarks = await store.load(["c1", "absent"], [0, 1])
    assert loaded == {"c1": state}
    assert watermarks == {0: 3 * DAY_MS}


async def test_replaying_the_same_message_does_not_double_count(redis_client: aioredis.Redis,
                                                                tmp_path: Path) -> None:
    service = new_service(redis_client, tmp_path)
    batch = [ResolvedInput(0, "c1", purchase("m1", 1, 20.0)), ResolvedInput(0, "c1", purchase("m2", 2, 5.0))]
    first = await service.score_touchpoints(batch)
    # A crash after saving but before committing offsets redelivers the whole batch.
    replayed = await service.score_touchpoints(batch)
    states, _ = await service.store.load(["c1"])
    assert (states["c1"].purchase_count, states["c1"].monetary_total) == (2, 25.0)
    assert [r["message_id"] for r in replayed] == ["m1", "m2"]
    assert replayed[-1]["features"] == first[-1]["features"]
    assert await service.store.pending_counts([0]) == {0: 2}
    # The silent schedule starts one step after the newest example, the path is the state's.
    assert await service.store.silent_schedule({0: ["c1"]}) == {"c1": 16 * DAY_MS}
    stored = (await service.store.load_paths(["c1"]))["c1"]
    assert np.array_equal(stored, silent_path(states["c1"]), equal_nan=True)


async def test_examples_survive_a_new_adapter_and_silent_ones_are_learned_from_paths(
    redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    first = new_service(redis_client, tmp_path)
    await first.score_touchpoints([ResolvedInput(1, "c1", purchase("m1", 0)),
                                   ResolvedInput(1, "c2", purchase("m2", 0))])
    await first.checkpoint()

    restarted = new_service(redis_client, tmp_path)
    assert await restarted.store.pending_counts([1]) == {1: 2}
    # Day 40 (a day of lateness: cutoff 39): both day-0 examples (due 14) mature. c1's event
    # closes its silent examples of days 14 (nothing in (14, 28]) and 28 (day 40 in its window);
    # c2, still silent, gets day 14's from its stored path (day 28's step ends on 42 > 39).
    await restarted.score_touchpoints([ResolvedInput(1, "c1", purchase("m3", 40))])
    learner = restarted.engine.learner
    assert learner.quality.examples == learner.model.examples_learned == 4
    states, _ = await restarted.store.load(["c1", "c2"])
    assert [(e.t_ms // DAY_MS, e.positive) for e in states["c1"].pending] == [(28, True), (40, False)]
    # c2's silent example never went through its state: only its day-0 example left it.
    assert states["c2"].pending == [] and states["c2"].last_example_ms == 0
    assert await restarted.store.silent_schedule({1: ["c1", "c2"]}) == {"c1": 54 * DAY_MS, "c2": 28 * DAY_MS}
    assert await restarted.store.pending_counts([1]) == {1: 2}


async def test_examples_and_paths_stored_under_another_feature_layout_are_dropped_not_crashed_on(
    redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    """A release that reorders or adds a path field must not learn old vectors as new ones, nor fail on them."""
    first = new_service(redis_client, tmp_path)
    await first.score_touchpoints([ResolvedInput(1, "c1", purchase("m1", 0)),
                                   ResolvedInput(1, "c2", purchase("m2", 0))])
    store = first.store
    # Rewrite what was stored as an older release with one path field fewer would have written it.
    older_layout = layout_id(PATH_FIELDS[:-1])
    for customer in ("c1", "c2"):
        raw = await redis_client.get(store.customer_key(customer))
        stored = decode_state(raw)
        # Stamped with this release's layout: read as another layout, its waiting examples are dropped.
        assert stored.pending and decode_state(raw, layout=older_layout).pending == []
        for example in stored.pending:
            example.path = example.path[:-1]
        await redis_client.set(store.customer_key(customer), encode_state(stored, layout=older_layout))
        path = decode_path(await redis_client.get(store.path_key(customer)))
        assert path is not None
        await redis_client.set(store.path_key(customer), encode_path(path[:-1], layout=older_layout))

    restarted = new_service(redis_client, tmp_path)
    # As in the test above, day 40 matures both day-0 examples and c2's first silent one; here
    # they were made under the other layout, so only c1's silent example of day 14, made from its
    # state by its own event, is learned (day 28's waits, as above).
    updates = await restarted.score_touchpoints([ResolvedInput(1, "c1", purchase("m3", 40))])
    assert len(updates) == 1
    learner = restarted.engine.learner
    assert learner.quality.examples == learner.model.examples_learned == 1
    states, _ = await restarted.store.load(["c1", "c2"])
    assert [e.t_ms // DAY_MS for e in states["c1"].pending] == [28, 40]
    assert states["c2"].pending == []
    # c2's path of the other layout reads as absent: its silent examples stop until its next event.
    paths = await restarted.store.load_paths(["c1", "c2"])
    assert list(paths) == ["c1"] and len(paths["c1"]) == len(PATH_FIELDS)
    assert await restarted.store.silent_schedule({1: ["c1", "c2"]}) == {"c1": 54 * DAY_MS}


async def checkpointed_service(redis_client: aioredis.Redis, tmp_path: Path) -> tuple[ScoringService, int]:
    """Return a service whose model learned from a few events and was checkpointed, and how many examples."""
    service = new_service(redis_client, tmp_path)
    await service.score_touchpoints(
        [ResolvedInput(0, "c1", purchase("m1", 0)), ResolvedInput(0, "c2", purchase("m2", 100))]
    )
    learned = service.engine.learner.model.examples_learned
    assert learned > 0
    await service.checkpoint()
    return service, learned


def refused_checkpoints(service: ScoringService, reason: str) -> float | None:
    return service.metrics.service.registry.get_sample_value(
        "touchstream_scoring_checkpoints_refused_total", {"reason": reason})


async def test_model_checkpoint_is_restored_unless_it_learned_other_steps(redis_client: aioredis.Redis,
                                                                          tmp_path: Path) -> None:
    _, learned = await checkpointed_service(redis_client, tmp_path)
    restarted = new_service(redis_client, tmp_path)
    await restarted.restore_model()
    assert restarted.engine.learner.model.version == f"logreg-v3-n{learned}"
    weekly = new_service(redis_client, tmp_path, step_days=7.0)
    await weekly.restore_model()
    assert weekly.engine.learner.model.version == "logreg-v3-n0"


async def test_merge_moves_state_to_the_survivor_once(redis_client: aioredis.Redis, tmp_path: Path) -> None:
    service = new_service(redis_client, tmp_path)
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
    assert set(await service.store.load_paths(["survivor", "merged"])) == {"survivor"}

    # Its stale due member and silent schedule in partition 1 are dropped when they come due.
    await service.score_touchpoints([ResolvedInput(1, "other", purchase("m3", 60))])
    assert await service.store.pending_counts([1]) == {1: 1}
    assert await service.store.silent_schedule({1: ["merged"]}) == {}


async def test_a_silent_customer_gets_a_score_update_only_when_time_carries_it_across_a_threshold(
    redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    # Labels never mature here (lateness beyond the test), so the untrained model (its BG/NBD prior)
    # is fixed: a one-off buyer's 90-day propensity falls from 0.75 through 0.5 (day ~60) and 0.4 (~105).
    service = new_service(redis_client, tmp_path, RISK_RULE, lateness_days=10_000)
    thresholds = service.engine.watched.propensity_thresholds
    assert thresholds == (0.4, 0.5)
    [bought] = await service.score_touchpoints([ResolvedInput(0, "quiet", purchase("m1", 0, 25.0))])
    assert bought["purchase_propensity"] > 0.5
    [(_, first_check)] = (await service.store.due_ticks({0: 1000 * DAY_MS}))[0]
    assert 55 * DAY_MS < first_check < 65 * DAY_MS

    # Another customer's events move partition 0 through day 50: nothing for "quiet" yet.
    assert [r["customer_id"] for r in await service.score_touchpoints(
        [ResolvedInput(0, "busy", purchase("m2", 50))])] == ["busy"]
    records = await service.score_touchpoints([ResolvedInput(0, "busy", purchase("m3", 200))])
    # Day 200 passes both of quiet's crossings (the second found once the first was checked),
    # and busy's (its day-50 purchase fades too) before its own event.
    rescores = [r for r in records if r["event_type"] == "rescore" and r["customer_id"] == "quiet"]
    assert len(rescores) == 2
    assert [r["customer_id"] for r in records if r["event_type"] != "rescore"] == ["busy"]
    sides = [int(threshold_side(r["purchase_propensity"], thresholds)) for r in (bought, *rescores)]
    assert sides == [2, 1, 0]
    assert rescores[0]["event_time_ms"] == first_check and rescores[1]["event_time_ms"] < 200 * DAY_MS
    for record in records:
        assert avro.validation_errors("ScoreUpdate", record) == []
    assert rescores[1]["consent"] == [] and rescores[1]["channel"] is None
    [event] = [r for r in records if r["message_id"] == "m3"]
    assert event["channel"] == "web" and 100 * DAY_MS < rescores[1]["event_time_ms"] < 110 * DAY_MS
    # Below every threshold and falling: no more checks for "quiet".
    states, _ = await service.store.load(["quiet"])
    assert states["quiet"].next_check_ms is None
    assert "quiet" not in dict((await service.store.due_ticks({0: 10_000 * DAY_MS}))[0])
    # A redelivered batch checks nobody twice.
    again = await service.score_touchpoints([ResolvedInput(0, "busy", purchase("m3", 200))])
    assert [r["event_type"] for r in again] == ["track"]


async def test_without_watched_rules_silent_customers_get_no_checks(redis_client: aioredis.Redis,
                                                                    tmp_path: Path) -> None:
    service = new_service(redis_client, tmp_path)
    await service.score_touchpoints([ResolvedInput(0, "quiet", purchase("m1", 0))])
    records = await service.score_touchpoints([ResolvedInput(0, "busy", purchase("m2", 300))])
    assert [r["customer_id"] for r in records] == ["busy"]
    assert await service.store.due_ticks({0: 10_000 * DAY_MS}) == {0: []}


async def test_forecasts_read_states_as_of_a_time(redis_client: aioredis.Redis, tmp_path: Path) -> None:
    service = new_service(redis_client, tmp_path)
    batch = [ResolvedInput(0, "c1", purchase("m1", 0)), ResolvedInput(1, "c2", purchase("m2", 3))]
    await service.score_touchpoints(batch)
    forecasts = await service.forecasts(["c1", "c2", "absent"], 100 * DAY_MS, 273)
    assert set(forecasts) == {"c1", "c2"}
    assert forecasts["c1"].horizon_days == 273 and 0 < forecasts["c1"].propensity < 1
    states, _ = await service.store.load(["c1"])
    single = service.engine.forecast(states["c1"], 100 * DAY_MS, 273)
    assert abs(single.propensity - forecasts["c1"].propensity) < 1e-12



async def test_a_tampered_or_unsigned_checkpoint_in_redis_is_never_unpickled(redis_client: aioredis.Redis,
                                                                            tmp_path: Path) -> None:
    store = (await checkpointed_service(redis_client, tmp_path))[0].store
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
        restarted = new_service(redis_client, tmp_path)
        await restarted.restore_model()
        assert unpickled == [], "the planted checkpoint was unpickled"
        assert restarted.engine.learner.model.version == "logreg-v3-n0"  # a fresh model instead
        assert refused_checkpoints(restarted, reason) == 1
        assert await redis_client.get(store.refused_model_key) == planted  # kept for whoever investigates
        # Scoring goes on, and its next checkpoint is signed again.
        await restarted.score_touchpoints([ResolvedInput(0, "c3", purchase(f"m-{reason}", 101))])
        await restarted.checkpoint()
        again = new_service(redis_client, tmp_path)
        await again.restore_model()
        assert refused_checkpoints(again, reason) == 0
    assert unpickled == []


async def test_a_checkpoint_signed_with_another_key_is_not_restored(redis_client: aioredis.Redis,
                                                                    tmp_path: Path) -> None:
    _, learned = await checkpointed_service(redis_client, tmp_path)
    rotated = new_service(redis_client, tmp_path, checkpoint_key="the-key-after-a-rotation")
    await rotated.restore_model()
    assert rotated.engine.learner.model.version == "logreg-v3-n0"
    assert refused_checkpoints(rotated, "bad_signature") == 1
    same_key = new_service(redis_client, tmp_path)
    await same_key.restore_model()
    assert same_key.engine.learner.model.version == f"logreg-v3-n{learned}"


async def test_an_event_stamped_in_2099_matures_no_label_and_passes_no_check_early(
        redis_client: aioredis.Redis, tmp_path: Path) -> None:
    service = new_service(redis_client, tmp_path)
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
    assert counted("crossing_checks") == 0
    assert counted("events_late") == 0
    _, watermarks = await service.store.load([], [0])
    assert watermarks[0] <= time.time() * 1000 + 300_000
    assert counted("events_ahead") == 1


async def test_an_erased_customer_stays_erased_for_a_restarted_worker_that_reads_its_records_again(
        redis_client: aioredis.Redis, tmp_path: Path) -> None:
    history = [ResolvedInput(0, "ann", purchase("m1", 1)), ResolvedInput(1, "ann_old", purchase("m2", 1)),
               ResolvedInput(0, "bob", purchase("m3", 1))]
    first = new_service(redis_client, tmp_path)
    await first.score_touchpoints(history)
    await first.forget_customers(["ann", "ann_old"], range(2))

    restarted = new_service(redis_client, tmp_path)  # a new process: nothing in memory
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


async def test_batch_schedules_and_matured_members_answer_in_one_round_trip_each(redis_client: aioredis.Redis) -> None:
    store = RedisScoringStore(redis_client, f"{PREFIX}:rt")
    changes = StateChanges(watermarks={0: 0, 1: 0})
    changes.schedule_tick(0, "c_ann", 50)
    changes.schedule_tick(1, "c_bob", 70)
    changes.schedule_tick(1, "c_cid", 900)
    changes.schedule_silent(1, "c_bob", 80, np.zeros(len(PATH_FIELDS)))
    changes.add_due(1, "c_bob", 10, 60)
    assert await store.save(changes, count_pending=[0, 1]) == {0: 0, 1: 1}
    await store.erased.add(["c_cid"])
    found = await store.batch_schedules({0: ["c_ann"], 1: ["c_bob", "c_cid"]}, {0: 100, 1: 100})
    assert found.erased == {"c_cid"}
    assert found.checks == {0: [("c_ann", 50)], 1: [("c_bob", 70)]}
    assert found.silent_next == {"c_bob": 80}
    matured = await store.matured_members({0: 100, 1: 100}, {1: 79})
    assert matured.due == {0: [], 1: ["c_bob|10"]} and matured.silent == {1: []}
    assert (await store.matured_members({1: 59}, {1: 80})).silent == {1: [("c_bob", 80)]}
