"""Pipeline throughput, latency, CPU per event and its efficiency, on the embedded runtime (issue 15).

One stack (`touchstream local up`: Apache Kafka, Valkey, the five services, a webhook
receiver; 4 partitions, one worker per service) runs two workloads (bench/pipeline_workloads.py):

- mix: a CDNOW-like stream (CDNOW's own orders for a sample of its customers, with page
  views, second devices and complaints) under the default rules (deploy/rules/default.yaml);
  a minority of events fires an action. Its shape and the share that fired are in the JSON.
- one_webhook_per_event: a new customer per event and a rule firing on the first score.

How each figure is measured:

- events_per_s (sustained): after a warm-up (an unmeasured relay through the broker, so its JIT
  has compiled the request paths, and 1,000 events of the workload), events are posted to
  ingest's /v1/batch (100 per request) as fast as the pipeline takes them, with at most
  `--backlog` (2,000: enough to keep every stage's 500-event batches full) posted but not yet
  consumed by triggers, as a saturated system with a bounded queue runs; the clock stops when every stage
  is drained: identity resolved every event, scoring, triggers and the console have consumed
  and committed everything upstream produced, and every fired action (but those held by quiet
  hours) reached the receiver. events_per_s = events / (first POST -> drained).
- cpu_us_per_event (stack): CPU seconds of every process of the stack (each component's whole
  process group: broker, Valkey, receiver, services) over that same window, from /proc/PID/stat,
  divided by the events; `cpu_system_share` is each one's kernel share. The benchmark's own
  client is not counted; its scrapes of /metrics cost the services ~1 ms each, a few a second.
  `idle_cpu_us_per_event`: what the idle stack (polls, heartbeats, timers) spends in as long.
- irreducible_us_per_event: the sum of four parts measured in the same run (bench/irreducible.py):
  relay_us, an aiokafka relay moving as many records of the same sizes through the same hops on
  the stack's own broker (relay processes + broker from /proc, the broker's idle rate with the
  stack idle subtracted); redis_resolve_us, Redis's CPU per identity resolve-script call on a
  fresh Valkey (append-only file, as the stack's) with the workload's events resolved in the
  worker's mean batch size from this run, times resolves per event; model_learn_predict_us, scoring's
  model predicting and learning every event of the workload in 500-event batches, on scoring's
  own silent paths of it (time.process_time); webhook_us, client + receiver CPU of one signed POST (WebhookSender
  against the receiver process, /proc), times the webhooks per event measured in the run.
  efficiency = irreducible_us_per_event / stack_us_per_event.
- latency: the one-webhook workload offered as a steady stream (a request every ~10 ms, open
  loop) at 25/50/75/90% of its measured sustained rate; p50/p99 of accepted (ingest's receive
  time) -> webhook received, for that level's events only, with the level's mean identity batch
  and CPU per event (small batches pay each stage's per-batch costs on few events).
- redis_bytes_per_customer: Valkey's used_memory after minus before a workload's run, less the
  growth of scoring's model checkpoint (one key per deployment), divided by that workload's
  customers (people, not events); `redis_bytes_per_customer_by_service` splits it by the key
  prefix of each service (sampled MEMORY USAGE, before and after the run);
  `redis_bytes_by_key_family` estimates where the bytes sit at the end (MEMORY USAGE of sampled
  keys x keys per family).
- load_average (1, 5, 15 min) is printed with every figure: the machine may be shared.

Usage: .venv/bin/python bench/bench_pipeline.py [--quick] [--events N] [--scale] [--memory-only]

--quick (3,000 events per workload, 10 s per latency level) takes a few minutes; the default
(20,000 events, 30 s per level) under ~10 minutes on 2 busy cores. --scale adds the older sweep of the
one-webhook workload at 1, 2 and 4 partitions x workers (a fresh stack each). --memory-only stops
after the two throughput runs: their Redis figures, per service and per key family, in about half the time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import redis
from irreducible import (
    TopicLoad,
    model_learn_predict_cpu,
    redis_resolve_cpu,
    relay_cpu,
    topic_record_sizes,
    webhook_post_cpu,
)
from pipeline_workloads import (
    DEFAULT_RULES_FILE,
    ONE_WEBHOOK_RULE_ID,
    ONE_WEBHOOK_RULES,
    MixShape,
    cdnow_mix,
    one_webhook_calls,
    track_call,
)
from proc_cpu import components_cpu_s, load_average

from services.identity.metrics import CUSTOMERS_CREATED_TOTAL
from services.triggers.metrics import ACTIONS_TOTAL as TRIGGERS_ACTIONS_TOTAL
from touchstream.datasets import cdnow_purchases
from touchstream.embedded import broker_description, embedded_broker_kind, stop_pid
from touchstream.eventtime import DAY_MS
from touchstream.metrics import batch_size_events, consumer_lag_messages, events_in_total, events_out_total
from touchstream.receiver import WEBHOOKS_TOTAL, percentile
from touchstream.replay import sum_metric
from touchstream.topics import ACTIONS, SCORES, TOUCHPOINTS_RAW, TOUCHPOINTS_RESOLVED
from touchstream_cli import local

# bench_console imports these three from here.
RULES = ONE_WEBHOOK_RULES
__all__ = ["RULES", "post_events", "track_call", "wait_for_webhooks"]

TARGETS = {"mix_events_per_s": 2000, "one_webhook_events_per_s": 1000, "p99_ms_at_half_load": 250,
           "redis_bytes_per_customer": 2048}
RULES_ENV = "TOUCHSTREAM_TRIGGERS_RULES_FILE"
# The mix replays CDNOW's 18 months as if live: with triggers' default 72 h backfill horizon every
# decision in it would be a `backfill` outcome and the mix would send no webhook at all.
BACKFILL_HORIZON_ENV = "TOUCHSTREAM_TRIGGERS_BACKFILL_HORIZON_HOURS"
MIX_BACKFILL_HORIZON_HOURS = str(3 * 365 * 24)
PIPELINE_TOPICS = (TOUCHPOINTS_RAW, TOUCHPOINTS_RESOLVED, SCORES, ACTIONS)
# A request every ~10 ms when offering a steady rate: batches of rate/100 events.
STEADY_REQUESTS_PER_S = 100
# Keys sampled per key family (MEMORY USAGE) for a workload's growth by family: the families mix
# workloads whose keys differ tenfold in size (a mix customer's console hash against a one-event
# one), and 100 samples moved a family's estimate by a quarter between runs.
FAMILY_SAMPLE = 1000


# ---------------------------------------------------------------- the upstream client
def _auth_header(write_key: str) -> str:
    return "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()


class Backlog:
    """Hold posting while more than `limit` posted events are not yet consumed by triggers."""

    def __init__(self, state: local.StackState, limit: int) -> None:
        self.url = f"{state.url('triggers')}/metrics"
        self.limit = limit
        self.baseline: float | None = None
        self.consumed = 0.0

    async def _read(self, session: aiohttp.ClientSession) -> float:
        async with session.get(self.url) as answer:
            return sum_metric(await answer.text(), events_in_total("triggers"), topic=SCORES.name)

    async def wait_for_room(self, session: aiohttp.ClientSession, posted: int) -> None:
        if self.baseline is None:
            self.baseline = await self._read(session)
        # Triggers' metrics are read only near the limit: each read costs its worker a render.
        while posted - self.consumed > self.limit:
            self.consumed = await self._read(session) - self.baseline
            if posted - self.consumed > self.limit:
                await asyncio.sleep(0.25)


async def post_events(state: local.StackState, calls: Sequence[dict[str, Any]], rate: float | None,
                      batch_size: int = 100, concurrency: int = 4, backlog: Backlog | None = None,
                      retried: Counter[int] | None = None) -> float:
    """POST `calls` to /v1/batch as fast as allowed, or as a steady stream at `rate` events/s; return the seconds.

    A 429 (ingest's rate limit) or a 503 that says `retry` (the broker did not acknowledge in
    time) is sent again after a pause, as an SDK would, and so is a request whose kept-alive
    connection the server closed as it was sent (ingest dedupes by messageId, so a resend is
    safe); `retried` counts them by status (0 for a lost connection).
    """
    bodies = [orjson.dumps({"batch": list(calls[i:i + batch_size])}) for i in range(0, len(calls), batch_size)]
    headers = {"Authorization": _auth_header(state.write_key), "Content-Type": "application/json"}
    url = f"{state.url('ingest')}/v1/batch"
    # Open loop at a steady rate: requests leave on schedule whatever the answers' delays.
    in_flight = asyncio.Semaphore(256 if rate else concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def post(body: bytes) -> None:
            try:
                while True:
                    try:
                        async with session.post(url, data=body, headers=headers) as answer:
                            status, text = answer.status, await answer.text()
                            retry_after = answer.headers.get("Retry-After")
                    except (aiohttp.ClientOSError, aiohttp.ClientConnectionResetError, aiohttp.ServerDisconnectedError):
                        if retried is not None:
                            retried[0] += 1
                        await asyncio.sleep(0.1)
                        continue
                    if status == 429 or (status == 503 and '"retry":true' in text):
                        if retried is not None:
                            retried[status] += 1
                        await asyncio.sleep(float(retry_after or 0.5))
                        continue
                    if status >= 300:
                        raise RuntimeError(f"ingest answered {status}: {text[:300]}")
                    return
            finally:
                in_flight.release()

        t0 = time.perf_counter()
        tasks = []
        for number, body in enumerate(bodies):
            if rate:
                await asyncio.sleep(max(0.0, t0 + number * batch_size / rate - time.perf_counter()))
            if backlog is not None:
                await backlog.wait_for_room(session, number * batch_size)
            await in_flight.acquire()
            tasks.append(asyncio.create_task(post(body)))
        await asyncio.gather(*tasks)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- progress of the stack
# Gauges among the counters: a difference of two readings of these means nothing.
LAGS = ("identity_lag", "scoring_lag", "triggers_lag", "console_lag")


@dataclass(frozen=True)
class Counters:
    """Where each stage has got, from the services' and the receiver's /metrics."""

    values: dict[str, float]

    def __sub__(self, other: Counters) -> Counters:
        """Counts since `other`; the consumer lags as they are now."""
        return Counters({k: v if k in LAGS else v - other.values.get(k, 0.0) for k, v in self.values.items()})

    def __getitem__(self, name: str) -> float:
        return self.values[name]


def read_counters(client: httpx.Client, state: local.StackState) -> Counters:
    """Scrape every stage, upstream first: a stage read later has done at least what it saw then."""

    def text(name: str) -> str:
        return client.get(f"{state.url(name)}/metrics", timeout=10).text

    values: dict[str, float] = {}
    ingest = text("ingest")
    values["ingest_out_raw"] = sum_metric(ingest, events_out_total("ingest"), topic=TOUCHPOINTS_RAW.name)
    identity = text("identity")
    values["identity_out_resolved"] = sum_metric(identity, events_out_total("identity"),
                                                 topic=TOUCHPOINTS_RESOLVED.name)
    values["identity_customers_created"] = sum_metric(identity, CUSTOMERS_CREATED_TOTAL)
    values["identity_batches"] = sum_metric(identity, batch_size_events("identity") + "_count")
    values["identity_batched_events"] = sum_metric(identity, batch_size_events("identity") + "_sum")
    values["identity_lag"] = sum_metric(identity, consumer_lag_messages("identity"))
    scoring = text("scoring")
    values["scoring_in_resolved"] = sum_metric(scoring, events_in_total("scoring"),
                                               topic=TOUCHPOINTS_RESOLVED.name)
    values["scoring_out_scores"] = sum_metric(scoring, events_out_total("scoring"), topic=SCORES.name)
    values["scoring_lag"] = sum_metric(scoring, consumer_lag_messages("scoring"))
    triggers = text("triggers")
    values["triggers_in_scores"] = sum_metric(triggers, events_in_total("triggers"), topic=SCORES.name)
    values["triggers_out_actions"] = sum_metric(triggers, events_out_total("triggers"), topic=ACTIONS.name)
    values["triggers_in_actions"] = sum_metric(triggers, events_in_total("triggers"), topic=ACTIONS.name)
    values["triggers_fired"] = sum_metric(triggers, TRIGGERS_ACTIONS_TOTAL, outcome="fired")
    values["triggers_held"] = sum_metric(triggers, TRIGGERS_ACTIONS_TOTAL, outcome="fired",
                                         reason="quiet_hours_hold")
    values["triggers_lag"] = sum_metric(triggers, consumer_lag_messages("triggers"))
    for rule, outcome, count in _actions_by_rule(triggers):
        values[f"action {rule} {outcome}"] = count
    console = text("console")
    for spec in (TOUCHPOINTS_RESOLVED, SCORES, ACTIONS):
        values[f"console_in_{spec.name}"] = sum_metric(console, events_in_total("console"), topic=spec.name)
    values["console_lag"] = sum_metric(console, consumer_lag_messages("console"))
    values["webhooks"] = sum_metric(text("receiver"), WEBHOOKS_TOTAL, result="new")
    return Counters(values)


def _actions_by_rule(metrics_text: str) -> list[tuple[str, str, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == TRIGGERS_ACTIONS_TOTAL:
                key = (sample.labels["rule"], sample.labels["outcome"])
                totals[key] = totals.get(key, 0.0) + sample.value
    return [(rule, outcome, count) for (rule, outcome), count in sorted(totals.items())]


def drained(done: Counters, events: int) -> bool:
    """Say whether every stage has handled `events` new events and everything they led to (`done` = deltas)."""
    return (done["ingest_out_raw"] >= events
            and done["identity_out_resolved"] >= events
            and done["scoring_in_resolved"] >= done["identity_out_resolved"] and done["scoring_lag"] == 0
            and done["triggers_in_scores"] >= done["scoring_out_scores"]
            and done["triggers_in_actions"] >= done["triggers_out_actions"] and done["triggers_lag"] == 0
            and done[f"console_in_{TOUCHPOINTS_RESOLVED.name}"] >= done["identity_out_resolved"]
            and done[f"console_in_{SCORES.name}"] >= done["scoring_out_scores"]
            and done[f"console_in_{ACTIONS.name}"] >= done["triggers_out_actions"] and done["console_lag"] == 0
            # Actions held by quiet hours are delivered when the window opens, hours from now.
            and done["webhooks"] >= done["triggers_fired"] - done["triggers_held"])


def wait_drained(client: httpx.Client, state: local.StackState, before: Counters, events: int,
                 timeout_s: float) -> tuple[float, Counters]:
    """Wait until the stack has handled `events` more events; return when (perf_counter) and the counters."""
    deadline = time.perf_counter() + timeout_s
    while True:
        now = read_counters(client, state)
        if drained(now - before, events):
            return time.perf_counter(), now
        if time.perf_counter() > deadline:
            raise TimeoutError(f"not drained after {timeout_s:.0f}s: {(now - before).values}")
        # A scrape costs each service ~1 ms of CPU (measured): at 4 a second, well under 1% of a run's.
        time.sleep(0.25)


def wait_for_webhooks(state: local.StackState, target: int, timeout: float = 900) -> float:
    """Wait until the receiver has `target` distinct webhooks; return when (perf_counter)."""
    deadline = time.perf_counter() + timeout
    with httpx.Client() as client:
        while time.perf_counter() < deadline:
            text = client.get(f"{state.url('receiver')}/metrics", timeout=10).text
            if sum_metric(text, WEBHOOKS_TOTAL, result="new") >= target:
                return time.perf_counter()
            time.sleep(0.1)
    raise TimeoutError(f"fewer than {target} webhooks after {timeout}s")


# ---------------------------------------------------------------- one workload's run
@dataclass
class WorkloadRun:
    """A workload's measured run and what the irreducible parts need from it."""

    result: dict[str, Any]
    done: Counters
    record_sizes: dict[str, Any]
    webhook_bodies: list[str]


def redis_used_memory(state: local.StackState) -> int:
    return int(redis.Redis.from_url(state.redis_url).info("memory")["used_memory"])


def delivered_bodies(state: local.StackState, limit: int, rule_ids: set[str] | None = None,
                     exclude: set[str] | None = None) -> list[dict[str, Any]]:
    """Return the latest deliveries (webhook_id, body, arrived_at_ms), optionally only of some rules."""
    deliveries = httpx.get(f"{state.url('receiver')}/deliveries", params={"limit": limit}, timeout=60).json()
    return [d for d in deliveries
            if (rule_ids is None or d["body"].get("rule_id") in rule_ids)
            and (exclude is None or d["body"].get("rule_id") not in exclude)]


def run_workload(state: local.StackState, calls: Sequence[dict[str, Any]], warm: Sequence[dict[str, Any]],
                 customers: int, backlog: int, timeout_s: float, exclude_rules: set[str] | None = None,
                 ) -> WorkloadRun:
    """Warm the stack up, then measure `calls`: sustained events/s, CPU per event per component, Redis bytes."""
    events = len(calls)
    with httpx.Client() as client:
        # Warm-up: connections, script loads and first batches are paid before the clock starts.
        before_warm = read_counters(client, state)
        asyncio.run(post_events(state, warm, None))
        wait_drained(client, state, before_warm, len(warm), timeout_s)
        memory_before = redis_used_memory(state)
        families_before = redis_bytes_by_key_family(state, sample_per_family=FAMILY_SAMPLE)
        before = read_counters(client, state)
        load_before = load_average()
        cpu_before = components_cpu_s(state.pids)
        system_before = components_cpu_s(state.pids, system_only=True)
        t0 = time.perf_counter()
        retried: Counter[int] = Counter()
        posted_s = asyncio.run(post_events(state, calls, None, backlog=Backlog(state, backlog), retried=retried))
        t_end, after = wait_drained(client, state, before, events, timeout_s)
        cpu_after = components_cpu_s(state.pids)
        system_after = components_cpu_s(state.pids, system_only=True)
    elapsed = t_end - t0
    done = after - before
    memory_after = redis_used_memory(state)
    families_after = redis_bytes_by_key_family(state, sample_per_family=FAMILY_SAMPLE)
    services_before, services_after = by_service(families_before), by_service(families_after)
    checkpoint_growth = services_after.get(MODEL_CHECKPOINT, 0) - services_before.get(MODEL_CHECKPOINT, 0)
    cpu_us = {name: round((cpu_after[name] - cpu_before.get(name, 0.0)) / events * 1e6, 1) for name in cpu_after}
    cpu_us = dict(sorted(cpu_us.items(), key=lambda item: -item[1]))
    stack_us = round(sum(cpu_us.values()), 1)
    spent = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    system_share = {name: round((system_after[name] - system_before.get(name, 0.0)) / spent[name], 2)
                    for name in cpu_us if spent[name] > 0}
    fired = {key.removeprefix("action "): int(value) for key, value in done.values.items()
             if key.startswith("action ") and value}
    result: dict[str, Any] = {
        "events": events, "seconds": round(elapsed, 2), "events_per_s": round(events / elapsed, 1),
        "posted_in_s": round(posted_s, 2), "backlog_limit_events": backlog,
        "ingest_requests_retried": {str(status): count for status, count in sorted(retried.items())},
        "cpu_us_per_event": {**cpu_us, "total": stack_us},
        # Kernel time (system calls: socket reads and writes, fsync) as a share of each component's CPU.
        "cpu_system_share": system_share,
        "cpu_bound_events_per_s": round((multiprocessing.cpu_count() * 1e6) / stack_us, 1) if stack_us else None,
        "records_per_event": {
            TOUCHPOINTS_RESOLVED.name: round(done["identity_out_resolved"] / events, 4),
            SCORES.name: round(done["scoring_out_scores"] / events, 4),
            ACTIONS.name: round(done["triggers_out_actions"] / events, 4),
        },
        "identity_mean_batch_events": round(done["identity_batched_events"] / max(done["identity_batches"], 1), 1),
        "fired_share_of_events": round(done["triggers_fired"] / events, 4),
        "webhooks_per_event": round(done["webhooks"] / events, 4),
        "held_by_quiet_hours": int(done["triggers_held"]),
        "actions_by_rule_and_outcome": fired,
        "customers": customers,
        "identity_customers_created": int(done["identity_customers_created"]),
        # Less the scoring model's checkpoint: one key of ~2.4 MB whatever the customers, first
        # written (or grown) during whichever run comes first; over the mix's 250 customers it
        # alone read as ~10 KB per customer.
        "redis_bytes_per_customer": round((memory_after - memory_before - checkpoint_growth) / max(customers, 1)),
        "redis_bytes_per_event": round((memory_after - memory_before - checkpoint_growth) / events),
        "redis_model_checkpoint_growth_bytes": checkpoint_growth,
        # Estimated from sampled MEMORY USAGE per key family (redis_bytes_by_key_family), not used_memory.
        "redis_bytes_per_customer_by_service": {
            name: round((services_after.get(name, 0) - services_before.get(name, 0)) / max(customers, 1))
            for name in sorted(services_after, key=lambda n: -(services_after[n] - services_before.get(n, 0)))},
        # The same per key family (key name up to its first id), largest first: what grew with this workload.
        "redis_bytes_per_customer_by_key_family": family_growth_per_customer(families_before, families_after,
                                                                             customers),
        "load_average_before": load_before,
        "load_average": load_average(),
    }
    topics = [spec.name for spec in PIPELINE_TOPICS]
    sizes = asyncio.run(topic_record_sizes(state.kafka_bootstrap, topics, state.partitions))
    bodies = [json.dumps(d["body"], ensure_ascii=False, separators=(",", ":"))
              for d in delivered_bodies(state, 2000, exclude=exclude_rules)]
    return WorkloadRun(result, done, sizes, bodies)


def switch_rules(state: local.StackState, rules_file: Path, text: str) -> None:
    """Give triggers another rule file: write it, stop the worker gracefully, start it again."""
    rules_file.write_text(text)
    stop_pid(state.pids["triggers"], timeout=30.0)
    state.pids["triggers"] = local.start(Path(state.run_dir), "triggers")


def latency_levels(state: local.StackState, max_rate: float, levels: Sequence[float], seconds: float, run: str,
                   timeout_s: float) -> list[dict[str, Any]]:
    """Offer the one-webhook workload steadily at each share of `max_rate`; p50/p99 accepted -> webhook."""
    results = []
    with httpx.Client() as client:
        for level in levels:
            rate = max_rate * level
            count = max(200, int(rate * seconds))
            calls = one_webhook_calls(f"{run}-l{round(level * 100)}", count)
            before = read_counters(client, state)
            cpu_before = components_cpu_s(state.pids)
            batch = max(1, round(rate / STEADY_REQUESTS_PER_S))
            retried: Counter[int] = Counter()
            posted_s = asyncio.run(post_events(state, calls, rate, batch_size=batch, retried=retried))
            _, after = wait_drained(client, state, before, count, timeout_s)
            cpu_after = components_cpu_s(state.pids)
            done = after - before
            deliveries = delivered_bodies(state, count * 2, rule_ids={ONE_WEBHOOK_RULE_ID})[-count:]
            latencies = sorted((d["arrived_at_ms"] - d["body"]["received_at_ms"]) / 1000 for d in deliveries)
            results.append({
                "load": level, "offered_events_per_s": round(rate, 1), "achieved_offer_events_per_s":
                round(count / posted_s, 1), "events": count, "events_per_request": batch,
                "p50_ms": round((percentile(latencies, 0.5) or 0) * 1000, 1),
                "p99_ms": round((percentile(latencies, 0.99) or 0) * 1000, 1),
                "ingest_requests_retried": {str(status): n for status, n in sorted(retried.items())},
                # A steady stream makes small batches, and each stage pays its per-batch costs on few events.
                "identity_mean_batch_events": round(done["identity_batched_events"] / max(done["identity_batches"], 1),
                                                    1),
                "cpu_us_per_event": round(sum(cpu_after[k] - cpu_before.get(k, 0.0) for k in cpu_after) / count * 1e6,
                                          1),
                "cpu_us_per_event_by_component": {k: round((cpu_after[k] - cpu_before.get(k, 0.0)) / count * 1e6, 1)
                                                  for k in sorted(cpu_after, key=lambda k: cpu_before.get(k, 0.0)
                                                                  - cpu_after[k])},
                "load_average": load_average()})
    return results


def redis_bytes_by_key_family(state: local.StackState, sample_per_family: int = 200) -> dict[str, Any]:
    """Estimate where Redis's bytes sit: keys per family (key name up to its first id) x sampled MEMORY USAGE."""
    client = redis.Redis.from_url(state.redis_url)
    keys: dict[str, list[bytes]] = {}
    counts: Counter[str] = Counter()
    for key in client.scan_iter(count=2000):
        family = _key_family(key.decode(errors="replace"))
        counts[family] += 1
        if len(keys.setdefault(family, [])) < sample_per_family:
            keys[family].append(key)
    estimate = {}
    for family, sample in keys.items():
        pipe = client.pipeline(transaction=False)
        for key in sample:
            pipe.memory_usage(key)
        sizes = [size or 0 for size in pipe.execute()]
        estimate[family] = {"keys": counts[family], "bytes": round(sum(sizes) / len(sizes) * counts[family])}
    return dict(sorted(estimate.items(), key=lambda item: -item[1]["bytes"]))


# Each service's keys by their prefix (the services' default settings).
SERVICE_KEY_PREFIXES = (("identity", "ts:identity:"), ("scoring", "ts:scoring:"), ("triggers", "triggers:"),
                        ("console", "ts:console:"), ("ingest", "ts:in:"))


# Scoring's model checkpoint: one key per deployment, not per customer, counted apart.
MODEL_CHECKPOINT = "scoring model checkpoint (not per customer)"


def service_of_key_family(family: str) -> str:
    """Name the service that owns a key family (its key prefix), or "other"."""
    if family.startswith("ts:scoring:model"):
        return MODEL_CHECKPOINT
    return next((name for name, prefix in SERVICE_KEY_PREFIXES if f"{family}:".startswith(prefix)), "other")


def by_service(families: dict[str, Any]) -> dict[str, int]:
    """Sum a `redis_bytes_by_key_family` estimate by the service owning each family."""
    totals: Counter[str] = Counter()
    for family, estimate in families.items():
        totals[service_of_key_family(family)] += estimate["bytes"]
    return dict(totals)


def family_growth_per_customer(before: dict[str, Any], after: dict[str, Any], customers: int,
                               ) -> dict[str, dict[str, int]]:
    """Per key family: keys and bytes (estimated) added per customer between two estimates, largest first."""
    growth = {}
    for family, estimate in after.items():
        was = before.get(family, {"keys": 0, "bytes": 0})
        added = estimate["bytes"] - was["bytes"]
        if added:
            growth[family] = {"bytes": round(added / max(customers, 1)),
                              "keys_per_customer_x100": round((estimate["keys"] - was["keys"]) * 100
                                                              / max(customers, 1))}
    return dict(sorted(growth.items(), key=lambda item: -item[1]["bytes"]))


def stack_idle_cpu_share(state: local.StackState, seconds: float = 5.0) -> dict[str, Any]:
    """Return the cores each component uses while the stack has nothing to do."""
    before = components_cpu_s(state.pids)
    time.sleep(seconds)
    after = components_cpu_s(state.pids)
    share = {name: round((after[name] - before.get(name, 0.0)) / seconds, 3) for name in after}
    return {**share, "total": round(sum(share.values()), 3), "load_average": load_average()}


def _key_family(key: str) -> str:
    parts = []
    for part in key.split(":")[:5]:
        if any(ch.isdigit() for ch in part):
            break
        parts.append(part)
    return ":".join(parts) or "(other)"


# ---------------------------------------------------------------- efficiency
def topic_loads(run: WorkloadRun, events: int) -> list[TopicLoad]:
    """The records per event and sizes the stack's topics carried in `run`, for the relay to repeat."""
    per_event = {TOUCHPOINTS_RAW.name: Fraction(1),
                 TOUCHPOINTS_RESOLVED.name: Fraction(int(run.done["identity_out_resolved"]), events),
                 SCORES.name: Fraction(int(run.done["scoring_out_scores"]), events),
                 ACTIONS.name: Fraction(int(run.done["triggers_out_actions"]), events)}
    loads = []
    for topic, share in per_event.items():
        if not share:
            break  # nothing flowed past here in this workload
        size = run.record_sizes.get(topic)
        if size is None:
            raise RuntimeError(f"no record of {topic} could be read back to size the relay's")
        loads.append(TopicLoad(topic, share, size["key"], size["value"]))
    return loads


def efficiency(run: WorkloadRun, relay: dict[str, Any], redis_resolve: dict[str, Any],
               model_learn_predict: dict[str, Any], webhook_post: dict[str, Any]) -> dict[str, Any]:
    """Irreducible CPU per event (its parts) against the whole stack's, for one workload."""
    events = run.result["events"]
    resolves_per_event = run.done["identity_out_resolved"] / events
    parts = {
        "relay_us": relay["cpu_us_per_event"]["total"],
        "redis_resolve_us": redis_resolve["redis_cpu_us_per_call"] * resolves_per_event,
        "model_learn_predict_us": model_learn_predict["us_per_event"],
        "webhook_us": webhook_post["us_per_post"] * run.result["webhooks_per_event"],
    }
    irreducible = sum(parts.values())
    stack = run.result["cpu_us_per_event"]["total"]
    return {"irreducible_us_per_event": round(irreducible, 1), "parts": {k: round(v, 1) for k, v in parts.items()},
            "stack_us_per_event": stack, "efficiency": round(irreducible / stack, 3) if stack else None,
            "webhooks_per_event": run.result["webhooks_per_event"], "resolves_per_event": round(resolves_per_event, 4)}


# ---------------------------------------------------------------- main
def measure(events: int, quick: bool, backlog: int, partitions: int, workers: int,
            memory_only: bool = False) -> dict[str, Any]:
    load_before = load_average()
    run = uuid.uuid4().hex[:6]
    timeout_s = 300.0 if quick else 900.0
    now_ms = int(time.time() * 1000)
    purchases = cdnow_purchases()
    shape = MixShape()
    # The mix ends a week ago in event time (a complaint's answer comes up to ~4 days after the last
    # order, and must not be in the future); its warm-up ends before the mix's first event.
    mix_end_ms = now_ms - 7 * DAY_MS
    mix = cdnow_mix(run, events, mix_end_ms, shape=shape, purchases=purchases)
    mix_warm = cdnow_mix(f"{run}w", 1000, mix_end_ms - 600 * DAY_MS, shape=shape, purchases=purchases)
    one = one_webhook_calls(run, events)
    one_warm = one_webhook_calls(f"{run}w", 1000)
    latency_s = 10.0 if quick else 30.0
    report: dict[str, Any] = {"bench": "pipeline", "broker": broker_description(embedded_broker_kind()),
                              "cores": multiprocessing.cpu_count(), "partitions": partitions,
                              "workers_per_service": workers, "targets": TARGETS, "load_average_before": load_before}
    with tempfile.TemporaryDirectory(prefix="touchstream-bench-") as tmp:
        run_dir = Path(tmp)
        rules_file = run_dir / "rules.yaml"
        rules_file.write_text(DEFAULT_RULES_FILE.read_text())
        state = local.up(run_dir, partitions=partitions, workers=workers, progress=False,
                         env_overrides={RULES_ENV: str(rules_file), BACKFILL_HORIZON_ENV: MIX_BACKFILL_HORIZON_HOURS})
        try:
            # The broker's JIT compiles its request paths over its first thousands of requests: a
            # relay of the nominal shape first, so the workloads and the relays meet the same broker.
            relay_cpu(state.kafka_bootstrap, state.pids["broker"], partitions, 20_000,
                      [TopicLoad(spec.name, Fraction(1), 26, 300) for spec in PIPELINE_TOPICS], idle_window_s=0.1)
            print("stack up and warm; running the mix", file=sys.stderr, flush=True)
            mix_run = run_workload(state, mix.calls, mix_warm.calls, mix.customers, backlog, timeout_s,
                                   exclude_rules={ONE_WEBHOOK_RULE_ID})
            mix_run.result["shape"] = {**shape.describe(), **mix.describe(), "rules": "deploy/rules/default.yaml"}
            print(json.dumps({"mix": mix_run.result}), file=sys.stderr, flush=True)
            switch_rules(state, rules_file, ONE_WEBHOOK_RULES)
            one_run = run_workload(state, one, one_warm, len(one), backlog, timeout_s)
            print(json.dumps({"one_webhook_per_event": one_run.result}), file=sys.stderr, flush=True)
            if memory_only:
                report["workloads"] = {"mix": mix_run.result, "one_webhook_per_event": one_run.result}
                report["redis_bytes_by_key_family"] = redis_bytes_by_key_family(state)
                report["load_average_after"] = load_average()
                return report
            one_run.result["latency"] = latency_levels(state, one_run.result["events_per_s"], (0.25, 0.5, 0.75, 0.9),
                                                       latency_s, run, timeout_s)
            print(json.dumps({"latency": one_run.result["latency"]}), file=sys.stderr, flush=True)
            report["redis_bytes_by_key_family"] = redis_bytes_by_key_family(state)
            idle = stack_idle_cpu_share(state)
            report["stack_idle_cpu_share"] = idle
            for workload in (mix_run, one_run):
                # What the stack spends with nothing to do (polls, heartbeats, timers), spread over the run's events.
                workload.result["idle_cpu_us_per_event"] = round(
                    idle["total"] * workload.result["seconds"] / workload.result["events"] * 1e6, 1)
            relay_events = max(events, 20_000)
            relays = {name: relay_cpu(state.kafka_bootstrap, state.pids["broker"], partitions, relay_events,
                                      topic_loads(workload, workload.result["events"]))
                      for name, workload in (("mix", mix_run), ("one_webhook_per_event", one_run))}
            print(json.dumps({"relay": relays}), file=sys.stderr, flush=True)
        finally:
            local.down(run_dir)
    # Micro-runs on processes of their own, after the stack is down: at least 10k events each,
    # so /proc's resolution and warm-up effects stay small against what is measured.
    micro_events = max(events, 10_000)
    micro_calls = {"mix": cdnow_mix(f"{run}m", micro_events, mix_end_ms, shape=shape, purchases=purchases).calls,
                   "one_webhook_per_event": one_webhook_calls(f"{run}m", micro_events)}
    posts = 1000 if quick else 3000
    workloads = {"mix": mix_run, "one_webhook_per_event": one_run}
    parts: dict[str, Any] = {}
    for name, workload in workloads.items():
        batch = max(1, round(workload.result["identity_mean_batch_events"]))
        parts[name] = {
            "relay": relays[name],
            "redis_resolve": asyncio.run(redis_resolve_cpu(micro_calls[name], batch)),
            "model_learn_predict": model_learn_predict_cpu(micro_calls[name]),
            "webhook_post": asyncio.run(webhook_post_cpu(workload.webhook_bodies, posts)),
        }
        workload.result["efficiency"] = efficiency(workload, **parts[name])
        workload.result["record_bytes_by_topic"] = workload.record_sizes
        print(json.dumps({name: {"efficiency": workload.result["efficiency"]}}), file=sys.stderr, flush=True)
    report["workloads"] = {name: workload.result for name, workload in workloads.items()}
    report["irreducible_measurements"] = parts
    report["summary"] = summary(report)
    report["load_average_after"] = load_average()
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's figures against their targets, in one place."""
    mix, one = report["workloads"]["mix"], report["workloads"]["one_webhook_per_event"]
    half = next((level for level in one.get("latency", []) if level["load"] == 0.5), None)
    return {
        "mix_events_per_s": mix["events_per_s"],
        "mix_meets_target": mix["events_per_s"] >= TARGETS["mix_events_per_s"],
        "one_webhook_events_per_s": one["events_per_s"],
        "one_webhook_meets_target": one["events_per_s"] >= TARGETS["one_webhook_events_per_s"],
        "p99_ms_at_half_load": half["p99_ms"] if half else None,
        "p99_meets_target": bool(half and half["p99_ms"] <= TARGETS["p99_ms_at_half_load"]),
        "mix_efficiency": mix["efficiency"]["efficiency"],
        "one_webhook_efficiency": one["efficiency"]["efficiency"],
        "redis_bytes_per_customer": {"mix": mix["redis_bytes_per_customer"],
                                     "one_webhook_per_event": one["redis_bytes_per_customer"]},
        "redis_meets_target": all(w["redis_bytes_per_customer"] <= TARGETS["redis_bytes_per_customer"]
                                  for w in (mix, one)),
    }


def scale_sweep(events: int, backlog: int) -> list[dict[str, Any]]:
    """The one-webhook workload at 1, 2 and 4 partitions x workers, a fresh stack each."""
    results = []
    for n in (1, 2, 4):
        with tempfile.TemporaryDirectory(prefix="touchstream-bench-") as tmp:
            run_dir = Path(tmp)
            (run_dir / "rules.yaml").write_text(ONE_WEBHOOK_RULES)
            state = local.up(run_dir, partitions=n, workers=n, progress=False,
                             env_overrides={RULES_ENV: str(run_dir / "rules.yaml")})
            try:
                run = uuid.uuid4().hex[:6]
                measured = run_workload(state, one_webhook_calls(run, events), one_webhook_calls(f"{run}w", 200),
                                        events, backlog, 900.0)
            finally:
                local.down(run_dir)
        keep = ("events", "seconds", "events_per_s", "cpu_us_per_event", "redis_bytes_per_customer", "load_average")
        results.append({"partitions": n, "workers_per_service": n, **{k: measured.result[k] for k in keep}})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="events per workload")
    parser.add_argument("--quick", action="store_true", help="3,000 events per workload, 10 s per latency level")
    parser.add_argument("--backlog", type=int, default=2_000,
                        help="most events posted but not yet consumed by triggers during a throughput run")
    parser.add_argument("--scale", action="store_true", help="also sweep 1, 2, 4 partitions x workers")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the two throughput runs and their Redis figures (no latency, relays or micro-runs)")
    args = parser.parse_args()
    events = 3_000 if args.quick else args.events
    report = measure(events, args.quick, args.backlog, partitions=4, workers=1, memory_only=args.memory_only)
    if args.scale:
        report["scale"] = scale_sweep(max(events // 2, 1000), args.backlog)
        report["load_average_after"] = load_average()
    report["command"] = " ".join(["bench/bench_pipeline.py", *sys.argv[1:]])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
