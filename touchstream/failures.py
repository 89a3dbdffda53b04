"""Failures counted in Redis per subject (a client address, an account), shared by every worker.

A subject that reached `max_failures` within `window_s` of its first failure is refused until the
window ends; later failures do not extend it. Subjects are stored as sha256 digests only, so
Redis never holds a client's address. Used by ingest (failed write keys), the console (failed
logins, failed admin keys on its JSON API) and identity (failed admin keys on its customer API).

Key layout: `<prefix><sha256 of subject>` -> failure count, expiring `window_s` after the first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from prometheus_client import Counter


class FailureCounter:
    """Count failures per subject within a window, and say how long a subject must wait."""

    def __init__(self, client: aioredis.Redis, prefix: str, max_failures: int, window_s: int) -> None:
        self.client, self.prefix = client, prefix
        self.max_failures, self.window_s = max_failures, window_s

    def key(self, subject: str) -> str:
        return f"{self.prefix}{hashlib.sha256(subject.encode()).hexdigest()}"

    async def retry_after(self, subject: str) -> int | None:
        """Return the seconds until `subject` may try again, or None if it may now."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.get(self.key(subject))
            pipe.ttl(self.key(subject))
            count, ttl = await pipe.execute()
        if count is None or int(count) < self.max_failures:
            return None
        if int(ttl) < 0:  # a count without an expiry would lock the subject out for good
            await self.client.expire(self.key(subject), self.window_s)
            return self.window_s
        return max(int(ttl), 1)

    async def failed(self, subject: str) -> int:
        """Count one failure; return how many `subject` has in the current window."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.incr(self.key(subject))
            pipe.expire(self.key(subject), self.window_s, nx=True)
            count, _ = await pipe.execute()
        return int(count)

    async def clear(self, subject: str) -> None:
        await self.client.delete(self.key(subject))


@dataclass(frozen=True)
class KeyRefusal:
    """Why a request's key was refused: 401 (no valid key) or 429 (too many failed keys from its address)."""

    status: int
    message: str
    retry_after_s: int | None = None

    @property
    def headers(self) -> dict[str, str]:
        if self.retry_after_s is not None:
            return {"Retry-After": str(self.retry_after_s)}
        return {"WWW-Authenticate": "Bearer"}


class KeyFailureThrottle:
    """Admit requests by an admin key, and refuse a client address for the rest of the window once it sent
    `max_failures` wrong keys (429 with Retry-After), before its key is even looked at: a guesser learns
    nothing more once locked out, not even a right guess. A request without a key is refused (401) but not
    counted: it guesses nothing. `refused` counts refusals by reason (`bad_key`, `locked_out`)."""

    def __init__(self, failures: FailureCounter, refused: Counter) -> None:
        self.failures = failures
        self.refused = refused
        for reason in ("bad_key", "locked_out"):  # at 0 from the start, so a rate() alert sees the first
            refused.labels(reason)

    async def check(self, authorization: str, address: str, valid: Callable[[str], bool]) -> KeyRefusal | None:
        """Return None when `authorization` holds a valid key (`valid(authorization)`), else the refusal."""
        wait_s = await self.failures.retry_after(address)
        if wait_s is not None:
            self.refused.labels("locked_out").inc()
            return KeyRefusal(429, f"too many failed authentications from this address; retry after {wait_s}s",
                              wait_s)
        if valid(authorization):
            return None
        if authorization.strip():
            self.refused.labels("bad_key").inc()
            await self.failures.failed(address)
        return KeyRefusal(401, "admin key required")
