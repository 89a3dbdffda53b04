"""A 3-broker Apache Kafka cluster (KRaft, on loopback) under the whole pipeline: the broker
leading the most partitions is killed with SIGKILL mid-run, then started again.

Topics have replication factor 3 and min.insync.replicas 2, so one broker away leaves every
write acknowledgeable: 0 acknowledged events lost (each one reaches the webhook receiver),
exactly one action per event, ingest never answers an error it could not keep (only 200, or
503 while a partition has no leader), and no service worker restarted by hand. This is
Kafka's own system-test promise, measured on this pipeline.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.chaos.test_crash_recovery import RULES, post_events
from tests.stacks import ARTIFACTS, running_stack, webhooks_received
from touchstream.embedded import ManagedProcess, restart_kafka_node, start_kafka_cluster, stop_pids
from touchstream.topics import ALL_TOPICS
from touchstream_cli import local

WORKERS = ("ingest", "identity", "scoring", "triggers", "console")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[ManagedProcess]]:
    logs = ARTIFACTS / "kafka-cluster-logs"
    logs.mkdir(parents=True, exist_ok=True)
    nodes = start_kafka_cluster(tmp_path / "cluster", 3, log_dir=logs)
    yield nodes
    # All at once, and not waiting long: the last node of a KRaft quorum stopped one by one cannot
    # finish a controlled shutdown (no majority left) and sat out the whole stop timeout; the data
    # is thrown away with the test.
    stop_pids([node.pid for node in nodes], timeout=3.0)
    for node in nodes:
        node.process.wait(5)  # reap


async def leader_counts(bootstrap: str) -> collections.Counter[int]:
    """Partitions of the catalogue's topics led by each broker id."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([spec.name for spec in ALL_TOPICS])
    finally:
        await admin.close()
    return collections.Counter(p["leader"] for t in described for p in t["partitions"] if p["leader"] >= 0)


@pytest.mark.parametrize("events", [pytest.param(2_000, id="short"),
                                    pytest.param(20_000, id="long", marks=pytest.mark.chaos)])
def test_killing_the_busiest_broker_loses_nothing(cluster: list[ManagedProcess], tmp_path: Path,
                                                  events: int) -> None:
    bootstrap = ",".join(f"127.0.0.1:{node.port}" for node in cluster)
    (tmp_path / "stack").mkdir()
    with running_stack(tmp_path / "stack", RULES, "kafka-cluster-stack-logs", kafka_bootstrap=bootstrap,
                       replication_factor=3) as stack:
        pids = {name: stack.pids[name] for name in WORKERS}
        progress, statuses = [0], []
        rate = 400.0
        sender = threading.Thread(target=post_events,
                                  args=(stack, f"cluster-{uuid.uuid4().hex[:6]}", events, rate, progress, statuses))
        sender.start()
        while progress[0] < events // 3 and sender.is_alive():
            time.sleep(0.05)
        busiest_id, led = asyncio.run(leader_counts(bootstrap)).most_common(1)[0]
        victim_index = next(i for i, node in enumerate(cluster)
                            if node.kafka_node is not None and node.kafka_node.node_id == busiest_id)
        victim = cluster[victim_index]
        victim.process.kill()  # SIGKILL: no controlled shutdown, no leadership handed over
        victim.process.wait(10)
        time.sleep(5.0)
        cluster[victim_index] = restart_kafka_node(victim, tmp_path / "cluster")
        sender.join()

        assert led > 0
        assert progress[0] == events, "ingest did not accept every event"
        assert set(statuses) <= {200, 503}, collections.Counter(statuses)
        stats = webhooks_received(stack, events, 600, stalled_s=120)
        assert stats["unique"] == events, stats
        assert stats["rejected_signatures"] == 0
        deliveries = httpx.get(f"{stack.url('receiver')}/deliveries", params={"limit": 10 * events},
                               timeout=60).json()
        customers = [d["body"]["customer_id"] for d in deliveries]
        assert len(customers) == len(set(customers)) == events
        state = local.StackState.load(Path(stack.run_dir))
        assert {name: state.pids[name] for name in WORKERS} == pids, "a worker had to be restarted"
