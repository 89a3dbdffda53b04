"""Failures counted in Redis per subject (a client address, an account), shared by every worker.

A subject that reached `max_failures` within `window_s` of its first failure is refused until the
window ends; later failures do not extend it. Subjects are stored as sha256 digests only, so
Redis never holds a client's address. Used by ingest (failed write keys) and the console
(failed logins).

Key layout: `<prefix><sha256 of subject>` -> failure count, expiring `window_s` after the first.
"""

from __future__ import annotations

import hashlib

import redis.asyncio as aioredis


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
