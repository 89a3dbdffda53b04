"""Identity graph throughput on one Redis primary: the real resolve script, batched as the service does.

Starts an embedded Valkey (one core, loopback), then runs `IdentityGraph.resolve` on batches
the way the identity service does (one pipeline of EVALSHA per batch), from several concurrent
clients as several identity workers would. Events carry 2-3 identifiers; a share of them reuse
an identifier seen before (attach) and some link two customers (merge).
Prints JSON: events/s (= EVALSHA/s) per concurrency level and the server's own CPU use.

    .venv/bin/python bench/bench_identity_graph.py [--events 200000] [--batch 500] [--clients 1,4,8] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from services.identity.domain import GraphLayout, ResolutionRequest, new_customer_id
from services.identity.graph import IdentityGraph
from services.identity.settings import IdentitySettings
from touchstream.embedded import free_port, start_valkey
from touchstream.identifiers import Identifier


def make_requests(count: int, seed: int, run: str) -> list[ResolutionRequest]:
    """Return `count` events: ~60% new customers, ~35% returning, ~5% linking two customers."""
    rng = random.Random(seed)
    requests: list[ResolutionRequest] = []
    for i in range(count):
        roll = rng.random()
        n = i if roll < 0.6 or i < 10 else rng.randrange(i)
        identifiers = [Identifier("email", f"{run}e{n:x}"), Identifier("device_id", f"{run}d{i:x}")]
        if roll > 0.95:
            identifiers.append(Identifier("phone", f"{run}p{rng.randrange(max(i, 1)):x}"))
        requests.append(ResolutionRequest(f"{run}-m{i}", 1_700_000_000_000 + i, tuple(identifiers),
                                          new_customer_id(identifiers)))
    return requests


async def run_level(url: str, clients: int, events: int, batch: int, run: str) -> dict[str, float]:
    layout = GraphLayout("bench:identity:{graph}:")
    connections = [aioredis.from_url(url) for _ in range(clients)]
    # The service's own merge rules and event TTL, as configured by default.
    settings = IdentitySettings()
    graphs = [IdentityGraph(c, layout, settings.graph_rules(), settings.event_ttl_s) for c in connections]
    await graphs[0].load_script()
    per_client = events // clients
    work = [make_requests(per_client, seed=k, run=f"{run}c{k}") for k in range(clients)]
    info_before = await connections[0].info("cpu")

    async def client(graph: IdentityGraph, requests: list[ResolutionRequest]) -> None:
        for start in range(0, len(requests), batch):
            await graph.resolve(requests[start:start + batch])

    started = time.perf_counter()
    await asyncio.gather(*(client(g, w) for g, w in zip(graphs, work, strict=True)))
    elapsed = time.perf_counter() - started
    done = per_client * clients
    info_after = await connections[0].info("cpu")
    server_cpu = (info_after["used_cpu_sys"] + info_after["used_cpu_user"]
                  - info_before["used_cpu_sys"] - info_before["used_cpu_user"])
    for c in connections:
        await c.aclose()
    return {"clients": clients, "events": done, "seconds": round(elapsed, 2),
            "events_per_s": round(done / elapsed), "server_cpu_share": round(server_cpu / elapsed, 2),
            # The client (Python) is usually the bottleneck here; the server's CPU per event
            # is what bounds one primary: 1e6 / this = events/s one fully busy core can take.
            "server_cpu_us_per_event": round(server_cpu / done * 1e6, 1)}


async def memory_by_key_kind(client: aioredis.Redis, sample: int = 2000) -> dict[str, float]:
    """Mean MEMORY USAGE of each kind of graph key (ident, customer hash, member set, event answer)."""
    kinds: dict[str, list[int]] = {"ident": [], "customer": [], "members": [], "event": []}
    async for key in client.scan_iter(match="bench:identity:*", count=1000):
        text = key.decode()
        kind = ("members" if text.endswith(":identifiers") else "event" if ":event:" in text
                else "customer" if ":customer:" in text else "ident")
        if len(kinds[kind]) < sample:
            kinds[kind].append(await client.memory_usage(key) or 0)
        if all(len(v) >= sample for v in kinds.values()):
            break
    return {kind: round(sum(v) / len(v)) for kind, v in kinds.items() if v}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--quick", action="store_true", help="20k events, 1 and 4 clients")
    args = parser.parse_args()
    if args.quick:
        args.events, args.clients = 20_000, "1,4"
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_valkey(port, Path(tmp) / "valkey.log")
        try:
            url = f"redis://127.0.0.1:{port}/0"
            results = {}
            for level in (int(c) for c in args.clients.split(",")):
                results[f"clients_{level}"] = await run_level(url, level, args.events, args.batch, run=f"r{level}")
            probe = aioredis.from_url(url)
            memory = (await probe.info("memory"))["used_memory"]
            keys = await probe.dbsize()
            per_kind = await memory_by_key_kind(probe)
            await probe.aclose()
        finally:
            server.stop()
    print(json.dumps({"bench": "identity_graph", "batch": args.batch, "results": results,
                      "redis_keys": keys, "redis_used_memory_bytes": memory,
                      "bytes_per_key": round(memory / max(keys, 1)), "bytes_by_key_kind": per_kind}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
