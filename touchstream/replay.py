"""Replay a transaction log through ingest in event time, at an accelerated clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from touchstream.eventtime import DAY_MS


@dataclass
class ReplayProgress:
    sent: int
    total: int
    event_time_ms: int
    elapsed_s: float


def sum_metric(text: str, name: str, **labels: str) -> float:
    """Sum the samples of `name` whose labels include `labels`.

    >>> sum_metric('# TYPE x_total counter\\nx_total{topic="a"} 2.0\\nx_total{topic="b"} 3.0\\n', "x_total", topic="a")
    2.0
    """
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def scrape(client: httpx.AsyncClient, url: str) -> str:
    try:
        response = await client.get(f"{url}/metrics", timeout=5.0)
        return response.text if response.status_code == 200 else ""
    except httpx.HTTPError:
        return ""


async def replay(
    ingest_url: str,
    write_key: str,
    calls: Sequence[tuple[int, dict[str, Any]]],
    days_per_second: float,
    batch_size: int = 500,
    concurrency: int = 2,
    on_progress: Callable[[ReplayProgress], None] | None = None,
    processed: Callable[[], Awaitable[float]] | None = None,
    max_lag: int = 5000,
) -> int:
    """POST `calls` (event time ms, Segment call) in event-time order; return how many were accepted.

    The clock runs `days_per_second` days of event time per wall-clock second, so a year of
    history takes 365 / days_per_second seconds if the pipeline keeps up. With `processed`
    (how many events the pipeline's last stage has handled) the replay pauses the clock while
    more than `max_lag` events are in the pipeline, so latency is measured, not queueing.
    """
    if not calls:
        return 0
    first_ms = calls[0][0]
    started = time.monotonic()
    paused_s = 0.0
    next_index = 0
    semaphore = asyncio.Semaphore(concurrency)
    tasks: list[asyncio.Task[int]] = []
    last_report = 0.0

    async def post(batch: list[dict[str, Any]]) -> int:
        async with semaphore:
            for attempt in range(5):
                response = await client.post(f"{ingest_url}/v1/batch", json={"batch": batch}, auth=(write_key, ""))
                if response.status_code == 200:
                    return int(response.json()["accepted"])
                if response.status_code in (429, 503):
                    await asyncio.sleep(float(response.headers.get("retry-after", 0.2 * (attempt + 1))))
                    continue
                raise RuntimeError(f"ingest refused a batch: {response.status_code} {response.text[:500]}")
            raise RuntimeError("ingest kept refusing a batch with 429/503")

    async with httpx.AsyncClient(timeout=30.0) as client:
        while next_index < len(calls):
            if processed is not None and next_index - await processed() > max_lag:
                pause_started = time.monotonic()
                await asyncio.sleep(0.2)
                paused_s += time.monotonic() - pause_started
                continue
            elapsed = time.monotonic() - started - paused_s
            clock_ms = first_ms + elapsed * days_per_second * DAY_MS
            end = next_index
            while end < len(calls) and calls[end][0] <= clock_ms and end - next_index < batch_size:
                end += 1
            if end == next_index:
                await asyncio.sleep(0.01)
                continue
            tasks.append(asyncio.create_task(post([call for _, call in calls[next_index:end]])))
            next_index = end
            in_flight = [t for t in tasks[-concurrency:] if not t.done()]
            if len(in_flight) >= concurrency:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            if on_progress and elapsed - last_report >= 1.0:
                last_report = elapsed
                on_progress(ReplayProgress(next_index, len(calls), calls[next_index - 1][0],
                                           time.monotonic() - started))
        results = await asyncio.gather(*tasks)
    return sum(results)
