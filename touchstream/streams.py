"""Faust wiring shared by the stream services: app factory, topics, health and metrics pages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import faust
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.web import Request, Response, View
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.exceptions import BusyLoadingError as RedisBusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from touchstream import avro
from touchstream.metrics import ServiceMetrics, consumer_lag_messages, render
from touchstream.settings import CoreSettings
from touchstream.topics import DEADLETTER, TopicSpec, prefixed

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_REDIS_BACKOFF_S = 2.0
# Exit code of a worker that stopped because an agent crashed (EX_SOFTWARE): restart it.
EXIT_AGENT_CRASHED = 70


class _IdempotentProducer(aiokafka_driver.Producer):
    # Faust only turns idempotence on inside transactions; its producer serves the few records
    # sent outside the kernel (none today), and should match the kernel's (acks=all, idempotent).
    def _settings_extra(self) -> dict[str, Any]:
        return {"acks": "all", "enable_idempotence": True}


def make_app(service: str, core: CoreSettings, web_port: int, web_host: str = "127.0.0.1") -> faust.App:
    """Build the Faust app of `service`: web server (pages, /metrics, health), timers, worker lifecycle.

    Records are not consumed through Faust streams but by the service's StreamKernel (group
    `touchstream-<service>`), beneath Faust's per-event machinery (README, "The hot loop"). Faust
    still joins a group of its own (`touchstream-<service>-worker`, its assignor's leader topic only).
    """
    if core.idempotent_producer:
        aiokafka_driver.Transport.Producer = _IdempotentProducer
    # Faust creates its data dir but not the parents.
    core.state_dir.mkdir(parents=True, exist_ok=True)
    # Faust lets its own WEB_BIND / WEB_PORT variables override the arguments below; the
    # service's settings (TOUCHSTREAM_<SERVICE>_WEB_HOST / _WEB_PORT) are the one source.
    faust_env = {k: v for k, v in os.environ.items() if k not in ("WEB_BIND", "WEB_PORT")}
    app = faust.App(
        # Faust names its group and internal topics after the app: prefixed like the topics.
        prefixed(f"touchstream-{service}-worker"),
        broker=core.kafka_url,
        # Per-customer state lives in Redis, not in Faust tables (README, "State placement").
        store="memory://",
        broker_session_timeout=core.session_timeout_s,
        broker_heartbeat_interval=core.heartbeat_interval_s,
        consumer_auto_offset_reset=core.auto_offset_reset,
        producer_acks=-1,
        topic_partitions=core.partitions,
        topic_replication_factor=core.replication_factor,
        web_enabled=True,
        web_bind=web_host,
        web_port=web_port,
        web_in_thread=False,
        datadir=str(core.state_dir / f"{service}-data"),
        env=faust_env,
    )
    return app


def run_kernel(app: faust.App, kernel: StreamKernel) -> None:
    """Run `kernel` as one of `app`'s tasks, stopped (consumer and producer closed) before the app stops."""

    @app.task
    async def consume() -> None:
        await kernel.run()

    async def stop_kernel(sender: Any, *args: Any, **kwargs: Any) -> None:
        await kernel.stop()

    app.on_before_shutdown.connect(stop_kernel)  # type: ignore[arg-type]


class ConsumerLag(Collector):
    """`touchstream_<service>_consumer_lag_messages{topic,partition}` of a service's stream kernel.

    Lag = the partition's end offset as the broker reports it in every fetch response (its
    high-water mark: the answer a ListOffsets(latest) request gives a read-uncommitted consumer,
    at no extra request) minus the group's committed offset (read from the broker when the
    partition is assigned, then updated on every commit). A partition appears once fetched from.
    """

    def __init__(self, service: str) -> None:
        self._name = consumer_lag_messages(service)
        self.lags: Callable[[], dict[tuple[str, int], int]] = dict

    def describe(self) -> list[GaugeMetricFamily]:
        # No names declared: a test process may build the same service's app more than once.
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            self._name, "Records on the partition not yet processed and committed by this worker "
            "(end offset minus committed offset).", labels=["topic", "partition"])
        for (topic, partition), lag in sorted(self.lags().items()):
            family.add_metric([topic, str(partition)], lag)
        yield family


_lag_collectors: dict[tuple[int, str], ConsumerLag] = {}


def add_health_pages(app: faust.App, service: str, readiness: Readiness, registry: CollectorRegistry = REGISTRY,
                     kernel: StreamKernel | None = None) -> None:
    """Serve /metrics (of `registry`), /healthz (process alive) and /readyz (503 with the reason until ready).

    With `kernel`, /metrics also carries the consumer lag of every partition the worker holds.
    """
    key = (id(registry), service)
    if key not in _lag_collectors:
        _lag_collectors[key] = ConsumerLag(service)
        registry.register(_lag_collectors[key])
    if kernel is not None:
        _lag_collectors[key].lags = kernel.lags

    @app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            body, content_type = render(registry)
            return self.bytes(body, content_type=content_type.split(";")[0])

    @app.page("/healthz")
    class HealthView(View):
        async def get(self, request: Request) -> Response:
            return self.json({"status": "ok"})

    @app.page("/readyz")
    class ReadyView(View):
        async def get(self, request: Request) -> Response:
            if readiness.ok:
                return self.json({"status": "ready"})
            return self.json({"status": "not ready", "reason": readiness.reason()}, status=503)


class Outbox:
    """Collect a batch's outgoing records; `flush` sends them all and returns once the broker acked each.

    Nothing leaves before `flush`, so a handler attempt that fails sends nothing.
    """

    def __init__(self, producer: AIOKafkaProducer, metrics: ServiceMetrics, stage: str) -> None:
        self._producer = producer
        self._metrics = metrics
        self._stage = stage
        self._pending: list[tuple[str, bytes | None, bytes | None]] = []

    def __len__(self) -> int:
        return len(self._pending)

    async def send(self, topic: TopicSpec | str, key: str | bytes | None, value: bytes) -> None:
        self._pending.append((_topic_name(topic), key.encode() if isinstance(key, str) else key, value))

    async def tombstone(self, topic: TopicSpec | str, key: str | bytes) -> None:
        """Send a null value for `key` (on a compacted topic, the broker then forgets the key)."""
        self._pending.append((_topic_name(topic), key.encode() if isinstance(key, str) else key, None))

    async def dead_letter(self, source: str, reason: str, key: bytes | None, original: bytes | None) -> None:
        """Send the original bytes to `deadletter` with the reason (the reason's head labels the metric)."""
        record = {"source": source, "stage": self._stage, "reason": reason[:1000], "key": key,
                  "original": original or b"", "failed_at_ms": int(time.time() * 1000)}
        self._metrics.events_failed.labels(reason.split(":")[0][:60]).inc()
        await self.send(DEADLETTER, source, avro.encode(DEADLETTER.schema, record))

    def adopt(self, other: Outbox) -> None:
        """Take over `other`'s pending records (a handler attempt that succeeded)."""
        self._pending += other._pending
        other._pending = []

    def child(self) -> Outbox:
        return Outbox(self._producer, self._metrics, self._stage)

    async def flush(self) -> None:
        """Send every pending record and return once each is acknowledged (acks=all).

        On a broker error the records not acknowledged stay pending and the error is raised:
        a later flush sends them again (a receiver dedupes by its own ids).
        """
        pending, self._pending = self._pending, []
        if not pending:
            return
        futures = [await self._producer.send(topic, value, key) for topic, key, value in pending]
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = [record for record, result in zip(pending, results, strict=True) if isinstance(result, BaseException)]
        per_topic = Counter(topic for (topic, _, _), result in zip(pending, results, strict=True)
                            if not isinstance(result, BaseException))
        for topic, count in per_topic.items():
            self._metrics.events_out.labels(topic).inc(count)
        if failed:
            self._pending = failed + self._pending
            error = next(r for r in results if isinstance(r, BaseException))
            raise error


def _topic_name(topic: TopicSpec | str) -> str:
    return topic if isinstance(topic, str) else topic.name


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed record, decoded once by the kernel. `value` is None for a tombstone."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    raw: bytes | None
    value: dict[str, Any] | None


Handler = Callable[[list[Record], Outbox], Awaitable[None]]


@dataclass(frozen=True)
class Consumes:
    """A service's input: the topics one handler takes, and how the kernel treats what it cannot read.

    `tombstones`: hand null values to the handler (value None) instead of passing over them.
    `dead_letters`: send what cannot be decoded or handled to `deadletter`; False for a stage
    that must not produce there (the console reads `deadletter` itself: it could loop), whose
    failed records are counted, logged and passed over.
    """

    specs: tuple[TopicSpec, ...]
    handle: Handler
    tombstones: bool = False
    dead_letters: bool = True


class Readiness:
    """What /readyz answers: every start step done, and no stage failing right now."""

    def __init__(self, *steps: str) -> None:
        self._pending = set(steps)
        self.failing: str | None = None

    def done(self, step: str) -> None:
        self._pending.discard(step)

    @property
    def ok(self) -> bool:
        return not self._pending and self.failing is None

    def reason(self) -> str:
        if self.failing:
            return self.failing
        return "waiting for: " + ", ".join(sorted(self._pending)) if self._pending else "ready"


def transient_redis_error(exc: BaseException) -> bool:
    """Return whether `exc` means Redis is unreachable or restarting (wait it out) rather than failing."""
    if isinstance(exc, RedisBusyLoadingError | RedisConnectionError | RedisTimeoutError):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, RedisError)


class StreamKernel:
    """The one consuming loop of every stream service, beneath Faust's per-event stream machinery.

    Per batch (aiokafka `getmany`: whatever has arrived, up to `batch_size`): decode each record
    once (what cannot be decoded goes to `deadletter`), hand each input's records to its handler,
    send the handlers' records in one producer batch and wait for the acks, then commit the
    batch's offsets. A crash anywhere before the commit means the batch comes again, which every
    stage's idempotent effects allow (at-least-once).

    Failures: Redis unreachable or restarting is waited out (the batch retried whole). Any other
    exception from a handler is retried `max_attempts` times; then the batch is handled record by
    record, and each record that still fails alone is dead-lettered with the exception as its
    reason, the rest handled. If no record succeeds alone and the errors are Redis's (OOM,
    WRONGTYPE, a script error), the dependency is failing, not the records: /readyz turns 503
    with the reason and the batch is retried until it passes. Nothing is skipped silently.
    """

    def __init__(self, service: str, core: CoreSettings, inputs: Sequence[Consumes], metrics: ServiceMetrics,
                 readiness: Readiness, *, max_attempts: int = 3, retry_backoff_s: float = 0.5) -> None:
        self.service = service
        self.group_id = prefixed(f"touchstream-{service}")
        self.core = core
        self.inputs = tuple(inputs)
        self.metrics = metrics
        self.readiness = readiness
        self.max_attempts = max_attempts
        self.retry_backoff_s = retry_backoff_s
        self._input_of = {spec.name: consumes for consumes in self.inputs for spec in consumes.specs}
        self._spec_of = {spec.name: spec for consumes in self.inputs for spec in consumes.specs}
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.committed: dict[TopicPartition, int] = {}
        self.before_consuming: list[Callable[[], Awaitable[None]]] = []
        # Called with each commit's offsets once the broker took it: what a stage kept only for
        # redeliveries of those records can go. A failure is logged, never fatal (the next commit's call
        # can catch up).
        self.after_commit: list[Callable[[Mapping[TopicPartition, int]], Awaitable[None]]] = []
        self._stopping = False
        self._stage_failures = metrics.counter(
            "stage_failures", "Handler attempts that raised, by topic and exception type.", ["topic", "error"])
        self._lingers = metrics.counter(
            "batch_lingers", "Small batches that waited batch_within_s for more records before being handled.")

    def outbox(self) -> Outbox:
        """An outbox on the kernel's producer (for work outside the loop, e.g. an API call)."""
        if self.producer is None:
            raise RuntimeError(f"{self.service}: the stream kernel has not started")
        return Outbox(self.producer, self.metrics, self.service)

    async def start_producer(self) -> None:
        if self.producer is None:
            self.producer = AIOKafkaProducer(
                bootstrap_servers=self.core.kafka_bootstrap, acks="all",
                enable_idempotence=self.core.idempotent_producer, client_id=f"{self.group_id}-producer")
            await self.producer.start()

    async def run(self) -> None:
        """Consume until cancelled; a bug in the loop itself exits the process (code 70) to be restarted."""
        try:
            await self.start_producer()
            await self._subscribe()
            # The consumer joins its group and fetches meanwhile, so the lag shows while these wait.
            for step in self.before_consuming:
                await step()
            await self._consume()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if self._stopping:  # the worker is shutting down and closed the consumer under the loop
                return
            log.critical("%s: the stream kernel crashed (%s: %s); exiting with code %d so the batch is handled "
                         "again after a restart", self.service, type(exc).__name__, str(exc)[:300], EXIT_AGENT_CRASHED)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_AGENT_CRASHED)

    async def stop(self) -> None:
        self._stopping = True
        for client in (self.consumer, self.producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        self.consumer = self.producer = None

    async def _subscribe(self) -> None:
        kernel = self

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: Any) -> None:
                for tp in revoked:
                    kernel.committed.pop(tp, None)

            async def on_partitions_assigned(self, assigned: Any) -> None:
                consumer = kernel.consumer
                for tp in assigned:
                    if consumer is not None:
                        kernel.committed[tp] = await consumer.committed(tp) or 0
                kernel.readiness.done("partitions_assigned")

        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.core.kafka_bootstrap, group_id=self.group_id, client_id=self.group_id,
            enable_auto_commit=False, auto_offset_reset=self.core.auto_offset_reset,
            # Range assignment gives one worker the same partition numbers of every input topic:
            # the topics are co-partitioned by customer_id, so a customer's records meet there.
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_poll_records=self.core.batch_size, fetch_max_wait_ms=self.core.fetch_max_wait_ms,
            session_timeout_ms=int(self.core.session_timeout_s * 1000),
            heartbeat_interval_ms=int(self.core.heartbeat_interval_s * 1000))
        await self.consumer.start()
        self.consumer.subscribe(list(self._spec_of), listener=Listener())

    async def _consume(self) -> None:
        assert self.consumer is not None
        while True:
            batch = await self.consumer.getmany(timeout_ms=500, max_records=self.core.batch_size)
            if batch:
                await self.handle_batch(await self._lingered(batch))

    async def _lingered(self, batch: dict[TopicPartition, list[Any]]) -> dict[TopicPartition, list[Any]]:
        """Return `batch`, topped up with what arrives within `batch_within_s` if it is small.

        A broker answers a fetch as soon as one record is there, so at a steady low rate every
        batch holds 1-4 records and the per-batch costs (Redis round trips, the producer's acks,
        the commit) are paid per record: CPU that queues the records behind it. Waiting a few
        milliseconds for company costs that much latency per stage and pays those costs once.
        A batch already `linger_below` records or more is handled at once: under load, no wait.
        """
        count = sum(len(messages) for messages in batch.values())
        room = self.core.batch_size - count
        if count >= self.core.linger_below or room <= 0 or self.consumer is None:
            return batch
        self._lingers.inc()
        await asyncio.sleep(self.core.batch_within_s)
        more = await self.consumer.getmany(timeout_ms=0, max_records=room)
        for tp, messages in more.items():
            batch.setdefault(tp, []).extend(messages)
        return batch

    async def handle_batch(self, batch: Mapping[TopicPartition, Sequence[Any]]) -> None:
        """Decode, handle, flush and commit one `getmany` batch (records of any input topics)."""
        started = time.perf_counter()
        outbox = self.outbox()
        by_input: dict[int, list[Record]] = {}
        count = 0
        for tp, messages in batch.items():
            consumes = self._input_of[tp.topic]
            spec = self._spec_of[tp.topic]
            records = by_input.setdefault(id(consumes), [])
            self.metrics.events_in.labels(tp.topic).inc(len(messages))
            count += len(messages)
            for message in messages:
                if message.value is None:
                    if consumes.tombstones:
                        records.append(Record(tp.topic, tp.partition, message.offset, message.key, None, None))
                    continue
                try:
                    value = avro.decode(spec.schema, message.value)
                except avro.DecodeError as exc:
                    if consumes.dead_letters:
                        await outbox.dead_letter(tp.topic, f"undecodable: {exc}", message.key, message.value)
                    else:
                        self.metrics.events_failed.labels(f"{tp.topic} undecodable").inc()
                        log.warning("%s: passed over an unreadable %s record: %s", self.service, tp.topic, exc)
                    continue
                records.append(Record(tp.topic, tp.partition, message.offset, message.key, message.value, value))
        for consumes in self.inputs:
            handed = by_input.get(id(consumes))
            if handed:
                await self._handle_isolating(consumes, handed, outbox)
        await self._flush(outbox)
        await self._commit({tp: messages[-1].offset + 1 for tp, messages in batch.items() if messages})
        self.metrics.batch_events.observe(count)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)

    async def _handle_isolating(self, consumes: Consumes, records: list[Record], outbox: Outbox) -> None:
        topic = records[0].topic
        while True:
            error = await self._attempts(consumes, records, outbox, self.max_attempts)
            if error is None:
                self.readiness.failing = None
                return
            failed: list[tuple[Record, BaseException]] = []
            for record in records:
                alone = await self._attempts(consumes, [record], outbox, 1)
                if alone is not None:
                    failed.append((record, alone))
            succeeded = len(records) - len(failed)
            if failed and succeeded == 0 and all(isinstance(e, RedisError) for _, e in failed):
                self.readiness.failing = f"{topic}: Redis refuses every record ({type(error).__name__}: {error})"
                log.error("%s: %s; retrying the batch in %.1fs", self.service, self.readiness.failing,
                          self.retry_backoff_s * 4)
                await asyncio.sleep(self.retry_backoff_s * 4)
                continue
            for record, exc in failed:
                reason = f"handler failed: {type(exc).__name__}: {exc}"
                log.error("%s: %s %s[%d]@%d after %d failed attempts: %s", self.service,
                          "dead-lettering" if consumes.dead_letters else "passing over", record.topic,
                          record.partition, record.offset, self.max_attempts + 1, reason)
                if consumes.dead_letters:
                    await outbox.dead_letter(record.topic, reason, record.key, record.raw)
                else:
                    self.metrics.events_failed.labels(f"{record.topic} handler failed").inc()
            self.readiness.failing = None
            return

    async def _attempts(self, consumes: Consumes, records: list[Record], outbox: Outbox,
                        attempts: int) -> BaseException | None:
        """Run the handler on `records` up to `attempts` times; return the last error, or None once it passed."""
        last: BaseException | None = None
        for attempt in range(attempts):
            attempt_outbox = outbox.child()
            try:
                await while_redis_is_down(partial(consumes.handle, records, attempt_outbox), self.metrics,
                                          f"{self.service}: {records[0].topic}")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                last = exc
                self._stage_failures.labels(records[0].topic, type(exc).__name__).inc()
                log.warning("%s: handling %d %s records failed (attempt %d of %d): %s: %s", self.service,
                            len(records), records[0].topic, attempt + 1, attempts, type(exc).__name__, exc)
                if attempt + 1 < attempts:
                    await asyncio.sleep(self.retry_backoff_s * (attempt + 1))
                continue
            outbox.adopt(attempt_outbox)
            return None
        return last

    async def _flush(self, outbox: Outbox) -> None:
        backoff = self.retry_backoff_s
        while True:
            try:
                await outbox.flush()
                if self.readiness.failing and self.readiness.failing.startswith("broker"):
                    self.readiness.failing = None
                return
            except KafkaError as exc:
                self.readiness.failing = f"broker did not acknowledge: {type(exc).__name__}: {exc}"
                log.warning("%s: %s; sending %d records again in %.1fs", self.service, self.readiness.failing,
                            len(outbox), backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_REDIS_BACKOFF_S)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.consumer is None or not offsets:
            return
        try:
            await self.consumer.commit(offsets)
            self.committed.update(offsets)
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            # A rebalance took the partitions away: their new owner handles these records again.
            log.warning("%s: commit refused (%s: %s); the new owner of the partitions repeats them",
                        self.service, type(exc).__name__, exc)
            return
        for step in self.after_commit:
            try:
                await step(offsets)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s: after the commit: %s: %s", self.service, type(exc).__name__, exc)

    def lags(self) -> dict[tuple[str, int], int]:
        """Return end offset (the high-water mark of the latest fetch) minus committed offset, per partition."""
        consumer = self.consumer
        if consumer is None:
            return {}
        lags = {}
        for tp in list(consumer.assignment()):
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            lags[(tp.topic, tp.partition)] = max(0, int(highwater) - self.committed.get(tp, 0))
        return lags


async def while_redis_is_down(call: Callable[[], Awaitable[T]], metrics: ServiceMetrics, what: str) -> T:
    """Run `call` until Redis answers it: a batch waits for Redis rather than being skipped.

    Only an unreachable or restarting Redis is waited for (connection refused or closed,
    timeouts, "loading the dataset"); any other error is raised to the caller (the kernel
    retries, then isolates the failing record).
    """
    backoff = 0.1
    while True:
        try:
            return await call()
        except Exception as exc:
            if not transient_redis_error(exc):
                raise
            metrics.redis_errors.inc()
            log.warning("%s: Redis unavailable (%s), retrying in %.1fs", what, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_REDIS_BACKOFF_S)


def run_worker(app: faust.App, loglevel: str = "info") -> None:
    """Run `app` as a Faust worker in this process until it is stopped."""
    faust.Worker(app, loglevel=loglevel).execute_from_commandline()
