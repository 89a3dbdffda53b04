"""aiokafka produce and consume rates against the embedded broker (Apache Kafka) on loopback.

Produces N records of a realistic size (an Avro TouchpointEvent is ~300 bytes) with acks=all,
as ingest does, then consumes them back from the start. Prints JSON. These bound what one
Python process can push through one client, not what Apache Kafka can take (far more).

    .venv/bin/python bench/bench_kafka_loopback.py [--records 200000] [--size 300] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from touchstream.embedded import broker_description, embedded_broker_kind, free_port, start_broker


async def measure(bootstrap: str, records: int, size: int, partitions: int) -> dict[str, float]:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic = f"bench-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, partitions, 1)])
    await admin.close()
    await asyncio.sleep(0.5)
    value = b"x" * size
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    started = time.perf_counter()
    # Windows of un-awaited sends, as ingest's batches are: one await per window, not per record.
    window = 5000
    for first in range(0, records, window):
        futures = [await producer.send(topic, value, key=str(i).encode()) for i in range(first, first + window)]
        await asyncio.gather(*futures)
    produce_s = time.perf_counter() - started
    await producer.stop()

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None, max_partition_fetch_bytes=4 * 1024 * 1024)
    await consumer.start()
    seen = 0
    started = time.perf_counter()
    while seen < records:
        batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
        seen += sum(len(b) for b in batches.values())
    consume_s = time.perf_counter() - started
    await consumer.stop()
    return {"records": records, "bytes": size, "partitions": partitions,
            "produce_per_s": round(records / produce_s), "consume_per_s": round(records / consume_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="20k records")
    args = parser.parse_args()
    if args.quick:
        args.records = 20_000
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        kind = embedded_broker_kind()
        broker = start_broker(kind, port, Path(tmp) / "kafka", Path(tmp) / "broker.log")
        try:
            result = asyncio.run(measure(f"127.0.0.1:{port}", args.records, args.size, args.partitions))
        finally:
            broker.stop()
    print(json.dumps({"bench": "kafka_loopback", "broker": broker_description(kind), **result}, indent=2))


if __name__ == "__main__":
    main()
