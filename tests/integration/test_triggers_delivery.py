"""Delivery against real Valkey and real HTTP receivers that verify Standard Webhooks signatures.

Long waits of the retry schedule run on a fake clock: the queue's due times are real Redis
scores, the clock that reads them is the test's.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_network
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError
from standardwebhooks import Webhook

from services.triggers.crossing import CrossingState
from services.triggers.delivery import ActionDelivery, DeliveryEnded, FailedDelivery
from services.triggers.erasure import forget_customers
from services.triggers.metrics import TriggersMetrics
from services.triggers.settings import WebhookEndpoint
from services.triggers.ssrf import Network
from services.triggers.state_store import (
    ERASED_KEY,
    DeliveryLedger,
    DeliveryQueue,
    RuleStateStore,
    claim_key,
    delivered_key,
    disabled_key,
    queue_keys,
    state_key,
)
from services.triggers.transport import AddressRefused, GuardedClient, WebhookSender, endpoint_refusal, guarded_client
from services.triggers.webhooks import RETRY_SCHEDULE_S
from touchstream.embedded import free_port
from touchstream.privacy import ErasedCustomers

pytestmark = pytest.mark.integration

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NEW_SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
T0 = 1_800_000_000.0
LOOPBACK: tuple[Network, ...] = (ip_network("127.0.0.0/8"),)


@dataclass
class Receiver:
    """A webhook receiver on loopback: verifies each request, answers with the next scripted status."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    retry_after: str | None = None
    delay_s: float = 0.0
    verified: list[tuple[dict[str, str], Any]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self) -> int:
        with self.lock:
            return self.statuses.pop(0) if self.statuses else 204

    def hits(self, webhook_id: str) -> int:
        return sum(1 for headers, _ in self.verified if headers["webhook-id"] == webhook_id)


def start_receiver(secret: str = SECRET) -> tuple[Receiver, ThreadingHTTPServer]:
    state = Receiver()
    verifier = Webhook(secret)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            headers = {k.lower(): v for k, v in self.headers.items()}
            if state.delay_s:
                time.sleep(state.delay_s)
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
            if state.retry_after and status >= 400:
                self.send_header("retry-after", state.retry_after)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return state, server


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state, server = start_receiver()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def second_receiver() -> Iterator[Receiver]:
    state, server = start_receiver()
    yield state
    server.shutdown()
    server.server_close()


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    delivery: ActionDelivery
    metrics: TriggersMetrics
    clock: FakeClock
    dead: list[FailedDelivery]
    delivered: list[DeliveryEnded]

    def count(self, result: str, rule: str = "churn-risk-high", endpoint: str = "marketing") -> float:
        return self.metrics.deliveries.labels(rule, endpoint, result)._value.get()

    def dead_lettered(self, reason: str, endpoint: str = "marketing") -> float | None:
        return self.metrics.registry.get_sample_value(
            "touchstream_triggers_deliveries_dead_lettered_total",
            {"rule": "churn-risk-high", "endpoint": endpoint, "reason": reason})

    async def tick(self, advance_s: float = 0.0) -> int:
        """Move the fake clock, start what is due, wait for those requests to finish."""
        self.clock.now += advance_s
        started = await self.delivery.dispatch_due()
        await self.delivery.drain()
        return started


def make_harness(redis_client: aioredis.Redis, endpoints: dict[str, WebhookEndpoint], client: GuardedClient,
                 **options: Any) -> Harness:
    metrics = TriggersMetrics(CollectorRegistry())
    clock = FakeClock()
    dead: list[FailedDelivery] = []
    delivered: list[DeliveryEnded] = []

    async def sink(failures: Sequence[FailedDelivery]) -> None:
        dead.extend(failures)

    async def announce(outcomes: Sequence[DeliveryEnded]) -> None:
        delivered.extend(outcomes)

    delivery = ActionDelivery(
        WebhookSender(client, endpoints, clock=clock), DeliveryLedger(redis_client, ttl_s=3600),
        DeliveryQueue(redis_client), metrics, sink, endpoints=sorted(endpoints), clock=clock,
        jitter=lambda: 0.5, announce_delivered=announce, **options)
    return Harness(delivery, metrics, clock, dead, delivered)


@pytest.fixture
async def client() -> Any:
    async with guarded_client(5, allow_networks=LOOPBACK) as http:
        yield http


@pytest.fixture
async def harness(receiver: Receiver, redis_client: aioredis.Redis, client: GuardedClient) -> Harness:
    return make_harness(redis_client, {"marketing": WebhookEndpoint(url=receiver.url, secret=SECRET)}, client)


def an_action(n: int = 1, *, outcome: str = "fired", endpoint: str = "marketing",
              body: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "action_id": f"act_{n:032x}",
        "rule_id": "churn-risk-high",
        "customer_id": f"cus_{n}",
        "outcome": outcome,
        "reason": None,
        "endpoint": endpoint,
        "payload_json": json.dumps(body or {"type": "retention.action", "customer_id": f"cus_{n}", "data": {"n": n}}),
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
    assert (await redis_client.hgetall(key))[b"cooldown_until_ms"] == b"86400000"
    assert 0 < await redis_client.ttl(key) <= 600
    assert await store.load([]) == {}


async def test_fired_action_arrives_signed_with_the_action_id(harness: Harness, receiver: Receiver) -> None:
    action = an_action(1)
    assert await harness.delivery.enqueue([action]) == []
    assert receiver.verified == []  # enqueue only writes Redis; the timer loop sends
    assert await harness.tick() == 1
    assert receiver.rejected == []
    ((headers, payload),) = receiver.verified
    assert headers["webhook-id"] == action["action_id"]
    assert headers["webhook-signature"].startswith("v1,")
    assert payload == json.loads(action["payload_json"])
    assert harness.count("succeeded") == 1
    latency = harness.metrics.registry.get_sample_value(
        "touchstream_triggers_event_to_webhook_seconds_count", {"rule": "churn-risk-high"})
    assert latency == 1
    assert await harness.delivery.pending() == {"marketing": 0}


async def test_rotation_signs_with_every_secret_and_either_verifies(
        receiver: Receiver, redis_client: aioredis.Redis, client: GuardedClient) -> None:
    endpoint = WebhookEndpoint(url=receiver.url, secrets=(SECRET, NEW_SECRET))
    harness = make_harness(redis_client, {"marketing": endpoint}, client)
    await harness.delivery.enqueue([an_action(11)])
    await harness.tick()
    ((headers, _),) = receiver.verified  # the receiver verified with the old secret
    signatures = headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    body = json.dumps(json.loads(an_action(11)["payload_json"]))
    for secret in (SECRET, NEW_SECRET):
        assert Webhook(secret).verify(an_action(11)["payload_json"], headers) == json.loads(body)
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + "A" * 32).verify(an_action(11)["payload_json"], headers)


async def test_replayed_action_is_not_sent_again(harness: Harness, receiver: Receiver,
                                                 redis_client: aioredis.Redis) -> None:
    action = an_action(2)
    await harness.delivery.enqueue([action])
    await harness.delivery.enqueue([action])  # queued twice before the loop ran: one entry
    await harness.tick()
    await harness.delivery.enqueue([action, action])
    await harness.tick()
    assert receiver.hits(action["action_id"]) == 1
    assert harness.count("duplicate") == 1  # one batch, one action id
    assert await redis_client.exists(delivered_key(action["action_id"]))


async def test_held_out_and_suppressed_actions_send_nothing(harness: Harness, receiver: Receiver) -> None:
    assert await harness.delivery.enqueue([an_action(3, outcome="held_out"), an_action(4, outcome="suppressed")]) == []
    assert await harness.tick() == 0
    assert receiver.verified == []


async def test_server_error_is_retried_on_the_schedule(harness: Harness, receiver: Receiver) -> None:
    receiver.statuses = [500, 503]
    action = an_action(5)
    await harness.delivery.enqueue([action])
    assert await harness.tick() == 1
    assert await harness.tick(4.9) == 0  # second try is due 5 s (+ up to 10 % jitter) later
    assert await harness.tick(0.4) == 1  # 5.3 s: 5 s stretched by jitter 0.5 -> 5.25 s
    assert await harness.tick(299) == 0
    assert await harness.tick(20) == 1  # third try after 5 min (x1.05)
    assert receiver.hits(action["action_id"]) == 3
    assert (harness.count("retried"), harness.count("succeeded")) == (2, 1)
    assert harness.dead == []


async def test_last_scheduled_try_sends_the_action_to_deadletter(harness: Harness, receiver: Receiver,
                                                                 redis_client: aioredis.Redis) -> None:
    receiver.statuses = [500] * len(RETRY_SCHEDULE_S)
    action = an_action(6)
    await harness.delivery.enqueue([action])
    tried_at = []
    while len(tried_at) < len(RETRY_SCHEDULE_S):
        if await harness.tick():
            tried_at.append(harness.clock.now - T0)
        else:
            harness.clock.now += 60
    # Ten tries over about three days, each wait the spec's (with <= 10 % jitter, 60 s ticks).
    waits = [b - a for a, b in itertools.pairwise(tried_at)]
    for wait, scheduled in zip(waits, RETRY_SCHEDULE_S[1:], strict=True):
        assert scheduled <= wait <= scheduled * 1.1 + 60
    ((failure,),) = [harness.dead]
    assert failure.action == action
    assert failure.reason == "webhook: HTTP 500 after 10 tries"
    # What actions.deliveries says about it: ten tries, the last answered 500, given up at the last try.
    ended = failure.ended().record()
    assert (ended["outcome"], ended["attempts"], ended["status"]) == ("dead_lettered", 10, 500)
    assert ended["ended_at_ms"] == int((T0 + tried_at[-1]) * 1000) and ended["reason"] == failure.reason
    assert harness.delivered == []
    assert harness.dead_lettered("exhausted") == 1
    assert not await redis_client.exists(delivered_key(action["action_id"]))
    assert await harness.tick(10 * 86_400) == 0  # nothing left in the queue
    assert await harness.delivery.pending() == {"marketing": 0}


async def test_retry_after_is_honoured(harness: Harness, receiver: Receiver) -> None:
    receiver.statuses, receiver.retry_after = [429], "120"
    await harness.delivery.enqueue([an_action(12)])
    await harness.tick()
    assert await harness.tick(6) == 0  # the schedule says 5 s, the receiver asked for 120 s
    assert await harness.tick(115) == 1
    assert harness.count("succeeded") == 1


async def test_gone_disables_the_endpoint_and_dead_letters_its_queue(
        harness: Harness, receiver: Receiver, redis_client: aioredis.Redis) -> None:
    receiver.statuses = [500, 410]
    first, second = an_action(13), an_action(14)
    await harness.delivery.enqueue([first])
    await harness.tick()  # 500: first waits for its retry
    receiver.statuses = [410]
    await harness.delivery.enqueue([second])
    await harness.tick()  # second gets 410
    disabled = json.loads(await redis_client.get(disabled_key("marketing")))
    assert disabled["reason"].startswith("receiver answered HTTP 410")
    assert sorted(f.action["action_id"] for f in harness.dead) == sorted([first["action_id"], second["action_id"]])
    assert harness.dead_lettered("endpoint_disabled") == 2
    # Each dead letter says how many tries it had and what the last answer was.
    assert sorted((f.action["action_id"], f.attempts, f.status) for f in harness.dead) == sorted(
        [(first["action_id"], 1, 500), (second["action_id"], 1, 410)])
    assert harness.metrics.endpoint_disabled.labels("marketing")._value.get() == 1
    assert await harness.tick(3600) == 0
    # Persisted: a fresh worker refuses new actions for the endpoint too.
    (refused,) = await harness.delivery.enqueue([an_action(15)])
    assert "disabled" in refused.reason
    # A worker that had not heard yet queued one more: the loop dead-letters it instead of sending.
    stale = an_action(16)
    await DeliveryQueue(redis_client).enqueue("marketing", {stale["action_id"]: (json.dumps(
        {"action": stale, "attempts": 0, "last_error": ""}), int(T0 * 1000))})
    fresh = make_harness(redis_client, {"marketing": WebhookEndpoint(url=receiver.url, secret=SECRET)},
                         harness.delivery._sender._client)
    assert await fresh.tick(7200) == 0
    assert [f.action["action_id"] for f in fresh.dead] == [stale["action_id"]]
    assert "receiver answered HTTP 410" in fresh.dead[0].reason
    assert len(receiver.verified) == 2


async def test_a_re_enabled_endpoint_is_delivered_to_again_by_running_workers(
        receiver: Receiver, redis_client: aioredis.Redis, client: GuardedClient) -> None:
    endpoints = {"marketing": WebhookEndpoint(url=receiver.url, secret=SECRET)}
    # Two running workers; the poll interval is how often each re-reads the disabled set.
    first = make_harness(redis_client, endpoints, client, poll_s=0.05)
    second = make_harness(redis_client, endpoints, client, poll_s=0.05)
    receiver.statuses = [410]
    await first.delivery.enqueue([an_action(80)])
    await first.tick()
    await asyncio.sleep(0.06)
    await second.tick()  # the second worker learns of the 410 from Redis
    for worker, n in ((first, 81), (second, 82)):
        (refused,) = await worker.delivery.enqueue([an_action(n)])
        assert "disabled" in refused.reason

    assert await DeliveryQueue(redis_client).enable("marketing")  # the operator's re-enable
    assert not await redis_client.exists(disabled_key("marketing"))
    await asyncio.sleep(0.06)
    await first.tick()  # a scan re-reads the disabled set
    assert await first.delivery.enqueue([an_action(83)]) == []
    assert await first.tick() == 1
    # The other worker has not scanned since: its enqueue looks again rather than refusing.
    assert await second.delivery.enqueue([an_action(84)]) == []
    assert await second.tick() == 1
    assert [h["webhook-id"] for h, _ in receiver.verified] == [an_action(n)["action_id"] for n in (80, 83, 84)]
    assert receiver.rejected == []
    assert not await DeliveryQueue(redis_client).enable("marketing")


async def test_client_error_is_dead_lettered_without_retries(harness: Harness, receiver: Receiver) -> None:
    receiver.statuses = [400]
    await harness.delivery.enqueue([an_action(7)])
    await harness.tick()
    assert await harness.tick(86_400) == 0
    (failure,) = harness.dead
    assert failure.reason == "webhook: HTTP 400 after 1 tries"
    assert harness.dead_lettered("rejected") == 1


async def test_redirect_is_a_failed_try_and_never_followed(harness: Harness, receiver: Receiver) -> None:
    receiver.statuses = [302, 302]
    await harness.delivery.enqueue([an_action(8)])
    await harness.tick()
    await harness.tick(6)
    await harness.tick(400)
    assert len(receiver.verified) == 3  # all to /hook; /elsewhere was never requested
    assert harness.count("retried") == 2 and harness.count("succeeded") == 1


async def test_a_restart_loses_nothing(receiver: Receiver, redis_client: aioredis.Redis,
                                       client: GuardedClient) -> None:
    endpoints = {"marketing": WebhookEndpoint(url=receiver.url, secret=SECRET)}
    first = make_harness(redis_client, endpoints, client, lease_s=60)
    receiver.statuses = [503]
    retried, claimed_then_crashed = an_action(20), an_action(21)
    await first.delivery.enqueue([retried])
    await first.tick()  # 503, rescheduled in Redis
    await first.delivery.enqueue([claimed_then_crashed])
    # The worker claims the action and dies before sending it.
    queue = DeliveryQueue(redis_client)
    assert [i for i, _ in await queue.claim("marketing", int(T0 * 1000), 10, int((T0 + 60) * 1000))] == [
        claimed_then_crashed["action_id"]]
    del first

    second = make_harness(redis_client, endpoints, client, lease_s=60)  # a new process: nothing in memory
    assert await second.tick(10) == 1  # the retry is due; the claimed one is still leased
    assert await second.tick(60) == 1  # the lease ran out: tried again
    assert receiver.hits(retried["action_id"]) == 2 and receiver.hits(claimed_then_crashed["action_id"]) == 1
    assert await redis_client.zcard(queue_keys("marketing")[0]) == 0


async def test_circuit_opens_after_failures_in_a_row_then_probes(
        receiver: Receiver, redis_client: aioredis.Redis, client: GuardedClient) -> None:
    endpoints = {"marketing": WebhookEndpoint(url=receiver.url, secret=SECRET)}
    harness = make_harness(redis_client, endpoints, client, breaker_threshold=3, breaker_cool_off_s=30,
                           concurrency_per_endpoint=1)
    receiver.statuses = [500, 500, 500]
    await harness.delivery.enqueue([an_action(30 + n) for n in range(6)])
    for _ in range(3):
        await harness.tick()
    assert len(receiver.verified) == 3
    assert harness.metrics.circuit_open.labels("marketing")._value.get() == 0
    assert await harness.tick(1) == 0  # open: due actions wait, no request
    assert harness.metrics.circuit_open.labels("marketing")._value.get() == 1
    assert await harness.tick(29) == 1  # half-open after the cool-off: one probe
    assert await harness.tick() == 1  # the probe succeeded: closed again, one at a time (concurrency 1)
    while await harness.tick():
        pass
    assert len({h["webhook-id"] for h, _ in receiver.verified}) == 6


SLOW_TIMEOUT_S = 3.0


async def test_one_dead_receiver_never_slows_the_other(
        receiver: Receiver, second_receiver: Receiver, redis_client: aioredis.Redis) -> None:
    # Hangs past the client timeout (3 s): were the healthy endpoint's deliveries held behind the slow
    # one's, they could not finish before that timeout; a loaded machine takes a few hundred ms for them.
    second_receiver.delay_s = 6.0
    endpoints = {"marketing": WebhookEndpoint(url=receiver.url, secret=SECRET),
                 "slow": WebhookEndpoint(url=second_receiver.url, secret=SECRET)}
    async with guarded_client(SLOW_TIMEOUT_S, allow_networks=LOOPBACK) as client:
        metrics = TriggersMetrics(CollectorRegistry())

        async def sink(_: Sequence[FailedDelivery]) -> None:
            return None

        delivery = ActionDelivery(
            WebhookSender(client, endpoints), DeliveryLedger(redis_client, 600), DeliveryQueue(redis_client), metrics,
            sink, endpoints=sorted(endpoints), concurrency_per_endpoint=2, poll_s=0.05)
        loop = asyncio.create_task(delivery.run())
        try:
            started = time.monotonic()
            actions = [an_action(100 + n, endpoint="slow") for n in range(20)]
            actions += [an_action(200 + n) for n in range(20)]
            await delivery.enqueue(actions)
            assert time.monotonic() - started < 0.5  # the consumer never waits on a receiver
            while len(receiver.verified) < 20 and time.monotonic() - started < 2 * SLOW_TIMEOUT_S:  # noqa: ASYNC110 (a thread fills it)
                await asyncio.sleep(0.02)
            healthy_done = time.monotonic() - started
        finally:
            loop.cancel()
            await delivery.drain()
    assert len({h["webhook-id"] for h, _ in receiver.verified}) == 20
    assert healthy_done < SLOW_TIMEOUT_S, healthy_done
    # The slow receiver saw at most its two concurrent slots' worth before the deliveries to the
    # healthy one were finished.
    assert len(second_receiver.verified) <= 2


async def test_unreachable_receiver_is_retried_later(redis_client: aioredis.Redis, client: GuardedClient) -> None:
    endpoint = WebhookEndpoint(url=f"http://127.0.0.1:{free_port()}/hook", secret=SECRET)
    harness = make_harness(redis_client, {"marketing": endpoint}, client)
    await harness.delivery.enqueue([an_action(9)])
    await harness.tick()
    assert harness.count("retried") == 1
    assert harness.metrics.registry.get_sample_value(
        "touchstream_triggers_delivery_attempts_failed_total", {"endpoint": "marketing", "cause": "ConnectError"}) == 1


async def test_unknown_endpoint_fails_without_a_request(harness: Harness, receiver: Receiver) -> None:
    (failure,) = await harness.delivery.enqueue([an_action(10, endpoint="nowhere")])
    assert failure.reason == "endpoint: 'nowhere' is not registered"
    assert (failure.attempts, failure.status, failure.failed_at_ms) == (0, None, int(T0 * 1000))
    assert await harness.tick() == 0
    assert receiver.verified == []


async def test_quiet_hours_hold_waits_for_not_before(harness: Harness, receiver: Receiver) -> None:
    not_before_ms = int((T0 + 3600) * 1000)
    await harness.delivery.enqueue([an_action(40, body={"type": "retention.action", "not_before_ms": not_before_ms})])
    assert await harness.tick() == 0
    assert await harness.tick(3599) == 0
    assert await harness.tick(1) == 1


async def test_connect_time_guard_refuses_a_name_that_now_resolves_to_loopback(receiver: Receiver) -> None:
    port = int(receiver.url.rsplit(":", 1)[1].split("/")[0])

    async def rebinding(host: str, _: int) -> list[str]:
        return ["127.0.0.1"]  # registration saw a public address; DNS now answers loopback

    async with guarded_client(2, resolve=rebinding) as guarded:
        with pytest.raises(AddressRefused, match="loopback"):
            await guarded.post(f"http://hooks.example.com:{port}/hook", content=b"{}")
    assert receiver.verified == [] and receiver.rejected == []


async def test_guard_connects_to_the_checked_address_with_the_name_as_host(
        receiver: Receiver, redis_client: aioredis.Redis) -> None:
    port = int(receiver.url.rsplit(":", 1)[1].split("/")[0])
    asked: list[str] = []

    async def resolver(host: str, _: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"]

    url = f"http://hooks.example.com:{port}/hook"
    async with guarded_client(2, allow_networks=LOOPBACK, resolve=resolver) as guarded:
        harness = make_harness(redis_client, {"marketing": WebhookEndpoint(url=url, secret=SECRET)}, guarded)
        await harness.delivery.enqueue([an_action(50)])
        await harness.tick()
    ((headers, _),) = receiver.verified
    assert headers["host"] == f"hooks.example.com:{port}"
    assert asked == ["hooks.example.com"]


async def test_connect_time_guard_refuses_a_literal_refused_address(receiver: Receiver) -> None:
    # No DNS involved: the check sits where the socket is made, so a literal IP cannot slip past it.
    async with guarded_client(2) as guarded:
        with pytest.raises(AddressRefused, match="loopback"):
            await guarded.post(receiver.url, content=b"{}", headers={})
    assert receiver.verified == [] and receiver.rejected == []


async def test_guard_checks_every_new_connection_but_resolves_once_per_ttl(receiver: Receiver) -> None:
    port = int(receiver.url.rsplit(":", 1)[1].split("/")[0])
    asked: list[str] = []

    async def resolver(host: str, _: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"]

    checked: list[str] = []
    async with guarded_client(2, allow_networks=LOOPBACK, resolve=resolver) as guarded:
        original = guarded.refusal

        def spy(address: str, allow_networks: Sequence[Network] = ()) -> str | None:
            checked.append(address)
            return original(address, allow_networks)

        guarded.refusal = spy  # type: ignore[method-assign]
        for n in range(3):
            answer = await guarded.post(f"http://hooks.example.com:{port}/hook", content=b"{}",
                                        headers={"webhook-id": f"x{n}"})
            assert answer.status_code == 401  # unsigned: the receiver refuses it, but it was reached
    assert asked == ["hooks.example.com"]
    # The test receiver closes every connection (HTTP/1.0), so each request connected anew and was
    # checked at its connect (after the resolver's own check of the answer).
    assert checked.count("127.0.0.1") >= 3


async def test_an_endpoints_allowlist_opens_loopback_for_it_alone_at_connect(
        receiver: Receiver, redis_client: aioredis.Redis) -> None:
    # Same receiver, same host and port: the endpoint without the allowlist must not ride on a
    # connection the allowed one opened.
    endpoints = {"allowed": WebhookEndpoint(url=receiver.url, secret=SECRET, allow_networks=LOOPBACK),
                 "other": WebhookEndpoint(url=receiver.url, secret=SECRET)}
    async with guarded_client(2) as guarded:
        harness = make_harness(redis_client, endpoints, guarded)
        await harness.delivery.enqueue([an_action(70, endpoint="allowed"), an_action(71, endpoint="other")])
        assert await harness.tick() == 2
        await harness.delivery.enqueue([an_action(72, endpoint="other")])
        await harness.tick()
    assert [h["webhook-id"] for h, _ in receiver.verified] == [an_action(70)["action_id"]]
    assert harness.count("succeeded", endpoint="allowed") == 1
    assert harness.count("retried", endpoint="other") == 2
    assert harness.metrics.registry.get_sample_value(
        "touchstream_triggers_delivery_attempts_failed_total", {"endpoint": "other", "cause": "AddressRefused"}) == 2


@pytest.mark.parametrize(
    ("resolved", "refusal"),
    [("169.254.169.254", "link-local"), ("100.100.100.200", "cloud metadata"),
     ("::ffff:169.254.169.254", "link-local"), ("64:ff9b::a9fe:a9fe", "link-local")])
async def test_connect_time_guard_refuses_metadata_addresses_whatever_is_allowed(
        receiver: Receiver, resolved: str, refusal: str) -> None:
    port = int(receiver.url.rsplit(":", 1)[1].split("/")[0])

    async def metadata(host: str, _: int) -> list[str]:
        return [resolved]

    everything = (ip_network("0.0.0.0/0"), ip_network("::/0"))
    async with guarded_client(2, allow_networks=everything, resolve=metadata) as guarded:
        with pytest.raises(AddressRefused, match=refusal):
            await guarded.post(f"http://hooks.example.com:{port}/hook", content=b"{}")
        assert "link-local" in (guarded.refusal("fe80::1") or "")
    assert receiver.verified == [] and receiver.rejected == []


def test_ssrf_guard_refuses_loopback_unless_allowed(receiver: Receiver) -> None:
    assert "loopback" in (endpoint_refusal(receiver.url) or "")
    assert endpoint_refusal(receiver.url, LOOPBACK) is None
    assert endpoint_refusal(receiver.url, [ip_network("127.0.0.1/32")]) is None
    assert "does not resolve" in (endpoint_refusal("http://no-such-host.invalid/hook", LOOPBACK) or "")


async def test_an_action_is_forgotten_only_after_its_dead_letter_is_written(
        receiver: Receiver, redis_client: aioredis.Redis, client: GuardedClient) -> None:
    harness = make_harness(redis_client, {"marketing": WebhookEndpoint(url=receiver.url, secret=SECRET)}, client,
                           lease_s=60)
    broken = {"calls": 0}
    original_sink = harness.delivery._dead_letter

    async def flaky_sink(failures: Sequence[FailedDelivery]) -> None:
        broken["calls"] += 1
        if broken["calls"] == 1:
            raise RuntimeError("broker away")
        await original_sink(failures)

    harness.delivery._dead_letter = flaky_sink
    receiver.statuses = [400, 400]
    await harness.delivery.enqueue([an_action(60)])
    await harness.tick()
    assert harness.dead == [] and await harness.delivery.pending() == {"marketing": 1}
    await harness.tick(61)  # the lease ran out: tried again, and this time the dead letter is written
    assert [f.action["action_id"] for f in harness.dead] == [an_action(60)["action_id"]]
    assert await harness.delivery.pending() == {"marketing": 0}


async def test_claim_records_the_acknowledged_answers_first_in_the_same_round_trip(
        redis_client: aioredis.Redis) -> None:
    queue, ledger = DeliveryQueue(redis_client), DeliveryLedger(redis_client, ttl_s=600)
    await queue.enqueue("marketing", {"act_a": ("{}", 1), "act_b": ("{}", 2)})
    [(first, _)] = await queue.claim("marketing", now_ms=10, limit=1, lease_until_ms=1_000)
    claimed = await queue.claim("marketing", now_ms=10, limit=5, lease_until_ms=1_000,
                                acknowledged={"marketing": [(first, 7)]}, ledger=ledger)
    assert [action_id for action_id, _ in claimed] == ["act_b"]
    assert await ledger.delivered(["act_a", "act_b"]) == {first}
    assert await queue.pending("marketing") == 1


async def test_a_claim_asked_again_after_its_answer_was_lost_hands_back_what_it_took(
        redis_client: aioredis.Redis) -> None:
    # Redis carried out the claim and went away before its answer arrived: the same claim id asked
    # again gets the same actions now, rather than their lease running out first.
    queue = DeliveryQueue(redis_client)
    await queue.enqueue("marketing", {"act_a": ('{"n": 1}', 1), "act_b": ('{"n": 2}', 2), "act_c": ("{}", 3)})
    first = await queue.claim("marketing", now_ms=10, limit=2, lease_until_ms=60_000, claim_id="lost")
    assert [action_id for action_id, _ in first] == ["act_a", "act_b"]
    assert await queue.claim("marketing", now_ms=10, limit=2, lease_until_ms=60_000, claim_id="lost") == first
    # Another claim finds them leased; answered, it forgets the lost one's record.
    other = await queue.claim("marketing", now_ms=10, limit=5, lease_until_ms=60_000, claim_id="next",
                              previous_claim_id="lost")
    assert [action_id for action_id, _ in other] == ["act_c"]
    assert not await redis_client.exists(claim_key("marketing", "lost"))
    assert 59_000 < await redis_client.pttl(claim_key("marketing", "next")) <= 60_000 - 10  # until its lease ends
    # An action that left the queue meanwhile (delivered, erased) is not handed back.
    await queue.remove_many("marketing", {"act_c"})
    assert await queue.claim("marketing", now_ms=10, limit=5, lease_until_ms=60_000, claim_id="next") == []


def lose_the_first_claim_answer(harness: Harness) -> list[int]:
    """Make the harness's first claim run in Redis and then lose its answer (a broken connection).

    Returns a list that gets how many actions that claim took.
    """
    queue = harness.delivery._queue
    real_claim = queue.claim
    lost: list[int] = []

    async def claim_then_lose_the_answer(*args: Any, **kwargs: Any) -> list[tuple[str, str]]:
        claimed = await real_claim(*args, **kwargs)
        if not lost:
            lost.append(len(claimed))
            raise RedisConnectionError("Connection closed by server.")
        return claimed

    queue.claim = claim_then_lose_the_answer  # type: ignore[method-assign]
    return lost


async def test_actions_a_claim_took_just_before_redis_went_away_go_out_on_the_next_scan(
        harness: Harness, receiver: Receiver) -> None:
    # Redis carried out the claim and the connection broke before its answer: the next scan asks for
    # the same claim and sends those actions now, not once their lease (60 s) has run out.
    lost = lose_the_first_claim_answer(harness)
    await harness.delivery.enqueue([an_action(n) for n in (31, 32)])
    with pytest.raises(RedisConnectionError):
        await harness.tick()
    assert lost == [2] and receiver.verified == []
    assert await harness.tick() == 2  # same moment: no lease has run out
    assert sorted(headers["webhook-id"] for headers, _ in receiver.verified) == sorted(
        an_action(n)["action_id"] for n in (31, 32))
    assert await harness.delivery.pending() == {"marketing": 0}


async def test_actions_of_a_claim_whose_next_redis_call_failed_go_out_on_the_next_scan(
        harness: Harness, receiver: Receiver) -> None:
    # The claim was answered, then Redis went away before the ledger check of what it took: the next
    # scan asks for the same claim and sends those actions now, not once their lease (60 s) has run out.
    ledger = harness.delivery._ledger
    real_delivered = ledger.delivered
    failed: list[bool] = []

    async def delivered_once_unreachable(*args: Any, **kwargs: Any) -> set[str]:
        if not failed:
            failed.append(True)
            raise RedisConnectionError("Connection closed by server.")
        return await real_delivered(*args, **kwargs)

    await harness.delivery.enqueue([an_action(n) for n in (51, 52)])
    ledger.delivered = delivered_once_unreachable  # type: ignore[method-assign]
    with pytest.raises(RedisConnectionError):
        await harness.tick()
    assert receiver.verified == []
    assert await harness.tick() == 2  # same moment: no lease has run out
    assert await harness.delivery.pending() == {"marketing": 0}


async def test_a_half_open_circuit_sends_one_probe_even_when_a_lost_claim_comes_back_with_more(
        receiver: Receiver, redis_client: aioredis.Redis, client: GuardedClient) -> None:
    # The claim (3 actions, circuit closed) was carried out but its answer lost; the circuit then
    # opened. Asked again once half-open, the claim hands back all three: one probe goes, two wait.
    endpoints = {"marketing": WebhookEndpoint(url=receiver.url, secret=SECRET)}
    harness = make_harness(redis_client, endpoints, client, breaker_threshold=1, breaker_cool_off_s=30,
                           concurrency_per_endpoint=3)
    lost = lose_the_first_claim_answer(harness)
    await harness.delivery.enqueue([an_action(n) for n in (41, 42, 43)])
    with pytest.raises(RedisConnectionError):
        await harness.tick()
    assert lost == [3]
    harness.delivery._breakers["marketing"].record_failure(harness.clock.now)  # another request failed meanwhile
    assert await harness.tick(1) == 0  # open
    assert await harness.tick(30) == 1  # half-open: the one probe
    assert len(receiver.verified) == 1
    assert await harness.tick() == 2  # the probe succeeded: the two released go now, not after their lease
    assert sorted(headers["webhook-id"] for headers, _ in receiver.verified) == sorted(
        an_action(n)["action_id"] for n in (41, 42, 43))
    assert await harness.delivery.pending() == {"marketing": 0}


async def test_a_long_answer_counts_by_its_status_and_the_next_request_still_goes_out() -> None:
    from aiohttp import web

    served = {"bytes": 0}

    async def hook(_request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        await response.prepare(_request)
        chunk = b"x" * 65_536
        try:
            for _ in range(64):  # 4 MiB, more than a webhook answer should ever be
                await response.write(chunk)
                served["bytes"] += len(chunk)
        except (ConnectionResetError, RuntimeError):
            pass
        return response

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with guarded_client(5, allow_networks=LOOPBACK) as guarded:
            answer = await guarded.post(f"http://127.0.0.1:{port}/hook", content=b"{}")
            assert answer.status_code == 200
            again = await guarded.post(f"http://127.0.0.1:{port}/hook", content=b"{}")
            assert again.status_code == 200
    finally:
        await runner.cleanup()


async def test_a_delivered_action_is_announced_before_the_ledger_records_it(
        receiver: Receiver, redis_client: aioredis.Redis, client: GuardedClient) -> None:
    harness = make_harness(redis_client, {"marketing": WebhookEndpoint(url=receiver.url, secret=SECRET)}, client)
    ledger_when_announced: list[bool] = []
    calls = {"n": 0}

    async def announce(outcomes: Sequence[DeliveryEnded]) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("broker away")
        ledger_when_announced.extend([bool(await redis_client.exists(delivered_key(o.action["action_id"])))
                                      for o in outcomes])
        harness.delivered.extend(outcomes)

    harness.delivery._announce_delivered = announce
    receiver.statuses = [503, 204]
    action = an_action(70)
    await harness.delivery.enqueue([action])
    await harness.tick()  # 503
    with pytest.raises(RuntimeError, match="broker away"):
        await harness.tick(6)  # 204, but announcing it fails
    # Not announced, so not recorded either; the lease keeps it from being sent again meanwhile.
    assert harness.delivered == [] and not await redis_client.exists(delivered_key(action["action_id"]))
    assert await harness.tick(1) == 0  # the next scan announces it, then records it
    assert ledger_when_announced == [False] and await redis_client.exists(delivered_key(action["action_id"]))
    (ended,) = harness.delivered
    record = ended.record()
    assert (record["action_id"], record["outcome"], record["attempts"], record["status"], record["reason"]) == (
        action["action_id"], "delivered", 2, 204, None)
    assert record["ended_at_ms"] == int((T0 + 6) * 1000)
    assert receiver.hits(action["action_id"]) == 2 and harness.dead == []


async def test_an_erased_customers_actions_are_never_sent_again_not_even_the_retry_of_one_in_flight(
        receiver: Receiver, redis_client: aioredis.Redis, client: GuardedClient) -> None:
    endpoints = {"marketing": WebhookEndpoint(url=receiver.url, secret=SECRET)}
    erased = ErasedCustomers(redis_client, ERASED_KEY, 3600)
    first = make_harness(redis_client, endpoints, client, erased=erased)
    queue = DeliveryQueue(redis_client)
    in_flight, queued_later, other = an_action(30), an_action(31), an_action(32)
    queued_later["customer_id"] = in_flight["customer_id"]
    receiver.statuses, receiver.delay_s = [503], 0.5
    await first.delivery.enqueue([in_flight])
    assert await first.delivery.dispatch_due() == 1  # on the wire: the receiver answers 503 in 0.5 s
    await forget_customers(redis_client, queue, erased, [in_flight["customer_id"]], [], ["marketing"])
    await first.delivery.drain()
    assert await queue.pending("marketing") == 0  # its retry was not written back
    receiver.delay_s = 0.0
    # Queued by a worker the erasure had not reached yet (written straight to the queue).
    await queue.enqueue("marketing", {queued_later["action_id"]: (json.dumps(
        {"action": queued_later, "attempts": 0, "last_error": ""}), int(T0 * 1000))})
    assert await first.tick(3 * 86_400) == 0

    # A restarted worker reads the `actions` topic again: the erased customer's actions are not queued.
    second = make_harness(redis_client, endpoints, client, erased=erased)
    await second.delivery.enqueue([in_flight, queued_later, other])
    assert await second.tick(3 * 86_400) == 1
    assert [h["webhook-id"] for h, _ in receiver.verified] == [in_flight["action_id"], other["action_id"]]
    assert second.metrics.deliveries_dropped._value.get() == 2
