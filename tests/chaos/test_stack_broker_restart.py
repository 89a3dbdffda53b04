"""The local Apache Kafka broker is killed with SIGKILL in the middle of a run under the whole
stack, and started again on the same data directory (what a supervisor would do).

Kafka keeps every record it acknowledged and every committed offset on disk, so: every event
ingest answered 2xx reaches the webhook receiver as exactly one action (one webhook-id), and no worker has
to be restarted by hand (they reconnect and rejoin their groups). While the broker is away ingest
answers 503, which the sender retries as a client would.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.chaos.test_crash_recovery import RULES, post_events
from tests.stacks import running_stack, webhooks_received
from touchstream_cli import local

WORKERS = ("ingest", "identity", "scoring", "triggers", "console")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[local.StackState]:
    with running_stack(tmp_path, RULES, "broker-restart-logs") as state:
        yield state


@pytest.mark.parametrize("events", [pytest.param(1_000, id="short"),
                                    pytest.param(5_000, id="long", marks=pytest.mark.chaos)])
def test_every_acknowledged_event_survives_a_broker_kill(stack: local.StackState, events: int) -> None:
    run_dir = Path(stack.run_dir)
    pids = {name: stack.pids[name] for name in WORKERS}
    progress, statuses = [0], []
    sender = threading.Thread(target=post_events,
                              args=(stack, f"kill-{uuid.uuid4().hex[:6]}", events, 150.0, progress, statuses))
    sender.start()
    while progress[0] < events // 3 and sender.is_alive():
        time.sleep(0.05)
    local.kill(run_dir, "broker")
    time.sleep(3.0)
    local.start(run_dir, "broker")  # same port, same data directory
    sender.join()

    assert progress[0] == events, "ingest did not accept every event"
    assert set(statuses) <= {200, 503}, sorted(set(statuses))  # refused while away, never an error
    stats = webhooks_received(stack, events, 300)
    assert stats["unique"] == events, stats
    deliveries = httpx.get(f"{stack.url('receiver')}/deliveries", params={"limit": 10 * events}, timeout=60).json()
    # One action per event, each under its own webhook-id (a redelivery of the same id is allowed).
    customers = [d["body"]["customer_id"] for d in deliveries]
    assert len(customers) == len(set(customers)) == events
    assert stats["rejected_signatures"] == 0
    state = local.StackState.load(run_dir)
    assert {name: state.pids[name] for name in WORKERS} == pids, "a worker had to be restarted"
