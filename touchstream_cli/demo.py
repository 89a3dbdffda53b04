"""`make demo`: the whole pipeline on CDNOW, from an empty machine to a summary."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from touchstream.datasets import cdnow_purchases, iter_track_calls
from touchstream.metrics import events_in_total, events_out_total
from touchstream.replay import PipelineState, ReplayProgress, replay, scrape, sum_metric
from touchstream.topics import ACTIONS, SCORES, TOUCHPOINTS_RESOLVED
from touchstream_cli import local

# The stages between ingest and the webhook; the console reads beside them, off the webhook's path.
PACED_STAGES = ("identity", "scoring", "triggers")
# Events in flight between ingest and the last stage above which the replay stops its clock. At the
# stack's ~300-500 events/s on 2 cores this is about a second of work: enough to keep every stage's
# batches full, little enough that the summary's latency is the pipeline's and not a queue's.
DEMO_MAX_LAG = 300
# Small posts: a 500-event post lands on the broker at once, a second of the pipeline's work ahead
# of the lag the replay paces by.
DEMO_POST_EVENTS = 100
# CDNOW's 18 months in about 46 s of event-time clock, when the pipeline keeps up.
DEMO_DAYS_PER_SECOND = 12.0


async def pipeline_counts(client: httpx.AsyncClient, state: local.StackState) -> dict[str, float]:
    """Read how far each stage has got from the services' own /metrics."""
    identity, scoring, triggers = await asyncio.gather(
        scrape(client, state.url("identity")), scrape(client, state.url("scoring")),
        scrape(client, state.url("triggers")))
    stats: dict[str, Any] = {}
    with contextlib.suppress(httpx.HTTPError):
        stats = (await client.get(f"{state.url('receiver')}/stats", timeout=5.0)).json()
    resolved, scores, actions = (spec.name_with(state.topic_prefix) for spec in (TOUCHPOINTS_RESOLVED, SCORES, ACTIONS))
    return {
        "lag": sum(sum_metric(text, f"touchstream_{stage}_consumer_lag_messages")
                   for stage, text in zip(PACED_STAGES, (identity, scoring, triggers), strict=True)),
        "resolved": sum_metric(identity, events_out_total("identity"), topic=resolved),
        "scored": sum_metric(scoring, events_out_total("scoring"), topic=scores),
        "scores_seen": sum_metric(triggers, events_in_total("triggers"), topic=scores),
        "actions": sum_metric(triggers, events_out_total("triggers"), topic=actions),
        "actions_seen": sum_metric(triggers, events_in_total("triggers"), topic=actions),
        "customers": sum_metric(identity, "touchstream_identity_customers_created_total"),
        "webhooks": float(stats.get("unique", 0)),
        "latency_p50_s": stats.get("latency_p50_s") or 0.0,
        "latency_p99_s": stats.get("latency_p99_s") or 0.0,
    }


async def wait_drained(state: local.StackState, accepted: int, wait_s: float) -> dict[str, float]:
    """Wait until every stage has consumed all it was sent, delivery has seen every action, and webhooks stop."""
    deadline = time.monotonic() + wait_s
    previous_webhooks = -1.0
    async with httpx.AsyncClient() as client:
        while True:
            counts = await pipeline_counts(client, state)
            # Scoring sends scores of its own (a silent customer's crossing), so the scores triggers
            # saw are no count of events: every stage's lag at zero is.
            caught_up = (counts["resolved"] >= accepted and counts["lag"] == 0
                         and counts["actions_seen"] >= counts["actions"])
            if caught_up and counts["webhooks"] == previous_webhooks:
                return counts
            if time.monotonic() > deadline:
                print(f"  not drained after {wait_s:.0f}s: {counts}")
                return counts
            previous_webhooks = counts["webhooks"]
            print(f"  draining: resolved {counts['resolved']:,.0f} scored {counts['scored']:,.0f} "
                  f"lag {counts['lag']:,.0f} webhooks {counts['webhooks']:,.0f}", flush=True)
            await asyncio.sleep(2.0)


async def replay_with_backpressure(state: local.StackState, calls: list[tuple[int, dict[str, Any]]],
                                  days_per_second: float, show: Any, max_lag: int = DEMO_MAX_LAG) -> int:
    """Replay, stopping the clock while the stages together are more than `max_lag` records behind."""
    async with httpx.AsyncClient() as client:

        async def pipeline_state() -> PipelineState:
            counts = await pipeline_counts(client, state)
            return PipelineState(lag=int(counts["lag"]), webhooks=int(counts["webhooks"]))

        return await replay(state.url("ingest"), state.write_key, calls, days_per_second,
                            batch_size=DEMO_POST_EVENTS,
                            on_progress=show, pipeline=pipeline_state, max_lag=max_lag)


def show_sample_webhook(state: local.StackState) -> None:
    """Print one delivered webhook body, as marketing receives it."""
    with contextlib.suppress(httpx.HTTPError, IndexError, KeyError):
        delivery = httpx.get(f"{state.url('receiver')}/deliveries", params={"limit": 1}, timeout=5).json()[0]
        print(f"\nlast webhook received (webhook-id {delivery['webhook_id']}):")
        print("  " + json.dumps(delivery["body"], indent=2).replace("\n", "\n  "))


def run_demo(run_dir: Path, days_per_second: float | None, limit: int | None, partitions: int,
             broker: str | None = None, screenshots: Path | None = None) -> dict[str, Any]:
    """Replay CDNOW through a fresh local stack, print a summary; with `screenshots`, save the console's
    pages there (touchstream_cli.screenshots) before the stack stops."""
    days_per_second = DEMO_DAYS_PER_SECOND if days_per_second is None else days_per_second
    purchases = cdnow_purchases()
    if limit:
        purchases = purchases[:limit]
    calls = list(iter_track_calls(purchases))
    print(f"CDNOW: {len(calls):,} purchases by {len({p.customer for p in purchases}):,} customers, "
          f"{purchases[0].date} .. {purchases[-1].date}")
    # CDNOW is 1997: replayed as if it happened now, so the backfill horizon (which keeps webhooks
    # about history from going out) is off here; `touchstream import` is how real history goes in.
    state = local.up(run_dir, partitions=partitions, broker=broker,
                     env_overrides={"TOUCHSTREAM_TRIGGERS_BACKFILL_HORIZON_HOURS": "0"})
    try:
        def show(progress: ReplayProgress) -> None:
            day = datetime.fromtimestamp(progress.event_time_ms / 1000, UTC).date()
            seen = progress.pipeline
            behind = f", lag {seen.lag:,}, webhooks {seen.webhooks:,}" if seen is not None else ""
            print(f"  [{progress.elapsed_s:5.1f}s] sent {progress.sent:,}/{progress.total:,} events "
                  f"({progress.rate:,.0f}/s{behind}; event time {day})", flush=True)

        started = time.monotonic()
        accepted = asyncio.run(replay_with_backpressure(state, calls, days_per_second, show))
        replay_s = time.monotonic() - started
        print(f"replayed {accepted:,} events in {replay_s:.1f}s; waiting for the pipeline to drain")
        counts = asyncio.run(wait_drained(state, accepted, wait_s=600.0))
        total_s = time.monotonic() - started
        summary = {
            "events_in": accepted,
            "customers_resolved": int(counts["customers"]),
            "scores": int(counts["scored"]),
            "actions_emitted": int(counts["actions"]),
            "actions_delivered": int(counts["webhooks"]),
            "event_to_webhook_p50_ms": round(counts["latency_p50_s"] * 1000, 1),
            "event_to_webhook_p99_ms": round(counts["latency_p99_s"] * 1000, 1),
            "wall_seconds": round(total_s, 1),
            "events_per_second": round(accepted / total_s, 1),
        }
        show_sample_webhook(state)
        if screenshots is not None:
            from services.identity.settings import DEV_ADMIN_KEY
            from touchstream_cli.screenshots import capture_console, showcase_candidates

            # The local stack's console and identity take the dev admin key (docs/console.md).
            candidates = showcase_candidates((str(call["userId"]) for _, call in calls), 50)
            for path in capture_console(state, screenshots, DEV_ADMIN_KEY, candidates):
                print(f"screenshot: {path}")
        print("\nsummary")
        for key, value in summary.items():
            print(f"  {key:26s} {value:,}" if isinstance(value, int) else f"  {key:26s} {value}")
        return summary
    finally:
        stopped = local.down(run_dir)
        print(f"stopped: {', '.join(stopped)}; logs in {run_dir / 'logs'}")
