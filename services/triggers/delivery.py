"""Webhook delivery: sign with Standard Webhooks, POST with httpx, retry, remember what was acknowledged."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from standardwebhooks import Webhook

from services.triggers.metrics import TriggersMetrics
from services.triggers.settings import WebhookEndpoint
from services.triggers.state_store import DeliveryLedger
from services.triggers.webhooks import Verdict, address_refusal, retry_delay_s, verdict_for_status


def endpoint_refusal(url: str, allow_private: bool) -> str | None:
    """Say why `url` may not be used as a webhook endpoint (SSRF guard), or None if it may."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"{host} does not resolve: {exc}"
    if allow_private:
        return None
    for *_, sockaddr in infos:
        refusal = address_refusal(str(sockaddr[0]))
        if refusal:
            return f"{host} resolves to {refusal} address {sockaddr[0]} (allow_private_endpoints is off)"
    return None


@dataclass(frozen=True)
class PostResult:
    verdict: Verdict
    detail: str


class WebhookSender:
    """POST one signed request to a named endpoint; never follow a redirect."""

    def __init__(self, client: httpx.AsyncClient, endpoints: Mapping[str, WebhookEndpoint]) -> None:
        self._client = client
        self._endpoints = dict(endpoints)
        self._signers = {name: Webhook(ep.secret.get_secret_value()) for name, ep in endpoints.items()}

    def knows(self, endpoint: str) -> bool:
        return endpoint in self._endpoints

    async def post(self, endpoint: str, webhook_id: str, body: str) -> PostResult:
        # Whole seconds: the signature covers the timestamp header's exact text.
        timestamp = datetime.fromtimestamp(int(time.time()), tz=UTC)
        headers = {
            "content-type": "application/json",
            "user-agent": "touchstream-triggers",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(timestamp.timestamp())),
            "webhook-signature": self._signers[endpoint].sign(webhook_id, timestamp, body),
        }
        try:
            response = await self._client.post(
                self._endpoints[endpoint].url, content=body.encode(), headers=headers, follow_redirects=False
            )
        except httpx.HTTPError as exc:
            return PostResult(Verdict.RETRY, f"{type(exc).__name__}: {exc}"[:200])
        return PostResult(verdict_for_status(response.status_code), f"HTTP {response.status_code}")


@dataclass(frozen=True)
class FailedDelivery:
    action: Mapping[str, Any]
    reason: str


class ActionDelivery:
    """Deliver a batch of actions concurrently (bounded), skipping those already acknowledged."""

    def __init__(
        self,
        sender: WebhookSender,
        ledger: DeliveryLedger,
        metrics: TriggersMetrics,
        *,
        max_attempts: int,
        backoff_s: float,
        concurrency: int,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._sender = sender
        self._ledger = ledger
        self._metrics = metrics
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._in_flight = asyncio.Semaphore(concurrency)
        self._sleep = sleep

    async def deliver_batch(self, actions: Sequence[Mapping[str, Any]]) -> list[FailedDelivery]:
        """Send every `fired` action not yet acknowledged; return those that could not be delivered."""
        fired = {a["action_id"]: a for a in actions if a["outcome"] == "fired"}
        already = await self._ledger.delivered(fired)
        for action_id in already:
            action = fired.pop(action_id)
            self._metrics.deliveries.labels(action["rule_id"], action["endpoint"], "duplicate").inc()
        results = await asyncio.gather(*(self._deliver(action) for action in fired.values()))
        return [failure for failure in results if failure is not None]

    async def _deliver(self, action: Mapping[str, Any]) -> FailedDelivery | None:
        rule, endpoint = action["rule_id"], action["endpoint"]
        if not self._sender.knows(endpoint):
            self._metrics.deliveries.labels(rule, endpoint, "failed").inc()
            return FailedDelivery(action, f"endpoint: {endpoint!r} is not registered")
        for attempt in range(1, self._max_attempts + 1):
            async with self._in_flight:
                result = await self._sender.post(endpoint, action["action_id"], action["payload_json"])
            if result.verdict is Verdict.DELIVERED:
                acknowledged_at = time.time()
                await self._ledger.mark_delivered(action["action_id"], int(acknowledged_at * 1000))
                self._metrics.deliveries.labels(rule, endpoint, "succeeded").inc()
                self._metrics.event_to_webhook.labels(rule).observe(
                    max(0.0, acknowledged_at - action["received_at_ms"] / 1000)
                )
                return None
            if result.verdict is Verdict.GIVE_UP or attempt == self._max_attempts:
                self._metrics.deliveries.labels(rule, endpoint, "failed").inc()
                return FailedDelivery(action, f"webhook: {result.detail} after {attempt} tries")
            self._metrics.deliveries.labels(rule, endpoint, "retried").inc()
            # Jitter spreads the retries of many actions that failed together.
            await self._sleep(retry_delay_s(attempt, self._backoff_s, jitter=random.random() * 0.2))
        raise AssertionError("unreachable: the last attempt always returns")
