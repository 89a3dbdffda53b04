"""The inline commands docker-compose.yml runs work against a real broker (compose itself needs Docker)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from aiokafka.admin import AIOKafkaAdminClient

from tests.unit.test_deploy_compose import environment as compose_environment
from touchstream.embedded import ManagedProcess, free_port, start_kafka
from touchstream.topics import ALL_TOPICS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


async def partitions_of(bootstrap: str) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        # Only topics that exist: describing a missing one makes the broker auto-create it.
        existing = [spec.name for spec in ALL_TOPICS if spec.name in await admin.list_topics()]
        described = await admin.describe_topics(existing) if existing else []
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described if not t["error_code"]}


@pytest.fixture
def empty_broker(tmp_path: Path) -> Iterator[str]:
    """A broker of its own, so no other test's topics count."""
    port = free_port()
    broker: ManagedProcess = start_kafka(port, tmp_path / "kafka", tmp_path / "kafka.log")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        broker.stop()


def test_kafka_init_creates_every_topic_of_the_catalogue(empty_broker: str) -> None:
    kafka_bootstrap = empty_broker
    assert asyncio.run(partitions_of(kafka_bootstrap)) == {}
    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["kafka-init"]
    command = service["command"]
    assert command[0] == "python"
    env = {**os.environ, **compose_environment(service),
           "TOUCHSTREAM_KAFKA_BOOTSTRAP": kafka_bootstrap, "TOUCHSTREAM_PARTITIONS": "2"}
    # Run it twice: a restarted compose stack runs it again on existing topics.
    for _ in range(2):
        done = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, text=True,
                              timeout=60, cwd=ROOT)
        assert done.returncode == 0, done.stdout + done.stderr
    found = asyncio.run(partitions_of(kafka_bootstrap))
    assert set(found) == {spec.name for spec in ALL_TOPICS}
    assert set(found.values()) == {2}, found
