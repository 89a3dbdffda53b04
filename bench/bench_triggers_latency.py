"""Event received -> webhook acknowledged latency, at half the pipeline's max sustainable rate.

Starts the whole embedded stack (`touchstream_cli.local.up`: Tansu, Valkey, ingest, identity,
scoring, triggers, a webhook receiver) with a rule that fires once per tracked event, then:
1. capacity: POSTs --events events through ingest as fast as it takes them and times how
   long until the receiver has every webhook: max sustainable rate = events / that time;
2. latency: sends events paced at --load x that rate for --seconds, and reads each
   webhook's latency as the receiver saw it (arrival - ingest's received_at_ms);
3. reports p50/p99 and a histogram (receiver's view), plus p50/p99 from the triggers
   service's own `touchstream_triggers_event_to_webhook_seconds` histogram for the rule
   (the latency run's observations only; bucket-interpolated, so coarser).

Prints JSON. Target: p99 <= 250 ms.

Usage: .venv/bin/python bench/bench_triggers_latency.py [--events 1500] [--load 0.5] [--seconds 20] [--batch 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from touchstream.metrics import EVENT_TO_WEBHOOK_SECONDS, LATENCY_BUCKETS
from touchstream.receiver import percentile
from touchstream_cli import local

RULE_ID = "bench-every-event"
RULES = f"""
rules:
  - id: {RULE_ID}
    when: {{event: {{field: event.type, eq: track}}}}
    action: {{endpoint: marketing, template: {{kind: bench, message: "${{message_id}}"}}}}
"""
TARGET_P99_MS = 250.0


def track_call(run: str, index: int) -> dict[str, Any]:
    # A new customer per event, so identity, scoring and triggers all do their full work.
    return {"type": "track", "event": "Order Completed", "userId": f"lat-{run}-{index}",
            "messageId": f"lat-{run}-{index}", "order": {"amount": 10.0 + index % 50}}


async def post_events(ingest_url: str, write_key: str, calls: list[dict[str, Any]], rate: float | None,
                      batch_size: int, concurrency: int = 4) -> float:
    """POST `calls` in batches, as fast as ingest takes them or paced at `rate` events/s; return seconds."""
    semaphore = asyncio.Semaphore(concurrency)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=60) as client:

        async def post(batch: list[dict[str, Any]]) -> None:
            async with semaphore:
                response = await client.post(f"{ingest_url}/v1/batch", json={"batch": batch}, auth=(write_key, ""))
                response.raise_for_status()

        tasks = []
        for start in range(0, len(calls), batch_size):
            if rate:
                await asyncio.sleep(max(0.0, started + start / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(post(calls[start:start + batch_size])))
            if not rate and sum(not t.done() for t in tasks) >= concurrency:
                await asyncio.wait([t for t in tasks if not t.done()], return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*tasks)
    return time.perf_counter() - started


def deliveries(state: local.StackState) -> list[dict[str, Any]]:
    response = httpx.get(f"{state.url('receiver')}/deliveries", params={"limit": 1_000_000}, timeout=60)
    result: list[dict[str, Any]] = response.json()
    return result


def wait_for(state: local.StackState, prefix: str, count: int, timeout_s: float = 600) -> float:
    """Wait until the receiver holds `count` webhooks for messages starting with `prefix`; return when."""
    deadline = time.perf_counter() + timeout_s
    seen = 0
    while time.perf_counter() < deadline:
        seen = sum(1 for d in deliveries(state) if str(d["body"]["data"].get("message", "")).startswith(prefix))
        if seen >= count:
            return time.perf_counter()
        time.sleep(0.2)
    raise TimeoutError(f"only {seen} of {count} webhooks for {prefix} after {timeout_s}s")


def latencies_ms(state: local.StackState, prefix: str) -> list[float]:
    return sorted(d["arrived_at_ms"] - d["body"]["received_at_ms"] for d in deliveries(state)
                  if str(d["body"]["data"].get("message", "")).startswith(prefix))


def histogram(values_ms: list[float]) -> dict[str, int]:
    """Cumulative counts per `le` bucket (seconds), as Prometheus would show them."""
    return {f"le_{bound:g}s": sum(1 for v in values_ms if v <= bound * 1000) for bound in LATENCY_BUCKETS} | {
        "le_inf": len(values_ms)}


def service_buckets(state: local.StackState) -> dict[float, float]:
    """Return the triggers service's cumulative event_to_webhook bucket counts for the rule."""
    text = httpx.get(f"{state.url('triggers')}/metrics", timeout=10).text
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{EVENT_TO_WEBHOOK_SECONDS}_bucket{{") and f'rule="{RULE_ID}"' in line:
            bound = line.split('le="')[1].split('"')[0]
            buckets[float("inf") if bound == "+Inf" else float(bound)] = float(line.rsplit(" ", 1)[1])
    return buckets


def service_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, float | None]:
    """p50/p99 (ms) of the observations between two scrapes, interpolated within buckets as PromQL does."""
    buckets = sorted((bound, count - before.get(bound, 0.0)) for bound, count in after.items())
    total = buckets[-1][1] if buckets else 0.0

    def quantile(q: float) -> float | None:
        previous_bound, previous_count = 0.0, 0.0
        for bound, count in buckets:
            if total and count >= q * total:
                if bound == float("inf"):
                    return previous_bound * 1000
                share = (q * total - previous_count) / max(count - previous_count, 1e-9)
                return round((previous_bound + (bound - previous_bound) * share) * 1000, 1)
            previous_bound, previous_count = bound, count
        return None

    return {"p50_ms": quantile(0.5), "p99_ms": quantile(0.99), "observations": total}


def run(events: int, load: float, seconds: float, partitions: int, batch: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="touchstream-bench-triggers-") as tmp:
        run_dir = Path(tmp)
        (run_dir / "rules.yaml").write_text(RULES)
        state = local.up(run_dir, partitions=partitions, progress=False,
                         env_overrides={"TOUCHSTREAM_TRIGGERS_RULES_FILE": str(run_dir / "rules.yaml")})
        try:
            run_id = uuid.uuid4().hex[:6]
            ingest, key = state.url("ingest"), state.write_key
            # Warm-up: connections, Lua script loads, first model and identity writes.
            warm = [track_call(f"{run_id}w", i) for i in range(200)]
            asyncio.run(post_events(ingest, key, warm, None, batch_size=50))
            wait_for(state, f"lat-{run_id}w-", len(warm))

            calls = [track_call(f"{run_id}c", i) for i in range(events)]
            started = time.perf_counter()
            post_s = asyncio.run(post_events(ingest, key, calls, None, batch_size=batch))
            elapsed = wait_for(state, f"lat-{run_id}c-", events) - started
            max_rate = events / elapsed

            rate = max_rate * load
            before = service_buckets(state)
            count = max(100, int(rate * seconds))
            paced = [track_call(f"{run_id}l", i) for i in range(count)]
            # The same batch size as the capacity run: the stages' per-batch costs then match,
            # so "half the max" is half of a rate measured the same way.
            sent_s = asyncio.run(post_events(ingest, key, paced, rate, batch_size=batch))
            wait_for(state, f"lat-{run_id}l-", count)
            latencies = latencies_ms(state, f"lat-{run_id}l-")
            stats = httpx.get(f"{state.url('receiver')}/stats", timeout=10).json()
            p99 = percentile(latencies, 0.99)
            return {
                "benchmark": "triggers_latency",
                "partitions": partitions,
                "events_per_post": batch,
                "capacity": {"events": events, "seconds": round(elapsed, 2), "max_events_per_s": round(max_rate, 1),
                             "ingest_accept_events_per_s": round(events / post_s, 1)},
                "latency_run": {"load": load, "events_per_s": round(rate, 1), "events": count,
                                "send_seconds": round(sent_s, 1)},
                "receiver_view": {"p50_ms": percentile(latencies, 0.5), "p99_ms": p99,
                                  "max_ms": latencies[-1] if latencies else None, "histogram": histogram(latencies)},
                "triggers_histogram": service_quantiles(before, service_buckets(state)),
                "target_p99_ms": TARGET_P99_MS,
                "meets_target": p99 is not None and p99 <= TARGET_P99_MS,
                "webhook_duplicates": stats["duplicates"],
                "bad_signatures": stats["rejected_signatures"],
            }
        finally:
            local.down(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1500, help="events in the capacity run")
    parser.add_argument("--load", type=float, default=0.5, help="share of the max rate for the latency run")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the latency run")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch", type=int, default=10, help="events per ingest POST, in both runs")
    args = parser.parse_args()
    print(json.dumps(run(args.events, args.load, args.seconds, args.partitions, args.batch), indent=2))


if __name__ == "__main__":
    main()
