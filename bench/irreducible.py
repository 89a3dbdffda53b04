"""The irreducible CPU of an event: what any implementation of the pipeline's contract must spend.

Four parts, each measured on its own so nothing of the stack's own overhead leaks in:

- `relay_cpu`: an aiokafka relay that moves as many records of the same sizes through the
  same topic hops as the stack did (ingest's produce, identity, scoring, triggers, the
  delivery consumer, the console's read of three topics), acks=all, idempotent producers,
  a commit per batch, no work. CPU of the relay processes and of the broker, from /proc.
- `redis_resolve_cpu`: Redis's CPU per call of identity's resolve script, on a fresh Valkey
  configured as the stack's (append-only file), the workload's events resolved in batches
  through services/identity's IdentityResolver as the worker does.
- `model_learn_predict_cpu`: scoring's PropensityModel (numpy: a BG/NBD prior and a logistic
  hazard) predicting and learning every event of the workload in kernel-sized batches, on the
  silent paths scoring's own state functions make of it.
- `webhook_post_cpu`: client and receiver CPU of one signed POST: services/triggers'
  WebhookSender against touchstream.receiver in a process of its own.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import itertools
import multiprocessing
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import redis.asyncio as aioredis
from proc_cpu import load_average, process_group_cpu_s, process_run_time_s

from services.identity.domain import GraphLayout, answer_slot, prepare_identifiers, resolution_request
from services.identity.graph import IdentityGraph
from services.identity.resolver import EventToResolve, IdentityResolver
from services.identity.settings import IdentitySettings
from services.ingest.segment import to_touchpoint
from services.scoring.features import path_model_inputs, silent_path
from services.scoring.model import PropensityModel
from services.scoring.settings import ScoringSettings
from services.scoring.state import CustomerState, apply_touchpoint, touchpoint_from_record
from services.triggers.settings import WebhookEndpoint
from services.triggers.transport import GuardedClient, WebhookSender
from services.triggers.webhooks import Verdict
from touchstream.embedded import create_topics, free_port, spawn, start_valkey
from touchstream.eventtime import DAY_MS
from touchstream.settings import CoreSettings
from touchstream.topics import TOUCHPOINTS_RAW, TopicSpec

# The stream kernel's batch (CoreSettings.batch_size) and the benchmark's HTTP batch.
CONSUMER_BATCH = 500
PRODUCER_BATCH = 100
LOOPBACK = "127.0.0.0/8"


def touchpoints_of(calls: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turn API calls into TouchpointEvent records exactly as ingest does."""
    received_at_ms = int(time.time() * 1000)
    return [to_touchpoint(call, None, "local", received_at_ms) for call in calls]


# ---------------------------------------------------------------- relay
@dataclass(frozen=True)
class TopicLoad:
    """What one pipeline topic carried per event in the stack: records, mean key and value sizes."""

    topic: str
    records_per_event: Fraction
    key_bytes: int
    value_bytes: int


@dataclass(frozen=True)
class _Stage:
    name: str
    bootstrap: str
    sources: tuple[str, ...]
    target: str | None
    # Records to consume (or, for the first stage, to produce) before the stage is done.
    expected_in: int
    # Records produced per record consumed, exactly: emitted = floor(consumed * ratio).
    ratio: Fraction
    key_bytes: int
    value_bytes: int
    group: str


def _relay_stage(stage: _Stage, ready: Any, go: Any, done: Any, release: Any) -> None:
    asyncio.run(_relay(stage, ready, go, done, release))


async def _relay(stage: _Stage, ready: Any, go: Any, done: Any, release: Any) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.coordinator.assignors.range import RangePartitionAssignor

    # As the stream kernel's clients: acks=all, idempotent, range-assigned, a commit per batch.
    producer = (AIOKafkaProducer(bootstrap_servers=stage.bootstrap, acks="all", enable_idempotence=True)
                if stage.target else None)
    consumer = (AIOKafkaConsumer(*stage.sources, bootstrap_servers=stage.bootstrap, group_id=stage.group,
                                 enable_auto_commit=False, auto_offset_reset="earliest",
                                 max_poll_records=CONSUMER_BATCH, session_timeout_ms=10_000,
                                 heartbeat_interval_ms=1000, partition_assignment_strategy=(RangePartitionAssignor,))
                if stage.sources else None)
    if producer:
        await producer.start()
    if consumer:
        await consumer.start()
    try:
        while consumer is not None and not consumer.assignment():
            await consumer.getmany(timeout_ms=100)
        ready.release()
        # Blocking waits in a thread: the consumer's heartbeats run on this loop meanwhile.
        await asyncio.to_thread(go.wait)
        value = b"v" * stage.value_bytes
        emitted = 0

        async def emit(upto: int) -> None:
            nonlocal emitted
            assert producer is not None and stage.target is not None
            futures = []
            while emitted < upto:
                futures.append(await producer.send(stage.target, value, key=f"{emitted:0{stage.key_bytes}d}".encode()))
                emitted += 1
            await asyncio.gather(*futures)

        if consumer is None:
            for start in range(0, stage.expected_in, PRODUCER_BATCH):
                await emit(min(start + PRODUCER_BATCH, stage.expected_in))
        else:
            seen = 0
            while seen < stage.expected_in:
                batches = await consumer.getmany(timeout_ms=500, max_records=CONSUMER_BATCH)
                if not batches:
                    continue
                seen += sum(len(records) for records in batches.values())
                if producer:
                    await emit(int(seen * stage.ratio))
                await consumer.commit()
        done.release()
        await asyncio.to_thread(release.wait)
    finally:
        if consumer:
            await consumer.stop()
        if producer:
            await producer.stop()


def relay_cpu(bootstrap: str, broker_pid: int, partitions: int, events: int, loads: Sequence[TopicLoad],
              read_model_topics: int = 3, idle_window_s: float = 3.0) -> dict[str, Any]:
    """Relay `events` through the topics of `loads` (in pipeline order) on the broker at `bootstrap`.

    One process per hop, a sink on the last topic, and a reader of the last `read_model_topics`
    topics (the console's read). The broker's CPU over the run, less its idle rate measured
    just before (it also serves the stack's idle consumers), counts towards the relay.
    """
    run = uuid.uuid4().hex[:6]
    topics = [f"relay-{run}-{load.topic}" for load in loads]
    asyncio.run(create_topics(bootstrap, partitions, [TopicSpec(t, "", "") for t in topics]))
    ratios = [after.records_per_event / before.records_per_event for before, after in itertools.pairwise(loads)]
    counts = [events]
    for ratio in ratios:
        counts.append(int(counts[-1] * ratio))
    stages = [_Stage(f"produce {loads[0].topic}", bootstrap, (), topics[0], events, Fraction(1),
                     loads[0].key_bytes, loads[0].value_bytes, "")]
    for i, ratio in enumerate(ratios):
        stages.append(_Stage(f"{loads[i].topic} -> {loads[i + 1].topic}", bootstrap, (topics[i],), topics[i + 1],
                             counts[i], ratio, loads[i + 1].key_bytes, loads[i + 1].value_bytes, f"relay-{run}-{i}"))
    stages.append(_Stage(f"consume {loads[-1].topic}", bootstrap, (topics[-1],), None, counts[-1], Fraction(0), 0, 0,
                         f"relay-{run}-sink"))
    read = slice(len(loads) - read_model_topics, len(loads))
    stages.append(_Stage(f"read model ({', '.join(load.topic for load in loads[read])})", bootstrap,
                         tuple(topics[read]), None, sum(counts[read]), Fraction(0), 0, 0, f"relay-{run}-reader"))

    idle_before = process_group_cpu_s(broker_pid)
    time.sleep(idle_window_s)
    broker_idle_share = (process_group_cpu_s(broker_pid) - idle_before) / idle_window_s

    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Semaphore(0), ctx.Semaphore(0)
    go, release = ctx.Event(), ctx.Event()
    processes = [ctx.Process(target=_relay_stage, args=(stage, ready, go, done, release), daemon=True)
                 for stage in stages]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            if not ready.acquire(timeout=120):
                raise TimeoutError("a relay stage did not join its group in 120 s")
        pids = {stage.name: int(process.pid or 0) for stage, process in zip(stages, processes, strict=True)}
        before = {name: process_run_time_s(pid) for name, pid in pids.items()}
        broker_before = process_group_cpu_s(broker_pid)
        t0 = time.perf_counter()
        go.set()
        for _ in processes:
            if not done.acquire(timeout=600):
                raise TimeoutError("the raw relay did not finish in 600 s")
        elapsed = time.perf_counter() - t0
        after = {name: process_run_time_s(pid) for name, pid in pids.items()}
        broker_s = process_group_cpu_s(broker_pid) - broker_before - broker_idle_share * elapsed
    finally:
        release.set()
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
    cpu = {name: (after[name] - before[name]) / events * 1e6 for name in before}
    cpu["broker"] = max(broker_s, 0.0) / events * 1e6
    return {
        "events": events, "seconds": round(elapsed, 2), "events_per_s": round(events / elapsed, 1),
        "records": dict(zip((load.topic for load in loads), counts, strict=True)),
        "record_bytes": {load.topic: {"key": load.key_bytes, "value": load.value_bytes} for load in loads},
        "broker_idle_cpu_share_subtracted": round(broker_idle_share, 3),
        "cpu_us_per_event": {**{name: round(us, 1) for name, us in cpu.items()}, "total": round(sum(cpu.values()), 1)},
        "load_average": load_average(),
    }


async def topic_record_sizes(bootstrap: str, topics: Sequence[str], partitions: int, per_partition: int = 100,
                             timeout_s: float = 20.0) -> dict[str, Any]:
    """Return the mean key and value size of the latest records of each topic, and how many were read."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    sizes: dict[str, Any] = {}
    try:
        for topic in topics:
            tps = [TopicPartition(topic, p) for p in range(partitions)]
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            starts = await consumer.beginning_offsets(tps)
            left = {tp for tp in tps if ends[tp] > starts[tp]}
            for tp in tps:
                consumer.seek(tp, max(starts[tp], ends[tp] - per_partition))
            keys = values = count = 0
            deadline = time.monotonic() + timeout_s
            while left and time.monotonic() < deadline:
                for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                    for record in records:
                        keys += len(record.key or b"")
                        values += len(record.value or b"")
                        count += 1
                    if records and records[-1].offset + 1 >= ends[tp]:
                        left.discard(tp)
            if count:
                sizes[topic] = {"key": round(keys / count), "value": round(values / count), "sampled": count}
    finally:
        await consumer.stop()
    return sizes


# ---------------------------------------------------------------- Redis: the identity resolve script
async def redis_resolve_cpu(calls: Sequence[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """Resolve `calls` against a fresh Valkey as the identity worker does; return Redis CPU per script call."""
    settings = IdentitySettings()
    hash_key = CoreSettings().pii_hash_key.get_secret_value().encode()
    items = []
    for offset, touchpoint in enumerate(touchpoints_of(calls)):
        prepared = prepare_identifiers(touchpoint["identifiers"], hash_key, settings.default_phone_region,
                                       settings.blocklist)
        # As read from a partition: the answer kept in the partition's hash (the worker drops it after the commit).
        slot = answer_slot(TOUCHPOINTS_RAW.name, 0, offset)
        items.append(EventToResolve(resolution_request(touchpoint, prepared.hashed, slot)))
    work_dir = Path(tempfile.mkdtemp(prefix="touchstream-bench-valkey-"))
    port = free_port()
    # With an append-only file, as the stack's Valkey: every script's writes are logged too.
    valkey = start_valkey(port, work_dir / "valkey.log", work_dir / "data")
    try:
        client = aioredis.from_url(f"redis://127.0.0.1:{port}/0")
        graph = IdentityGraph(client, GraphLayout(settings.graph_key_prefix), settings.graph_rules(),
                              settings.event_ttl_s)
        resolver = IdentityResolver(graph, None, settings.matching)
        await graph.load_script()
        server_before, client_before = process_run_time_s(valkey.pid), time.process_time()
        t0 = time.perf_counter()
        created = 0
        for start in range(0, len(items), batch_size):
            created += sum(r.created for r in await resolver.resolve(items[start:start + batch_size]))
        elapsed = time.perf_counter() - t0
        server_s = process_run_time_s(valkey.pid) - server_before
        client_s = time.process_time() - client_before
        await client.aclose()
    finally:
        valkey.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
    return {"calls": len(items), "batch": batch_size, "customers_created": created, "seconds": round(elapsed, 2),
            "redis_cpu_us_per_call": round(server_s / len(items) * 1e6, 1),
            # The worker's side of the same calls (redis-py, parsing answers): stack overhead, not irreducible.
            "client_cpu_us_per_call": round(client_s / len(items) * 1e6, 1),
            "load_average": load_average()}


# ---------------------------------------------------------------- the model: learn + predict
def _customer_key(call: dict[str, Any]) -> str:
    return str(call.get("userId") or call.get("anonymousId"))


def model_learn_predict_cpu(calls: Sequence[dict[str, Any]], batch_size: int = CONSUMER_BATCH) -> dict[str, Any]:
    """Time scoring's model predicting and learning every event of `calls`, `batch_size` events per call."""
    settings = ScoringSettings()
    horizon_ms = settings.horizon_days * DAY_MS
    touches = [touchpoint_from_record(t) for t in touchpoints_of(calls)]
    keys = [_customer_key(call) for call in calls]
    purchases: dict[str, list[int]] = {}
    for key, touch in zip(keys, touches, strict=True):
        if touch.is_purchase:
            purchases.setdefault(key, []).append(touch.timestamp_ms)
    for times in purchases.values():
        times.sort()
    states: dict[str, CustomerState] = {}
    paths: list[np.ndarray] = []
    labels: list[bool] = []
    for key, touch in zip(keys, touches, strict=True):
        state = states.setdefault(key, CustomerState())
        apply_touchpoint(state, touch)
        later = purchases.get(key, [])
        # The label scoring would learn: a purchase by this customer within the horizon after the event.
        after = bisect.bisect_right(later, touch.timestamp_ms)
        labels.append(after < len(later) and later[after] <= touch.timestamp_ms + horizon_ms)
        paths.append(silent_path(state))
    times_ms = np.array([touch.timestamp_ms for touch in touches], dtype=np.float64)
    all_paths, all_labels = np.stack(paths), np.array(labels, dtype=bool)
    model = PropensityModel(settings.step_days, kind=settings.model, learning_rates=settings.learning_rates)
    started = time.process_time()
    # As scoring does it: one vectorised predict and one learn per batch (numpy, not a River call per event).
    for start in range(0, len(labels), batch_size):
        rows = slice(start, start + batch_size)
        inputs, btyd = path_model_inputs(all_paths[rows], times_ms[rows])
        model.hazards(inputs, btyd)
        model.learn_many(inputs, btyd, all_labels[rows])
    spent = time.process_time() - started
    examples = labels
    return {"events": len(examples), "model": model.version, "batch": batch_size, "positive_share": round(
        sum(examples) / max(len(examples), 1), 3),
        "us_per_event": round(spent / max(len(examples), 1) * 1e6, 1), "load_average": load_average()}


# ---------------------------------------------------------------- one signed webhook
async def webhook_post_cpu(bodies: Sequence[str], posts: int, concurrency: int = 8) -> dict[str, Any]:
    """POST `posts` signed webhooks (bodies taken in turn) to a receiver of their own; CPU of both sides.

    `concurrency` is the delivery loop's requests in flight per endpoint (ActionDelivery's default).
    """
    if not bodies:
        raise ValueError("no webhook bodies to send")
    work_dir = Path(tempfile.mkdtemp(prefix="touchstream-bench-receiver-"))
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    port = free_port()
    # As the stack runs it: the same command, with its journal.
    receiver = spawn("receiver", [sys.executable, "-m", "touchstream_cli", "receiver", "--port", str(port),
                                  "--secret", secret, "--journal", str(work_dir / "journal.jsonl")],
                     work_dir / "receiver.log")
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as probe:
            for _ in range(300):
                try:
                    async with probe.get(f"{url}/readyz") as answer:
                        if answer.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise TimeoutError(f"webhook receiver not ready; see {work_dir / 'receiver.log'}")
        endpoint = WebhookEndpoint(url=f"{url}/hook", secret=secret)
        client = GuardedClient(10.0, allow_networks=[LOOPBACK])
        sender = WebhookSender(client, {"marketing": endpoint})
        semaphore = asyncio.Semaphore(concurrency)
        failures = 0

        async def post(number: int) -> None:
            nonlocal failures
            async with semaphore:
                result = await sender.post("marketing", f"act_bench_{number:08d}", bodies[number % len(bodies)])
                failures += result.verdict != Verdict.DELIVERED

        # The first posts open connections and warm caches, as a running delivery loop has.
        await asyncio.gather(*(post(n) for n in range(50)))
        receiver_before, client_before = process_run_time_s(receiver.pid), time.process_time()
        await asyncio.gather(*(post(n) for n in range(50, 50 + posts)))
        client_s = time.process_time() - client_before
        receiver_s = process_run_time_s(receiver.pid) - receiver_before
        await client.aclose()
    finally:
        receiver.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
    if failures:
        raise RuntimeError(f"{failures} webhook posts were not accepted by the receiver")
    client_us, receiver_us = client_s / posts * 1e6, receiver_s / posts * 1e6
    return {"posts": posts, "concurrency": concurrency,
            "body_bytes_mean": round(sum(len(b) for b in bodies) / len(bodies)),
            "client_cpu_us_per_post": round(client_us, 1), "receiver_cpu_us_per_post": round(receiver_us, 1),
            "us_per_post": round(client_us + receiver_us, 1), "load_average": load_average()}
