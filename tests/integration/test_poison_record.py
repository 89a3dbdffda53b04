"""A record that decodes but crashes its handler does not crash-loop the worker: after a few attempts
it is isolated and dead-lettered with the exception as its reason, every other record of the batch is
handled once, and the worker goes on (it used to exit 70 and get the same batch forever).

The worker is tests/integration/crashing_worker.py, built like every service, on the session broker.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from tests.kafka_reading import collect
from touchstream import avro
from touchstream.embedded import free_port, stop_pid
from touchstream.topics import CUSTOMER_DELETIONS, DEADLETTER

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


async def produce(bootstrap: str, ids: list[str]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for cid in ids:
            record = {"deletion_id": f"d-{cid}", "customer_id": cid, "merged_ids": [], "requested_at_ms": 1}
            await producer.send(CUSTOMER_DELETIONS.name, avro.encode(CUSTOMER_DELETIONS.schema, record),
                                key=b"k", partition=0)
        await producer.flush()
    finally:
        await producer.stop()


def test_a_record_that_crashes_its_handler_is_dead_lettered_and_the_rest_handled_once(
        all_topics: str, tmp_path: Path, artifacts_dir: Path) -> None:
    run = uuid.uuid4().hex[:6]
    ids = [f"c_{run}_{i}" for i in range(30)]
    bad = ids[12]
    seen = tmp_path / "seen.txt"
    seen.write_text("")
    env = {**os.environ, "TOUCHSTREAM_KAFKA_BOOTSTRAP": all_topics, "TOUCHSTREAM_PARTITIONS": "2",
           "TOUCHSTREAM_STATE_DIR": str(tmp_path / "state"), "WEB_PORT_FOR_TEST": str(free_port()),
           "SEEN_FILE": str(seen), "CRASH_ON": bad, "PYTHONPATH": str(REPO)}
    log = artifacts_dir / "poison-record-worker.log"
    with log.open("ab") as out:
        worker = subprocess.Popen([sys.executable, str(Path(__file__).with_name("crashing_worker.py"))], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True, cwd=tmp_path)
    try:
        asyncio.run(produce(all_topics, ids))
        deadline = time.monotonic() + 90
        handled: list[str] = []
        while time.monotonic() < deadline:
            assert worker.poll() is None, f"the worker exited with {worker.returncode}; see {log}"
            handled = [cid for cid in seen.read_text().split() if cid.startswith(f"c_{run}_")]
            if set(handled) == set(ids) - {bad}:
                break
            time.sleep(0.2)
        assert sorted(handled) == sorted(set(ids) - {bad}), "each other record handled exactly once"
        mine = [record for _, record in asyncio.run(collect(
            all_topics, DEADLETTER.name, DEADLETTER.schema, 2, wait_s=10,
            match=lambda _key, letter: letter["stage"] == "crash-test" and bad.encode() in letter["original"]))]
        assert len(mine) == 1, mine
        assert mine[0]["reason"] == f"handler failed: RuntimeError: cannot handle {bad}"
        assert mine[0]["source"] == CUSTOMER_DELETIONS.name
        assert worker.poll() is None
    finally:
        stop_pid(worker.pid, 15, worker)
