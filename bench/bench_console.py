"""Console benchmarks: customer page server time on a loaded read model, and read-model update rate.

Starts an embedded Valkey, loads 10,000 customers (5 touchpoints and 5 scores each) and one
customer with 1,000 touchpoints, 1,000 scores and 20 actions, all through `ReadModelStore.apply`
in batches of 500 as the worker does (that load is the store-only update rate). Then serves the
real pages (aiohttp, as inside the worker) and times GET /customers/<heavy customer>: server time
(handler start to response ready) and loopback round trip. With the worker part (default on), it
also starts the embedded broker (Apache Kafka) and a real console worker
(`python -m services.console`), produces records to its topics and measures how fast the worker
turns them into the read model. Last (default on), it runs the whole stack, pushes events
through ingest at the pipeline's own maximum rate and reports how far the console's read model
lags the pipeline and how fast it catches up.

Prints JSON. `.venv/bin/python bench/bench_console.py [--customers 10000] [--requests 500] [--worker-records 50000]
[--pipeline-events 3000]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaProducer

from services.console.readmodel import ActionTaken, ScoreUpdated, TouchpointSeen
from services.console.settings import ConsoleSettings
from services.console.store import ReadModelStore, Update
from services.console.web import ConsoleWeb
from services.identity.admin import hash_admin_key
from services.triggers.rules import parse_rules
from touchstream import avro
from touchstream.embedded import (
    broker_client_env,
    create_topics,
    embedded_broker_kind,
    free_port,
    spawn,
    start_broker,
    start_valkey,
)
from touchstream.topics import SCORES, TOUCHPOINTS_RESOLVED

REPO = Path(__file__).resolve().parents[1]
KEY = "bench-key"
RULES = parse_rules("""
rules:
  - id: churn-high
    when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.6}
    action: {endpoint: marketing}
""")
T0 = 1_780_000_000_000
REASONS = (("overdue_ratio", 1.1), ("log_purchase_count", -0.3), ("recency_days", 0.2))


def touch(cid: str, n: int) -> TouchpointSeen:
    buy = n % 7 == 0
    return TouchpointSeen(cid, f"{cid}-m{n}", T0 + n * 60_000, "track", "Order Completed" if buy else "Page Viewed",
                          ("web", "app", "wechat", "store_pos")[n % 4], "bench", 25.0 if buy else None,
                          "EUR" if buy else None, None, None, {"page": f"/p/{n}", "campaign": "winter"}, ("email",))


def score(cid: str, n: int) -> ScoreUpdated:
    risk = (n % 100) / 100
    return ScoreUpdated(cid, f"{cid}-m{n}", T0 + n * 60_000, risk, 1 - risk, ("loyal", "at_risk", "new")[n % 3],
                        ("active", "lapsing")[n % 2], "bench-v1", REASONS, {"recency_days": float(n)})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Recorder:
    """Stands in for the page-time histogram and keeps every observation."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}

    def labels(self, page: str) -> Recorder:
        self._page = page
        return self

    def observe(self, value: float) -> None:
        self.seconds.setdefault(self._page, []).append(value)


async def load(store: ReadModelStore, customers: int, batch: int) -> dict[str, Any]:
    updates: list[Update] = []
    for c in range(customers):
        cid = f"c_bench{c:06d}"
        for n in range(5):
            updates.append(touch(cid, n))
            updates.append(score(cid, n))
    heavy = "c_heavy"
    for n in range(1000):
        updates.append(touch(heavy, n))
        updates.append(score(heavy, n))
    for n in range(20):
        updates.append(ActionTaken(f"a{n}", "churn-high", heavy, ("fired", "held_out", "suppressed")[n % 3],
                                   "cooldown" if n % 3 == 2 else None, "marketing", T0 + n * 3_000_000, T0))
    started = time.perf_counter()
    for i in range(0, len(updates), batch):
        await store.apply(updates[i:i + batch])
    elapsed = time.perf_counter() - started
    return {"updates": len(updates), "seconds": round(elapsed, 2), "updates_per_s": round(len(updates) / elapsed),
            "batch": batch}


async def time_pages(store: ReadModelStore, requests: int) -> dict[str, Any]:
    recorder = Recorder()
    settings = ConsoleSettings(admin_keys=frozenset({hash_admin_key(KEY)}))
    pages = ConsoleWeb(store, settings, RULES, recorder)  # type: ignore[arg-type]
    app = web.Application()
    pages.register(app.router)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        form = await (await client.get("/login")).text()  # the login form's CSRF token, as a browser gets it
        token = re.search(r'name="csrf" value="([^"]+)"', form)
        assert token, "no CSRF token on the login form"
        await client.post("/login", data={"key": KEY, "csrf": token.group(1)})
        results: dict[str, Any] = {}
        for name, path, count in (("customer", "/customers/c_heavy", requests), ("overview", "/overview", 30),
                                  ("rules", "/rules", 30)):
            round_trips = []
            for _ in range(count):
                started = time.perf_counter()
                response = await client.get(path)
                body = await response.read()
                round_trips.append(time.perf_counter() - started)
                assert response.status == 200, (path, response.status)
            server = recorder.seconds[name]
            results[name] = {
                "requests": count, "bytes": len(body),
                "server_ms_p50": round(percentile(server, 0.5) * 1000, 2),
                "server_ms_p99": round(percentile(server, 0.99) * 1000, 2),
                "round_trip_ms_p50": round(percentile(round_trips, 0.5) * 1000, 2),
                "round_trip_ms_p99": round(percentile(round_trips, 0.99) * 1000, 2),
            }
        results["customer"]["timeline_shown"] = 200
        results["customer"]["scores_shown"] = 200
        return results
    finally:
        await client.close()


async def worker_rate(records: int, redis_port: int, tmp: Path) -> dict[str, Any]:
    """Produce `records` (half touchpoints, half scores) and time a real console worker through them."""
    broker_port, web_port = free_port(), free_port()
    kind = embedded_broker_kind()
    broker = start_broker(kind, broker_port, tmp / "kafka", tmp / "broker.log")
    bootstrap = f"127.0.0.1:{broker_port}"
    worker = None
    try:
        await create_topics(bootstrap, 2)
        env = {"PYTHONPATH": str(REPO), "TOUCHSTREAM_KAFKA_BOOTSTRAP": bootstrap, **broker_client_env(kind),
               "TOUCHSTREAM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/1", "TOUCHSTREAM_PARTITIONS": "2",
               "TOUCHSTREAM_STATE_DIR": str(tmp / "state"), "TOUCHSTREAM_CONSOLE_WEB_PORT": str(web_port)}
        worker = spawn("console", [sys.executable, "-m", "services.console"], tmp / "console.log", env)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{web_port}") as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "console worker not ready; see its log"
                await asyncio.sleep(0.2)
            encoded = []
            for i in range(records // 2):
                cid = f"c_w{i % 5000:05d}"
                t = touch(cid, i)
                resolved = {"customer_id": cid, "resolved_at_ms": T0, "event": {
                    "message_id": t.message_id, "type": "track", "event": t.name, "channel": t.channel,
                    "source": "bench", "timestamp_ms": t.event_time_ms, "received_at_ms": T0,
                    "identifiers": [{"type": "email", "value": "ab" * 32}],
                    "order": {"order_id": None, "amount": 25.0, "currency": "EUR", "items": []}
                    if t.order_amount else None, "feedback": None, "consent": [],
                    "properties_json": json.dumps({"properties": t.properties})}}
                encoded.append((TOUCHPOINTS_RESOLVED.name, cid, avro.encode(TOUCHPOINTS_RESOLVED.schema, resolved)))
                s = score(cid, i)
                encoded.append((SCORES.name, cid, avro.encode(SCORES.schema, {
                    "customer_id": cid, "message_id": s.message_id, "event_time_ms": s.event_time_ms,
                    "received_at_ms": T0, "churn_risk": s.churn_risk, "purchase_propensity": s.purchase_propensity,
                    "segment": s.segment, "stage": s.stage, "model_version": s.model_version,
                    "reasons": [{"feature": f, "contribution": c} for f, c in s.reasons], "features": s.features})))
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=256 * 1024)
            await producer.start()
            started = time.perf_counter()
            try:
                for topic, key, value in encoded:
                    await producer.send(topic, value, key=key.encode())
                await producer.flush()
            finally:
                await producer.stop()
            produced_s = time.perf_counter() - started
            deadline = time.monotonic() + 600
            applied = 0.0
            while applied < len(encoded):
                assert time.monotonic() < deadline, f"worker applied {applied} of {len(encoded)}"
                text = (await http.get("/metrics")).text
                applied = sum(float(line.split()[-1]) for line in text.splitlines()
                              if line.startswith("touchstream_console_read_model_updates_total"))
                await asyncio.sleep(0.1)
            elapsed = time.perf_counter() - started
            samples = {line.split()[0]: float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith(("touchstream_console_batch_size_events_",
                                           "touchstream_console_batch_duration_"))}
        batches = samples.get("touchstream_console_batch_size_events_count", 0.0)
        return {"records": len(encoded), "produce_seconds": round(produced_s, 2), "seconds": round(elapsed, 2),
                "records_per_s": round(len(encoded) / elapsed), "batches": int(batches),
                "mean_batch": round(samples.get("touchstream_console_batch_size_events_sum", 0.0) / max(batches, 1), 1),
                "mean_batch_ms": round(1000 * samples.get("touchstream_console_batch_duration_seconds_sum", 0.0)
                                       / max(batches, 1), 2),
                "max_batch": 500, "partitions": 2, "workers": 1}
    finally:
        if worker is not None:
            worker.stop()
        broker.stop()


def console_updates(state: Any) -> float:
    text = httpx.get(f"{state.url('console')}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("touchstream_console_read_model_updates_total"))


def pipeline_lag(events: int) -> dict[str, Any]:
    """Run the whole stack (console included), push `events` through ingest as fast as it takes them, and
    compare: when the pipeline's last webhook arrives, how far behind is the read model, and how long until
    it has caught up. Every event makes three console records (resolved touchpoint, score, action)."""
    import bench_pipeline  # the pipeline benchmark's event shape, rule and ingest client

    from touchstream import local

    with tempfile.TemporaryDirectory(prefix="touchstream-bench-console-") as tmp:
        run_dir = Path(tmp)
        (run_dir / "rules.yaml").write_text(bench_pipeline.RULES)
        state = local.up(run_dir, partitions=2, progress=False,
                         env_overrides={"TOUCHSTREAM_TRIGGERS_RULES_FILE": str(run_dir / "rules.yaml")})
        try:
            warm = [bench_pipeline.track_call("warm", i) for i in range(200)]
            asyncio.run(bench_pipeline.post_events(state, warm, None))
            bench_pipeline.wait_for_webhooks(state, len(warm))
            expected = 3 * len(warm)
            while console_updates(state) < expected:
                time.sleep(0.2)
            calls = [bench_pipeline.track_call(uuid.uuid4().hex[:6], i) for i in range(events)]
            t0 = time.perf_counter()
            asyncio.run(bench_pipeline.post_events(state, calls, None))
            pipeline_done = bench_pipeline.wait_for_webhooks(state, len(warm) + events)
            behind = expected + 3 * events - console_updates(state)
            deadline = time.monotonic() + 600
            while console_updates(state) < expected + 3 * events:
                assert time.monotonic() < deadline, "the console never caught up"
                time.sleep(0.1)
            console_done = time.perf_counter()
        finally:
            local.down(run_dir)
    pipeline_s = pipeline_done - t0
    return {"events": events, "partitions": 2, "workers_per_service": 1,
            "pipeline_seconds": round(pipeline_s, 2), "pipeline_events_per_s": round(events / pipeline_s, 1),
            "console_records_behind_at_last_webhook": int(behind),
            "console_caught_up_after_last_webhook_s": round(console_done - pipeline_done, 2),
            "console_records_per_s": round(3 * events / (console_done - t0), 1)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--worker-records", type=int, default=50_000, help="0 skips the worker part")
    parser.add_argument("--pipeline-events", type=int, default=3_000, help="0 skips the whole-stack part")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        port = free_port()
        valkey = start_valkey(port, tmp / "valkey.log")
        try:
            client = aioredis.from_url(f"redis://127.0.0.1:{port}/0")
            store = ReadModelStore(client)
            loaded = await load(store, args.customers, args.batch)
            pages = await time_pages(store, args.requests)
            memory = (await client.info("memory"))["used_memory"]
            await client.aclose()
            worker = await worker_rate(args.worker_records, port, tmp) if args.worker_records else None
        finally:
            valkey.stop()
    # local.up runs its own event loop, so the whole-stack part runs outside this one, in a thread.
    lag = await asyncio.to_thread(pipeline_lag, args.pipeline_events) if args.pipeline_events else None
    print(json.dumps({
        "bench": "console", "cpus": os.cpu_count(), "customers": args.customers + 1,
        "heavy_customer": {"touchpoints": 1000, "scores": 1000, "actions": 20},
        "store_update_rate": loaded, "redis_used_memory_mb": round(memory / 1e6, 1),
        "pages": pages, "worker_update_rate": worker, "against_the_pipeline": lag,
    }, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
