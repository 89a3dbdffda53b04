"""Redis (Valkey) is killed mid-run and started again on the same port and append-only file.

Every write Valkey acknowledged is written to its AOF before the answer (`appendfsync no`:
under `everysec` a busy disk postpones the write itself, and a clean-clone CI run lost 68
identity customers across the kill), so the restarted server has all of it. The services must
ride the outage out on their own: ingest answers 503 (the sender retries), the stream workers
wait and retry the batch in hand rather than skip it, and the delivery loop tries again. After
it, every event is reflected once (one customer in identity's graph, one purchase in scoring's
state, one webhook-id at the receiver) and no worker was restarted.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.chaos.test_crash_recovery import RULES, post_events, scoring_states
from tests.stacks import running_stack, webhooks_received
from touchstream.embedded import free_port, start_valkey
from touchstream_cli import local

WORKERS = ("ingest", "identity", "scoring", "triggers", "console")


@pytest.fixture
def stack(tmp_path: Path, kafka_bootstrap: str) -> Iterator[local.StackState]:
    with running_stack(tmp_path, RULES, "redis-restart-logs", shared_broker=kafka_bootstrap) as state:
        yield state


def redis_errors(stack: local.StackState, service: str) -> float:
    text = httpx.get(f"{stack.url(service)}/metrics", timeout=10).text
    match = re.search(rf"^touchstream_{service}_redis_errors_total (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def assert_every_event_once(stack: local.StackState, count: int, timeout_s: float = 300, stalled_s: float = 45) -> None:
    # Wait for every webhook, or until the pipeline stood still for `stalled_s` (something was lost).
    # Shorter than the delivery lease (60 s): a claim Valkey carried out just before it was killed is
    # asked again under its id once Valkey is back, so its actions go out then, not when the lease ends.
    stats = webhooks_received(stack, count, timeout_s, stalled_s=stalled_s)
    deliveries = httpx.get(f"{stack.url('receiver')}/deliveries", params={"limit": count * 2}, timeout=60).json()
    customers = [d["body"]["customer_id"] for d in deliveries]
    client = redis.Redis.from_url(stack.redis_url)
    identity_customers = [k for k in client.scan_iter(match="ts:identity:{graph}:customer:*", count=1000)
                          if k.count(b":") == 4]
    states = scoring_states(client)
    # Every stage's count in one message: a shortfall says which stage lost the events.
    reached = {"identity customers": len(identity_customers), "scoring states": len(states),
               "webhooks": stats["unique"], "lags": stats.get("lags")}
    assert stats["unique"] == len(identity_customers) == len(states) == count, reached
    assert len(set(customers)) == count == len(customers), "an event's action came under two webhook-ids"
    assert sorted({s.purchase_count for s in states}) == [1], "a purchase was lost or counted twice"


def run_with_redis_restarts(stack: local.StackState, count: int, rate: float, restarts: int, down_s: float) -> None:
    run_dir = Path(stack.run_dir)
    pids = {name: stack.pids[name] for name in WORKERS}
    progress = [0]
    sender = threading.Thread(target=post_events, args=(stack, f"redis-{uuid.uuid4().hex[:6]}", count, rate, progress))
    sender.start()
    for index in range(restarts):
        while progress[0] < count * (index + 1) / (restarts + 1) and sender.is_alive():
            time.sleep(0.05)
        local.kill(run_dir, "redis")
        time.sleep(down_s)
        local.start(run_dir, "redis")
    sender.join()
    assert progress[0] == count, "ingest did not accept every event"
    assert_every_event_once(stack, count)
    # Recovered on their own: the same processes, all ready, and they did see Redis go away.
    state = local.StackState.load(run_dir)
    assert {name: state.pids[name] for name in WORKERS} == pids
    statuses = {name: s for name, s in local.status(run_dir).items() if name in WORKERS}
    assert all(s.startswith("ready") for s in statuses.values()), "; ".join(f"{n}: {s}" for n, s in statuses.items())
    # Which stage was mid-command when Redis went (the others reconnect silently) depends on timing.
    assert sum(redis_errors(stack, service) for service in ("identity", "scoring", "triggers", "console")) > 0


@pytest.mark.integration
def test_valkey_on_a_data_dir_keeps_every_acknowledged_write_across_kill_9(tmp_path: Path) -> None:
    port = free_port()
    server = start_valkey(port, tmp_path / "valkey.log", tmp_path / "data")
    client = redis.Redis(port=port)
    try:
        assert client.config_get("appendfsync") == {"appendfsync": "no"}
        with client.pipeline(transaction=False) as pipe:
            for i in range(20_000):
                pipe.set(f"k{i}", i)
            pipe.execute()
        client.hset("h", mapping={"a": 1})
        os.killpg(server.pid, signal.SIGKILL)  # no shutdown, no final fsync
        server.process.wait(10)
        server = start_valkey(port, tmp_path / "valkey.log", tmp_path / "data")
        assert client.dbsize() == 20_001 and client.get("k19999") == b"19999" and client.hget("h", "a") == b"1"
    finally:
        client.close()
        server.stop()


@pytest.mark.integration
def test_redis_restart_mid_run_loses_nothing(stack: local.StackState) -> None:
    run_with_redis_restarts(stack, count=1_500, rate=150.0, restarts=1, down_s=4.0)


@pytest.mark.chaos
def test_redis_restarted_three_times_in_a_10k_event_run(stack: local.StackState) -> None:
    run_with_redis_restarts(stack, count=10_000, rate=300.0, restarts=3, down_s=6.0)
