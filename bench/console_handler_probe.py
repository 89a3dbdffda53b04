"""One measurement for bench_console.py: the console's batch handler of a given source tree, in-process.

Run as `python bench/console_handler_probe.py SOURCE RECORDS BATCH REDIS_URL`: puts the source tree
first on the path, decodes the pickled (topic, key, value) records of the topics that tree consumes,
then times `updates_of` + `ReadModelStore.apply` over them in batches of BATCH (no broker, no
kernel: what the read model itself costs per record at that batch size) against an emptied Redis,
and prints one JSON line: CPU seconds of this process and of Redis, Redis memory and keys after.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import sys
import time
from pathlib import Path
from typing import Any


async def measure(raw: list[tuple[str, str, bytes]], batch: int, redis_url: str) -> dict[str, Any]:
    import redis.asyncio as aioredis
    from prometheus_client import CollectorRegistry

    from services.console.app import CONSUMED, updates_of
    from services.console.store import ReadModelStore
    from touchstream import avro
    from touchstream.metrics import ServiceMetrics
    from touchstream.streams import Record

    schemas = {spec.name: spec.schema for spec in CONSUMED}
    records = [Record(topic, 0, n, key.encode(), value, avro.decode(schemas[topic], value))
               for n, (topic, key, value) in enumerate(raw) if topic in schemas]
    client = aioredis.from_url(redis_url)
    store = ReadModelStore(client)
    metrics = ServiceMetrics("console", CollectorRegistry())
    await client.execute_command("FLUSHALL", "SYNC")  # another tree's read model may be there, in its own layout
    await store.apply(updates_of(records[:4], metrics))  # loads the scripts and opens the connection
    await client.execute_command("FLUSHALL", "SYNC")  # freed before the memory is read, not lazily
    memory_before = int((await client.info("memory"))["used_memory"])
    redis_before = await client.info("cpu")
    started = time.process_time()
    for n in range(0, len(records), batch):
        await store.apply(updates_of(records[n:n + batch], metrics))
    cpu_s = time.process_time() - started
    redis_after = await client.info("cpu")
    result = {
        "records": len(records), "cpu_s": cpu_s,
        "redis_cpu_s": sum(redis_after[k] - redis_before[k] for k in ("used_cpu_sys", "used_cpu_user")),
        "redis_bytes": int((await client.info("memory"))["used_memory"]) - memory_before,
        "redis_keys": int(await client.dbsize()),
    }
    await client.aclose()
    return result


if __name__ == "__main__":
    source, records_path, batch, url = sys.argv[1:5]
    sys.path.insert(0, source)
    print(json.dumps(asyncio.run(measure(pickle.loads(Path(records_path).read_bytes()), int(batch), url))))
