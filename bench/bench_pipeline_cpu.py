"""CPU cost per event of each stage, on the stack `touchstream local up` starts.

Sends N events through ingest's /v1/batch, waits until triggers has consumed every score,
and reads each service's own `process_cpu_seconds_total` before and after. CPU-seconds per
event is what sizes a deployment (workers per stage = target rate x CPU per event / cores per
worker); the wall-clock rates are printed too but on a small machine all stages, the broker
and Redis share the same cores, so they are a floor, not a per-worker figure.

    .venv/bin/python bench/bench_pipeline_cpu.py [--events 20000] [--batch 500] [--partitions 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import redis

from touchstream.metrics import events_in_total, events_out_total
from touchstream.topics import SCORES, TOUCHPOINTS_RAW, TOUCHPOINTS_RESOLVED
from touchstream_cli import local

COUNTERS = {
    "ingest": f'{events_out_total("ingest")}{{topic="{TOUCHPOINTS_RAW.name}"}}',
    "identity": f'{events_in_total("identity")}{{topic="{TOUCHPOINTS_RAW.name}"}}',
    "scoring": f'{events_in_total("scoring")}{{topic="{TOUCHPOINTS_RESOLVED.name}"}}',
    "triggers": f'{events_in_total("triggers")}{{topic="{SCORES.name}"}}',
}


def sample(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(match[1]) if match else 0.0


def scrape(state: local.StackState) -> dict[str, dict[str, float]]:
    info = redis.Redis(port=state.ports["redis"]).info("cpu")
    result = {"redis": {"cpu": info["used_cpu_sys"] + info["used_cpu_user"], "events": 0.0}}
    for name in COUNTERS:
        text = httpx.get(f"{state.url(name)}/metrics", timeout=10).text
        result[name] = {"cpu": sample(text, "process_cpu_seconds_total"), "events": sample(text, COUNTERS[name])}
    return result


def make_batch(run: str, start: int, size: int) -> dict[str, Any]:
    """Events of ~size/3 customers: each has an e-mail and a device; a third of the events are purchases."""
    events = []
    for i in range(start, start + size):
        customer = i // 3
        event: dict[str, Any] = {
            "type": "track", "event": "Order Completed" if i % 3 == 0 else "Product Viewed",
            "userId": f"{run}-u{customer}", "email": f"{run}.{customer}@example.com",
            "messageId": f"{run}-m{i}", "timestamp": f"2026-{1 + i % 10:02d}-{1 + i % 27:02d}T10:00:00Z",
            "context": {"device": {"id": f"{run}-d{customer}"}},
        }
        if i % 3 == 0:
            event["order"] = {"amount": 20.0 + i % 50, "currency": "EUR"}
        events.append(event)
    return {"batch": events}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="5000 events")
    args = parser.parse_args()
    if args.quick:
        args.events = 5000
    run = uuid.uuid4().hex[:6]
    with tempfile.TemporaryDirectory() as tmp:
        # The events are stamped in early 2026: acted on however old (backfill horizon off), as the measure needs.
        state = local.up(Path(tmp), partitions=args.partitions, progress=False,
                         env_overrides={"TOUCHSTREAM_TRIGGERS_BACKFILL_HORIZON_HOURS": "0"})
        try:
            before = scrape(state)
            started = time.perf_counter()

            def post(start: int) -> None:
                response = httpx.post(f"{state.url('ingest')}/v1/batch", auth=(state.write_key, ""), timeout=60,
                                      json=make_batch(run, start, args.batch))
                response.raise_for_status()

            with ThreadPoolExecutor(4) as pool:
                list(pool.map(post, range(0, args.events, args.batch)))
            ingested = time.perf_counter() - started
            deadline = time.monotonic() + 600
            done: dict[str, float] = {}
            while len(done) < len(COUNTERS) and time.monotonic() < deadline:
                now = scrape(state)
                for name in COUNTERS:
                    if name not in done and now[name]["events"] - before[name]["events"] >= args.events:
                        done[name] = time.perf_counter() - started
                time.sleep(0.2)
            after = scrape(state)
        finally:
            local.down(Path(tmp))
    stages = {}
    for name in COUNTERS:
        count = after[name]["events"] - before[name]["events"]
        cpu = after[name]["cpu"] - before[name]["cpu"]
        stages[name] = {
            "events": int(count),
            "cpu_us_per_event": round(cpu / max(count, 1) * 1e6, 1),
            "events_per_cpu_second": round(count / cpu) if cpu else None,
            "done_after_s": round(done[name], 2) if name in done else None,
        }
    redis_cpu = after["redis"]["cpu"] - before["redis"]["cpu"]
    # Every stage's Redis work together (graph script, dedupe, scoring state, trigger state).
    stages["redis"] = {"cpu_us_per_event": round(redis_cpu / args.events * 1e6, 1)}
    finished = len(done) == len(COUNTERS)
    print(json.dumps({"bench": "pipeline_cpu", "events": args.events, "batch": args.batch,
                      "partitions": args.partitions, "ingest_seconds": round(ingested, 2),
                      "pipeline_events_per_s": round(args.events / max(done.values())) if finished else None,
                      "stages": stages}, indent=2))


if __name__ == "__main__":
    main()
