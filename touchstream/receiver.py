"""A local webhook receiver for the demo and tests: verifies Standard Webhooks signatures
with the official `standardwebhooks` package, dedupes on webhook-id, and measures latency.

It plays the marketing tool's part; a real receiver would do the same dedupe.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from touchstream.metrics import LATENCY_BUCKETS, metric_name, render

MAX_KEPT_DELIVERIES = 200_000
# Webhooks received, by result ("new", "duplicate", ...): the benchmarks wait on it.
WEBHOOKS_TOTAL = metric_name("receiver", "webhooks", "total")


def percentile(sorted_values: Sequence[float], share: float) -> float | None:
    """Return the nearest-rank percentile of already sorted values.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 0.5)
    2.0
    >>> percentile([], 0.99) is None
    True
    """
    if not sorted_values:
        return None
    rank = max(1, round(share * len(sorted_values) + 0.4999))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class WebhookLog:
    """Deliveries seen, by webhook-id, with end-to-end latencies.

    With a `journal` file every delivery is appended to it before it is answered, and read
    back on start: a restarted receiver still dedupes and still lists what it got before,
    as a real receiver with a database would.
    """

    def __init__(self, journal: Path | None = None) -> None:
        self.deliveries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.requests = 0
        self.duplicates = 0
        self.rejected = 0
        self.latencies_s: list[float] = []
        self._journal: IO[str] | None = None
        if journal is not None:
            if journal.exists():
                for line in journal.read_text().splitlines():
                    if line.strip():
                        entry = json.loads(line)
                        self._record(entry["webhook_id"], entry["body"], entry["arrived_at_ms"])
            self._journal = journal.open("a", encoding="utf-8")

    def record(self, webhook_id: str, body: dict[str, Any], now_ms: int) -> bool:
        """Record a delivery; return False if this webhook-id was seen before."""
        if self._journal is not None:
            self._journal.write(json.dumps({"webhook_id": webhook_id, "body": body, "arrived_at_ms": now_ms}) + "\n")
            self._journal.flush()
        return self._record(webhook_id, body, now_ms)

    def _record(self, webhook_id: str, body: dict[str, Any], now_ms: int) -> bool:
        self.requests += 1
        if webhook_id in self.deliveries:
            self.duplicates += 1
            return False
        received_at = body.get("received_at_ms")
        if isinstance(received_at, int | float):
            self.latencies_s.append((now_ms - received_at) / 1000)
        self.deliveries[webhook_id] = {"body": body, "arrived_at_ms": now_ms}
        if len(self.deliveries) > MAX_KEPT_DELIVERIES:
            self.deliveries.popitem(last=False)
        return True

    def stats(self) -> dict[str, Any]:
        latencies = sorted(self.latencies_s)
        return {
            "requests": self.requests,
            "unique": len(self.deliveries),
            "duplicates": self.duplicates,
            "rejected_signatures": self.rejected,
            "latency_p50_s": percentile(latencies, 0.50),
            "latency_p99_s": percentile(latencies, 0.99),
        }


def build_receiver(secret: str, fail_status: int | None = None, journal: Path | None = None) -> Starlette:
    """Build the receiver app; `fail_status` makes it answer every delivery with that status (fault tests).

    `journal`: a file that keeps every delivery across restarts of the receiver (see WebhookLog).
    """
    from prometheus_client import CollectorRegistry, Counter, Histogram

    verifier = Webhook(secret)
    log = WebhookLog(journal)
    registry = CollectorRegistry()
    received = Counter(WEBHOOKS_TOTAL, "Webhooks received, by result.", ["result"],
                       registry=registry)
    latency = Histogram("touchstream_receiver_event_to_webhook_seconds", "Event accepted -> webhook received.",
                        buckets=LATENCY_BUCKETS, registry=registry)
    state = {"fail_status": fail_status}

    async def hook(request: Request) -> Response:
        body = await request.body()
        try:
            payload = verifier.verify(body, dict(request.headers))
        except WebhookVerificationError as exc:
            log.rejected += 1
            received.labels("bad_signature").inc()
            return JSONResponse({"error": f"signature: {exc}"}, status_code=400)
        if state["fail_status"]:
            received.labels("refused").inc()
            return JSONResponse({"error": "failing on purpose"}, status_code=int(state["fail_status"]))
        now_ms = int(time.time() * 1000)
        is_new = log.record(request.headers["webhook-id"], payload if isinstance(payload, dict) else {}, now_ms)
        received.labels("new" if is_new else "duplicate").inc()
        if is_new and isinstance(payload, dict) and isinstance(payload.get("received_at_ms"), int | float):
            latency.observe((now_ms - payload["received_at_ms"]) / 1000)
        return JSONResponse({"ok": True})

    async def stats(_request: Request) -> Response:
        return JSONResponse(log.stats())

    async def deliveries(request: Request) -> Response:
        limit = int(request.query_params.get("limit", "1000"))
        items = list(log.deliveries.items())[-limit:]
        return Response(json.dumps([{"webhook_id": k, **v} for k, v in items]), media_type="application/json")

    async def set_failure(request: Request) -> Response:
        data = await request.json()
        state["fail_status"] = data.get("status")
        return JSONResponse({"fail_status": state["fail_status"]})

    async def metrics(_request: Request) -> Response:
        body, content_type = render(registry)
        return Response(body, media_type=content_type.split(";")[0])

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[
        Route("/hook", hook, methods=["POST"]),
        Route("/stats", stats, methods=["GET"]),
        Route("/deliveries", deliveries, methods=["GET"]),
        Route("/failure", set_failure, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", healthz, methods=["GET"]),
    ])
