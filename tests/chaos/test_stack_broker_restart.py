"""The embedded broker is killed under the whole running stack and started again, empty, with
its topics created again (what `touchstream local` does; an operator would do the same).

What can be promised with a memory-only broker: the workers notice the loss, rejoin their
groups on the new broker and go on from its (new) first offsets, with no restart; every event
accepted after the broker's return goes all the way to a webhook. Events the old broker held
and no stage had consumed yet are gone with it (README, "Known limits"); Redis state from
before the restart stays.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.chaos.test_crash_recovery import RULES, post_events
from tests.stacks import running_stack, webhooks_received
from touchstream import local

WORKERS = ("ingest", "identity", "scoring", "triggers", "console")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[local.StackState]:
    with running_stack(tmp_path, RULES, "broker-restart-logs") as state:
        yield state


@pytest.mark.chaos
def test_workers_carry_on_after_the_broker_restarts_empty(stack: local.StackState) -> None:
    run_dir = Path(stack.run_dir)
    pids = {name: stack.pids[name] for name in WORKERS}
    before, after = 500, 2_000
    post_events(stack, f"pre-{uuid.uuid4().hex[:6]}", before, 200.0, [0])
    assert webhooks_received(stack, before, 120)["unique"] == before

    local.kill(run_dir, "broker")
    time.sleep(15.0)  # longer than the session timeout: every group membership is gone
    local.start(run_dir, "broker")

    progress = [0]
    post_events(stack, f"post-{uuid.uuid4().hex[:6]}", after, 200.0, progress)
    assert progress[0] == after
    stats = webhooks_received(stack, before + after, 300)
    assert stats["unique"] == before + after, stats
    deliveries = httpx.get(f"{stack.url('receiver')}/deliveries", params={"limit": 10 * after}, timeout=60).json()
    customers = [d["body"]["customer_id"] for d in deliveries]
    assert len(customers) == len(set(customers)) == before + after
    state = local.StackState.load(run_dir)
    assert {name: state.pids[name] for name in WORKERS} == pids, "a worker had to be restarted"
