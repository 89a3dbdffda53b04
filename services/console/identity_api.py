"""identity's customer API as the console calls it: one request with the console's admin key, and the
customer-360 lookup that never raises (the page shows what it has and says why identity's part is missing)."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import quote

import httpx

from services.console.identities import IdentityAnswerError, IdentityProfile, identity_profile
from services.console.settings import ConsoleSettings

log = logging.getLogger(__name__)


@cache
def tls_context() -> ssl.SSLContext:
    """The TLS settings httpx would build for each new client (loading the CA bundle costs ~10 ms of
    CPU), built once: the pipeline sampler opens a client per service every few seconds."""
    return httpx.create_ssl_context()


def json_object(response: httpx.Response) -> dict[str, Any]:
    """Return a peer's JSON object answer, or {} for anything else (an HTML error page, a list)."""
    try:
        answer = response.json()
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


@dataclass(frozen=True)
class IdentityLookup:
    """What identity's customer API said about a customer: its view, or why there is none to show."""

    profile: IdentityProfile | None
    problem: str | None = None  # None with no profile: identity does not know the customer



class IdentityClient:
    """Requests to identity's customer API (`TOUCHSTREAM_CONSOLE_IDENTITY_URL`) with the console's admin key."""

    def __init__(self, settings: ConsoleSettings) -> None:
        self.settings = settings

    async def call(self, method: str, path: str, timeout_s: float = 10.0, **request: Any) -> httpx.Response:
        """Send one request to identity's customer API with the console's admin key (raises httpx.HTTPError)."""
        key = self.settings.identity_admin_key.get_secret_value()
        async with httpx.AsyncClient(timeout=timeout_s, verify=tls_context()) as http:
            return await http.request(method, f"{self.settings.identity_url}{path}",
                                      headers={"Authorization": f"Bearer {key}"}, **request)

    async def lookup(self, customer_id: str) -> IdentityLookup:
        """Ask identity's `GET /v1/customers/{id}` for the customer's identifiers; never raise: the page
        shows what it has and says why identity's part is missing."""
        if not self.settings.identity_url:
            return IdentityLookup(None, "Set TOUCHSTREAM_CONSOLE_IDENTITY_URL to show the identifiers identity holds.")
        try:
            response = await self.call("GET", f"/v1/customers/{quote(customer_id, safe='')}",
                                                 timeout_s=self.settings.identity_timeout_s)
        except httpx.HTTPError as exc:
            return IdentityLookup(None, f"identity did not answer ({type(exc).__name__}); the identifiers are not "
                                        "shown. Reload to try again.")
        if response.status_code == 404:
            return IdentityLookup(None)
        if response.status_code in (401, 403):
            return IdentityLookup(None, "identity refused the console's admin key "
                                        "(TOUCHSTREAM_CONSOLE_IDENTITY_ADMIN_KEY).")
        if response.status_code != 200:
            return IdentityLookup(None, f"identity could not show this customer (HTTP {response.status_code}).")
        try:
            return IdentityLookup(identity_profile(response.json()))
        except (ValueError, IdentityAnswerError) as exc:
            log.warning("identity's customer view was not understood: %s", exc)
            return IdentityLookup(None, f"identity's answer was not understood ({exc}).")
