"""What Valkey's append-only fsync policy costs Redis traffic shaped like the stack's (`no`, `always`, `everysec`).

touchstream's embedded Valkey writes its append-only file before it answers and leaves the
flush to the kernel (`appendfsync no`; touchstream/embedded.py says why). This measures Valkey
alone under the three policies, side by side in one run: for each policy in turn (rounds
interleaved, so a change in the machine's load falls on all of them), a fresh Valkey on an
append-only file in a temporary directory, and `--clients` asyncio clients (the stack's five
services) each sending pipelines of `--batch` writes shaped like a stage's batch (an HSET of
a ~400-byte customer hash and a SET with expiry per event), as fast as answers come.

Printed JSON, per policy: writes_per_s (events' writes answered per second over all
clients), batch_p50_ms / batch_p99_ms (pipeline sent -> every answer), valkey_cpu_us_per_write
(Valkey's user+system CPU from INFO over the round), aof_delayed_fsync (times Valkey postponed
a write past two seconds because the disk was slow); and each policy's throughput and p99
as a ratio to `everysec` (Valkey's default). A fast client-bound loop like this one shows the
fsync mostly as Valkey CPU; what `always` costs the stack's latency (an fsync in every Valkey
event-loop turn that writes, each stage waiting on it) shows in bench/bench_pipeline.py run with
TOUCHSTREAM_VALKEY_APPENDFSYNC set. load_average is printed: the machine may be shared.

Usage: .venv/bin/python bench/bench_valkey_fsync.py [--seconds 5] [--rounds 3] [--clients 5] [--batch 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from touchstream.embedded import VALKEY_APPENDFSYNC_ENV, VALKEY_APPENDFSYNC_POLICIES, free_port, start_valkey
from touchstream.receiver import percentile

PAYLOAD = "x" * 40


async def client_loop(url: str, client_index: int, batch: int, stop_at: float, latencies: list[float]) -> int:
    client = aioredis.Redis.from_url(url)
    written = 0
    try:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            async with client.pipeline(transaction=False) as pipe:
                for i in range(batch):
                    key = f"bench:{client_index}:{written + i}"
                    pipe.hset(f"{key}:h", mapping={f"field{f}": PAYLOAD for f in range(10)})
                    pipe.set(f"{key}:s", "1", ex=3600)
                await pipe.execute()
            latencies.append(time.perf_counter() - started)
            written += batch
    finally:
        await client.aclose()
    return written


def valkey_cpu_s(info: dict[str, Any]) -> float:
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def one_round(policy: str, seconds: float, clients: int, batch: int) -> dict[str, Any]:
    os.environ[VALKEY_APPENDFSYNC_ENV] = policy
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_valkey(port, Path(tmp, "valkey.log"), Path(tmp, "data"))
        url = f"redis://127.0.0.1:{port}"
        admin = aioredis.Redis.from_url(url)
        try:
            cpu_before = valkey_cpu_s(await admin.info("cpu"))
            latencies: list[float] = []
            started = time.monotonic()
            written = await asyncio.gather(*(client_loop(url, c, batch, started + seconds, latencies)
                                             for c in range(clients)))
            elapsed = time.monotonic() - started
            cpu_after = valkey_cpu_s(await admin.info("cpu"))
            persistence = await admin.info("persistence")
        finally:
            await admin.aclose()
            server.stop()
    total = sum(written)
    latencies.sort()
    return {"writes": total, "seconds": elapsed, "cpu_s": cpu_after - cpu_before,
            "latencies": latencies, "aof_delayed_fsync": int(persistence.get("aof_delayed_fsync", 0))}


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    writes = sum(r["writes"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)
    latencies = sorted(x for r in rounds for x in r["latencies"])
    return {
        "writes_per_s": round(writes / seconds),
        "writes_per_s_by_round": [round(r["writes"] / r["seconds"]) for r in rounds],
        "batch_p50_ms": round((percentile(latencies, 0.50) or 0.0) * 1e3, 3),
        "batch_p99_ms": round((percentile(latencies, 0.99) or 0.0) * 1e3, 3),
        "valkey_cpu_us_per_write": round(sum(r["cpu_s"] for r in rounds) / writes * 1e6, 2),
        "aof_delayed_fsync": sum(r["aof_delayed_fsync"] for r in rounds),
    }


async def measure(seconds: float, rounds: int, clients: int, batch: int) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {policy: [] for policy in VALKEY_APPENDFSYNC_POLICIES}
    for _ in range(rounds):
        for policy in VALKEY_APPENDFSYNC_POLICIES:
            results[policy].append(await one_round(policy, seconds, clients, batch))
    by_policy = {policy: summarise(r) for policy, r in results.items()}
    everysec = by_policy["everysec"]
    return {
        "clients": clients, "batch": batch, "seconds_per_round": seconds, "rounds": rounds,
        "by_policy": by_policy,
        "ratio_vs_everysec": {
            policy: {key: round(figures[key] / everysec[key], 3)
                     for key in ("writes_per_s", "batch_p99_ms", "valkey_cpu_us_per_write")}
            for policy, figures in by_policy.items() if policy != "everysec"},
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each round per policy")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per policy")
    parser.add_argument("--clients", type=int, default=5, help="concurrent clients (the stack's services)")
    parser.add_argument("--batch", type=int, default=50, help="events per pipeline (two writes each)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.seconds, args.rounds, args.clients, args.batch)), indent=2))


if __name__ == "__main__":
    main()
