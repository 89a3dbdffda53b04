"""Delivery policy with no I/O: which answers count, when to retry, when a circuit opens (addresses: ssrf.py)."""

from __future__ import annotations

from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum

# The Standard Webhooks schedule: the first try at once, then these waits after each failure
# (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h) -- ten tries over about three days.
RETRY_SCHEDULE_S: tuple[float, ...] = (0, 5, 300, 1_800, 7_200, 18_000, 36_000, 50_400, 72_000, 86_400)
# A receiver may ask for a longer pause with Retry-After, but not for longer than a day.
MAX_RETRY_AFTER_S = 86_400.0


class Verdict(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    GIVE_UP = "give_up"
    DISABLE = "disable"


def verdict_for_status(status: int) -> Verdict:
    """Classify a receiver's HTTP status; a redirect is a failure because we never follow one.

    >>> verdict_for_status(204), verdict_for_status(503), verdict_for_status(301), verdict_for_status(400)
    (<Verdict.DELIVERED: 'delivered'>, <Verdict.RETRY: 'retry'>, <Verdict.RETRY: 'retry'>, <Verdict.GIVE_UP: 'give_up'>)
    >>> verdict_for_status(410)
    <Verdict.DISABLE: 'disable'>
    """
    if 200 <= status < 300:
        return Verdict.DELIVERED
    # 410 Gone is the receiver saying "stop sending here" (Standard Webhooks): disable the endpoint.
    if status == 410:
        return Verdict.DISABLE
    # A 3xx is a failed try (following it could lead to an internal address), retried
    # because the receiver may fix its URL; other 4xx will not change on a retry.
    if status in (408, 425, 429) or status >= 500 or 300 <= status < 400:
        return Verdict.RETRY
    return Verdict.GIVE_UP


def retry_after_s(header: str | None, now_s: float) -> float | None:
    """Parse a Retry-After header (seconds or an HTTP date) into a wait in seconds, or None.

    >>> retry_after_s("120", 0), retry_after_s("Thu, 01 Jan 1970 00:01:00 GMT", 30), retry_after_s("soon", 0)
    (120.0, 30.0, None)
    """
    if not header:
        return None
    text = header.strip()
    if text.isdigit():
        return min(float(text), MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - now_s), MAX_RETRY_AFTER_S)


def next_retry_at(
    attempts_made: int, now_s: float, jitter: float, retry_after: float | None = None,
    schedule: tuple[float, ...] = RETRY_SCHEDULE_S,
) -> float | None:
    """Return when the next try is due after `attempts_made` failed tries, or None once the schedule is spent.

    `jitter` in [0, 1) stretches the wait by up to 10 %, so actions that failed together do
    not come back together; a receiver's Retry-After is a floor.

    >>> next_retry_at(1, 1000.0, 0.0), next_retry_at(2, 1000.0, 0.0), next_retry_at(10, 1000.0, 0.0) is None
    (1005.0, 1300.0, True)
    >>> next_retry_at(1, 1000.0, 0.0, retry_after=60)
    1060.0
    """
    if attempts_made >= len(schedule):
        return None
    wait = schedule[attempts_made] * (1 + 0.1 * jitter)
    if retry_after is not None:
        wait = max(wait, retry_after)
    return now_s + wait


class Circuit(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    """Per-endpoint breaker: open after `threshold` failures in a row, let one probe through after `cool_off_s`.

    >>> breaker = CircuitBreaker(threshold=2, cool_off_s=30)
    >>> breaker.record_failure(0); breaker.record_failure(1); breaker.state(2)
    <Circuit.OPEN: 'open'>
    >>> breaker.allows(10), breaker.state(31), breaker.allows(31), breaker.allows(31)
    (False, <Circuit.HALF_OPEN: 'half_open'>, True, False)
    >>> breaker.record_success(); breaker.state(32)
    <Circuit.CLOSED: 'closed'>
    """

    threshold: int
    cool_off_s: float
    failures_in_a_row: int = 0
    opened_at_s: float | None = None
    probing: bool = False

    def state(self, now_s: float) -> Circuit:
        if self.opened_at_s is None:
            return Circuit.CLOSED
        if now_s - self.opened_at_s >= self.cool_off_s:
            return Circuit.HALF_OPEN
        return Circuit.OPEN

    def allows(self, now_s: float) -> bool:
        """Say whether a request may start now; in half-open, only one probe at a time."""
        state = self.state(now_s)
        if state is Circuit.CLOSED:
            return True
        if state is Circuit.HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def record_success(self) -> None:
        self.failures_in_a_row = 0
        self.opened_at_s = None
        self.probing = False

    def record_failure(self, now_s: float) -> None:
        self.failures_in_a_row += 1
        if self.probing or self.failures_in_a_row >= self.threshold:
            # A failed probe starts a new cool-off.
            self.opened_at_s = now_s
        self.probing = False

    def release_probe(self) -> None:
        """Give the half-open probe slot back when a claimed request was not sent after all."""
        self.probing = False
