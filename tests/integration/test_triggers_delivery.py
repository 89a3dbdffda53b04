"""Triggers adapters against real Valkey and a real HTTP receiver that verifies Standard Webhooks signatures."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from standardwebhooks import Webhook

from services.triggers.crossing import CrossingState
from services.triggers.delivery import ActionDelivery, WebhookSender, endpoint_refusal
from services.triggers.metrics import TriggersMetrics
from services.triggers.settings import WebhookEndpoint
from services.triggers.state_store import DeliveryLedger, RuleStateStore, delivered_key, state_key

pytestmark = pytest.mark.integration

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass
class Receiver:
    """A webhook receiver on loopback: verifies each request, answers with the next scripted status."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    verified: list[tuple[dict[str, str], Any]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self) -> int:
        with self.lock:
            return self.statuses.pop(0) if self.statuses else 204

    def hits(self, webhook_id: str) -> int:
        return sum(1 for headers, _ in self.verified if headers["webhook-id"] == webhook_id)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()
    verifier = Webhook(SECRET)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                payload = verifier.verify(body, headers)
            except Exception as exc:
                state.rejected.append(str(exc))
                self.send_response(401)
                self.end_headers()
                return
            with state.lock:
                state.verified.append((headers, payload))
            status = state.answer()
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("location", state.url + "/elsewhere")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


async def no_wait(_: float) -> None:
    return None


@dataclass
class Harness:
    delivery: ActionDelivery
    metrics: TriggersMetrics
    client: httpx.AsyncClient

    def count(self, result: str, rule: str = "churn-risk-high") -> float:
        return self.metrics.deliveries.labels(rule, "marketing", result)._value.get()


@pytest.fixture
async def harness(receiver: Receiver, redis_client: aioredis.Redis) -> Any:
    metrics = TriggersMetrics(CollectorRegistry())
    async with httpx.AsyncClient(timeout=5, follow_redirects=False) as client:
        sender = WebhookSender(client, {"marketing": WebhookEndpoint(url=receiver.url, secret=SECRET)})
        delivery = ActionDelivery(sender, DeliveryLedger(redis_client, ttl_s=3600), metrics,
                                  max_attempts=3, backoff_s=0.01, concurrency=4, sleep=no_wait)
        yield Harness(delivery, metrics, client)


def an_action(n: int = 1, *, outcome: str = "fired", endpoint: str = "marketing") -> dict[str, Any]:
    return {
        "action_id": f"act_{n:032x}",
        "rule_id": "churn-risk-high",
        "customer_id": f"cus_{n}",
        "outcome": outcome,
        "reason": None,
        "endpoint": endpoint,
        "payload_json": json.dumps({"type": "retention.action", "customer_id": f"cus_{n}", "data": {"n": n}}),
        "event_time_ms": 0,
        "received_at_ms": 0,
        "created_at_ms": 0,
    }


async def test_state_store_round_trips_a_batch_in_one_pipeline(redis_client: aioredis.Redis) -> None:
    store = RuleStateStore(redis_client, ttl_s=600)
    states = {("churn-risk-high", "cus_1"): CrossingState(armed=False, cooldown_until_ms=86_400_000),
              ("churn-risk-high", "cus_2"): CrossingState(armed=True, cooldown_until_ms=5)}
    await store.save(states)
    loaded = await store.load([*states, ("churn-risk-high", "never-seen")])
    assert loaded == states
    key = state_key("churn-risk-high", "cus_1")
    assert await redis_client.hgetall(key) == {b"armed": b"0", b"cooldown_until_ms": b"86400000"}
    assert 0 < await redis_client.ttl(key) <= 600
    assert await store.load([]) == {}


async def test_fired_action_arrives_signed_with_the_action_id(harness: Harness, receiver: Receiver) -> None:
    action = an_action(1)
    assert await harness.delivery.deliver_batch([action]) == []
    assert receiver.rejected == []
    ((headers, payload),) = receiver.verified
    assert headers["webhook-id"] == action["action_id"]
    assert headers["webhook-signature"].startswith("v1,")
    assert payload == json.loads(action["payload_json"])
    assert harness.count("succeeded") == 1
    latency = harness.metrics.registry.get_sample_value(
        "touchstream_triggers_event_to_webhook_seconds_count", {"rule": "churn-risk-high"})
    assert latency == 1


async def test_replayed_action_is_not_sent_again(harness: Harness, receiver: Receiver,
                                                 redis_client: aioredis.Redis) -> None:
    action = an_action(2)
    await harness.delivery.deliver_batch([action])
    await harness.delivery.deliver_batch([action, action])
    assert receiver.hits(action["action_id"]) == 1
    assert harness.count("duplicate") == 1
    assert await redis_client.exists(delivered_key(action["action_id"]))


async def test_held_out_and_suppressed_actions_send_nothing(harness: Harness, receiver: Receiver) -> None:
    assert await harness.delivery.deliver_batch([an_action(3, outcome="held_out"),
                                                 an_action(4, outcome="suppressed")]) == []
    assert receiver.verified == []


async def test_server_error_is_retried_until_acknowledged(harness: Harness, receiver: Receiver) -> None:
    receiver.statuses = [500, 503]
    action = an_action(5)
    assert await harness.delivery.deliver_batch([action]) == []
    assert receiver.hits(action["action_id"]) == 3
    assert (harness.count("retried"), harness.count("succeeded")) == (2, 1)


async def test_last_failed_try_is_returned_for_the_deadletter(harness: Harness, receiver: Receiver,
                                                              redis_client: aioredis.Redis) -> None:
    receiver.statuses = [500, 500, 500]
    action = an_action(6)
    (failure,) = await harness.delivery.deliver_batch([action])
    assert failure.action == action
    assert failure.reason == "webhook: HTTP 500 after 3 tries"
    assert harness.count("failed") == 1
    assert not await redis_client.exists(delivered_key(action["action_id"]))


async def test_client_error_is_not_retried(harness: Harness, receiver: Receiver) -> None:
    receiver.statuses = [400]
    (failure,) = await harness.delivery.deliver_batch([an_action(7)])
    assert failure.reason == "webhook: HTTP 400 after 1 tries"


async def test_redirect_is_a_failed_try_and_never_followed(harness: Harness, receiver: Receiver) -> None:
    receiver.statuses = [302, 302, 302]
    (failure,) = await harness.delivery.deliver_batch([an_action(8)])
    assert failure.reason == "webhook: HTTP 302 after 3 tries"
    assert len(receiver.verified) == 3  # all to /hook; /elsewhere was never requested


async def test_unreachable_receiver_fails_after_the_tries(redis_client: aioredis.Redis) -> None:
    from touchstream.embedded import free_port

    metrics = TriggersMetrics(CollectorRegistry())
    endpoint = WebhookEndpoint(url=f"http://127.0.0.1:{free_port()}/hook", secret=SECRET)
    async with httpx.AsyncClient(timeout=2) as client:
        delivery = ActionDelivery(WebhookSender(client, {"marketing": endpoint}), DeliveryLedger(redis_client, 60),
                                  metrics, max_attempts=2, backoff_s=0, concurrency=1, sleep=no_wait)
        (failure,) = await delivery.deliver_batch([an_action(9)])
    assert failure.reason.startswith("webhook: ConnectError")
    assert failure.reason.endswith("after 2 tries")


async def test_unknown_endpoint_fails_without_a_request(harness: Harness, receiver: Receiver) -> None:
    (failure,) = await harness.delivery.deliver_batch([an_action(10, endpoint="nowhere")])
    assert failure.reason == "endpoint: 'nowhere' is not registered"
    assert receiver.verified == []


async def test_a_batch_is_delivered_concurrently_each_exactly_once(harness: Harness, receiver: Receiver) -> None:
    actions = [an_action(100 + n) for n in range(40)]
    assert await harness.delivery.deliver_batch(actions) == []
    assert sorted(h["webhook-id"] for h, _ in receiver.verified) == sorted(a["action_id"] for a in actions)


def test_ssrf_guard_refuses_loopback_unless_allowed(receiver: Receiver) -> None:
    assert "loopback" in (endpoint_refusal(receiver.url, allow_private=False) or "")
    assert endpoint_refusal(receiver.url, allow_private=True) is None
    assert "does not resolve" in (endpoint_refusal("http://no-such-host.invalid/hook", allow_private=True) or "")
