"""Console benchmarks: what the read model costs per record and per customer, and page server times.

1. Read-model cost (default on): the embedded broker (Apache Kafka) and Valkey, and a real console worker
   (`python -m services.console`) fed what the pipeline benchmark's events put on the console's topics
   (per event: a resolved purchase, its score with every model feature, the action it fires and how that
   action's delivery ended). Measured: CPU seconds of the worker and of Redis (from /proc) per record and
   per event, and Redis memory per customer (INFO used_memory before and after, the Redis emptied
   first), keys per customer. With `--baseline DIR` (another source tree, e.g. the commit before a
   change: `git archive <commit> | tar -x -C DIR`) both trees run on the same records, alternating, so
   the machine's load falls on both alike; each tree consumes the topics its own code knows.
2. Pages: 10,000 customers by default (5 touchpoints and 5 scores each) and one customer with 1,000 touchpoints,
   1,000 scores and 20 actions (a tenth of the customers with an action of the rule too) loaded through
   `ReadModelStore.apply` in batches of 500 (the store-only
   update rate), then GET /customers/<heavy customer>, /overview and /rules timed: server time (handler
   start to response ready) and loopback round trip.
3. Against the pipeline (default on): the whole stack, events pushed through ingest at the pipeline's own
   maximum rate; how far the console's read model lags the pipeline and how fast it catches up.

Prints JSON (with the load average before and after). `.venv/bin/python bench/bench_console.py
[--cost-customers 20000] [--cost-events-per-customer 1] [--rounds 2] [--baseline DIR] [--customers 10000]
[--requests 500] [--pipeline-events 3000]`; issue 21's target (overview p99 server time <= 50 ms with 100k
customers): `--customers 100000 --cost-customers 0 --pipeline-events 0`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import pickle
import re
import statistics
import subprocess
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
from proc_cpu import process_cpu_s

from services.console.app import READ_MODEL_UPDATES_TOTAL
from services.console.readmodel import ActionTaken, ScoreUpdated, TouchpointSeen
from services.console.settings import ConsoleSettings
from services.console.store import ReadModelStore, Update
from services.console.web import ConsoleWeb
from services.identity.admin import hash_admin_key
from services.scoring.features import MODEL_FEATURES
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
from touchstream.metrics import batch_size_events, consumer_lag_messages, events_in_total
from touchstream.replay import sum_metric
from touchstream.topics import ACTION_DELIVERIES, ACTIONS, SCORES, TOUCHPOINTS_RESOLVED

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
FEATURE_NAMES = MODEL_FEATURES


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
        if c % 10 == 0:  # a tenth of them with an action of the rule, over 60 days: the rules page's charts
            updates.append(ActionTaken(f"a-{cid}", "churn-high", cid, ("fired", "held_out", "suppressed")[c % 3],
                                       "cooldown" if c % 3 == 2 else None, "marketing",
                                       T0 + (c % 60) * 86_400_000, T0))
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
    pages = ConsoleWeb(store, store.client, settings, RULES, recorder)  # type: ignore[arg-type]
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
        for name, path, count in (("customer", "/customers/c_heavy", requests), ("overview", "/overview", requests),
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


def resolved_record(cid: str, n: int) -> dict[str, Any]:
    """A resolved purchase, as identity writes it for the pipeline benchmark's events."""
    t_ms = T0 + n * 60_000
    return {"customer_id": cid, "resolved_at_ms": t_ms, "event": {
        "message_id": f"{cid}-m{n}", "type": "track", "event": "Order Completed", "channel": "web",
        "source": "bench", "timestamp_ms": t_ms, "received_at_ms": t_ms,
        "identifiers": [{"type": "user_id", "value": hashlib.sha256(cid.encode()).hexdigest()}],
        "order": {"order_id": None, "amount": 10.0 + n % 50, "currency": "USD", "items": []},
        "feedback": None, "consent": [], "properties_json": None}}


def score_record(cid: str, n: int) -> dict[str, Any]:
    """A score as scoring writes it: every model feature, three reasons."""
    t_ms = T0 + n * 60_000
    risk = 0.3 + (n % 50) / 100
    return {"customer_id": cid, "message_id": f"{cid}-m{n}", "event_time_ms": t_ms, "received_at_ms": t_ms,
            "churn_risk": risk, "purchase_propensity": 1 - risk, "segment": ("new", "loyal", "at_risk")[n % 3],
            "stage": ("active", "lapsing")[n % 2], "model_version": "river-logreg-v1:1234",
            "reasons": [{"feature": f, "contribution": c} for f, c in REASONS],
            "features": {name: float(n % 7) / 3 for name in FEATURE_NAMES}, "event_type": "track",
            "event_name": "Order Completed", "consent": [], "channel": "web", "time_zone": None}


def action_record(cid: str, n: int) -> dict[str, Any]:
    t_ms = T0 + n * 60_000
    return {"action_id": f"act_{hashlib.sha256(f'{cid}{n}'.encode()).hexdigest()[:32]}", "rule_id": "bench-first-score",
            "customer_id": cid, "outcome": "fired", "reason": None, "endpoint": "marketing",
            "payload_json": '{"type":"retention.action"}', "event_time_ms": t_ms, "received_at_ms": t_ms,
            "created_at_ms": t_ms + 30}


def delivery_record(action: dict[str, Any]) -> dict[str, Any]:
    return {key: action[key] for key in ("action_id", "rule_id", "customer_id", "endpoint", "event_time_ms",
                                         "received_at_ms", "created_at_ms")} | {
        "outcome": "delivered", "attempts": 1, "status": 204, "reason": None,
        "ended_at_ms": action["created_at_ms"] + 90}


def pipeline_records(customers: int, events_per_customer: int) -> list[tuple[str, str, bytes]]:
    """What the pipeline benchmark's events put on the console's topics: per event a resolved purchase, its
    score, the action it fires and how that action's delivery ended; customers interleaved, as they arrive.

    Actions are written as RetentionAction v1 (a `fired` one reads the same in every version), so a baseline
    tree from before v2 reads them too.
    """
    codec = avro.load_codec(use_versions={ACTIONS.schema: 1})
    records = []
    for n in range(events_per_customer):
        for c in range(customers):
            cid = f"c_{hashlib.sha256(str(c).encode()).hexdigest()[:16]}"
            action = action_record(cid, n)
            for spec, value in ((TOUCHPOINTS_RESOLVED, resolved_record(cid, n)), (SCORES, score_record(cid, n)),
                                (ACTIONS, action), (ACTION_DELIVERIES, delivery_record(action))):
                records.append((spec.name, cid, codec.encode(spec.schema, value)))
    return records


def consumed_topics(source: Path) -> set[str]:
    """The topics the console worker of the source tree at `source` consumes (asked of that tree's code)."""
    probe = "from services.console.app import CONSUMED; print(' '.join(spec.name for spec in CONSUMED))"
    answer = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=source,
                            env={**os.environ, "PYTHONPATH": str(source)})
    return set(answer.stdout.split())


async def produce(bootstrap: str, records: list[tuple[str, str, bytes]], events_per_s: float) -> None:
    """Send `records` (four per event), all at once (`events_per_s` 0) or an event at a time at that rate."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5 if not events_per_s else 0,
                                max_batch_size=256 * 1024)
    await producer.start()
    try:
        started = time.perf_counter()
        for n, (topic, key, value) in enumerate(records):
            if events_per_s and n % 4 == 0:
                await asyncio.sleep(max(0.0, started + n / 4 / events_per_s - time.perf_counter()))
            await producer.send(topic, value, key=key.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def read_model_cost(source: Path, records: list[tuple[str, str, bytes]], customers: int, events_per_s: float,
                          bootstrap: str, kind: str, redis_port: int, tmp: Path) -> dict[str, Any]:
    """Run the console worker of the tree at `source` over `records` into an empty Redis and measure what the read
    model costs: CPU of the worker and of Redis per record, and Redis memory (INFO used_memory delta) per customer."""
    topics = consumed_topics(source)
    mine = [r for r in records if r[0] in topics]
    expected = {topic: sum(1 for r in mine if r[0] == topic) for topic in topics}
    redis = aioredis.from_url(f"redis://127.0.0.1:{redis_port}/1")
    await redis.execute_command("FLUSHALL", "SYNC")  # freed before the memory is read, not lazily
    redis_pid = int((await redis.info("server"))["process_id"])
    web_port = free_port()
    # `latest`: a topic this group never committed on (one the previous tree did not consume) starts at the
    # end, so every run reads exactly the records produced for it.
    env = {"PYTHONPATH": str(source), "TOUCHSTREAM_KAFKA_BOOTSTRAP": bootstrap, **broker_client_env(kind),
           "TOUCHSTREAM_AUTO_OFFSET_RESET": "latest",
           "TOUCHSTREAM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/1", "TOUCHSTREAM_PARTITIONS": "2",
           "TOUCHSTREAM_STATE_DIR": str(tmp / "state"), "TOUCHSTREAM_CONSOLE_WEB_PORT": str(web_port)}
    # The source tree first on the path, ahead of the working directory (which `-m` would put first).
    run_tree = (f"import runpy, sys; sys.path.insert(0, {str(source)!r}); "
                "runpy.run_module('services.console', run_name='__main__', alter_sys=True)")
    worker = spawn("console", [sys.executable, "-c", run_tree], tmp / f"console-{source.name}.log", env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{web_port}") as http:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert worker.alive(), f"console worker of {source} exited; see its log"
                assert time.monotonic() < deadline, "console worker not ready; see its log"
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)  # let the start-up settle before the counters are read
            memory_before = int((await redis.info("memory"))["used_memory"])
            worker_cpu, redis_cpu = process_cpu_s(worker.pid), process_cpu_s(redis_pid)
            started = time.perf_counter()
            await produce(bootstrap, records, events_per_s)
            deadline = time.monotonic() + 900
            while True:
                text = (await http.get("/metrics")).text
                seen = {topic: sum_metric(text, events_in_total("console"), topic=topic) for topic in topics}
                lag = sum_metric(text, consumer_lag_messages("console"))
                if all(seen[t] >= expected[t] for t in topics) and lag == 0:
                    break
                assert worker.alive(), f"console worker of {source} exited; see its log"
                assert time.monotonic() < deadline, f"the worker of {source} applied {seen} of {expected}"
                await asyncio.sleep(0.1)
            elapsed = time.perf_counter() - started
            worker_cpu, redis_cpu = process_cpu_s(worker.pid) - worker_cpu, process_cpu_s(redis_pid) - redis_cpu
            memory = int((await redis.info("memory"))["used_memory"]) - memory_before
            keys = int(await redis.dbsize())
            batches = sum_metric(text, batch_size_events("console") + "_count")
    finally:
        worker.stop()
        await redis.aclose()
    events = len(records) // 4
    return {
        "source": "this tree" if source == REPO else "baseline", "offered_events_per_s": events_per_s or "all at once",
        "topics_consumed": len(topics),
        "records_applied": len(mine), "seconds": round(elapsed, 2), "records_per_s": round(len(mine) / elapsed),
        "batches": int(batches), "mean_batch": round(len(mine) / max(batches, 1), 1),
        "worker_cpu_s": round(worker_cpu, 2), "worker_cpu_us_per_record": round(1e6 * worker_cpu / len(mine)),
        "worker_cpu_us_per_event": round(1e6 * worker_cpu / events),
        "redis_cpu_us_per_event": round(1e6 * redis_cpu / events),
        "redis_bytes_per_customer": round(memory / customers), "redis_keys_per_customer": round(keys / customers, 2),
    }


def handler_costs(sources: list[Path], records: list[tuple[str, str, bytes]], batches: list[int], rounds: int,
                  redis_port: int, tmp: Path) -> dict[str, Any]:
    """The read model's own cost per event at fixed batch sizes (bench/console_handler_probe.py, in-process: no
    broker, no kernel), each tree alternating round by round; medians."""
    pickled = tmp / "records.pickle"
    pickled.write_bytes(pickle.dumps(records))
    events = len(records) // 4
    found: dict[str, list[dict[str, Any]]] = {}
    for batch in batches:
        for _ in range(rounds):
            for source in sources:
                answer = subprocess.run(
                    [sys.executable, str(REPO / "bench" / "console_handler_probe.py"), str(source), str(pickled),
                     str(batch), f"redis://127.0.0.1:{redis_port}/2"],
                    capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(source)})
                assert answer.returncode == 0, f"the handler probe of {source} failed: {answer.stderr[-2000:]}"
                run = json.loads(answer.stdout.splitlines()[-1])
                found.setdefault(f"{'this tree' if source == REPO else 'baseline'}, batches of {batch} records",
                                 []).append(run)
    return {case: {
        "records_per_event": round(runs[0]["records"] / events, 2),
        "cpu_us_per_event": round(statistics.median(1e6 * r["cpu_s"] / events for r in runs)),
        "redis_cpu_us_per_event": round(statistics.median(1e6 * r["redis_cpu_s"] / events for r in runs)),
        "redis_bytes_per_customer": round(statistics.median(r["redis_bytes"] for r in runs) / (events or 1)),
        "redis_keys": runs[0]["redis_keys"], "runs": len(runs)} for case, runs in found.items()}


async def compare_read_models(sources: list[Path], customers: int, events_per_customer: int, rates: list[float],
                              rounds: int, tmp: Path) -> dict[str, Any]:
    """Measure each source tree's read model on the same records, alternating trees round by round, so a change
    in the machine's load falls on both alike; one broker and one Redis for every run."""
    kind = embedded_broker_kind()
    broker_port = free_port()
    broker = start_broker(kind, broker_port, tmp / "kafka", tmp / "broker.log")
    redis_port = free_port()
    valkey = start_valkey(redis_port, tmp / "valkey-cost.log")
    bootstrap = f"127.0.0.1:{broker_port}"
    records = pipeline_records(customers, events_per_customer)
    runs: list[dict[str, Any]] = []
    try:
        handler = await asyncio.to_thread(handler_costs, sources, records, [4, 40, 400], rounds, redis_port, tmp)
        await create_topics(bootstrap, 2)
        for rate in rates:
            for round_number in range(rounds):
                for source in sources:
                    # A new copy of the records each run: the worker's group starts from the committed end.
                    run = await read_model_cost(source, records, customers, rate, bootstrap, kind, redis_port, tmp)
                    runs.append({"round": round_number + 1, **run})
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    finally:
        valkey.stop()
        broker.stop()
    by_case: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_case.setdefault(f"{run['source']}, {run['offered_events_per_s']} events/s", []).append(run)
    summary = {case: {key: statistics.median(r[key] for r in rs) for key in (
        "worker_cpu_us_per_record", "worker_cpu_us_per_event", "redis_cpu_us_per_event", "redis_bytes_per_customer",
        "redis_keys_per_customer", "records_per_s", "mean_batch")} for case, rs in by_case.items()}
    return {"customers": customers, "events_per_customer": events_per_customer,
            "records_per_event": "touchpoint, score, action, delivery outcome (a tree consumes those it knows)",
            "rounds": rounds, "handler_in_process": handler, "worker_median": summary, "worker_runs": runs}


def console_updates(state: Any) -> float:
    text = httpx.get(f"{state.url('console')}/metrics", timeout=10).text
    return sum_metric(text, READ_MODEL_UPDATES_TOTAL)


def pipeline_lag(events: int) -> dict[str, Any]:
    """Run the whole stack (console included), push `events` through ingest as fast as it takes them, and
    compare: when the pipeline's last webhook arrives, how far behind is the read model, and how long until
    it has caught up. Every event makes three console records (resolved touchpoint, score, action)."""
    import bench_pipeline  # the pipeline benchmark's event shape, rule and ingest client

    from touchstream_cli import local

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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=10_000, help="customers loaded for the page timings")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--cost-customers", type=int, default=20_000,
                        help="customers of the read-model cost part (0 skips it)")
    parser.add_argument("--cost-events-per-customer", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each tree in the cost part, alternating")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 200.0],
                        help="events/s offered in the cost part; 0: all at once (large batches)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another source tree (e.g. `git archive <commit>` unpacked) measured in the same run")
    parser.add_argument("--pipeline-events", type=int, default=3_000, help="0 skips the whole-stack part")
    args = parser.parse_args()
    load_before = os.getloadavg()
    cost = None
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        if args.cost_customers:
            sources = ([args.baseline.resolve()] if args.baseline else []) + [REPO]
            cost = await compare_read_models(sources, args.cost_customers, args.cost_events_per_customer,
                                             args.rates, args.rounds, tmp)
        port = free_port()
        valkey = start_valkey(port, tmp / "valkey.log")
        try:
            client = aioredis.from_url(f"redis://127.0.0.1:{port}/0")
            store = ReadModelStore(client)
            loaded = await load(store, args.customers, args.batch)
            pages = await time_pages(store, args.requests)
            memory = (await client.info("memory"))["used_memory"]
            await client.aclose()
        finally:
            valkey.stop()
    # local.up runs its own event loop, so the whole-stack part runs outside this one, in a thread.
    lag = await asyncio.to_thread(pipeline_lag, args.pipeline_events) if args.pipeline_events else None
    print(json.dumps({
        "bench": "console", "cpus": os.cpu_count(), "command": " ".join(["bench/bench_console.py", *sys.argv[1:]]),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "read_model_cost": cost,
        "customers": args.customers + 1, "heavy_customer": {"touchpoints": 1000, "scores": 1000, "actions": 20},
        "store_update_rate": loaded, "redis_used_memory_mb": round(memory / 1e6, 1),
        "pages": pages,
        # Issue 21: the overview stays fast with 100k customers in the read model.
        "overview_server_ms_p99": pages["overview"]["server_ms_p99"], "overview_server_ms_p99_target": 50,
        "overview_target_met": pages["overview"]["server_ms_p99"] <= 50 and args.customers + 1 >= 100_000,
        "against_the_pipeline": lag,
    }, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
