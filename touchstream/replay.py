"""Replay a transaction log through ingest in event time, at an accelerated clock."""

from __future__ import annotations

import asyncio
import math
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
    # Events per second sent since the previous report.
    rate: float = 0.0
    # What the pipeline reported at the last look (None without a `pipeline` probe).
    pipeline: PipelineState | None = None


@dataclass(frozen=True)
class PipelineState:
    """How far behind the pipeline is, from its own /metrics: the pacing signal of a replay."""

    # Records consumed by no stage yet: the sum of the stream stages' consumer lag.
    lag: int
    webhooks: int = 0


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


# Ingest (uvicorn) closes a connection idle for 5 s. A replay paused by the pipeline's lag leaves its
# connections idle that long, and one picked from the pool just as the server closed it fails with a
# transport error (a demo died so at 68,200 of 69,659 events): connections expire on our side first,
# and a batch whose answer was lost is sent again (ingest's messageId dedupe makes that safe).
KEEPALIVE_EXPIRY_S = 2.0
POST_ATTEMPTS = 8


async def replay(
    ingest_url: str,
    write_key: str,
    calls: Sequence[tuple[int, dict[str, Any]]],
    days_per_second: float,
    batch_size: int = 500,
    concurrency: int = 2,
    on_progress: Callable[[ReplayProgress], None] | None = None,
    pipeline: Callable[[], Awaitable[PipelineState]] | None = None,
    max_lag: int = 5000,
    look_every_s: float = 0.25,
    transport: httpx.AsyncBaseTransport | None = None,
) -> int:
    """POST `calls` (event time ms, Segment call) in event-time order; return how many were accepted.

    The clock runs `days_per_second` days of event time per wall-clock second, so a year of
    history takes 365 / days_per_second seconds if the pipeline keeps up. With `pipeline` (looked
    at every `look_every_s`) the replay stops its clock while the stages' summed consumer lag plus
    what it posted since that look is above `max_lag`: it goes as fast as the pipeline drains, and
    what the receiver measures is the pipeline's latency, not a queue the replay built in front of
    it. A batch that meets 429/503 or a lost connection is sent again, up to POST_ATTEMPTS tries.
    `transport` replaces httpx's (tests).
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
    sent_at_report = 0
    seen: PipelineState | None = None
    looked_at = -math.inf

    # Events posted since the pipeline was last looked at: they are behind it too, though its lag does
    # not show them yet. Without them the replay could post look_every_s of its clock at once (thousands
    # of events in CDNOW's busiest weeks) on a lag read as small, and the demo's latency was that queue's.
    posted_since_look = 0

    async def look() -> PipelineState | None:
        nonlocal seen, looked_at, posted_since_look
        if pipeline is not None and time.monotonic() - looked_at >= look_every_s:
            seen = await pipeline()
            looked_at = time.monotonic()
            posted_since_look = 0
        return seen

    async def post(batch: list[dict[str, Any]]) -> int:
        async with semaphore:
            answer_lost, last_failure = False, ""
            for attempt in range(POST_ATTEMPTS):
                try:
                    response = await client.post(f"{ingest_url}/v1/batch", json={"batch": batch},
                                                 auth=(write_key, ""))
                except httpx.TransportError as exc:
                    # The batch may have been accepted before the connection went: send it again.
                    answer_lost, last_failure = True, f"{type(exc).__name__} {exc}".strip()
                    await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                if response.status_code == 200:
                    body = response.json()
                    # Ingest drops an event whose messageId it has seen: after a lost answer, what the
                    # first try accepted comes back as duplicates, and it was accepted all the same.
                    return int(body["accepted"]) + (int(body.get("duplicates", 0)) if answer_lost else 0)
                if response.status_code in (429, 503):
                    last_failure = f"ingest answered {response.status_code}"
                    await asyncio.sleep(float(response.headers.get("retry-after", 0.2 * (attempt + 1))))
                    continue
                raise RuntimeError(f"ingest refused a batch: {response.status_code} {response.text[:500]}")
            raise RuntimeError(f"ingest took no answer to a batch in {POST_ATTEMPTS} tries (last: {last_failure})")

    def report(state: PipelineState | None) -> float:
        nonlocal sent_at_report
        assert on_progress is not None
        now = time.monotonic() - started
        rate = (next_index - sent_at_report) / max(now - last_report, 1e-9)
        sent_at_report = next_index
        on_progress(ReplayProgress(next_index, len(calls), calls[max(next_index - 1, 0)][0], now, rate, state))
        return now

    async with httpx.AsyncClient(timeout=30.0, transport=transport,
                                 limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S)) as client:
        while next_index < len(calls):
            state = await look()
            if state is not None and state.lag + posted_since_look > max_lag:
                pause_started = time.monotonic()
                await asyncio.sleep(look_every_s)
                paused_s += time.monotonic() - pause_started
                if on_progress and time.monotonic() - started - last_report >= 1.0:
                    last_report = report(state)
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
            posted_since_look += end - next_index
            next_index = end
            in_flight = [t for t in tasks[-concurrency:] if not t.done()]
            if len(in_flight) >= concurrency:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            if on_progress and time.monotonic() - started - last_report >= 1.0:
                last_report = report(state)
        results = await asyncio.gather(*tasks)
    return sum(results)
