"""Where the demo's event -> webhook latency is spent, hop by hop (issue 15's demo target: p99 <= 2 s).

The demo (`touchstream demo`) replays CDNOW paced by the pipeline's own lag, and its summary
gives one figure: accepted -> webhook received. This runs the same replay (the demo's pacing,
posts and clock; the first `--limit` purchases) on a fresh local stack, then reads every record
the stages wrote back from the broker and splits that latency by the broker's record timestamps
(each producer's create time; one clock, the machine's):

- ingest: ingest received the event -> its touchpoints.raw record
- identity: touchpoints.raw -> touchpoints.resolved (same message_id)
- scoring: touchpoints.resolved -> the event's scores record (same message_id)
- triggers: scores -> the actions record it fired (same customer and received_at_ms)
- delivery: actions -> the webhook at the receiver (webhook-id = action_id)
- end_to_end: ingest received -> webhook received, for the webhooks delivered

Each hop prints p50/p99/max in ms and how many records it covers, plus the CPU each stage's
process used over the replay (µs per event, /proc), and the load average: the machine may be
shared, and a stage starved of CPU holds its batch longer.

Usage: .venv/bin/python bench/bench_demo_hops.py [--limit 15000] [--partitions 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from proc_cpu import components_cpu_s, load_average

from touchstream import avro
from touchstream.datasets import cdnow_purchases, iter_track_calls
from touchstream.receiver import percentile
from touchstream.topics import ACTIONS, SCORES, TOUCHPOINTS_RAW, TOUCHPOINTS_RESOLVED, TopicSpec
from touchstream_cli import local
from touchstream_cli.demo import DEMO_DAYS_PER_SECOND, replay_with_backpressure, wait_drained


async def read_topic(bootstrap: str, spec: TopicSpec) -> list[tuple[int, dict[str, Any]]]:
    """Return (record timestamp ms, decoded value) of every record on `spec`'s topic."""
    consumer = AIOKafkaConsumer(spec.name, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    records: list[tuple[int, dict[str, Any]]] = []
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=2000, max_records=5000)
            if not batch:
                return records
            for messages in batch.values():
                records.extend((m.timestamp, avro.decode(spec.schema, m.value)) for m in messages if m.value)
    finally:
        await consumer.stop()


def spread(delays_ms: list[int]) -> dict[str, float | None]:
    ordered = sorted(delays_ms)
    return {"records": len(ordered), "p50_ms": percentile(ordered, 0.50), "p99_ms": percentile(ordered, 0.99),
            "max_ms": ordered[-1] if ordered else None}


def hop_delays(raw: list[tuple[int, dict[str, Any]]], resolved: list[tuple[int, dict[str, Any]]],
               scores: list[tuple[int, dict[str, Any]]], actions: list[tuple[int, dict[str, Any]]],
               webhooks: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Join the stages' records of each event and return each hop's delays.

    >>> raw = [(110, {"message_id": "m", "received_at_ms": 100})]
    >>> resolved = [(150, {"event": {"message_id": "m"}})]
    >>> scores = [(400, {"message_id": "m", "customer_id": "c", "received_at_ms": 100})]
    >>> actions = [(420, {"action_id": "a", "customer_id": "c", "received_at_ms": 100})]
    >>> hops = hop_delays(raw, resolved, scores, actions, [{"webhook_id": "a", "arrived_at_ms": 500,
    ...                                                      "body": {"received_at_ms": 100}}])
    >>> {hop: figures["p50_ms"] for hop, figures in hops.items()}
    {'ingest': 10, 'identity': 40, 'scoring': 250, 'triggers': 20, 'delivery': 80, 'end_to_end': 400}
    """
    raw_at = {value["message_id"]: (ts, value["received_at_ms"]) for ts, value in raw}
    resolved_at = {value["event"]["message_id"]: ts for ts, value in resolved}
    scored_at = {value["message_id"]: ts for ts, value in scores}
    scored_by_event = {(value["customer_id"], value["received_at_ms"]): ts for ts, value in scores}
    action_at = {value["action_id"]: ts for ts, value in actions}
    ingest, identity, scoring = [], [], []
    for message_id, (ts, received_at_ms) in raw_at.items():
        ingest.append(ts - received_at_ms)
        if message_id in resolved_at:
            identity.append(resolved_at[message_id] - ts)
            if message_id in scored_at:
                scoring.append(scored_at[message_id] - resolved_at[message_id])
    triggers = [ts - scored_by_event[key] for ts, value in actions
                if (key := (value["customer_id"], value["received_at_ms"])) in scored_by_event]
    delivery = [w["arrived_at_ms"] - action_at[w["webhook_id"]] for w in webhooks if w["webhook_id"] in action_at]
    end_to_end = [w["arrived_at_ms"] - w["body"]["received_at_ms"] for w in webhooks]
    return {"ingest": spread(ingest), "identity": spread(identity), "scoring": spread(scoring),
            "triggers": spread(triggers), "delivery": spread(delivery), "end_to_end": spread(end_to_end)}


def measure(limit: int, partitions: int) -> dict[str, Any]:
    purchases = cdnow_purchases()[:limit]
    calls = list(iter_track_calls(purchases))
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp, "stack")
        state = local.up(run_dir, partitions=partitions, progress=False,
                         env_overrides={"TOUCHSTREAM_TRIGGERS_BACKFILL_HORIZON_HOURS": "0"})
        try:
            load_before = load_average()
            cpu_before = components_cpu_s(state.pids)
            started = time.monotonic()
            with contextlib.redirect_stdout(sys.stderr):  # the drain's progress lines; stdout is the JSON
                accepted = asyncio.run(replay_with_backpressure(state, calls, DEMO_DAYS_PER_SECOND, lambda _: None))
                asyncio.run(wait_drained(state, accepted, wait_s=600.0))
            seconds = time.monotonic() - started
            cpu_after = components_cpu_s(state.pids)
            bootstrap = f"127.0.0.1:{state.ports['broker']}"
            raw, resolved, scores, actions = (asyncio.run(read_topic(bootstrap, spec)) for spec in
                                              (TOUCHPOINTS_RAW, TOUCHPOINTS_RESOLVED, SCORES, ACTIONS))
            journal = Path(state.run_dir, "receiver-journal.jsonl")
            webhooks = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
        finally:
            local.down(run_dir)
    return {
        "events": accepted, "seconds": round(seconds, 1), "events_per_s": round(accepted / seconds, 1),
        "scores": len(scores), "actions": len(actions), "webhooks": len(webhooks),
        "hops": hop_delays(raw, resolved, scores, actions, webhooks),
        "cpu_us_per_event": {name: round((cpu_after[name] - cpu_before[name]) / accepted * 1e6)
                             for name in sorted(cpu_after, key=lambda n: cpu_before[n] - cpu_after[n])},
        "load_average_before": load_before, "load_average": load_average(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=15_000, help="replay the first N CDNOW purchases")
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()
    print(json.dumps({"bench": "demo_hops", **measure(args.limit, args.partitions),
                      "command": f"bench/bench_demo_hops.py --limit {args.limit}"}, indent=2))


if __name__ == "__main__":
    main()
