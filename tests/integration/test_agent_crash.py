"""An agent that fails on a batch stops its worker (exit code 70, one CRITICAL line) instead of
being restarted past the batch, as Faust does by default; the next worker gets the batch again.

The worker is tests/integration/crashing_worker.py, built with touchstream.streams.make_app like
every service, on its own Apache Kafka broker.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from touchstream.embedded import create_topics, free_port, start_kafka, stop_pid
from touchstream.streams import EXIT_AGENT_CRASHED
from touchstream.topics import TOUCHPOINTS_RAW

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
VALUES = [f"ok-{i}" for i in range(20)] + ["bad"] + [f"ok-{i}" for i in range(20, 40)]


async def produce(bootstrap: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value in VALUES:
            await producer.send(TOUCHPOINTS_RAW.name, value.encode(), key=b"k", partition=0)
        await producer.flush()
    finally:
        await producer.stop()


def start_worker(bootstrap: str, tmp_path: Path, crash_on: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TOUCHSTREAM_KAFKA_BOOTSTRAP": bootstrap,
        "TOUCHSTREAM_PARTITIONS": "2",
        "TOUCHSTREAM_STATE_DIR": str(tmp_path / "state"),
        "TOUCHSTREAM_SESSION_TIMEOUT_S": "6",
        "WEB_PORT_FOR_TEST": str(free_port()),
        "SEEN_FILE": str(tmp_path / "seen.txt"),
        "CRASH_ON": crash_on,
        "PYTHONPATH": str(REPO),
    }
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, str(Path(__file__).with_name("crashing_worker.py"))], env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=tmp_path)


def test_a_crashed_agent_exits_the_worker_and_its_batch_is_handled_again(tmp_path: Path,
                                                                         artifacts_dir: Path) -> None:
    port = free_port()
    broker = start_kafka(port, tmp_path / "kafka", artifacts_dir / "kafka-agent-crash.log")
    bootstrap = f"127.0.0.1:{port}"
    log = artifacts_dir / "agent-crash-worker.log"
    log.write_bytes(b"")
    seen = tmp_path / "seen.txt"
    try:
        asyncio.run(create_topics(bootstrap, 2))
        asyncio.run(produce(bootstrap))
        first = start_worker(bootstrap, tmp_path, "bad", log)
        try:
            assert first.wait(90) == EXIT_AGENT_CRASHED
        finally:
            stop_pid(first.pid, 5, first)
        # Batches before the failing one were handled and committed; the failing one is the last line.
        *handled_batches, failed_batch = seen.read_text().splitlines()
        assert "bad" in failed_batch.split()
        critical = [line for line in log.read_text().splitlines() if "CRITICAL" in line]
        assert any("crashed (RuntimeError: cannot handle bad)" in line and "exiting with code 70" in line
                   for line in critical), critical

        # Restarted, as a supervisor would: the batch that failed comes again, then the rest; together
        # with what the first worker committed, nothing is missing.
        committed = {value for line in handled_batches for value in line.split()}
        seen.write_text("")
        second = start_worker(bootstrap, tmp_path, "never", log)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and committed | set(seen.read_text().split()) != set(VALUES):
                assert second.poll() is None, "the second worker exited"
                time.sleep(0.2)
            handled_again = set(seen.read_text().split())
            assert set(failed_batch.split()) <= handled_again
            assert committed | handled_again == set(VALUES)
        finally:
            stop_pid(second.pid, 15, second)
    finally:
        broker.stop()
