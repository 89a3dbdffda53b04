"""The console's login: server-side sessions, the failed-login throttle and the post-login redirect.

Sessions live in Redis (the cookie holds a random token, Redis only its hash); failed logins are
counted in Redis per client address (read through trusted proxies) and for all addresses together.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import unicodedata
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis.asyncio as aioredis

from touchstream.failures import FailureCounter

SESSION_COOKIE = "ts_console_session"
# Pre-session cookie of the login form: its value is also the form's CSRF token (double submit).
LOGIN_COOKIE = "ts_console_login"
LOGIN_COOKIE_TTL_S = 3600
LOGIN_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)


def safe_next(target: str | None) -> str:
    r"""Keep a post-login redirect on this site: a path of its own, or /overview.

    Browsers drop tabs and line breaks from a Location before reading it and treat a backslash as
    "/", so "/<tab>/evil.example" would arrive as "//evil.example": a target with any control
    character, whitespace or backslash is refused whole, and what is left must parse to a path with
    no scheme and no host.

    >>> safe_next("/customers/c_1"), safe_next("//evil.example"), safe_next("https://evil.example")
    ('/customers/c_1', '/overview', '/overview')
    >>> safe_next("/\t/evil.example"), safe_next("/\\evil.example"), safe_next("/ok?q=1#top")
    ('/overview', '/overview', '/ok?q=1#top')
    """
    if not target or not target.startswith("/") or "\\" in target:
        return "/overview"
    if any(char.isspace() or unicodedata.category(char) == "Cc" for char in target):
        return "/overview"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or parts.path.startswith("//"):
        return "/overview"
    return target



@dataclass
class Session:
    csrf: str


class Sessions:
    """Server-side sessions in Redis; the cookie holds a random token, Redis only its hash."""

    def __init__(self, client: aioredis.Redis, prefix: str, ttl_s: int) -> None:
        self.client, self.prefix, self.ttl_s = client, prefix, ttl_s

    def _key(self, token: str) -> str:
        return f"{self.prefix}session:{hashlib.sha256(token.encode()).hexdigest()}"

    async def create(self) -> tuple[str, Session]:
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        await self.client.set(self._key(token), csrf, ex=self.ttl_s)
        return token, Session(csrf)

    async def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        csrf = await self.client.get(self._key(token))
        return Session(csrf.decode() if isinstance(csrf, bytes) else csrf) if csrf is not None else None

    async def drop(self, token: str) -> None:
        await self.client.delete(self._key(token))


@dataclass(frozen=True)
class Lockout:
    """Logins refused for `wait_s` seconds, because of the failures from one address or from all."""

    wait_s: int
    all_addresses: bool


class LoginThrottle:
    """Failed logins counted in Redis (so across workers), per client address and for the console's one
    account (every admin key), each from its first failure on.

    After `max_failures` from one address, or `max_account_failures` from all of them together, within
    `window_s`, logins from that address (or from everywhere) are refused with 429 until the window ends.
    A successful login clears its address's count only: the account's would let a guesser start over
    each time an operator logs in.
    """

    ACCOUNT = "admin"

    def __init__(self, client: aioredis.Redis, prefix: str, max_failures: int, window_s: int,
                 max_account_failures: int) -> None:
        self.by_address = FailureCounter(client, f"{prefix}login_failures:", max_failures, window_s)
        self.by_account = FailureCounter(client, f"{prefix}login_account_failures:", max_account_failures, window_s)

    async def lockout(self, address: str) -> Lockout | None:
        """Return why and how long logins from `address` are refused, or None if it may try now."""
        account_wait = await self.by_account.retry_after(self.ACCOUNT)
        address_wait = await self.by_address.retry_after(address)
        if account_wait is not None and account_wait >= (address_wait or 0):
            return Lockout(account_wait, all_addresses=True)
        return Lockout(address_wait, all_addresses=False) if address_wait is not None else None

    async def failed(self, address: str) -> int:
        """Count one failure; return how many `address` has in the current window."""
        await self.by_account.failed(self.ACCOUNT)
        return await self.by_address.failed(address)

    async def clear(self, address: str) -> None:
        await self.by_address.clear(address)

