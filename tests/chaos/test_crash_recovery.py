"""kill -9 a worker of each stream service mid-run: nothing lost, nothing doubled.

Every event is a new customer's first purchase, and the rule fires on a first score above
0.3 (a fresh model says 0.5), so each event must end as exactly one action with one
`webhook-id`, one customer in the identity graph and one purchase in scoring's state.
A supervisor's restart is played by `local.kill_and_restart`.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from services.scoring.codec import decode_state
from services.scoring.state import CustomerState
from tests.stacks import running_stack, webhooks_received
from touchstream_cli import local

RULES = """
rules:
  - id: chaos-first-score
    when: {score: churn_risk, crosses_above: 0.1, rearm_below: 0.05}
    action: {endpoint: marketing, template: {kind: chaos}}
    cooldown_hours: 24
    holdout_percent: 0
"""
VICTIMS = ("identity", "scoring", "triggers")


@pytest.fixture
def stack(tmp_path: Path, kafka_bootstrap: str) -> Iterator[local.StackState]:
    with running_stack(tmp_path, RULES, "chaos-logs",
                       shared_broker=kafka_bootstrap) as state:
        yield state


def post_events(state: local.StackState, run: str, count: int, rate: float, progress: list[int],
                statuses: list[int] | None = None) -> None:
    """Send `count` first purchases in batches of 100 at `rate` events/s, each batch retried (as a client
    would) until ingest answers 200; `progress` holds the number accepted, `statuses` every answer's code."""

    async def send() -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            started = time.perf_counter()
            for start in range(0, count, 100):
                await asyncio.sleep(max(0.0, started + start / rate - time.perf_counter()))
                batch = [{"type": "track", "event": "Order Completed", "userId": f"{run}-{i}",
                          "messageId": f"{run}-{i}", "order": {"amount": 5.0}}
                         for i in range(start, min(count, start + 100))]
                for attempt in range(20):
                    response = await client.post(f"{state.url('ingest')}/v1/batch", json={"batch": batch},
                                                 auth=(state.write_key, ""))
                    if statuses is not None:
                        statuses.append(response.status_code)
                    if response.status_code == 200:
                        break
                    await asyncio.sleep(0.5 * (attempt + 1))
                response.raise_for_status()
                progress[0] = start + len(batch)

    asyncio.run(send())


def scoring_states(client: redis.Redis) -> list[CustomerState]:
    keys = list(client.scan_iter(match="ts:scoring:customer:*", count=1000))
    return [decode_state(raw) for raw in client.mget(keys)] if keys else []


def run_with_kills(stack: local.StackState, count: int, rate: float) -> None:
    run = f"chaos-{uuid.uuid4().hex[:6]}"
    progress = [0]
    sender = threading.Thread(target=post_events, args=(stack, run, count, rate, progress))
    sender.start()
    for index, victim in enumerate(VICTIMS):
        while progress[0] < count * (index + 1) / (len(VICTIMS) + 1) and sender.is_alive():
            time.sleep(0.05)
        local.kill_and_restart(Path(stack.run_dir), victim)
    sender.join()
    assert progress[0] == count, "ingest did not accept every event"

    stats = webhooks_received(stack, count, 600)
    deliveries = httpx.get(f"{stack.url('receiver')}/deliveries", params={"limit": count * 2}, timeout=60).json()
    customers_with_webhook = [d["body"]["customer_id"] for d in deliveries]
    # Nothing lost: every event's action arrived; nothing doubled: one webhook-id per customer.
    assert stats["unique"] == count, stats
    assert len(set(customers_with_webhook)) == count == len(customers_with_webhook)
    assert stats["rejected_signatures"] == 0

    client = redis.Redis.from_url(stack.redis_url)
    identity_customers = [k for k in client.scan_iter(match="ts:identity:{graph}:customer:*", count=1000)
                          if k.count(b":") == 4]
    assert len(identity_customers) == count
    states = scoring_states(client)
    assert len(states) == count
    assert sorted({s.purchase_count for s in states}) == [1], "a purchase was lost or counted twice"


@pytest.mark.integration
def test_kill9_each_stream_worker_short_run(stack: local.StackState) -> None:
    run_with_kills(stack, count=2_000, rate=150.0)


@pytest.mark.chaos
def test_kill9_each_stream_worker_20k_events(stack: local.StackState) -> None:
    run_with_kills(stack, count=20_000, rate=400.0)
