"""The embedded broker: Apache Kafka by default, Tansu only when asked; a broker that cannot start
says why in one line with the fix (no Java, no jars, port taken, a data dir it cannot use)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from touchstream.embedded import (
    BrokerUnavailable,
    broker_client_env,
    embedded_broker_kind,
    free_port,
    start_kafka,
    start_tansu,
)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_kafka_is_the_default_and_unknown_kinds_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOUCHSTREAM_EMBEDDED_BROKER", raising=False)
    assert embedded_broker_kind() == "kafka"
    assert broker_client_env("kafka") == {}
    monkeypatch.setenv("TOUCHSTREAM_EMBEDDED_BROKER", "tansu")
    assert embedded_broker_kind() == "tansu"
    assert broker_client_env("tansu")["TOUCHSTREAM_IDEMPOTENT_PRODUCER"] == "false"
    with pytest.raises(BrokerUnavailable, match=r"unknown embedded broker 'redpanda'.*kafka, tansu"):
        embedded_broker_kind("redpanda")


def test_a_taken_port_is_named(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(BrokerUnavailable, match=f"port 127.0.0.1:{port} is taken"):
            start_kafka(port, tmp_path / "kafka")


def test_missing_jars_and_missing_java_say_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOUCHSTREAM_KAFKA_LIBS", str(tmp_path / "empty"))
    with pytest.raises(BrokerUnavailable, match=r"no Apache Kafka broker jars in .*run `make kafka`"):
        start_kafka(free_port(), tmp_path / "kafka")
    monkeypatch.delenv("TOUCHSTREAM_KAFKA_LIBS")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerUnavailable, match=r"no `java` found.*make kafka.*--broker tansu"):
        start_kafka(free_port(), tmp_path / "kafka")


def test_a_data_dir_of_another_cluster_is_reported_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "kafka"
    start_kafka(free_port(), data, tmp_path / "first.log").stop()
    # Another cluster's id in the storage: Kafka refuses to start on it.
    (data / "cluster-id").write_text("AAAAAAAAAAAAAAAAAAAAAA")
    meta = data / "log" / "meta.properties"
    meta.write_text("\n".join(
        "cluster.id=AAAAAAAAAAAAAAAAAAAAAA" if line.startswith("cluster.id=") else line
        for line in meta.read_text().splitlines()))
    (data / "log" / "__cluster_metadata-0").rename(data / "log" / "moved-away")
    with pytest.raises(BrokerUnavailable) as refused:
        start_kafka(free_port(), data, tmp_path / "second.log", timeout=60)
    message = str(refused.value)
    assert "\n" not in message and "exited with code" in message and "remove it" in message, message


def test_the_cli_reports_a_broker_that_cannot_start_in_one_line(tmp_path: Path) -> None:
    env = {"TOUCHSTREAM_KAFKA_LIBS": str(tmp_path / "empty"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "touchstream_cli", "local", "up", "--run-dir", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr, done.stderr
    assert "run `make kafka`" in done.stderr


async def round_trip(bootstrap: str, idempotent: bool) -> bytes:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=idempotent)
    await producer.start()
    try:
        meta = await producer.send_and_wait("smoke", b"hello", key=b"k")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        from aiokafka import TopicPartition

        tp = TopicPartition("smoke", meta.partition)
        consumer.assign([tp])
        consumer.seek(tp, meta.offset)
        record = await asyncio.wait_for(consumer.getone(), 20)
    finally:
        await consumer.stop()
    return bytes(record.value or b"")


def test_the_tansu_fallback_still_carries_records(tmp_path: Path) -> None:
    port = free_port()
    broker = start_tansu(port, tmp_path / "tansu.log")
    try:
        # Without the idempotent producer: Tansu refuses InitProducerId (broker_client_env turns it off).
        assert asyncio.run(round_trip(f"127.0.0.1:{port}", idempotent=False)) == b"hello"
    finally:
        broker.stop()


def test_kafka_takes_the_idempotent_producer(kafka_bootstrap: str) -> None:
    assert asyncio.run(round_trip(kafka_bootstrap, idempotent=True)) == b"hello"
