"""Faust wiring shared by the stream services: app factory, topics, health and metrics pages."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import faust
import mode
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.web import Request, Response, View
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from touchstream import avro
from touchstream.metrics import ServiceMetrics, metric_name, render
from touchstream.settings import CoreSettings
from touchstream.topics import DEADLETTER, TopicSpec

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_REDIS_BACKOFF_S = 2.0
# Exit code of a worker that stopped because an agent crashed (EX_SOFTWARE): restart it.
EXIT_AGENT_CRASHED = 70


class ExitOnAgentCrash(mode.OneForOneSupervisor):
    """Stop the worker at once, exit code 70, when an agent crashes; a supervisor restarts it.

    Faust's default restarts a crashed agent on the records after the batch it was handling,
    so that batch would be skipped without a trace. Exiting without a graceful stop commits
    nothing more: the restarted worker (or another one after a rebalance) handles the batch
    again, which every stage's idempotent writes allow. A cancelled agent (a rebalance) is
    restarted as usual.
    """

    async def restart_service(self, service: mode.ServiceT) -> None:
        reason = service.crash_reason
        if reason is None or isinstance(reason, asyncio.CancelledError):
            await super().restart_service(service)
            return
        log.critical("agent %s crashed (%s: %s); exiting with code %d so the batch is handled again after a "
                     "restart", service, type(reason).__name__, str(reason)[:300], EXIT_AGENT_CRASHED)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_AGENT_CRASHED)


class _IdempotentProducer(aiokafka_driver.Producer):
    # Faust only turns idempotence on inside transactions; we want it on plain sends
    # (on by default; off only for the Tansu fallback, which refuses it).
    def _settings_extra(self) -> dict[str, Any]:
        return {"acks": "all", "enable_idempotence": True}


class _TunedConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    fetch_max_wait_ms = 500

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Faust hardcodes fetch_max_wait_ms=1500. Apache Kafka answers as soon as records
        # arrive, but the Tansu fallback holds every fetch that long (measured: ~615 ms per
        # topic hop at 1500, ~5 ms at 20), so the wait is a setting.
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms
        return consumer


class _TunedConsumer(aiokafka_driver.Consumer):
    def _new_consumer_thread(self) -> _TunedConsumerThread:
        return _TunedConsumerThread(self, loop=self.loop, beacon=self.beacon)


def make_app(service: str, core: CoreSettings, web_port: int, web_host: str = "127.0.0.1") -> faust.App:
    """Build a Faust app for `service` on Apache Kafka (or the Tansu fallback)."""
    if core.idempotent_producer:
        aiokafka_driver.Transport.Producer = _IdempotentProducer
    _TunedConsumerThread.fetch_max_wait_ms = core.fetch_max_wait_ms
    aiokafka_driver.Transport.Consumer = _TunedConsumer
    # Faust creates its data dir but not the parents.
    core.state_dir.mkdir(parents=True, exist_ok=True)
    # Faust lets its own WEB_BIND / WEB_PORT variables override the arguments below; the
    # service's settings (TOUCHSTREAM_<SERVICE>_WEB_HOST / _WEB_PORT) are the one source.
    faust_env = {k: v for k, v in os.environ.items() if k not in ("WEB_BIND", "WEB_PORT")}
    app = faust.App(
        f"touchstream-{service}",
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
        broker_commit_interval=1.0,
        datadir=str(core.state_dir / f"{service}-data"),
        env=faust_env,
        agent_supervisor=ExitOnAgentCrash,
    )
    return app


def faust_topic(app: faust.App, spec: TopicSpec, core: CoreSettings) -> faust.TopicT:
    """Declare `spec` as a raw-bytes Faust topic; values are decoded by touchstream.avro."""
    return app.topic(
        spec.name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=core.partitions,
    )


class ConsumerLag(Collector):
    """`touchstream_<service>_consumer_lag_messages{topic,partition}` of a Faust app's consumer.

    Lag = the partition's end offset as the broker reports it in every fetch response (its
    high-water mark: the same answer a ListOffsets(latest) request gives a read-uncommitted
    consumer, at no extra request) minus the group's committed offset as this worker knows it
    (0 before any commit: a new group starts from the earliest offset). A partition appears
    once fetched from.
    """

    def __init__(self, service: str) -> None:
        self._name = metric_name(service, "consumer_lag", "messages")
        self.app: faust.App | None = None

    def describe(self) -> list[GaugeMetricFamily]:
        # No names declared: a test process may build the same service's app more than once.
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            self._name, "Records on the partition not yet processed and committed by this worker "
            "(fetch high-water mark minus committed offset).", labels=["topic", "partition"])
        for (topic, partition), lag in sorted(self.lags().items()):
            family.add_metric([topic, str(partition)], lag)
        yield family

    def lags(self) -> dict[tuple[str, int], int]:
        """Return the lag of every partition assigned to this worker whose high-water mark is known."""
        app = self.app
        consumer = app._consumer if app is not None else None
        if app is None or consumer is None:  # the worker has not started its consumer
            return {}
        try:
            thread: Any = consumer._thread  # type: ignore[attr-defined]
            client = thread._ensure_consumer()
            assignment = client._subscription.subscription.assignment
        except Exception:  # not started, or between assignments
            return {}
        if assignment is None:
            return {}
        lags = {}
        internal = f"{app.conf.id}-"  # Faust's own topics (the assignor's leader topic)
        for tp in list(assignment.tps):
            if tp.topic.startswith(internal):
                continue
            state = assignment.state_value(tp)
            if state is None or state.highwater is None:
                continue
            # None: neither this worker nor the group committed anything here yet, and consumers
            # start from the earliest offset, so nothing of the partition counts as done.
            committed = consumer._committed_offset.get(tp) or 0  # type: ignore[attr-defined]
            lags[(tp.topic, tp.partition)] = max(0, int(state.highwater) - int(committed))
        return lags


_lag_collectors: dict[tuple[int, str], ConsumerLag] = {}


def add_health_pages(app: faust.App, ready: dict[str, bool], registry: CollectorRegistry = REGISTRY) -> None:
    """Serve /metrics (of `registry`), /healthz (process alive) and /readyz (`ready['ok']` is true).

    /metrics also carries the consumer lag of every partition the worker holds (ConsumerLag).
    """
    service = app.conf.id.removeprefix("touchstream-")
    key = (id(registry), service)
    if key not in _lag_collectors:
        _lag_collectors[key] = ConsumerLag(service)
        registry.register(_lag_collectors[key])
    _lag_collectors[key].app = app

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
            if ready.get("ok"):
                return self.json({"status": "ready"})
            return self.json({"status": "starting"}, status=503)


def batches(stream: faust.StreamT, core: CoreSettings) -> AsyncIterator[list[faust.EventT]]:
    """Yield lists of events (not values) so each batch can see keys and partitions."""
    # take_events exists on faust.Stream but not on the StreamT interface.
    return stream.take_events(core.batch_size, within=core.batch_within_s)  # type: ignore[attr-defined]


class Outbox:
    """Collect a batch's outgoing records, then send them all and wait for the broker's acks."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics
        self._pending: list[Any] = []

    async def send(self, topic: faust.TopicT, key: str | bytes | None, value: bytes) -> None:
        raw_key = key.encode() if isinstance(key, str) else key
        self._pending.append(await topic.send(key=raw_key, value=value))
        self._metrics.events_out.labels(topic.get_topic_name()).inc()

    async def tombstone(self, topic: faust.TopicT, key: str | bytes) -> None:
        """Send a null value for `key` (on a compacted topic, the broker then forgets the key)."""
        raw_key = key.encode() if isinstance(key, str) else key
        # Straight to the producer: a raw-serialised Faust topic cannot send a None value.
        producer = topic.app.producer
        self._pending.append(await producer.send(topic.get_topic_name(), raw_key, None, None, None, None))
        self._metrics.events_out.labels(topic.get_topic_name()).inc()

    async def dead_letter(
        self, topic: faust.TopicT, stage: str, source: str, reason: str, key: bytes | None, original: bytes
    ) -> None:
        record = {
            "source": source,
            "stage": stage,
            "reason": reason[:1000],
            "key": key,
            "original": original,
            "failed_at_ms": int(time.time() * 1000),
        }
        self._metrics.events_failed.labels(reason.split(":")[0][:60]).inc()
        await self.send(topic, source, avro.encode(DEADLETTER.schema, record))

    async def flush(self) -> None:
        """Return only once every record sent since the last flush is acknowledged."""
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)


async def while_redis_is_down(call: Callable[[], Awaitable[T]], metrics: ServiceMetrics, what: str) -> T:
    """Run `call` until Redis answers it: a batch waits for Redis rather than being skipped.

    Only an unreachable or restarting Redis is waited for (connection refused or closed,
    timeouts, "loading the dataset"); any other error is raised, and crashes the worker.
    """
    backoff = 0.1
    while True:
        try:
            return await call()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            metrics.redis_errors.inc()
            log.warning("%s: Redis unavailable (%s), retrying in %.1fs", what, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_REDIS_BACKOFF_S)


def run_worker(app: faust.App, loglevel: str = "info") -> None:
    """Run `app` as a Faust worker in this process until it is stopped."""
    faust.Worker(app, loglevel=loglevel).execute_from_commandline()
