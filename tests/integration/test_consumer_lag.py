"""touchstream_<service>_consumer_lag_messages on a live identity worker (own Apache Kafka broker, real Valkey).

Records wait on touchpoints.raw while the worker cannot work (its Redis is not there yet):
the lag is the number of records per partition. Once Redis starts the worker catches up,
commits, and the lag falls to 0. The same gauge comes from touchstream.streams for every
Faust service.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from touchstream.embedded import ManagedProcess, free_port, start_valkey
from touchstream.topics import TOUCHPOINTS_RAW

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
RECORDS = 200
LAG = re.compile(r'^touchstream_identity_consumer_lag_messages\{partition="(\d+)",topic="([^"]+)"\} (\S+)$', re.M)


async def produce(bootstrap: str, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        # Undecodable on purpose: identity dead-letters them, which is processing all the same.
        for i in range(count):
            await producer.send(TOUCHPOINTS_RAW.name, b"not avro", key=b"k%d" % i, partition=i % 2)
        await producer.flush()
    finally:
        await producer.stop()


def lags(url: str) -> dict[tuple[str, int], float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {(topic, int(partition)): float(value) for partition, topic, value in LAG.findall(text)}


def test_consumer_lag_counts_unprocessed_records_and_falls_to_zero(kafka_bootstrap: str, topic_prefix: str,
                                                                     tmp_path: Path, artifacts_dir: Path) -> None:
    # The process's broker; the records go to topics of the test's own (the worker inherits the prefix).
    broker = kafka_bootstrap
    asyncio.run(produce(broker, RECORDS))
    redis_port, web_port = free_port(), free_port()
    env = {
        **os.environ,
        "TOUCHSTREAM_KAFKA_BOOTSTRAP": broker,
        "TOUCHSTREAM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",  # nothing listens there yet
        "TOUCHSTREAM_PARTITIONS": "2",
        "TOUCHSTREAM_STATE_DIR": str(tmp_path / "state"),
        "TOUCHSTREAM_IDENTITY_WEB_PORT": str(web_port),
        "PYTHONPATH": str(REPO),
    }
    log = open(artifacts_dir / "identity-lag.log", "ab")  # noqa: SIM115
    try:
        process = subprocess.Popen([sys.executable, "-m", "services.identity"], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, env=env, cwd=REPO)
    finally:
        log.close()
    worker = ManagedProcess("identity", process)
    redis: ManagedProcess | None = None
    url = f"http://127.0.0.1:{web_port}"
    try:
        # Behind: the worker fetched the records (so it knows the high-water marks) but cannot
        # process them without Redis.
        deadline = time.monotonic() + 60
        seen: dict[tuple[str, int], float] = {}
        while time.monotonic() < deadline:
            assert worker.alive(), "identity exited; see test-artifacts/identity-lag.log"
            try:
                seen = lags(url)
            except httpx.TransportError:
                seen = {}
            if len(seen) == 2:
                break
            time.sleep(0.2)
        assert seen == {(TOUCHPOINTS_RAW.name, 0): RECORDS / 2, (TOUCHPOINTS_RAW.name, 1): RECORDS / 2}

        redis = start_valkey(redis_port, artifacts_dir / "valkey-lag.log")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(lags(url).values()):
            time.sleep(0.2)
        assert lags(url) == {(TOUCHPOINTS_RAW.name, 0): 0, (TOUCHPOINTS_RAW.name, 1): 0}

        asyncio.run(produce(broker, 10))  # caught up again right after new records
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(lags(url).values()):
            time.sleep(0.2)
        assert sum(lags(url).values()) == 0
        text = httpx.get(f"{url}/metrics", timeout=5).text
        assert re.search(r'^touchstream_identity_events_failed_total\{reason="undecodable"\} 210\.0$', text, re.M)
    finally:
        worker.stop()
        if redis is not None:
            redis.stop()
