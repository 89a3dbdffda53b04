"""Pipeline throughput and latency, against the raw broker, on the embedded runtime.

Prints JSON:
- raw: an aiokafka relay doing the pipeline's four topic hops (raw -> resolved -> scores ->
  actions -> consumer), one process per hop, no work: the broker's limit for this shape.
- pipeline: events/s end to end, ingest HTTP -> signed webhook at the receiver, with every
  event making exactly one webhook (a new customer per event and a rule that fires on a
  first score above 0.3, which an untrained model's 0.5 risk crosses).
- ratio = pipeline / raw.
- cpu_us_per_event: CPU-seconds per event of every process of the stack (services, broker, Redis,
  receiver) during the throughput run, from /proc; `cpu_bound_events_per_s` is cores / their sum,
  the rate this machine could reach if every stage overlapped perfectly.
- latency: p50/p99 event accepted -> webhook received at 25/50/75% of the measured maximum.
- scale: throughput at 1, 2 and 4 partitions x workers; Redis memory per 100k customers.

Usage: .venv/bin/python bench/bench_pipeline.py [--events N] [--quick]

Without --quick (20k events, then 10k per scale step) it takes ~10-15 minutes on 2 idle cores;
`--events 400` runs every step in ~3 minutes as a smoke test (too few events for its numbers:
idle polling dominates the CPU per event, and the 75% latency level overshoots).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis

from touchstream import local
from touchstream.embedded import broker_description, create_topics, embedded_broker_kind, free_port, start_broker
from touchstream.receiver import percentile
from touchstream.topics import TopicSpec

HOPS = 4
RULES = """
rules:
  - id: bench-first-score
    when: {score: churn_risk, crosses_above: 0.3, rearm_below: 0.2}
    action: {endpoint: marketing, template: {kind: bench}}
    cooldown_hours: 24
    holdout_percent: 0
"""


# ---------------------------------------------------------------- raw relay
def _relay_stage(bootstrap: str, source: str | None, target: str | None, count: int, payload_size: int,
                 started: Any, finished: Any) -> None:
    asyncio.run(_relay(bootstrap, source, target, count, payload_size, started, finished))


async def _relay(bootstrap: str, source: str | None, target: str | None, count: int, payload_size: int,
                 started: Any, finished: Any) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2) if target else None
    consumer = (AIOKafkaConsumer(source, bootstrap_servers=bootstrap, group_id=f"relay-{source}",
                                 auto_offset_reset="earliest", session_timeout_ms=10_000,
                                 heartbeat_interval_ms=1000) if source else None)
    if producer:
        await producer.start()
    if consumer:
        await consumer.start()
    try:
        if source is None:
            assert producer is not None and target is not None
            started.wait()
            value = b"x" * payload_size
            futures = [await producer.send(target, value, key=str(i).encode()) for i in range(count)]
            await asyncio.gather(*futures)
            return
        assert consumer is not None
        seen = 0
        while seen < count:
            batches = await consumer.getmany(timeout_ms=200, max_records=2000)
            futures = []
            for records in batches.values():
                for record in records:
                    seen += 1
                    if producer and target:
                        futures.append(await producer.send(target, record.value, key=record.key))
            if futures:
                await asyncio.gather(*futures)
        if target is None:
            finished.set()
    finally:
        if consumer:
            await consumer.stop()
        if producer:
            await producer.stop()


def raw_relay_rate(count: int, partitions: int, payload_size: int = 300) -> dict[str, Any]:
    """Events/s through HOPS topics with aiokafka only, one process per stage."""
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="touchstream-relay-"))
    broker = start_broker(embedded_broker_kind(), port, data_dir / "kafka", data_dir / "broker.log")
    bootstrap = f"127.0.0.1:{port}"
    try:
        run = uuid.uuid4().hex[:6]
        topics = [f"relay-{run}-{i}" for i in range(HOPS)]
        asyncio.run(create_topics(bootstrap, partitions, [TopicSpec(t, "", "") for t in topics]))
        ctx = multiprocessing.get_context("spawn")
        started, finished = ctx.Event(), ctx.Event()
        stages = [(None, topics[0])] + [(topics[i], topics[i + 1]) for i in range(HOPS - 1)] + [(topics[-1], None)]
        processes = [ctx.Process(target=_relay_stage, args=(bootstrap, s, t, count, payload_size, started, finished))
                     for s, t in stages]
        for process in processes:
            process.start()
        time.sleep(8.0)  # every stage has joined its group and fetched once
        t0 = time.perf_counter()
        started.set()
        if not finished.wait(600):
            raise TimeoutError("raw relay did not finish in 600 s")
        elapsed = time.perf_counter() - t0
        for process in processes:
            process.join(30)
        return {"events": count, "hops": HOPS, "seconds": round(elapsed, 2), "events_per_s": round(count / elapsed, 1)}
    finally:
        broker.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


# ---------------------------------------------------------------- pipeline
def track_call(run: str, index: int) -> dict[str, Any]:
    return {"type": "track", "event": "Order Completed", "userId": f"bench-{run}-{index}",
            "messageId": f"bench-{run}-{index}", "order": {"amount": 10.0 + index % 50}}


async def post_events(state: local.StackState, calls: list[dict[str, Any]], rate: float | None,
                      batch_size: int = 100, concurrency: int = 4) -> float:
    """POST `calls` in batches, as fast as possible or at `rate` events/s; return seconds taken."""
    semaphore = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=60) as client:

        async def post(batch: list[dict[str, Any]]) -> None:
            async with semaphore:
                response = await client.post(f"{state.url('ingest')}/v1/batch", json={"batch": batch},
                                             auth=(state.write_key, ""))
                response.raise_for_status()

        tasks = []
        for start in range(0, len(calls), batch_size):
            if rate:
                due = t0 + start / rate
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(post(calls[start:start + batch_size])))
            if not rate:
                pending = [t for t in tasks[-concurrency:] if not t.done()]
                if len(pending) >= concurrency:
                    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*tasks)
    return time.perf_counter() - t0


def process_cpu_s(pid: int) -> float:
    """Return the user + system CPU seconds `pid` has used (Linux /proc; 0 where it is not readable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stack_cpu_s(state: local.StackState) -> dict[str, float]:
    """Return CPU seconds per component of the stack; a service's extra workers count under its name."""
    totals: dict[str, float] = {}
    for name, pid in state.pids.items():
        component = name.rsplit("-", 1)[0] if name[-1].isdigit() else name
        totals[component] = totals.get(component, 0.0) + process_cpu_s(pid)
    return totals


def receiver_stats(state: local.StackState) -> dict[str, Any]:
    return httpx.get(f"{state.url('receiver')}/stats", timeout=10).json()


def wait_for_webhooks(state: local.StackState, target: int, timeout: float = 900) -> float:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if receiver_stats(state)["unique"] >= target:
            return time.perf_counter()
        time.sleep(0.1)  # /stats sorts every latency so far: polling it costs the receiver CPU
    raise TimeoutError(f"only {receiver_stats(state)['unique']} of {target} webhooks after {timeout}s")


def latencies_since(state: local.StackState, first_index: int) -> list[float]:
    deliveries = httpx.get(f"{state.url('receiver')}/deliveries", params={"limit": 1_000_000}, timeout=60).json()
    return sorted((d["arrived_at_ms"] - d["body"]["received_at_ms"]) / 1000 for d in deliveries[first_index:])


def pipeline_run(events: int, partitions: int, workers: int, latency_levels: tuple[float, ...] = (),
                 latency_seconds: float = 10.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="touchstream-bench-") as tmp:
        run_dir = Path(tmp)
        (run_dir / "rules.yaml").write_text(RULES)
        state = local.up(run_dir, partitions=partitions, workers=workers, progress=False,
                         env_overrides={"TOUCHSTREAM_TRIGGERS_RULES_FILE": str(run_dir / "rules.yaml")})
        try:
            rds = redis.Redis.from_url(state.redis_url)
            memory_before = int(rds.info("memory")["used_memory"])
            # Warm up: first batches pay for connections, script loads and JIT-less imports.
            warm = [track_call("warm", i) for i in range(200)]
            asyncio.run(post_events(state, warm, None))
            wait_for_webhooks(state, len(warm))
            run = uuid.uuid4().hex[:6]
            calls = [track_call(run, i) for i in range(events)]
            cpu_before = stack_cpu_s(state)
            t0 = time.perf_counter()
            post_s = asyncio.run(post_events(state, calls, None))
            t_end = wait_for_webhooks(state, len(warm) + events)
            elapsed = t_end - t0
            cpu_after = stack_cpu_s(state)
            result: dict[str, Any] = {
                "partitions": partitions, "workers_per_service": workers, "events": events,
                "seconds": round(elapsed, 2), "events_per_s": round(events / elapsed, 1),
                "ingest_accept_events_per_s": round(events / post_s, 1),
            }
            cpu_per_event = {name: round((cpu_after[name] - cpu_before.get(name, 0.0)) / events * 1e6)
                             for name in cpu_after}
            result["cpu_us_per_event"] = {**cpu_per_event, "total": sum(cpu_per_event.values())}
            if sum(cpu_per_event.values()):
                cores = os.cpu_count() or 1
                result["cpu_bound_events_per_s"] = round(cores * 1e6 / sum(cpu_per_event.values()), 1)
            customers = len(warm) + events
            memory_after = int(rds.info("memory")["used_memory"])
            result["redis_bytes_per_100k_customers"] = int((memory_after - memory_before) / customers * 100_000)
            max_rate = events / elapsed
            levels = []
            for level in latency_levels:
                rate = max_rate * level
                count = max(100, int(rate * latency_seconds))
                first = receiver_stats(state)["unique"]
                phase_calls = [track_call(f"{run}-l{int(level * 100)}", i) for i in range(count)]
                asyncio.run(post_events(state, phase_calls, rate, batch_size=20))
                wait_for_webhooks(state, first + count)
                lat = latencies_since(state, first)
                levels.append({"load": level, "events_per_s": round(rate, 1), "events": count,
                               "p50_ms": round((percentile(lat, 0.5) or 0) * 1000, 1),
                               "p99_ms": round((percentile(lat, 0.99) or 0) * 1000, 1)})
            if levels:
                result["latency"] = levels
            stats = receiver_stats(state)
            result["webhook_duplicates"] = stats["duplicates"]
            result["bad_signatures"] = stats["rejected_signatures"]
            return result
        finally:
            local.down(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="fewer events, no scale sweep")
    args = parser.parse_args()
    events = 3_000 if args.quick else args.events
    # At least 20k events for the relay: a few thousand take a fraction of a second, of which
    # the four hops' first fetch waits would be a fifth, understating the broker's rate.
    raw = raw_relay_rate(max(events, 20_000), partitions=4)
    print(json.dumps({"raw_relay": raw}), file=sys.stderr, flush=True)
    main_run = pipeline_run(events, partitions=4, workers=1, latency_levels=(0.25, 0.5, 0.75))
    print(json.dumps({"pipeline": main_run}), file=sys.stderr, flush=True)
    result: dict[str, Any] = {
        "raw_relay": raw,
        "pipeline": main_run,
        "ratio_pipeline_to_raw": round(main_run["events_per_s"] / raw["events_per_s"], 3),
        "cores": multiprocessing.cpu_count(),
        "broker": broker_description(embedded_broker_kind()),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }
    if not args.quick:
        result["scale"] = [pipeline_run(events // 2, partitions=n, workers=n) for n in (1, 2, 4)]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
