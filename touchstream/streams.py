"""Faust wiring shared by the stream services: app factory, topics, health and metrics pages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import faust
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.web import Request, Response, View
from prometheus_client import REGISTRY, CollectorRegistry

from touchstream import avro
from touchstream.metrics import ServiceMetrics, render
from touchstream.settings import CoreSettings
from touchstream.topics import DEADLETTER, TopicSpec


class _IdempotentProducer(aiokafka_driver.Producer):
    # Faust only turns idempotence on inside transactions; we want it on plain sends
    # whenever the broker supports it (Apache Kafka yes, Tansu no).
    def _settings_extra(self) -> dict[str, Any]:
        return {"acks": "all", "enable_idempotence": True}


class _TunedConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    fetch_max_wait_ms = 500

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Faust hardcodes fetch_max_wait_ms=1500, and Tansu holds every fetch that long even
        # when records arrive (measured: ~615 ms per topic hop at 1500, ~5 ms at 20), so the
        # wait is a setting: short on the embedded broker, Kafka's usual 500 ms elsewhere.
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms
        return consumer


class _TunedConsumer(aiokafka_driver.Consumer):
    def _new_consumer_thread(self) -> _TunedConsumerThread:
        return _TunedConsumerThread(self, loop=self.loop, beacon=self.beacon)


def make_app(service: str, core: CoreSettings, web_port: int, web_host: str = "127.0.0.1") -> faust.App:
    """Build a Faust app for `service` with settings that work on Tansu and Apache Kafka."""
    if core.idempotent_producer:
        aiokafka_driver.Transport.Producer = _IdempotentProducer
    _TunedConsumerThread.fetch_max_wait_ms = core.fetch_max_wait_ms
    aiokafka_driver.Transport.Consumer = _TunedConsumer
    # Faust creates its data dir but not the parents.
    core.state_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"touchstream-{service}",
        broker=core.kafka_url,
        # Tables are not used for durable state: Tansu's ListOffsets answer would cut
        # changelog recovery short, so per-customer state lives in Redis.
        store="memory://",
        broker_session_timeout=core.session_timeout_s,
        broker_heartbeat_interval=core.heartbeat_interval_s,
        # Tansu answers "latest" wrongly, so never start from it.
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        topic_partitions=core.partitions,
        topic_replication_factor=core.replication_factor,
        web_enabled=True,
        web_bind=web_host,
        web_port=web_port,
        web_in_thread=False,
        broker_commit_interval=1.0,
        datadir=str(core.state_dir / f"{service}-data"),
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


def add_health_pages(app: faust.App, ready: dict[str, bool], registry: CollectorRegistry = REGISTRY) -> None:
    """Serve /metrics (of `registry`), /healthz (process alive) and /readyz (`ready['ok']` is true)."""

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


def run_worker(app: faust.App, loglevel: str = "info") -> None:
    """Run `app` as a Faust worker in this process until it is stopped."""
    faust.Worker(app, loglevel=loglevel).execute_from_commandline()
