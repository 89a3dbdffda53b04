"""Webhook delivery's scheduler: queue fired actions in Redis, POST them through the signed, SSRF-guarded
transport (`transport.py`), retry on a persisted schedule, break the circuit of a failing endpoint,
dead-letter after the last try."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from services.triggers.erasure import DELETED_RULE_ID
from services.triggers.metrics import TriggersMetrics
from services.triggers.state_store import DeliveryLedger, DeliveryQueue, disabled_key
from services.triggers.transport import WebhookSender
from services.triggers.webhooks import (
    RETRY_SCHEDULE_S,
    Circuit,
    CircuitBreaker,
    Verdict,
    next_retry_at,
)
from touchstream.privacy import ErasedCustomers

log = logging.getLogger(__name__)

COALESCE_S = 0.002


@dataclass(frozen=True)
class DeliveryEnded:
    """How one fired action's delivery ended, as `actions.deliveries` tells it (schema ActionDeliveryEnded)."""

    action: Mapping[str, Any]
    outcome: str  # "delivered" or "dead_lettered"
    attempts: int  # HTTP requests made, the last included
    status: int | None  # the last answer's HTTP status; None without an answer
    reason: str | None  # why it was dead-lettered
    ended_at_ms: int

    def record(self) -> dict[str, Any]:
        """Return the ActionDeliveryEnded Avro record.

        >>> action = {"action_id": "act_1", "rule_id": "r", "customer_id": "c_1", "endpoint": "m",
        ...           "event_time_ms": 1, "received_at_ms": 2, "created_at_ms": 3}
        >>> DeliveryEnded(action, "delivered", 2, 204, None, 9).record()["attempts"]
        2
        """
        action = self.action
        return {"action_id": action["action_id"], "rule_id": action["rule_id"], "customer_id": action["customer_id"],
                "endpoint": action["endpoint"], "outcome": self.outcome, "attempts": self.attempts,
                "status": self.status, "reason": self.reason, "event_time_ms": action["event_time_ms"],
                "received_at_ms": action["received_at_ms"], "created_at_ms": action["created_at_ms"],
                "ended_at_ms": self.ended_at_ms}


@dataclass(frozen=True)
class FailedDelivery:
    action: Mapping[str, Any]
    reason: str
    attempts: int = 0  # 0: it could not be sent at all (unknown or disabled endpoint)
    status: int | None = None
    failed_at_ms: int = 0

    def ended(self) -> DeliveryEnded:
        return DeliveryEnded(self.action, "dead_lettered", self.attempts, self.status, self.reason, self.failed_at_ms)


DeadLetterSink = Callable[[Sequence[FailedDelivery]], Awaitable[None]]
DeliveredSink = Callable[[Sequence[DeliveryEnded]], Awaitable[None]]


class ActionDelivery:
    """Queue fired actions in Redis and deliver them from a timer loop, endpoint by endpoint.

    The `actions` consumer only calls `enqueue` (a Redis write), so a dead receiver never
    holds up the stream. The loop (`run`) claims due actions per endpoint, up to that
    endpoint's free request slots and only while its circuit lets requests through, so one
    slow or dead receiver never slows the others.

    Every final outcome is told: an action given up on goes to `dead_letter` (with its tries and
    last status), one a receiver acknowledged to `announce_delivered`, which the next scan calls
    before the ledger write (see `dispatch_due`).
    """

    def __init__(
        self,
        sender: WebhookSender,
        ledger: DeliveryLedger,
        queue: DeliveryQueue,
        metrics: TriggersMetrics,
        dead_letter: DeadLetterSink,
        *,
        endpoints: Sequence[str],
        concurrency_per_endpoint: int = 8,
        breaker_threshold: int = 5,
        breaker_cool_off_s: float = 30.0,
        lease_s: float = 60.0,
        poll_s: float = 0.5,
        schedule: tuple[float, ...] = RETRY_SCHEDULE_S,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        announce_delivered: DeliveredSink | None = None,
        erased: ErasedCustomers | None = None,
    ) -> None:
        self._sender = sender
        self._ledger = ledger
        self._queue = queue
        self._metrics = metrics
        self._dead_letter = dead_letter
        self._endpoints = tuple(endpoints)
        self._limit = concurrency_per_endpoint
        # Per endpoint: the claim not yet answered (asked again under its id after a Redis error, so
        # what it took is not left leased to nobody), and the last one answered (forgotten by the next).
        self._unanswered_claim: dict[str, str] = {}
        self._answered_claim: dict[str, str] = {}
        self._breakers = {e: CircuitBreaker(breaker_threshold, breaker_cool_off_s) for e in endpoints}
        self._in_flight = dict.fromkeys(endpoints, 0)
        self._disabled: dict[str, str] = {}
        self._disabled_read_at = -math.inf
        self._lease_s = lease_s
        self._poll_s = poll_s
        self._schedule = schedule
        self._clock = clock
        self._jitter = jitter
        # Erased customers: their actions are never queued, and dropped unsent when claimed.
        self._erased = erased
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        # 2xx answers not yet written to the ledger, per endpoint: recorded for a whole scan at once.
        self._acknowledged: dict[str, list[tuple[str, int]]] = {}
        # Their ids, until written (also while a scan is writing them).
        self._unrecorded: set[str] = set()
        self._announce_delivered = announce_delivered
        # How each of those ended, until announced (action id -> outcome).
        self._unannounced: dict[str, DeliveryEnded] = {}

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def enqueue(self, actions: Sequence[Mapping[str, Any]]) -> list[FailedDelivery]:
        """Queue every `fired` action not yet acknowledged nor about an erased customer; return those that
        can never be sent."""
        fired = {a["action_id"]: a for a in actions if a["outcome"] == "fired"}
        for action_id in await self._ledger.delivered(fired):
            action = fired.pop(action_id)
            self._metrics.deliveries.labels(action["rule_id"], action["endpoint"], "duplicate").inc()
        for action_id in await self._about_erased(fired):
            fired.pop(action_id)
            self._metrics.deliveries_dropped.inc()
        # The timer loop refreshes which endpoints are disabled; an action queued for one in the
        # meantime is dead-lettered by the loop, not lost. One this worker still thinks disabled is
        # looked up again first, so an action right after a re-enable is not dead-lettered for nothing.
        if (any(a["endpoint"] in self._disabled for a in fired.values())
                and time.monotonic() - self._disabled_read_at >= self._poll_s):
            await self._read_disabled()
        failures: list[FailedDelivery] = []
        by_endpoint: dict[str, dict[str, tuple[str, int]]] = {}
        now_ms = self._now_ms()
        for action_id, action in fired.items():
            endpoint = action["endpoint"]
            if not self._sender.knows(endpoint):
                failures.append(FailedDelivery(action, f"endpoint: {endpoint!r} is not registered",
                                               failed_at_ms=now_ms))
            elif endpoint in self._disabled:
                failures.append(FailedDelivery(action, f"endpoint: {endpoint!r} is disabled (receiver answered 410)",
                                               failed_at_ms=now_ms))
            else:
                due_ms = max(now_ms, _not_before_ms(action))
                by_endpoint.setdefault(endpoint, {})[action_id] = (_queue_state(action, 0, ""), due_ms)
        for endpoint, entries in by_endpoint.items():
            await self._queue.enqueue(endpoint, entries)
        for failure in failures:
            self._count_dead_letter(failure.action, "endpoint")
        if by_endpoint:
            self._wake.set()
        return failures

    async def run(self) -> None:
        """Deliver due actions until cancelled; wake at once when `enqueue` adds work."""
        try:
            while True:
                # Cleared before the scan, so work enqueued during it wakes the next one.
                self._wake.clear()
                try:
                    await self.dispatch_due()
                except (RedisError, OSError) as exc:  # Redis away: try again on the next tick
                    self._metrics.redis_errors.inc()
                    log.warning("delivery loop: %s", exc)
                except Exception:
                    # The loop is the only thing that sends; it must outlive any one bad scan.
                    log.exception("delivery loop: scan failed; trying again")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll_s)
                    # Let the completions and enqueues of the same moment gather, so one scan
                    # claims for all of them (each scan costs Redis round trips).
                    await asyncio.sleep(COALESCE_S)
        finally:
            # Stopped (shutdown): record what receivers acknowledged, so a restart does not send it
            # again. If that fails, the leases run out and those actions go out once more, with the
            # same webhook-id, which the receiver dedupes.
            with contextlib.suppress(Exception):
                await self.flush_acknowledged()

    async def flush_acknowledged(self) -> None:
        """Write the 2xx answers gathered since the last scan to the ledger and drop them from the queues."""
        done, self._acknowledged = self._acknowledged, {}
        if not done:
            return
        try:
            await self._announce(done)
            await self._queue.complete_many(done, self._ledger)
        except BaseException:
            # Keep them for the next scan; their leases keep them from being claimed meanwhile.
            for endpoint, items in done.items():
                self._acknowledged.setdefault(endpoint, [])[:0] = items
            raise
        self._recorded(done)

    async def _announce(self, done: Mapping[str, Sequence[tuple[str, int]]]) -> None:
        """Hand the outcomes of acknowledged actions not yet announced to `announce_delivered`."""
        ended = [self._unannounced[action_id] for items in done.values() for action_id, _ in items
                 if action_id in self._unannounced]
        if ended and self._announce_delivered is not None:
            await self._announce_delivered(ended)
        for outcome in ended:
            self._unannounced.pop(outcome.action["action_id"], None)

    def _recorded(self, done: dict[str, list[tuple[str, int]]]) -> None:
        for items in done.values():
            self._unrecorded.difference_update(action_id for action_id, _ in items)

    async def dispatch_due(self) -> int:
        """Start a request for each due action an endpoint has room for; return how many started."""
        # The 2xx answers since the last scan are written in the same round trip as the first claim,
        # before it, so it cannot hand them out again; or on their own if nothing is claimed.
        acknowledged, self._acknowledged = self._acknowledged, {}
        written: dict[str, list[tuple[str, int]]] = {}
        try:
            # Announced before the ledger write: a crash in between sends the webhook again (same
            # webhook-id) and announces it again (same action id), where the other order could lose
            # the announcement for good. While the broker is away this fails, and the scan with it.
            await self._announce(acknowledged)
            started = await self._dispatch(acknowledged, written)
            await self._queue.complete_many(acknowledged, self._ledger)
        except BaseException:
            # Not known to be written: keep them for the next scan (writing them twice is harmless).
            for endpoint, items in acknowledged.items():
                self._acknowledged.setdefault(endpoint, [])[:0] = items
            self._recorded(written)
            raise
        self._recorded(written)
        self._recorded(acknowledged)
        return started

    async def _dispatch(self, acknowledged: dict[str, list[tuple[str, int]]],
                        written: dict[str, list[tuple[str, int]]]) -> int:
        if time.monotonic() - self._disabled_read_at >= self._poll_s:
            await self._read_disabled()
        now_s = self._clock()
        started = 0
        for endpoint in self._endpoints:
            breaker = self._breakers[endpoint]
            self._metrics.circuit_open.labels(endpoint).set(0 if breaker.state(now_s) is Circuit.CLOSED else 1)
            if endpoint in self._disabled:
                await self._dead_letter_queue(endpoint, self._disabled[endpoint])
                continue
            room = self._limit - self._in_flight[endpoint]
            if room <= 0:
                continue
            state = breaker.state(now_s)
            if state is Circuit.OPEN:
                continue
            if state is Circuit.HALF_OPEN:
                if not breaker.allows(now_s):
                    continue
                room = 1
            claim_id = self._unanswered_claim.setdefault(endpoint, uuid.uuid4().hex)
            claimed = await self._queue.claim(endpoint, int(now_s * 1000), room, int((now_s + self._lease_s) * 1000),
                                              acknowledged=acknowledged, ledger=self._ledger, claim_id=claim_id,
                                              previous_claim_id=self._answered_claim.get(endpoint))
            written.update(acknowledged)
            acknowledged.clear()
            # Acknowledged before a crash that left them queued: drop, do not send again.
            done = await self._ledger.delivered(i for i, _ in claimed)
            # Queued before their customer's erasure reached this queue (or by a lagging worker): never sent.
            erased = await self._about_erased({i: json.loads(s)["action"] for i, s in claimed if s}) - done
            self._metrics.deliveries_dropped.inc(len(erased))
            done |= erased
            if done:
                await self._queue.remove_many(endpoint, done)
                claimed = [(i, s) for i, s in claimed if i not in done]
            # Answered only now: had a Redis call since the claim failed, the next scan asks for the same
            # claim again and gets its actions back, rather than leaving them leased until the lease ends.
            self._answered_claim[endpoint] = self._unanswered_claim.pop(endpoint)
            if state is Circuit.HALF_OPEN and len(claimed) > 1:
                # A claim asked again after its answer was lost hands back what it took then, which may
                # be more than one if the circuit was closed at the time: one probe goes, the rest wait.
                await self._queue.release(endpoint, [i for i, _ in claimed[1:]], int(now_s * 1000))
                claimed = claimed[:1]
            if state is Circuit.HALF_OPEN and not claimed:
                breaker.release_probe()
            for action_id, state_json in claimed:
                self._in_flight[endpoint] += 1
                task = asyncio.create_task(self._attempt(endpoint, action_id, state_json))
                self._tasks.add(task)
                task.add_done_callback(self._finished)
                started += 1
        return started

    async def _read_disabled(self) -> None:
        """Re-read which endpoints are disabled: another worker may have disabled one, an operator re-enabled one."""
        stored = await self._queue.disabled(self._endpoints)
        for endpoint in sorted(self._disabled.keys() - stored.keys()):
            log.warning("endpoint %r enabled again; delivering its new actions", endpoint)
        self._disabled = {endpoint: json.loads(why).get("reason", why) for endpoint, why in stored.items()}
        self._disabled_read_at = time.monotonic()

    async def _about_erased(self, actions: Mapping[str, Mapping[str, Any]]) -> set[str]:
        """Return the ids of those `actions` whose customer was erased (a deletion notice is not one of them)."""
        about = {i: a["customer_id"] for i, a in actions.items() if a["rule_id"] != DELETED_RULE_ID}
        if self._erased is None or not about:
            return set()
        erased = await self._erased.among(about.values())
        return {i for i, customer_id in about.items() if customer_id in erased}

    async def drain(self) -> None:
        """Wait until every request started so far has finished and its outcome is recorded (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.flush_acknowledged()

    async def pending(self) -> dict[str, int]:
        """Return the queued action count per endpoint, and publish it as a metric."""
        counts = {e: await self._queue.pending(e) for e in self._endpoints}
        for endpoint, count in counts.items():
            self._metrics.queued.labels(endpoint).set(count)
        return counts

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery attempt crashed", exc_info=task.exception())

    async def _attempt(self, endpoint: str, action_id: str, state_json: str) -> None:
        try:
            await self._attempt_once(endpoint, action_id, state_json)
        finally:
            self._in_flight[endpoint] -= 1

    async def _attempt_once(self, endpoint: str, action_id: str, state_json: str) -> None:
        if not state_json:  # due entry without its payload: nothing to send
            await self._queue.remove(endpoint, action_id)
            return
        state = json.loads(state_json)
        action: dict[str, Any] = state["action"]
        rule = action["rule_id"]
        breaker = self._breakers[endpoint]
        result = await self._sender.post(endpoint, action_id, action["payload_json"])
        now_s = self._clock()
        attempts = state["attempts"] + 1
        if result.verdict is Verdict.DELIVERED:
            breaker.record_success()
            # Recorded by the next scan, together with the other answers of the moment (one round
            # trip for all). Until then the lease keeps the action from being claimed again.
            self._acknowledged.setdefault(endpoint, []).append((action_id, int(now_s * 1000)))
            self._unrecorded.add(action_id)
            self._unannounced[action_id] = DeliveryEnded(action, "delivered", attempts, result.status, None,
                                                         int(now_s * 1000))
            self._metrics.deliveries.labels(rule, endpoint, "succeeded").inc()
            self._metrics.event_to_webhook.labels(rule).observe(max(0.0, time.time() - action["received_at_ms"] / 1000))
            return
        self._metrics.attempts_failed.labels(endpoint, result.detail.split(":")[0][:40]).inc()
        if result.verdict is Verdict.DISABLE:
            breaker.record_success()  # the receiver answered; its circuit is not the problem
            await self._disable(endpoint, result.detail, now_s, {action_id: (attempts, result.status)})
            return
        # Dead-letter first, then forget: a crash in between retries rather than loses the action.
        if result.verdict is Verdict.GIVE_UP:
            breaker.record_success()
            await self._give_up(FailedDelivery(action, f"webhook: {result.detail} after {attempts} tries", attempts,
                                               result.status, int(now_s * 1000)), "rejected")
            await self._queue.remove(endpoint, action_id)
            return
        breaker.record_failure(now_s)
        due_s = next_retry_at(attempts, now_s, self._jitter(), result.retry_after_s, self._schedule)
        if due_s is None:
            await self._give_up(FailedDelivery(action, f"webhook: {result.detail} after {attempts} tries", attempts,
                                               result.status, int(now_s * 1000)), "exhausted")
            await self._queue.remove(endpoint, action_id)
            return
        if await self._queue.reschedule(endpoint, action_id,
                                        _queue_state(action, attempts, result.detail, result.status),
                                        int(due_s * 1000)):
            self._metrics.deliveries.labels(rule, endpoint, "retried").inc()

    async def _disable(self, endpoint: str, detail: str, now_s: float,
                       just_tried: Mapping[str, tuple[int, int | None]]) -> None:
        reason = f"receiver answered {detail} (Gone)"
        await self._queue.disable(endpoint, json.dumps({"at_ms": int(now_s * 1000), "reason": reason}))
        self._disabled[endpoint] = reason
        self._metrics.endpoint_disabled.labels(endpoint).inc()
        log.warning("endpoint %r disabled: %s; its queued actions go to deadletter. Re-enable it by deleting the "
                    "Redis key %s: every worker resumes within %.1f s, no restart needed",
                    endpoint, reason, disabled_key(endpoint), self._poll_s)
        await self._dead_letter_queue(endpoint, reason, just_tried)

    async def _dead_letter_queue(self, endpoint: str, reason: str,
                                 just_tried: Mapping[str, tuple[int, int | None]] | None = None) -> None:
        """Send every action queued for a disabled endpoint to deadletter, then drop them from the queue.

        `just_tried`: tries and last status of actions whose latest try is not in their queue state yet.
        """
        # Those a receiver acknowledged are delivered, not dead letters (their ledger write is on its way).
        queued = [(i, s) for i, s in await self._queue.all_queued(endpoint) if i not in self._unrecorded]
        if not queued:
            return
        now_ms = self._now_ms()
        states = [json.loads(s) for _, s in queued if s]
        failures = []
        for state in states:
            stored = (state["attempts"], state.get("last_status"))
            attempts, status = (just_tried or {}).get(state["action"]["action_id"], stored)
            failures.append(FailedDelivery(state["action"], f"endpoint: {endpoint!r} disabled: {reason}", attempts,
                                           status, now_ms))
        for failure in failures:
            self._count_dead_letter(failure.action, "endpoint_disabled")
        await self._dead_letter(failures)
        await self._queue.remove_many(endpoint, [i for i, _ in queued])

    async def _give_up(self, failure: FailedDelivery, kind: str) -> None:
        self._count_dead_letter(failure.action, kind)
        await self._dead_letter([failure])

    def _count_dead_letter(self, action: Mapping[str, Any], kind: str) -> None:
        self._metrics.deliveries.labels(action["rule_id"], action["endpoint"], "failed").inc()
        self._metrics.dead_lettered.labels(action["rule_id"], action["endpoint"], kind).inc()


def _queue_state(action: Mapping[str, Any], attempts: int, last_error: str, last_status: int | None = None) -> str:
    return json.dumps({"action": dict(action), "attempts": attempts, "last_error": last_error,
                       "last_status": last_status}, separators=(",", ":"))


def _not_before_ms(action: Mapping[str, Any]) -> int:
    # A rule in quiet hours with `hold` puts the window's opening into the envelope.
    try:
        value = json.loads(action["payload_json"]).get("not_before_ms")
    except (ValueError, AttributeError):
        return 0
    return int(value) if isinstance(value, int | float) else 0
