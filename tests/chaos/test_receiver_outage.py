"""The webhook receiver is down for the middle of a run: every action arrives once it is back,
each `webhook-id` once after dedupe, and the failed deliveries were retried on the schedule.

The receiver process is killed (connection refused) and started again on its port; it keeps
what it got in a journal, as a real receiver keeps it in a database. The Standard Webhooks
schedule (5 s, 5 min, 30 min, ...) is scaled down 400 times through
TOUCHSTREAM_TRIGGERS_RETRY_SCHEDULE_S, so its first waits (12.5 ms, 0.75 s, 4.5 s) fit a test.

Each try's timing is read from the delivery queue in Redis, which the test polls: a failed try
re-schedules its action at `failure time + wait * (1 + up to 10 % jitter)`, and the next try
starts once that due time has passed. Two consecutive due times therefore differ by at least
the next wait, and by no more than 10 % above it plus the timer's reaction time.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from services.triggers.state_store import queue_keys
from services.triggers.webhooks import RETRY_SCHEDULE_S
from tests.chaos.test_crash_recovery import RULES, post_events
from tests.stacks import running_stack, webhooks_received
from touchstream_cli import local

SCALE = 400
SCHEDULE = tuple(wait / SCALE for wait in RETRY_SCHEDULE_S)
LEASE_S = 600.0  # a claimed action's score is then far beyond any due time of this test
POLL_S = 0.02
# How late a try may start after its due time: the timer's poll, the endpoint's 8 requests in
# flight when a burst of actions falls due together, and a busy 2-core machine (measured: up
# to ~0.4 s with ~150 actions due in the same second on its own; up to ~0.9 s with `make test`
# running a second test process beside it and other work on the machine). Never sooner is
# checked to the millisecond.
REACTION_S = 2.0


@pytest.fixture
def stack(tmp_path: Path, kafka_bootstrap: str) -> Iterator[local.StackState]:
    env = {
        "TOUCHSTREAM_TRIGGERS_RETRY_SCHEDULE_S": json.dumps(SCHEDULE),
        "TOUCHSTREAM_TRIGGERS_DISPATCH_POLL_S": str(POLL_S),
        "TOUCHSTREAM_TRIGGERS_DELIVERY_LEASE_S": str(LEASE_S),
        # The circuit breaker would hold retries back until its probe succeeds; with it out of
        # the way each try follows the schedule alone.
        "TOUCHSTREAM_TRIGGERS_BREAKER_THRESHOLD": "1000000",
    }
    with running_stack(tmp_path, RULES, "receiver-outage-logs", env,
                       shared_broker=kafka_bootstrap) as state:
        yield state


@dataclass
class QueueWatch:
    """Poll the endpoint's delivery queue; keep each action's due times by attempts made."""

    redis_url: str
    endpoint: str = "marketing"
    due: dict[str, dict[int, int]] = field(default_factory=dict)  # action -> attempts made -> due ms
    left_at: dict[str, float] = field(default_factory=dict)  # action -> when it left the queue (delivered)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        client = redis.Redis.from_url(self.redis_url)
        due_key, actions_key = queue_keys(self.endpoint)
        seen: dict[str, float] = {}
        while not self.stop.is_set():
            now = time.time()
            scores = {k.decode(): s for k, s in client.zrange(due_key, 0, -1, withscores=True)}
            changed = [a for a, s in scores.items() if seen.get(a) != s and s < (now + LEASE_S / 2) * 1000]
            if changed:
                for action, state in zip(changed, client.hmget(actions_key, changed), strict=True):
                    if state:
                        attempts = json.loads(state)["attempts"]
                        self.due.setdefault(action, {})[attempts] = int(scores[action])
            for action in seen.keys() - scores.keys():
                self.left_at.setdefault(action, now)
            seen = scores
            time.sleep(0.005)


def spacing_violations(due: dict[int, int], exact: bool) -> list[str]:
    """Check consecutive due times of one action against the schedule."""
    problems = []
    for attempts in sorted(due):
        if attempts + 1 not in due or attempts + 1 >= len(SCHEDULE):
            continue
        gap_s = (due[attempts + 1] - due[attempts]) / 1000
        wait = SCHEDULE[attempts + 1]
        if gap_s < wait - 0.002:
            problems.append(f"try {attempts + 2} due {gap_s:.3f}s after try {attempts + 1}'s due time; wait is {wait}s")
        if exact and gap_s > wait * 1.1 + REACTION_S:
            problems.append(f"try {attempts + 2} due {gap_s:.3f}s after try {attempts + 1}'s; at most {wait * 1.1}s "
                            f"+ {REACTION_S}s expected")
    return problems


def run_outage(stack: local.StackState, count: int, rate: float, outage_s: float) -> dict[str, Any]:
    run_dir = Path(stack.run_dir)
    run = f"outage-{uuid.uuid4().hex[:6]}"
    watch = QueueWatch(stack.redis_url)
    watcher = threading.Thread(target=watch.run, daemon=True)
    watcher.start()
    progress = [0]
    sender = threading.Thread(target=post_events, args=(stack, run, count, rate, progress))
    sender.start()
    while progress[0] < count // 4 and sender.is_alive():
        time.sleep(0.02)
    local.kill(run_dir, "receiver")
    down_at = time.time()
    time.sleep(outage_s)
    # No request can arrive before the receiver is started again; when it first answers within
    # `local.start` (which returns once it polled it ready) depends on the machine's load.
    restarting_at = time.time()
    local.start(run_dir, "receiver")
    back_at = time.time()
    sender.join()
    assert progress[0] == count, "ingest did not accept every event"

    receiver = stack.url("receiver")
    stats = webhooks_received(stack, count, 120 + outage_s, poll_s=0.5)
    time.sleep(1.0)  # let the watcher see the last removals
    watch.stop.set()
    watcher.join()
    deliveries = httpx.get(f"{receiver}/deliveries", params={"limit": count * 2}, timeout=60).json()

    # Nothing lost, nothing doubled: one webhook-id per event's customer, all of them here.
    customers = [d["body"]["customer_id"] for d in deliveries]
    assert stats["unique"] == count, stats
    assert len(customers) == count == len(set(customers))
    assert stats["rejected_signatures"] == 0
    arrived = {d["webhook_id"]: d["arrived_at_ms"] / 1000 for d in deliveries}

    failed = {a: due for a, due in watch.due.items() if any(n >= 1 for n in due)}
    assert len(failed) >= count // 10, f"only {len(failed)} deliveries failed during a {outage_s}s outage"
    for action in failed:
        # A failed delivery arrived, and only once the receiver was back (or it arrived just
        # before the kill, which cut the answer off: the retry was the duplicate that was deduped).
        assert action in arrived, f"{action} failed and never arrived"
        assert arrived[action] >= restarting_at or arrived[action] <= down_at, (
            f"{action} arrived at {arrived[action]}, while the receiver was down ({down_at}-{restarting_at})")
    retried_twice = [a for a, due in failed.items() if max(due) >= 2]
    assert retried_twice, "no delivery was retried more than once"
    print(json.dumps({"events": count, "outage_s": outage_s, "failed_deliveries": len(failed),
                      "most_failed_tries": max(max(due) for due in failed.values()),
                      "receiver": stats, "last_arrival_after_back_s": round(max(arrived.values()) - back_at, 2)}))
    return {"failed": failed, "arrived": arrived, "down_at": down_at, "back_at": back_at, "stats": stats}


@pytest.mark.integration
def test_receiver_down_mid_run_everything_arrives_on_the_retry_schedule(stack: local.StackState) -> None:
    result = run_outage(stack, count=600, rate=100.0, outage_s=3.0)
    problems = {a: p for a, due in result["failed"].items() if (p := spacing_violations(due, exact=True))}
    assert not problems, problems
    # The longest wait used was the third one (4.5 s): the actions that failed first had it.
    assert any(max(due) >= 3 for due in result["failed"].values()), "no action reached its fourth try"
    # Nothing gave up: every failed action's tries stayed within the schedule's ten.
    assert all(max(due) < len(SCHEDULE) for due in result["failed"].values())


@pytest.mark.chaos
def test_receiver_down_for_20s_of_a_5k_event_run(stack: local.StackState) -> None:
    # 20 s down, 5,000 events at 200/s: the failed tries pile up faster than one triggers worker
    # makes them (~200 webhook requests/s here), so tries start later than due; the schedule
    # is still a floor: no try before its wait is over.
    result = run_outage(stack, count=5_000, rate=200.0, outage_s=20.0)
    problems = {a: p for a, due in result["failed"].items() if (p := spacing_violations(due, exact=False))}
    assert not problems, dict(list(problems.items())[:5])
    assert any(max(due) >= 3 for due in result["failed"].values()), "no action reached its fourth try"
