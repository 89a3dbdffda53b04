"""The console's pages and JSON API, as aiohttp routes served by the Faust worker's own web server.

Every page is rendered on the server with Jinja2 (autoescape on); the only script is
static/console.js (live updates), served from this package. Pages sit behind an admin-key
login (`auth.py`: sessions, the failed-login throttle) that sets an HttpOnly, SameSite=Strict session
cookie; every POST carries a CSRF token (the login form's is a double-submit token bound to a
pre-session cookie). identity's customer API is called through `identity_api.py`, the services'
/metrics are scraped by `scraping.py`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jinja2
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from services.console.auth import (
    LOGIN_COOKIE,
    LOGIN_COOKIE_TTL_S,
    LOGIN_TOKEN,
    SESSION_COOKIE,
    LoginThrottle,
    Session,
    Sessions,
    safe_next,
)
from services.console.backtests import BacktestReportError, parse_backtest_report
from services.console.charts import (
    DAY_MS,
    backtest_fired,
    backtest_totals,
    dated,
    dead_letter_bars,
    latency_lines,
    line_table,
    quality_lines,
    rate_lines,
    recent_samples,
    rule_activity,
    score_lines,
    segment_heatmap,
    segment_sankey,
    uplift_forest,
    value_tier_bars,
    value_tier_label,
)
from services.console.identity_api import IdentityClient, json_object
from services.console.quality import (
    LatencyWindow,
    ModelQuality,
    RateMeter,
    latency_quantiles,
    latency_words,
    model_quality,
    seconds_in_words,
)
from services.console.readmodel import (
    closed_windows,
    conversion_uplift,
    duration_in_words,
    open_complaints,
    reason_in_words,
    sentiment_in_words,
    voice_in_words,
)
from services.console.scraping import ARRIVALS, CONSOLE_STAGE, STAGES, PipelineSampler
from services.console.settings import ConsoleSettings
from services.console.store import ReadModel
from services.console.vendor import ECHARTS
from services.identity.admin import hash_admin_key, is_admin
from services.triggers.rules import Rule, ScoreCrossing
from touchstream.client_address import client_address
from touchstream.eventtime import DAY_S
from touchstream.failures import FailureCounter, KeyFailureThrottle, KeyRefusal
from touchstream.metrics import EVENT_TO_WEBHOOK_SECONDS

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# Served by name from a fixed list (no request path ever reaches the filesystem): name -> (file, type, max age).
# The chart library's URL carries its version (the pages link `?v=<version>`), so browsers may keep it a year.
STATIC_FILES = {
    "console.css": ("console.css", "text/css", 300),
    "console.js": ("console.js", "text/javascript", 300),
    "charts.js": ("charts.js", "text/javascript", 300),
    "echarts.min.js": (f"vendor/{ECHARTS.name}", "text/javascript", 365 * DAY_S),
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A backtest report is a few kB per rule (one count per day or week it fired).
MAX_BACKTEST_BYTES = 2_000_000


def _time(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def template_env() -> jinja2.Environment:
    """Build the Jinja2 environment: templates from this package, every value escaped."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["time"] = _time
    env.filters["pct"] = _pct
    env.filters["day"] = lambda ms: datetime.fromtimestamp(ms / 1000, UTC).date().isoformat()
    env.globals["reason_in_words"] = reason_in_words
    env.globals["sentiment_in_words"] = sentiment_in_words
    env.globals["chart_library_version"] = ECHARTS.version
    env.globals["line_table"] = line_table
    env.globals["value_tier_label"] = value_tier_label
    env.filters["money"] = lambda value: "-" if value is None else f"{value:,.2f}"
    env.filters["duration"] = duration_in_words
    env.filters["latency_ms"] = lambda ms: seconds_in_words(max(0, ms) / 1000)
    return env


@cache
def _static_bytes(path: str) -> bytes:
    """A static file's bytes, read once (they only change with a new release)."""
    return (HERE / "static" / path).read_bytes()


def rule_thresholds(rules: Sequence[Rule]) -> list[tuple[str, str, float]]:
    """Return (rule id, score name, threshold) of every rule that fires on a score crossing."""
    return [(r.id, r.when.score, r.when.crosses_above) for r in rules if isinstance(r.when, ScoreCrossing)]


class ConsoleWeb:
    """Routes of the console over its read model, identity's customer API and the services' metrics."""

    def __init__(self, store: ReadModel, client: aioredis.Redis, settings: ConsoleSettings, rules: Sequence[Rule],
                 page_seconds: Histogram | None = None, feed_rate: RateMeter | None = None,
                 arrivals: LatencyWindow | None = None, api_refused: Counter | None = None) -> None:
        """`store` answers the pages (the read model on Redis, or the in-memory fake in tests); `client` keeps
        sessions and the login and API throttles, which live in Redis whatever the read model is."""
        self.store = store
        self.settings = settings
        self.thresholds = rule_thresholds(rules)
        self.rules = {r.id: r for r in rules}
        self.sessions = Sessions(client, settings.key_prefix, settings.session_ttl_s)
        self.throttle = LoginThrottle(client, settings.key_prefix, settings.login_max_failures,
                                      settings.login_failure_window_s, settings.login_max_failures_per_account)
        # Without the worker's counter (tests, benchmarks), one of its own registry.
        self.api_throttle = KeyFailureThrottle(
            FailureCounter(client, f"{settings.key_prefix}api_failures:", settings.api_max_failures,
                           settings.api_failure_window_s),
            api_refused or Counter("console_api_auth_refused", "", ["reason"], registry=CollectorRegistry()))
        self.templates = template_env()
        self.page_seconds = page_seconds
        self.feed_rate = feed_rate
        self.arrivals = arrivals
        self.sampler = PipelineSampler(store, settings, feed_rate, arrivals)
        self.identity = IdentityClient(settings)

    def register(self, router: web.UrlDispatcher) -> None:
        """Add every route to `router` (the Faust worker's aiohttp app, or a test app)."""
        router.add_get("/", self._secure(self.home))
        router.add_get("/login", self._secure(self.login_form))
        router.add_post("/login", self._secure(self.login))
        router.add_post("/logout", self._secure(self._authed(self.logout, csrf=True)))
        router.add_get("/overview", self._secure(self._authed(self._timed("overview", self.overview))))
        router.add_get("/customers", self._secure(self._authed(self.customer_search_form)))
        router.add_post("/customers", self._secure(self._authed(self.customer_search, csrf=True)))
        router.add_get("/customers/{customer_id}",
                       self._secure(self._authed(self._timed("customer", self.customer_page))))
        router.add_get("/customers/{customer_id}/live", self._secure(self._authed(self.customer_live)))
        router.add_get("/overview/live", self._secure(self._authed(self.overview_live)))
        router.add_get("/overview/fragment", self._secure(self._authed(self.overview_fragment)))
        router.add_get("/rules/live", self._secure(self._authed(self.rules_live)))
        router.add_get("/rules/fragment", self._secure(self._authed(self.rules_fragment)))
        router.add_get("/customers/{customer_id}/fragment", self._secure(self._authed(self.customer_fragment)))
        router.add_get("/customers/{customer_id}/split", self._secure(self._authed(self.split_form)))
        router.add_post("/customers/{customer_id}/split", self._secure(self._authed(self.split, csrf=True)))
        router.add_get("/customers/{customer_id}/delete", self._secure(self._authed(self.delete_form)))
        router.add_post("/customers/{customer_id}/delete", self._secure(self._authed(self.delete, csrf=True)))
        router.add_get("/rules", self._secure(self._authed(self._timed("rules", self.rules_page))))
        router.add_get("/v1/rules/{rule_id}/outcomes", self._secure(self._authed(self.rule_outcomes_json,
                                                                                  api=True)))
        # Machines only (the admin key as a bearer token, never a session cookie, so no page can be made to send it).
        router.add_put("/v1/rules/backtest", self._secure(self.save_backtest))
        router.add_get("/static/{name}", self._secure(self.static))
        # Browsers ask for one on every page; "no content" keeps their consoles free of a 404.
        router.add_get("/favicon.ico", self._secure(self.no_icon))

    # -- plumbing -------------------------------------------------------------------------------------

    def _secure(self, handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = exc
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            if isinstance(response, web.HTTPException):
                raise response
            return response
        return wrapped

    def _authed(self, handler: Callable[[web.Request, Session], Awaitable[web.StreamResponse]],
                csrf: bool = False, api: bool = False) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            session = await self.sessions.get(request.cookies.get(SESSION_COOKIE))
            if session is None and api:
                refusal = await self._api_key_refusal(request)
                if refusal is not None:
                    return web.json_response({"error": refusal.message}, status=refusal.status,
                                             headers=refusal.headers)
                session = Session("")
            if session is None:
                if request.method != "GET":
                    return web.json_response({"error": "login or admin key required"}, status=401)
                raise web.HTTPSeeOther(f"/login?next={request.rel_url.path}")
            if csrf:
                form = await request.post()
                sent = str(form.get("csrf", ""))
                if not session.csrf or not hmac.compare_digest(sent, session.csrf):
                    return self._page("error.html", None, status=403, message="This form has expired; reload it.")
            return await handler(request, session)
        return wrapped

    async def _api_key_refusal(self, request: web.Request) -> KeyRefusal | None:
        """None for a request with an admin key (Bearer); else 401, or 429 once its address sent too many wrong keys."""
        address = client_address(request.remote, request.headers.getall("X-Forwarded-For", []),
                                 self.settings.trusted_proxies)
        return await self.api_throttle.check(request.headers.get("Authorization", ""), address,
                                             lambda authorization: is_admin(authorization, self.settings.admin_keys))

    def _timed(self, page: str, handler: Callable[[web.Request, Session], Awaitable[web.StreamResponse]]
               ) -> Callable[[web.Request, Session], Awaitable[web.StreamResponse]]:
        async def wrapped(request: web.Request, session: Session) -> web.StreamResponse:
            started = time.perf_counter()
            try:
                return await handler(request, session)
            finally:
                if self.page_seconds is not None:
                    self.page_seconds.labels(page).observe(time.perf_counter() - started)
        return wrapped

    def _page(self, template: str, session: Session | None, status: int = 200, csrf: str | None = None,
              **context: Any) -> web.Response:
        token = csrf if csrf is not None else session.csrf if session else ""
        body = self.templates.get_template(template).render(csrf=token, logged_in=session is not None, **context)
        return web.Response(text=body, content_type="text/html", charset="utf-8", status=status)

    async def static(self, request: web.Request) -> web.StreamResponse:
        """Serve the console's stylesheet, scripts and the vendored chart library (a fixed list), compressed."""
        found = STATIC_FILES.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        path, content_type, max_age_s = found
        response = web.Response(body=_static_bytes(path), content_type=content_type, charset="utf-8",
                                headers={"Cache-Control": f"public, max-age={max_age_s}"})
        response.enable_compression()
        return response

    async def no_icon(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=204, headers={"Cache-Control": "public, max-age=86400"})

    # -- login ----------------------------------------------------------------------------------------

    async def home(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther("/overview")

    def _login_page(self, request: web.Request, target: str, error: str | None, status: int = 200,
                    fresh: bool = False) -> web.Response:
        """The login form with its CSRF token: the pre-session cookie's value (a new one if absent or `fresh`)."""
        token = request.cookies.get(LOGIN_COOKIE, "")
        if fresh or not LOGIN_TOKEN.fullmatch(token):
            token = secrets.token_urlsafe(32)
        response = self._page("login.html", None, status=status, csrf=token, next=target, error=error)
        response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="Strict", path="/login",
                            secure=self.settings.cookie_secure, max_age=LOGIN_COOKIE_TTL_S)
        return response

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        return self._login_page(request, safe_next(request.query.get("next")), None)

    async def login(self, request: web.Request) -> web.StreamResponse:
        address = client_address(request.remote, request.headers.getall("X-Forwarded-For", []),
                                 self.settings.trusted_proxies)
        form = await request.post()
        target = safe_next(str(form.get("next", "")))
        lockout = await self.throttle.lockout(address)
        if lockout is not None:
            wait_s = lockout.wait_s
            source = "on this console" if lockout.all_addresses else "from your address"
            response = self._login_page(request, target, status=429, error=(
                f"Too many failed logins {source}: try again in "
                f"{f'{wait_s} s' if wait_s < 60 else duration_in_words(wait_s * 1000)}."))
            response.headers["Retry-After"] = str(wait_s)
            return response
        cookie, sent = request.cookies.get(LOGIN_COOKIE, ""), str(form.get("csrf", ""))
        if not LOGIN_TOKEN.fullmatch(cookie) or not hmac.compare_digest(sent, cookie):
            return self._login_page(request, target, status=403, fresh=True,
                                    error="This form has expired (or cookies are off); log in again.")
        key = str(form.get("key", ""))
        if not key or not is_admin(f"Bearer {key}", self.settings.admin_keys):
            failures = await self.throttle.failed(address)
            log.info("console login refused (key sha256 prefix %s, failure %d from this address)",
                     hash_admin_key(key)[:8] if key else "-", failures)
            return self._login_page(request, target, status=401, error="That key is not an admin key.")
        await self.throttle.clear(address)
        token, _ = await self.sessions.create()
        response = web.HTTPSeeOther(target)
        response.del_cookie(LOGIN_COOKIE, path="/login")
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="Strict", path="/",
                            secure=self.settings.cookie_secure, max_age=self.settings.session_ttl_s)
        return response

    async def logout(self, request: web.Request, session: Session) -> web.StreamResponse:
        token = request.cookies.get(SESSION_COOKIE, "")
        await self.sessions.drop(token)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    # -- customer -------------------------------------------------------------------------------------

    async def customer_search_form(self, request: web.Request, session: Session) -> web.StreamResponse:
        return self._page("search.html", session, error=None)

    async def customer_search(self, request: web.Request, session: Session) -> web.StreamResponse:
        # A POST, so a typed e-mail or phone never lands in a URL, a log line or the history.
        form = await request.post()
        query = str(form.get("q", "")).strip()
        kind, sep, value = query.partition(":")
        if sep:
            return await self._find_by_identifier(session, kind.strip(), value)
        if not query:
            return self._page("search.html", session, status=400, error="Type a customer id or an identifier.")
        raise web.HTTPSeeOther(f"/customers/{quote(query, safe='')}")

    async def _find_by_identifier(self, session: Session, kind: str, value: str) -> web.StreamResponse:
        """Ask identity which customer owns a typed identifier (it normalises and hashes it as the pipeline
        does); the clear value goes in a POST body, never in a URL."""
        if not self.settings.identity_url:
            return self._page("search.html", session, status=503, error=(
                "Search by identifier needs TOUCHSTREAM_CONSOLE_IDENTITY_URL; search by customer id works."))
        try:
            response = await self.identity.call("POST", "/v1/customers/lookup",
                                                 json={"identifier": {"type": kind, "value": value}})
        except httpx.HTTPError as exc:
            return self._page("search.html", session, status=502,
                              error=f"identity did not answer ({type(exc).__name__}); try again.")
        answer = json_object(response)
        if response.status_code == 404:
            return self._page("search.html", session, status=404, error="No customer has this identifier.")
        if response.status_code == 400:
            reason = f"{answer.get('field', '')} {answer.get('reason', '')}".strip() or response.text[:300]
            return self._page("search.html", session, status=400, error=f"Not a usable identifier: {reason}")
        customer_id = answer.get("customer_id")
        if response.status_code in (401, 403):
            message = "identity refused the console's admin key (TOUCHSTREAM_CONSOLE_IDENTITY_ADMIN_KEY)."
        elif response.status_code != 200 or not isinstance(customer_id, str):
            message = f"identity could not look the identifier up (HTTP {response.status_code})."
        else:
            raise web.HTTPSeeOther(f"/customers/{quote(customer_id, safe='')}")
        return self._page("search.html", session, status=502, error=message)

    async def _customer_context(self, customer_id: str) -> dict[str, Any] | None:
        record = await self.store.customer(customer_id)
        identity = await self.identity.lookup(record.customer_id)
        if not record.known and identity.profile is None:
            return None  # neither the read model nor identity knows it (or identity cannot say)
        points = [(s.event_time_ms, s.churn_risk, s.purchase_propensity) for s in record.scores]
        marks = [(a.event_time_ms, a.outcome, a.rule_id) for a in record.actions]
        chart = score_lines(points, [(f"{rid} ({score} {value:g})", value) for rid, score, value in self.thresholds],
                            marks)
        complaints = open_complaints(record.timeline, int(time.time() * 1000))
        voice = {s.message_id: s.message_sentiment for s in record.scores if s.message_sentiment is not None}
        heard = [s for s in record.scores if s.sentiment_recent is not None]
        voice_reason = voice_in_words(heard[-1].sentiment_recent, heard[-1].sentiment_last) if heard else None
        return {"c": record, "identity": identity, "chart": chart, "latest": record.latest_score,
                "complaints": complaints, "voice": voice, "voice_reason": voice_reason}

    async def customer_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        customer_id = request.match_info["customer_id"]
        context = await self._customer_context(customer_id)
        if context is None:
            return self._page("search.html", session, status=404, error="Unknown customer.")
        if context["c"].customer_id != customer_id:
            raise web.HTTPSeeOther(f"/customers/{context['c'].customer_id}")
        return self._page("customer.html", session, **context)

    async def customer_fragment(self, request: web.Request, session: Session) -> web.StreamResponse:
        context = await self._customer_context(request.match_info["customer_id"])
        if context is None:
            raise web.HTTPNotFound()
        return self._page("customer_live.html", session, **context)

    async def customer_live(self, request: web.Request, session: Session) -> web.StreamResponse:
        """Server-Sent Events: say `changed` whenever anything the customer's page shows changes."""
        customer_id = request.match_info["customer_id"]
        return await self._changes(request, lambda: self.store.change_marker(customer_id))

    async def _changes(self, request: web.Request, marker: Callable[[], Awaitable[str]]) -> web.StreamResponse:
        """Server-Sent Events: `changed` each time `marker()` gives something new (polled every live_poll_s)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               **{k: v for k, v in SECURITY_HEADERS.items() if k != "Cache-Control"}})
        # The state the page was drawn from is taken before the client hears back, so no change slips between.
        last = await marker()
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        try:
            while True:
                await asyncio.sleep(self.settings.live_poll_s)
                current = await marker()
                if current != last:
                    last = current
                    await response.write(b"event: changed\ndata: {}\n\n")
                else:
                    await response.write(b": keep-alive\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response

    async def split_form(self, request: web.Request, session: Session) -> web.StreamResponse:
        """Ask for confirmation before splitting an identifier off a customer (nothing changes on a GET)."""
        ref = request.query.get("identifier", "")
        kind, sep, digest = ref.partition(":")
        if not sep or not kind or not re.fullmatch(r"[0-9a-f]{16,128}", digest):
            return self._page("error.html", session, status=400, message="Pick an identifier from the profile.")
        return self._page("split.html", session, customer_id=request.match_info["customer_id"], ref=ref,
                          kind=kind, short=digest[:12], request_id=uuid.uuid4().hex,
                          enabled=bool(self.settings.identity_url))

    async def split(self, request: web.Request, session: Session) -> web.StreamResponse:
        """Un-merge: ask identity to split the identifier off; identity announces it on identity.merges."""
        customer_id = request.match_info["customer_id"]
        form = await request.post()
        ref, request_id = str(form.get("identifier", "")), str(form.get("request_id", ""))
        if form.get("confirm") != "yes" or not ref:
            return self._page("error.html", session, status=400, message="The split was not confirmed.")
        if not self.settings.identity_url:
            return self._page("error.html", session, status=503,
                              message="Un-merge needs TOUCHSTREAM_CONSOLE_IDENTITY_URL.")
        try:
            response = await self.identity.call(
                "POST", f"/v1/customers/{quote(customer_id, safe='')}/unmerge",
                json={"identifiers": [ref], "request_id": request_id or uuid.uuid4().hex})
        except httpx.HTTPError as exc:
            return self._page("error.html", session, status=502,
                              message=f"identity did not answer: {type(exc).__name__}")
        if response.status_code != 200:
            status = response.status_code if response.status_code < 500 else 502
            return self._page("error.html", session, status=status,
                              message=f"identity refused the split: {response.text[:300]}")
        result = response.json()
        return self._page("split_done.html", session, customer_id=result["customer_id"],
                          new_customer_id=result["new_customer_id"], identifiers=result["identifiers"])

    async def delete_form(self, request: web.Request, session: Session) -> web.StreamResponse:
        """Ask for confirmation before deleting a customer: the operator types its id (nothing changes on a GET)."""
        return self._page("delete.html", session, customer_id=request.match_info["customer_id"],
                          request_id=uuid.uuid4().hex, enabled=bool(self.settings.identity_url), error=None)

    async def delete(self, request: web.Request, session: Session) -> web.StreamResponse:
        """Delete a customer through identity's DELETE /v1/customers/{id}, with the admin key as the split does.

        identity removes the identities and announces the deletion; the read model forgets the customer
        when that announcement reaches the console. The form's request_id makes a resubmission the same
        erasure (same deletion id, same customer.deleted webhook).
        """
        customer_id = request.match_info["customer_id"]
        form = await request.post()
        request_id = str(form.get("request_id", "")).strip()[:100] or uuid.uuid4().hex
        if str(form.get("confirm_id", "")).strip() != customer_id:
            return self._page("delete.html", session, status=400, customer_id=customer_id, request_id=request_id,
                              enabled=bool(self.settings.identity_url),
                              error="Type the customer id exactly to confirm; nothing was deleted.")
        if not self.settings.identity_url:
            return self._page("error.html", session, status=503,
                              message="Deletion needs TOUCHSTREAM_CONSOLE_IDENTITY_URL; nothing was deleted.")
        try:
            response = await self.identity.call("DELETE", f"/v1/customers/{quote(customer_id, safe='')}",
                                                 params={"request_id": request_id})
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            log.warning("identity unreachable for a deletion: %s", type(exc).__name__)
            return self._page("error.html", session, status=502, message=(
                f"identity did not answer ({type(exc).__name__}): customer {customer_id} was not deleted. "
                "Try again once identity is up."))
        except httpx.HTTPError as exc:
            # The request went out: identity may have erased the customer before its answer was lost.
            log.warning("identity's answer to a deletion was lost: %s", type(exc).__name__)
            return self._page("error.html", session, status=502, message=(
                f"identity's answer was lost ({type(exc).__name__}): customer {customer_id} may or may not be "
                "deleted. Look it up, or send the form again: the same request is the same deletion."))
        if response.status_code == 404:
            return self._page("error.html", session, status=404, message=(
                f"identity does not know customer {customer_id}: nothing was deleted "
                "(it may have been deleted already)."))
        if response.status_code in (401, 403):
            return self._page("error.html", session, status=502, message=(
                "identity refused the console's admin key (TOUCHSTREAM_CONSOLE_IDENTITY_ADMIN_KEY): "
                f"customer {customer_id} was not deleted."))
        if not 200 <= response.status_code < 300:
            status = response.status_code if response.status_code < 500 else 502
            return self._page("error.html", session, status=status, message=(
                f"identity refused the deletion (HTTP {response.status_code}): {response.text[:300]}"))
        answer = json_object(response)
        # identity erases the live customer and every id merged into it: name them all, as identity did.
        erased = str(answer.get("customer_id") or customer_id)
        merged = [str(m) for m in answer.get("merged_ids") or ()]
        log.info("customer deleted through identity (%s)", answer.get("deletion_id", "no deletion id"))
        return self._page("delete_done.html", session, customer_id=erased, merged_ids=merged,
                          deletion_id=str(answer.get("deletion_id", "")))

    # -- overview and rules ---------------------------------------------------------------------------

    async def sample_pipeline(self, now_s: float | None = None) -> dict[str, str | None]:
        """Scrape the services' /metrics once (see `PipelineSampler.sample`); return the texts."""
        return await self.sampler.sample(now_s)

    async def _overview_context(self, texts: dict[str, str | None]) -> dict[str, Any]:
        segments = await self.store.segments()
        scoring, triggers = texts.get("scoring"), texts.get("triggers")
        quality: ModelQuality | None = model_quality(scoring) if scoring is not None else None
        quantiles = latency_quantiles(triggers, EVENT_TO_WEBHOOK_SECONDS) if triggers else None
        latency = latency_words(quantiles) if quantiles else None
        now = time.time()
        feed = self.feed_rate.per_second(now) if self.feed_rate is not None else None
        rates = [(stage, bool(self.sampler.metrics_url(stage.name)), texts.get(stage.name) is not None,
                  self.sampler.stage_rates[stage.name].per_second(now)) for stage in STAGES]
        flow = await self.store.segment_flow(30)
        value_tiers = await self.store.value_tiers()
        dead_letters = await self.store.dead_letters()
        history = recent_samples(await self.store.pipeline_samples(), int(now // 60))
        charts = {
            "segments": segment_heatmap(segments), "flow": segment_sankey(flow), "value": value_tier_bars(value_tiers),
            "rates": rate_lines(history, [*(stage.name for stage in STAGES), CONSOLE_STAGE]),
            "latency": latency_lines(history, [label for _, label in ARRIVALS]),
            "quality": quality_lines(history), "dead_letters": dead_letter_bars(dead_letters),
        }
        return {"segments": segments, "seg_names": charts["segments"]["rows"],
                "stage_names": charts["segments"]["columns"], "customers": await self.store.customer_count(),
                "dead_letters": dead_letters, "flow": flow, "value_tiers": value_tiers, "quality": quality,
                "quality_configured": bool(self.settings.scoring_metrics_url), "latency": latency,
                "latency_configured": bool(self.settings.triggers_metrics_url), "feed": feed, "rates": rates,
                "arrivals": self.sampler.arrival_rows(now), "charts": charts}

    async def overview(self, request: web.Request, session: Session) -> web.StreamResponse:
        return self._page("overview.html", session, **await self._overview_context(await self.sample_pipeline()))

    async def overview_fragment(self, request: web.Request, session: Session) -> web.StreamResponse:
        # The sampler's latest scrape (every pipeline_sample_s): a live page never scrapes the services itself.
        return self._page("overview_live.html", session, **await self._overview_context(self.sampler.last_texts))

    async def overview_live(self, request: web.Request, session: Session) -> web.StreamResponse:
        """Server-Sent Events: `changed` whenever the overview's numbers change (the pipeline's every sample)."""
        return await self._changes(request, self.store.overview_marker)

    async def outcomes_clock(self) -> int:
        """The "now" that closes attribution windows: the newest event time the read model applied.

        Event time, like every other count here (purchases, actions, segment flow), so a replay of
        history gives the same outcomes as live traffic; capped at the wall clock, so one event
        stamped in the future cannot close every window at once.
        """
        clock = await self.store.event_clock()
        wall_ms = int(time.time() * 1000)
        return wall_ms if clock is None else min(clock, wall_ms)

    async def rule_outcomes(self, rule_id: str, now_ms: int | None = None) -> dict[str, Any]:
        counts = await self.store.rule_counts(rule_id)
        window_ms = self.settings.window_ms(rule_id)
        now = await self.outcomes_clock() if now_ms is None else now_ms
        treated, treated_open = closed_windows(counts.treated_at, window_ms, now)
        holdout, holdout_open = closed_windows(counts.holdout_at, window_ms, now)
        outcome = conversion_uplift(
            len(treated), await self.store.converted(treated, window_ms),
            len(holdout), await self.store.converted(holdout, window_ms),
            self.settings.min_group_size, treated_open, holdout_open,
        )
        suppressed = {k.split(":", 1)[1]: v for k, v in counts.counts.items() if k.startswith("suppressed:")}
        return {
            "rule_id": rule_id,
            "fired": counts.counts.get("fired", 0),
            "held_out": counts.counts.get("held_out", 0),
            "backfill": counts.counts.get("backfill", 0),
            "suppressed": suppressed,
            "delivered": counts.delivered,
            "delivery_failed": counts.delivery_failed,
            "attribution_window_hours": window_ms / 3_600_000,
            "windows_closed_by_ms": now,
            "outcome": outcome.to_json(),
            "by_day": dated(counts.by_day),
        }

    async def _rules_context(self) -> dict[str, Any]:
        ids = sorted(set(await self.store.rule_ids()) | set(self.rules))
        now = await self.outcomes_clock()
        rows = [await self.rule_outcomes(rule_id, now) for rule_id in ids]
        backtest = await self.store.backtest()
        return {"rows": rows, "rules": self.rules, "clock_ms": now, "forest": uplift_forest(rows),
                "activity": [rule_activity(row["rule_id"], row["by_day"], now // DAY_MS) for row in rows],
                "backtest": backtest,
                "backtest_charts": (backtest_fired(backtest), backtest_totals(backtest)) if backtest else None}

    async def rules_page(self, request: web.Request, session: Session) -> web.StreamResponse:
        return self._page("rules.html", session, **await self._rules_context())

    async def rules_fragment(self, request: web.Request, session: Session) -> web.StreamResponse:
        return self._page("rules_live.html", session, **await self._rules_context())

    async def rules_live(self, request: web.Request, session: Session) -> web.StreamResponse:
        """Server-Sent Events: `changed` whenever a rule's counts or outcome may have changed."""
        return await self._changes(request, self.store.rules_marker)

    async def rule_outcomes_json(self, request: web.Request, session: Session) -> web.StreamResponse:
        rule_id = request.match_info["rule_id"]
        if rule_id not in self.rules and rule_id not in await self.store.rule_ids():
            return web.json_response({"error": "unknown rule"}, status=404)
        return web.Response(text=json.dumps(await self.rule_outcomes(rule_id)), content_type="application/json")

    async def save_backtest(self, request: web.Request) -> web.StreamResponse:
        """Keep a backtest report (`touchstream rules backtest --json`) for the rules page's backtest charts."""
        refusal = await self._api_key_refusal(request)
        if refusal is not None:
            return web.json_response({"error": refusal.message}, status=refusal.status, headers=refusal.headers)
        if request.content_length is not None and request.content_length > MAX_BACKTEST_BYTES:
            return web.json_response({"error": f"report: larger than {MAX_BACKTEST_BYTES} bytes"}, status=413)
        body = await request.content.read(MAX_BACKTEST_BYTES + 1)
        if len(body) > MAX_BACKTEST_BYTES:
            return web.json_response({"error": f"report: larger than {MAX_BACKTEST_BYTES} bytes"}, status=413)
        try:
            result = parse_backtest_report(json.loads(body), int(time.time() * 1000))
        except json.JSONDecodeError as exc:
            return web.json_response({"error": f"report: not JSON ({exc.msg} at line {exc.lineno})"}, status=400)
        except UnicodeDecodeError:
            return web.json_response({"error": "report: not UTF-8 text"}, status=400)
        except BacktestReportError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        await self.store.save_backtest(result)
        return web.json_response({"rules": len(result.rules), "periods": len(result.periods())})
