"""Ingest throughput against the raw produce rate of the same broker, measured in one run.

Starts the embedded broker (Apache Kafka) + Valkey (touchstream.embedded), runs ingest as its own process
(`python -m services.ingest`, uvicorn, one worker), and posts batches of 100 events from a
second process on loopback (a bare asyncio HTTP/1.1 client, several keep-alive connections). In the same run it
measures aiokafka producing the same records (same Avro bytes, acks=all) straight to the
broker from one process. Prints JSON:

- ingest events/s accepted, request latency p50/p99, CPU seconds the ingest process used;
- raw produce events/s and CPU seconds of the producing process;
- ratios ingest/raw for throughput and per core (events per CPU second of each process).

    .venv/bin/python bench/bench_ingest.py [--seconds 10] [--connections 8] [--batch 100]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.ingest.segment import to_touchpoint  # noqa: E402
from services.ingest.settings import hash_write_key  # noqa: E402
from touchstream import avro  # noqa: E402
from touchstream.embedded import (  # noqa: E402
    broker_client_env,
    broker_description,
    create_topics,
    embedded_broker_kind,
    free_port,
    spawn,
    start_broker,
    start_valkey,
    wait_for_port,
)
from touchstream.topics import TOUCHPOINTS_RAW  # noqa: E402

WRITE_KEY = "bench-key"
# The raw aiokafka baseline keys its records as ingest does (a keyed hash), so it pays the same per-event cost.
BENCH_HASH_KEY = b"bench-pii-hash-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def event(run: str, n: int) -> dict[str, Any]:
    """One realistic Segment track call (~450 bytes of JSON)."""
    return {
        "type": "track", "event": "Product Viewed", "userId": f"user-{n % 5000}", "messageId": f"{run}-{n}",
        "timestamp": "2026-11-25T10:00:00.000Z", "channel": "web",
        "properties": {"product_id": f"sku-{n % 977}", "price": 19.99, "category": "shoes", "position": n % 12},
        "context": {"ip": "203.0.113.7", "locale": "en-GB", "userAgent": "Mozilla/5.0 (X11; Linux x86_64)",
                    "traits": {"email": f"user{n % 5000}@example.org"}, "library": {"name": "bench"}},
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------- load generator (second process)

def batch_body_parts(batch: int) -> list[bytes]:
    """Return a batch body split where each event's messageId goes, so bodies cost a join, not a dumps."""
    marker = "@@MID@@"
    events = [{**event("x", n), "messageId": marker} for n in range(batch)]
    text = json.dumps({"batch": events, "sentAt": "2026-11-25T10:00:01.000Z"})
    return [part.encode() for part in text.split(marker)]


async def _post_batches(url: str, seconds: float, connections: int, batch: int, run: str) -> dict[str, Any]:
    # A bare HTTP/1.1 keep-alive client on asyncio streams: on a 2-core machine every CPU
    # cycle the load generator spends is taken from the server under test.
    host, port = url.removeprefix("http://").split(":")
    auth = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    parts = batch_body_parts(batch)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(10**9))
    accepted = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal accepted
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < deadline:
                pieces = [parts[0]]
                for part in parts[1:]:
                    pieces.append(f"{run}-{next(counter)}".encode())
                    pieces.append(part)
                body = b"".join(pieces)
                head = (f"POST /v1/batch HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic {auth}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                started = time.perf_counter()
                writer.write(head + body)
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                payload = await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                status = int(status_line.split()[1])
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    accepted += json.loads(payload)["accepted"]
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    return {"accepted": accepted, "elapsed_s": elapsed, "requests": len(latencies), "statuses": statuses,
            "latencies": latencies}


def run_client(args: argparse.Namespace) -> None:
    result = asyncio.run(_post_batches(args.url, args.seconds, args.connections, args.batch, args.run))
    print(json.dumps(result))


# ---------------------------------------------------------------- raw produce (this process)

async def raw_produce(bootstrap: str, values: list[tuple[bytes, bytes]], seconds: float, batched: bool
                      ) -> dict[str, float]:
    """Produce `values` over and over for `seconds`: one send() per record, or one record batch per partition."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.partitioner import DefaultPartitioner

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2, max_batch_size=256 * 1024)
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(TOUCHPOINTS_RAW.name))
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        for key, value in values:
            by_partition.setdefault(DefaultPartitioner()(key, partitions, partitions), []).append((key, value))
        sent = 0
        cpu_started, started = time.process_time(), time.perf_counter()
        while time.perf_counter() - started < seconds:
            futures = []
            if batched:
                for partition, records in by_partition.items():
                    batch = producer.create_batch()
                    for key, value in records:
                        batch.append(key=key, value=value, timestamp=None)
                    batch.close()
                    futures.append(await producer.send_batch(batch, TOUCHPOINTS_RAW.name, partition=partition))
            else:
                futures = [await producer.send(TOUCHPOINTS_RAW.name, value=value, key=key) for key, value in values]
            await asyncio.gather(*futures)
            sent += len(values)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        await producer.stop()
    return {"events_per_s": sent / elapsed, "cpu_s": cpu, "events_per_cpu_s": sent / cpu}


def same_records(count: int) -> list[tuple[bytes, bytes]]:
    from services.ingest.producer import record_key

    records = []
    for n in range(count):
        record = to_touchpoint(event("raw", n), None, "bench", int(time.time() * 1000), batch_sent_at_ms=None)
        records.append((record_key(record, BENCH_HASH_KEY), avro.encode(TOUCHPOINTS_RAW.schema, record)))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        run_client(args)
        return

    logs = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    kafka_port, redis_port, http_port = free_port(), free_port(), free_port()
    kind = embedded_broker_kind()
    broker = start_broker(kind, kafka_port, logs / "kafka", logs / "broker.log")
    redis = start_valkey(redis_port, logs / "valkey.log")
    ingest = None
    try:
        bootstrap = f"127.0.0.1:{kafka_port}"
        asyncio.run(create_topics(bootstrap, args.partitions))
        env = {
            "TOUCHSTREAM_KAFKA_BOOTSTRAP": bootstrap,
            **broker_client_env(kind),
            "TOUCHSTREAM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "TOUCHSTREAM_PARTITIONS": str(args.partitions),
            "TOUCHSTREAM_INGEST_PORT": str(http_port),
            "TOUCHSTREAM_INGEST_WRITE_KEYS": json.dumps({"bench": hash_write_key(WRITE_KEY)}),
            # High enough never to refuse, but on: its Redis script is part of the measured path.
            "TOUCHSTREAM_INGEST_RATE_LIMIT_EVENTS_PER_S": "1000000",
            "PYTHONPATH": str(REPO),
        }
        ingest = spawn("ingest", [sys.executable, "-m", "services.ingest"], logs / "ingest.log", env)
        wait_for_port(http_port, timeout=30, process=ingest)

        records = same_records(args.batch)
        raw = asyncio.run(raw_produce(bootstrap, records, args.seconds, batched=False))
        raw_batched = asyncio.run(raw_produce(bootstrap, records, args.seconds, batched=True))

        cpu_before = cpu_seconds(ingest.pid)
        client = subprocess.run(
            [sys.executable, __file__, "--client", "--url", f"http://127.0.0.1:{http_port}", "--run",
             f"r{time.time_ns()}", "--seconds", str(args.seconds), "--connections", str(args.connections),
             "--batch", str(args.batch)],
            capture_output=True, text=True, check=True)
        ingest_cpu = cpu_seconds(ingest.pid) - cpu_before
        load = json.loads(client.stdout)
        latencies = load.pop("latencies")
        ingest_eps = load["accepted"] / load["elapsed_s"]
        result = {
            "command": " ".join([".venv/bin/python bench/bench_ingest.py", *sys.argv[1:]]),
            "cores": os.cpu_count(),
            "broker": broker_description(kind),
            "batch_events": args.batch,
            "connections": args.connections,
            "ingest": {
                "events_per_s": round(ingest_eps),
                "requests": load["requests"],
                "statuses": load["statuses"],
                "latency_ms_p50": round(statistics.median(latencies) * 1000, 2),
                "latency_ms_p99": round(percentile(latencies, 0.99) * 1000, 2),
                "cpu_s": round(ingest_cpu, 2),
                "events_per_cpu_s": round(load["accepted"] / ingest_cpu) if ingest_cpu else None,
            },
            "raw_produce": {k: round(v, 2) for k, v in raw.items()},
            "raw_produce_batched": {k: round(v, 2) for k, v in raw_batched.items()},
            "record_bytes": len(same_records(1)[0][1]),
            "ratio_ingest_to_raw": round(ingest_eps / raw["events_per_s"], 3),
            "ratio_ingest_to_raw_per_core": (round((load["accepted"] / ingest_cpu) / raw["events_per_cpu_s"], 3)
                                             if ingest_cpu else None),
            "ratio_ingest_to_raw_batched_per_core": (
                round((load["accepted"] / ingest_cpu) / raw_batched["events_per_cpu_s"], 3) if ingest_cpu else None),
        }
        print(json.dumps(result, indent=2))
    finally:
        if ingest is not None:
            ingest.stop()
        redis.stop()
        broker.stop()


if __name__ == "__main__":
    main()
