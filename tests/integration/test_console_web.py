"""The console's pages over a real Valkey, through aiohttp's test server: login, CSRF, escaping, search, outcomes."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import AIOKafkaProducer

from services.console.auth import LOGIN_COOKIE, SESSION_COOKIE, Lockout, LoginThrottle
from services.console.charts import PipelineSample
from services.console.quality import LatencyWindow, RateMeter
from services.console.readmodel import ActionTaken, DeadLettered, DeliveryEnded, ScoreUpdated, TouchpointSeen
from services.console.scraping import STAGES
from services.console.settings import ConsoleSettings
from services.console.store import ReadModelStore
from services.console.vendor import ECHARTS
from services.console.web import CSP, ConsoleWeb
from services.identity.admin import hash_admin_key
from services.triggers.rules import parse_rules
from tests.integration.test_identity_service import ADMIN_KEY as IDENTITY_KEY
from tests.integration.test_identity_service import identity_worker, producer, touchpoint  # noqa: F401 (fixtures)
from tests.kafka_reading import collect
from tests.unit.console.fakes import InMemoryReadModel
from touchstream.embedded import free_port
from touchstream.topics import TOUCHPOINTS_RAW, TOUCHPOINTS_RESOLVED

pytestmark = pytest.mark.integration
KEY = "console-test-key"
RULES = parse_rules("""
rules:
  - id: churn-high
    description: Risk crosses 0.7
    when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.6}
    action: {endpoint: marketing}
""")
HOSTILE = {"note": "<script>alert(1)</script>", "img": "<img src=x onerror=alert(2)>", "link": "javascript:alert(3)"}


@pytest.fixture
async def console(redis_client: aioredis.Redis) -> AsyncIterator[TestClient]:
    settings = ConsoleSettings(admin_keys=frozenset({hash_admin_key(KEY)}), min_group_size=2,
                               attribution_window_hours=1)
    pages = ConsoleWeb(ReadModelStore(redis_client), redis_client, settings, RULES)
    app = web.Application()
    pages.register(app.router)
    client = TestClient(TestServer(app))
    await client.start_server()
    yield client
    await client.close()


async def login_token(client: TestClient) -> str:
    """Open the login form as a browser does: it sets the pre-session cookie and carries its token."""
    form = await client.get("/login")
    assert form.status == 200
    found = re.search(r'name="csrf" value="([^"]+)"', await form.text())
    assert found and form.cookies[LOGIN_COOKIE].value == found.group(1)
    return found.group(1)


async def logged_in(client: TestClient) -> str:
    token = await login_token(client)
    response = await client.post("/login", data={"key": KEY, "next": "/overview", "csrf": token},
                                 allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == "/overview"
    page = await (await client.get("/overview")).text()
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found
    return found.group(1)


async def test_pages_need_a_login_and_the_cookie_is_httponly_strict(console: TestClient) -> None:
    response = await console.get("/customers/c_1", allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == "/login?next=/customers/c_1"
    assert (await console.get("/v1/rules/churn-high/outcomes")).status == 401
    token = await login_token(console)
    refused = await console.post("/login", data={"key": "wrong", "csrf": token}, allow_redirects=False)
    assert refused.status == 401 and SESSION_COOKIE not in refused.cookies
    accepted = await console.post("/login", data={"key": KEY, "csrf": token}, allow_redirects=False)
    [cookie] = [h for h in accepted.headers.getall("Set-Cookie") if h.startswith(f"{SESSION_COOKIE}=")]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert (await console.get("/customers/c_1", allow_redirects=False)).status != 303


async def test_login_never_redirects_to_a_target_a_browser_reads_as_another_site(console: TestClient) -> None:
    form = await (await console.get("/login", params={"next": "/\t/evil.example"})).text()
    assert 'name="next" value="/overview"' in form
    token = await login_token(console)
    for target in ("/\t/evil.example", "/\n/evil.example", "/\r\n/evil.example"):
        refused = await console.post("/login", data={"key": "wrong", "next": target, "csrf": token})
        assert refused.status == 401 and 'name="next" value="/overview"' in await refused.text()
    accepted = await console.post("/login", data={"key": KEY, "next": "/\t/evil.example", "csrf": token},
                                  allow_redirects=False)
    assert accepted.status == 303 and accepted.headers["Location"] == "/overview"


async def test_every_page_sends_a_strict_csp(console: TestClient) -> None:
    await logged_in(console)
    for path in ("/login", "/overview", "/rules", "/customers"):
        response = await console.get(path)
        assert response.headers["Content-Security-Policy"] == CSP, path
        assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
        assert response.headers["X-Frame-Options"] == "DENY"
        assert "<script>" not in (await response.text()).replace('<script src="/static/console.js" defer>', "")


async def test_static_files_are_a_fixed_list_with_nosniff(console: TestClient) -> None:
    script = await console.get("/static/console.js")
    assert script.status == 200 and script.headers["Content-Type"].startswith("text/javascript")
    assert script.headers["X-Content-Type-Options"] == "nosniff"
    assert "EventSource" in await script.text()
    for path in ("/static/..%2Fweb.py", "/static/web.py", "/static/%2e%2e%2fsettings.py",
                 "/static/vendor/echarts.min.js", "/static/echarts-LICENSE"):
        assert (await console.get(path)).status == 404, path
    # The vendored chart library: its URL carries the version, so it is cached long, and sent compressed.
    library = await console.get(f"/static/echarts.min.js?v={ECHARTS.version}", headers={"Accept-Encoding": "gzip"})
    assert library.status == 200 and library.headers["Content-Encoding"] == "gzip"
    assert library.headers["Cache-Control"] == "public, max-age=31536000"
    assert hashlib.sha256(await library.read()).hexdigest() == ECHARTS.sha256
    charts = await console.get("/static/charts.js")
    assert charts.status == 200 and "renderMode" in await charts.text()
    assert (await console.get("/favicon.ico")).status == 204


async def test_a_post_without_the_csrf_token_is_refused(console: TestClient) -> None:
    csrf = await logged_in(console)
    refused = await console.post("/customers", data={"q": "c_1", "csrf": "forged"}, allow_redirects=False)
    assert refused.status == 403
    missing = await console.post("/logout", data={}, allow_redirects=False)
    assert missing.status == 403
    accepted = await console.post("/customers", data={"q": "c_1", "csrf": csrf}, allow_redirects=False)
    assert accepted.status == 303 and accepted.headers["Location"] == "/customers/c_1"
    odd = await console.post("/customers", data={"q": "/\r\nSet-Cookie x=1//evil", "csrf": csrf},
                             allow_redirects=False)
    # One path segment on this site, the CR/LF encoded: no header injection, no open redirect.
    assert odd.headers["Location"] == "/customers/%2F%0D%0ASet-Cookie%20x=1%2F%2Fevil"


async def test_hostile_properties_are_escaped_on_the_customer_page(console: TestClient,
                                                                   redis_client: aioredis.Redis) -> None:
    store = ReadModelStore(redis_client)
    await store.apply([TouchpointSeen("c_x", "m-1", 1000, "track", "<b>Bold</b>", "web", "t", None, None,
                                      None, None, dict(HOSTILE), ("email",))])
    await logged_in(console)
    page = await (await console.get("/customers/c_x")).text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "&lt;b&gt;Bold&lt;/b&gt;" in page
    assert "<script>alert" not in page and "<img src=x" not in page and 'href="javascript:' not in page


async def test_the_pages_read_only_the_read_model_so_they_serve_the_in_memory_one(
        redis_client: aioredis.Redis) -> None:
    # Redis keeps the session; everything the pages show comes from the ReadModel they were given.
    read_model = InMemoryReadModel()
    await read_model.apply([
        TouchpointSeen("c_m", "m-1", 1000, "track", "Order Completed", "web", "t", 42.0, "EUR", None, None,
                       dict(HOSTILE), ("email",)),
        ScoreUpdated("c_m", "m-1", 1000, 0.81, 0.2, "at_risk", "active", "v", (), {}),
    ])
    settings = ConsoleSettings(admin_keys=frozenset({hash_admin_key(KEY)}), min_group_size=1)
    app = web.Application()
    ConsoleWeb(read_model, redis_client, settings, RULES).register(app.router)
    async with TestClient(TestServer(app)) as client:
        await logged_in(client)
        page = await (await client.get("/customers/c_m")).text()
        assert "Order Completed" in page and "at_risk" in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
        overview = await (await client.get("/overview")).text()
        assert "at_risk" in overview
    assert not [key async for key in redis_client.scan_iter(match="ts:console:c:*")]


async def test_open_complaints_show_with_their_sla_clock(console: TestClient, redis_client: aioredis.Redis) -> None:
    now_ms = int(time.time() * 1000)
    hour = 3_600_000

    def complaint(n: int, at_ms: int, text: str) -> TouchpointSeen:
        return TouchpointSeen("c_k", f"k{n}", at_ms, "track", "Complaint Filed", "call_center", "t", None, None,
                              "complaint", text, {}, ())

    await ReadModelStore(redis_client).apply([
        complaint(1, now_ms - 50 * hour, "parcel never arrived"),
        TouchpointSeen("c_k", "k2", now_ms - 49 * hour, "track", "Ticket Resolved", "call_center", "t", None, None,
                       None, None, {}, ()),
        complaint(3, now_ms - 3 * hour - 5 * 60_000, "refund is late <b>again</b>"),
    ])
    await logged_in(console)
    page = await (await console.get("/customers/c_k")).text()
    section = page[page.index('id="complaints"'):]
    section = section[:section.index("</ul>")]
    assert "open 3 h 5 min" in section and "Complaint Filed" in section
    assert section.count("<li>") == 1  # the first complaint was resolved
    # A message's words stay in the event log: neither the page nor the read model holds them.
    assert "refund is late" not in page and "parcel never arrived" not in page
    stored = b"".join(v for v in (await redis_client.hgetall(ReadModelStore(redis_client).ckey("c_k"))).values())
    assert b"refund is late" not in stored and b"parcel" not in stored


async def test_the_customers_voice_shows_on_the_timeline_and_in_words(console: TestClient,
                                                                      redis_client: aioredis.Redis) -> None:
    await ReadModelStore(redis_client).apply([
        TouchpointSeen("c_v", "v1", 1000, "track", "Complaint Submitted", "app", "t", None, None, "complaint",
                       "送餐太慢了", {}, ()),
        ScoreUpdated("c_v", "v1", 1000, 0.5, 0.5, "new", "active", "v", (), {
            "message_sentiment": -0.83, "sentiment_recent": -0.83, "sentiment_last": -0.83}),
        TouchpointSeen("c_v", "v2", 2000, "page", None, "web", "t", None, None, None, None, {}, ()),
        ScoreUpdated("c_v", "v2", 2000, 0.5, 0.5, "new", "active", "v", (), {
            "sentiment_recent": -0.83, "sentiment_last": -0.83}),
    ])
    await logged_in(console)
    page = await (await console.get("/customers/c_v")).text()
    assert "The customer's recent messages are strongly negative (mean -0.83, last -0.83)" in page.replace(
        "&#39;", "'")
    timeline = page[page.index('id="timeline"'):]
    assert timeline.count('class="chip sentiment"') == 1 and "strongly negative -0.83" in timeline


ANN_HASH = "a1" * 32  # identity's keyed hash of ann@example.com (made up: the stub stands in for the HMAC)
ANN_PHONE_HASH = "b2" * 32


@pytest.fixture
async def identity_api() -> AsyncIterator[tuple[str, list[dict[str, object]]]]:
    """identity's customer API stood in by a peer that knows one customer: ann@example.com (any case and spacing,
    as identity normalises) is c_7f3a. It records every request; yields its URL and the requests.
    (test_the_console_finds_a_customer_through_the_real_identity_worker uses the real identity.)"""
    calls: list[dict[str, object]] = []
    view = {"customer_id": "c_7f3a", "looked_up_id": "c_7f3a", "first_seen_ms": 1000, "last_seen_ms": 2000,
            "identities": [{"type": "email", "hash": ANN_HASH, "first_seen_ms": 1000, "last_seen_ms": 2000,
                            "shared": False},
                           {"type": "phone", "hash": ANN_PHONE_HASH, "first_seen_ms": 1500, "last_seen_ms": 1500,
                            "shared": True}],
            "merges": []}

    async def lookup(request: web.Request) -> web.Response:
        body = await request.json()
        calls.append({"path": request.path_qs, "authorization": request.headers.get("Authorization"), "body": body})
        wanted = body["identifier"]
        if "@" not in wanted["value"]:
            return web.json_response({"error": "identifier.value: is not a usable identifier of this type",
                                      "field": "identifier.value", "reason": "is not a usable identifier of this type"},
                                     status=400)
        if wanted["value"].strip().lower() != "ann@example.com":
            return web.json_response({"error": "no customer has this identifier"}, status=404)
        return web.json_response(view)

    async def customer(request: web.Request) -> web.Response:
        calls.append({"path": request.path_qs, "authorization": request.headers.get("Authorization")})
        if request.match_info["cid"] != "c_7f3a":
            return web.json_response({"error": "unknown customer"}, status=404)
        return web.json_response(view)

    identity = web.Application()
    identity.router.add_post("/v1/customers/lookup", lookup)
    identity.router.add_get("/v1/customers/{cid}", customer)
    server = TestServer(identity)
    await server.start_server()
    yield str(server.make_url("")).rstrip("/"), calls
    await server.close()


def delivery(action_id: str, cid: str, outcome: str, attempts: int, status: int | None,
             reason: str | None = None) -> DeliveryEnded:
    return DeliveryEnded(action_id, "churn-high", cid, "marketing", outcome, attempts, status, reason, 1000, 1250)


async def test_a_typed_identifier_finds_the_customer_and_the_page_shows_identitys_view(
        redis_client: aioredis.Redis, identity_api: tuple[str, list[dict[str, object]]]) -> None:
    identity_url, calls = identity_api
    cid = "c_7f3a"
    await ReadModelStore(redis_client).apply([
        ScoreUpdated(cid, "m-1", 1000, 0.82, 0.18, "at_risk", "lapsing", "v7", (("overdue_ratio", 1.4),), {}),
        ActionTaken("a-1", "churn-high", cid, "fired", None, "marketing", 1000, 1005),
        ActionTaken("a-2", "churn-high", cid, "fired", None, "marketing", 2000, 2005),
        ActionTaken("a-3", "churn-high", cid, "fired", None, "marketing", 3000, 3005),
        delivery("a-2", cid, "dead_lettered", 8, 500, "webhook: HTTP 500 after 8 tries"),
        delivery("a-3", cid, "delivered", 2, 204),
    ])
    settings = ConsoleSettings(admin_keys=frozenset({hash_admin_key(KEY)}), identity_url=identity_url,
                               identity_admin_key="identity-key")
    pages = ConsoleWeb(ReadModelStore(redis_client), redis_client, settings, RULES)
    app = web.Application()
    pages.register(app.router)
    async with TestClient(TestServer(app)) as console:
        csrf = await logged_in(console)
        found = await console.post("/customers", data={"q": "email:  ANN@example.com ", "csrf": csrf},
                                   allow_redirects=False)
        assert found.status == 303 and found.headers["Location"] == f"/customers/{cid}"
        assert "ann" not in found.headers["Location"]
        # identity was asked with the typed value in the JSON body and the admin key, never in a URL.
        assert calls == [{"path": "/v1/customers/lookup", "authorization": "Bearer identity-key",
                          "body": {"identifier": {"type": "email", "value": "  ANN@example.com"}}}]
        page = await (await console.get(f"/customers/{cid}")).text()
        # The identities come from identity's GET /v1/customers/{id}, with the same key.
        assert calls[-1] == {"path": f"/v1/customers/{cid}", "authorization": "Bearer identity-key"}
        identities = page[page.index('id="identities"'):page.index("</table>", page.index('id="identities"'))]
        assert ANN_HASH[:12] in identities and ANN_PHONE_HASH[:12] in identities and "shared" in identities
        assert f"/customers/{cid}/split?identifier=phone:{ANN_PHONE_HASH}" in identities
        assert "82.0%" in page and "v7" in page
        assert "How overdue the next purchase is strongly raises churn risk" in page
        assert "churn-high (churn_risk 0.7)" in page  # the rule threshold on the chart
        # Delivery status, from actions.deliveries: pending, failed after 8 tries, delivered at the 2nd.
        assert "pending for marketing" in page
        assert "failed: webhook: HTTP 500 after 8 tries" in page and "8 tries, last HTTP 500" in page
        assert "delivered to marketing" in page and "2 tries, HTTP 204, 250 ms after ingest" in page
        missing = await console.post("/customers", data={"q": "email:nobody@example.com", "csrf": csrf})
        assert missing.status == 404 and "No customer has this identifier" in await missing.text()
        bad = await console.post("/customers", data={"q": "email:not-an-address", "csrf": csrf})
        assert bad.status == 400 and "identifier.value is not a usable identifier" in await bad.text()
        assert all("ann" not in str(call["path"]).lower() for call in calls)


async def test_the_customer_page_says_why_identitys_view_is_missing_and_still_shows_the_rest(
        redis_client: aioredis.Redis, identity_api: tuple[str, list[dict[str, object]]]) -> None:
    identity_url, _ = identity_api
    await ReadModelStore(redis_client).apply([
        TouchpointSeen("c_7f3a", "m-1", 1000, "track", "Page Viewed", "web", "t", None, None, None, None, {}, ())])
    broken = web.Application()

    async def nonsense(request: web.Request) -> web.Response:
        return web.json_response({"customer_id": "c_7f3a", "identities": [{"type": "email", "hash": "<b>x</b>"}]})

    broken.router.add_get("/v1/customers/{cid}", nonsense)
    broken_server = TestServer(broken)
    await broken_server.start_server()
    cases = {
        None: "Set TOUCHSTREAM_CONSOLE_IDENTITY_URL to show the identifiers identity holds.",
        f"http://127.0.0.1:{free_port()}": "identity did not answer (ConnectError)",
        str(broken_server.make_url("")).rstrip("/"): "identity&#39;s answer was not understood "
                                                     "(identities[0].hash is not a keyed hash)",
    }
    try:
        for url, problem in cases.items():
            settings = ConsoleSettings(admin_keys=frozenset({hash_admin_key(KEY)}), identity_url=url)
            app = web.Application()
            ConsoleWeb(ReadModelStore(redis_client), redis_client, settings, RULES).register(app.router)
            async with TestClient(TestServer(app)) as console:
                await logged_in(console)
                response = await console.get("/customers/c_7f3a")
                page = await response.text()
                assert response.status == 200 and problem in page, (url, page)
                assert "Page Viewed" in page and 'id="identities"' not in page and "&lt;b&gt;" not in page
    finally:
        await broken_server.close()
    # identity knows a customer the read model has not seen yet: the page shows identity's view.
    await redis_client.flushdb()
    settings = ConsoleSettings(admin_keys=frozenset({hash_admin_key(KEY)}), identity_url=identity_url)
    app = web.Application()
    ConsoleWeb(ReadModelStore(redis_client), redis_client, settings, RULES).register(app.router)
    async with TestClient(TestServer(app)) as console:
        await logged_in(console)
        page = await (await console.get("/customers/c_7f3a")).text()
        assert ANN_HASH[:12] in page and "No touchpoints yet." in page
        assert (await console.get("/customers/c_nobody")).status == 404


async def test_searching_an_identifier_without_identity_says_what_is_missing(console: TestClient,
                                                                              redis_client: aioredis.Redis) -> None:
    csrf = await logged_in(console)
    unconfigured = await console.post("/customers", data={"q": "email:ann@example.com", "csrf": csrf})
    assert unconfigured.status == 503 and "TOUCHSTREAM_CONSOLE_IDENTITY_URL" in await unconfigured.text()
    down = ConsoleSettings(admin_keys=frozenset({hash_admin_key(KEY)}),
                           identity_url=f"http://127.0.0.1:{free_port()}")
    app = web.Application()
    ConsoleWeb(ReadModelStore(redis_client), redis_client, down, RULES).register(app.router)
    async with TestClient(TestServer(app)) as client:
        csrf = await logged_in(client)
        response = await client.post("/customers", data={"q": "email:ann@example.com", "csrf": csrf})
        assert response.status == 502 and "identity did not answer" in await response.text()


async def test_overview_shows_segments_model_quality_and_dead_letters(redis_client: aioredis.Redis) -> None:
    scoring = web.Application()

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="touchstream_scoring_prequential_roc_auc_ratio 0.734\n"
                                 'touchstream_scoring_examples_learned_total{label="1"} 12.0\n'
                                 "touchstream_scoring_drift_alarms_total 3.0\n")

    async def triggers_metrics(request: web.Request) -> web.Response:
        return web.Response(text='touchstream_triggers_event_to_webhook_seconds_bucket{rule="r",le="0.25"} 60.0\n'
                                 'touchstream_triggers_event_to_webhook_seconds_bucket{rule="r",le="1.0"} 99.0\n'
                                 'touchstream_triggers_event_to_webhook_seconds_bucket{rule="r",le="+Inf"} 100.0\n')

    scoring.router.add_get("/metrics", metrics)
    scoring.router.add_get("/triggers-metrics", triggers_metrics)
    scoring_server = TestServer(scoring)
    await scoring_server.start_server()
    store = ReadModelStore(redis_client)
    await store.apply([
        ScoreUpdated("c_1", "m1", 1, 0.2, 0.8, "champion", "active", "v", (), {}),
        ScoreUpdated("c_2", "m2", 1, 0.9, 0.1, "at_risk", "lapsing", "v", (), {}),
        ScoreUpdated("c_3", "m3", 1, 0.1, 0.9, "champion", "active", "v", (), {}),
        DeadLettered("identity", "no usable identifier", "d1"),
    ])
    settings = ConsoleSettings(admin_keys=frozenset({hash_admin_key(KEY)}),
                               scoring_metrics_url=str(scoring_server.make_url("/metrics")),
                               triggers_metrics_url=str(scoring_server.make_url("/triggers-metrics")))
    feed = RateMeter()
    feed.add(120, time.time())
    pages = ConsoleWeb(store, store.client, settings, RULES, feed_rate=feed)
    app = web.Application()
    pages.register(app.router)
    async with TestClient(TestServer(app)) as client:
        await logged_in(client)
        page = await (await client.get("/overview")).text()
    await scoring_server.close()
    assert re.search(r"<th>champion</th>\s*<td>2</td><td>0</td>\s*<td>2</td>", page), page
    assert "0.734" in page and '<dd id="drift-alarms">3</dd>' in page
    assert "no usable identifier" in page
    assert re.search(r"<td>new customer</td><td>champion · active</td><td>2</td>", page)
    assert '<td class="rate" id="feed-rate">2.0 records/s</td>' in page
    assert '<td id="latency-p50">≤ 0.25 s</td>' in page and "≤ 1 s" in page


async def test_split_asks_for_confirmation_then_calls_identity_with_the_admin_key(
        redis_client: aioredis.Redis) -> None:
    calls: list[tuple[str, str, dict[str, object]]] = []
    identity = web.Application()

    async def unmerge(request: web.Request) -> web.Response:
        calls.append((request.match_info["cid"], request.headers["Authorization"], await request.json()))
        return web.json_response({"customer_id": request.match_info["cid"], "new_customer_id": "c_new",
                                  "identifiers": (await request.json())["identifiers"], "merge_id": "u-1"})

    identity.router.add_post("/v1/customers/{cid}/unmerge", unmerge)
    identity_server = TestServer(identity)
    await identity_server.start_server()
    settings = ConsoleSettings(admin_keys=frozenset({hash_admin_key(KEY)}),
                               identity_url=str(identity_server.make_url("")).rstrip("/"),
                               identity_admin_key="identity-key")
    pages = ConsoleWeb(ReadModelStore(redis_client), redis_client, settings, RULES)
    app = web.Application()
    pages.register(app.router)
    ref = "phone:" + "ab" * 32
    try:
        async with TestClient(TestServer(app)) as client:
            csrf = await logged_in(client)
            confirm = await (await client.get(f"/customers/c_1/split?identifier={ref}")).text()
            assert "Split an identifier off?" in confirm and calls == []  # a GET changes nothing
            request_id = re.search(r'name="request_id" value="([0-9a-f]+)"', confirm)
            assert request_id
            form = {"csrf": csrf, "identifier": ref, "request_id": request_id.group(1)}
            assert (await client.post("/customers/c_1/split", data=form)).status == 400  # not confirmed
            assert (await client.post("/customers/c_1/split", data={**form, "confirm": "yes",
                                                                     "csrf": "x"})).status == 403
            assert calls == []
            done = await client.post("/customers/c_1/split", data={**form, "confirm": "yes"})
            assert done.status == 200 and "c_new" in await done.text()
            assert (await client.get("/customers/c_1/split?identifier=phone:<script>")).status == 400
    finally:
        await identity_server.close()
    assert calls == [("c_1", "Bearer identity-key", {"identifiers": [ref], "request_id": request_id.group(1)})]


async def test_rule_outcomes_json_gives_the_uplift_once_groups_are_big_enough(console: TestClient,
                                                                              redis_client: aioredis.Redis) -> None:
    store = ReadModelStore(redis_client)
    hour = 3_600_000

    def purchase(cid: str, at_ms: int) -> TouchpointSeen:
        return TouchpointSeen(cid, f"p-{cid}", at_ms, "track", "Order Completed", "web", "t", 10.0, "EUR", None, None,
                              {}, ())

    updates: list[TouchpointSeen | ActionTaken] = []
    # Closed windows (action at 1 h, window 1 h). Treated: 4 customers, 3 buy within the hour. Hold-out:
    # 4 customers, 1 buys within the hour, 1 more buys after it (not counted). Uplift 0.75 - 0.25 = 0.5.
    for i, buys_at in enumerate([10, 20, 30, None]):
        updates.append(ActionTaken(f"t{i}", "churn-high", f"c_t{i}", "fired", None, "marketing", hour, hour))
        if buys_at is not None:
            updates.append(purchase(f"c_t{i}", hour + buys_at))
    for i, buys_at in enumerate([10, 2 * hour, None, None]):
        updates.append(ActionTaken(f"h{i}", "churn-high", f"c_h{i}", "held_out", "holdout", "marketing", hour, hour))
        if buys_at is not None:
            updates.append(purchase(f"c_h{i}", hour + buys_at))
    updates.append(ActionTaken("s1", "churn-high", "c_s", "suppressed", "cooldown", "marketing", hour, hour))
    # Open windows: actions at 10 h, and the newest event time seen is 10 h 10 ms, so their hour has not
    # passed. t4 already bought, t5 and h4 have not (yet): none of the three may count either way.
    updates += [ActionTaken("t4", "churn-high", "c_t4", "fired", None, "marketing", 10 * hour, 10 * hour),
                ActionTaken("t5", "churn-high", "c_t5", "fired", None, "marketing", 10 * hour, 10 * hour),
                ActionTaken("h4", "churn-high", "c_h4", "held_out", "holdout", "marketing", 10 * hour, 10 * hour),
                purchase("c_t4", 10 * hour + 10)]
    await store.apply(updates)
    auth = {"Authorization": f"Bearer {KEY}"}
    body = await (await console.get("/v1/rules/churn-high/outcomes", headers=auth)).json()
    assert (body["fired"], body["held_out"], body["suppressed"]) == (6, 5, {"cooldown": 1})
    assert body["windows_closed_by_ms"] == 10 * hour + 10
    outcome = body["outcome"]
    assert (outcome["treated"], outcome["treated_converted"], outcome["holdout"], outcome["holdout_converted"]) == (
        4, 3, 4, 1)
    assert (outcome["treated_open"], outcome["holdout_open"]) == (2, 1)
    assert outcome["enough_data"] and outcome["uplift"] == pytest.approx(0.5)
    assert outcome["ci_low"] < 0.5 < outcome["ci_high"]
    assert (await console.get("/v1/rules/nope/outcomes", headers=auth)).status == 404
    await logged_in(console)
    page = await (await console.get("/rules")).text()
    assert "+50.0 pp" in page and "cooldown: 1" in page
    assert "3 still inside their window" in page and "2 treated, 1 hold-out" in page

    # Event time reaches 11 h (any customer's event): the three windows close. Treated 4/6, hold-out 1/5:
    # uplift 2/3 - 1/5 = 7/15 exactly.
    await store.apply([TouchpointSeen("c_other", "v-1", 11 * hour, "track", "Page Viewed", "web", "t", None, None,
                                      None, None, {}, ())])
    outcome = (await (await console.get("/v1/rules/churn-high/outcomes", headers=auth)).json())["outcome"]
    assert (outcome["treated"], outcome["treated_converted"], outcome["holdout"], outcome["holdout_converted"]) == (
        6, 4, 5, 1)
    assert (outcome["treated_open"], outcome["holdout_open"]) == (0, 0)
    assert outcome["uplift"] == pytest.approx(7 / 15)


async def test_the_login_form_needs_its_csrf_token_bound_to_the_pre_session_cookie(console: TestClient) -> None:
    token = await login_token(console)
    cookie = await console.get("/login")
    assert "HttpOnly" in cookie.headers["Set-Cookie"] and "SameSite=Strict" in cookie.headers["Set-Cookie"]
    assert "Path=/login" in cookie.headers["Set-Cookie"]
    # A cross-site form: no token, or a token of the attacker's own, never the victim's cookie.
    for data in ({"key": KEY}, {"key": KEY, "csrf": "x" * 43}, {"key": KEY, "csrf": ""}):
        forged = await console.post("/login", data=data, allow_redirects=False)
        assert forged.status == 403 and SESSION_COOKIE not in forged.cookies, data
        assert "This form has expired" in await forged.text()
    # The refusal handed out a fresh token: the old one is no longer the cookie's.
    stale = await console.post("/login", data={"key": KEY, "csrf": token}, allow_redirects=False)
    assert stale.status == 403
    console.session.cookie_jar.clear()
    token = await login_token(console)
    no_cookie = TestClient(console.server)  # the right token, but a browser without the cookie
    try:
        response = await no_cookie.post("/login", data={"key": KEY, "csrf": token}, allow_redirects=False)
        assert response.status == 403
    finally:
        await no_cookie.session.close()
    accepted = await console.post("/login", data={"key": KEY, "csrf": token}, allow_redirects=False)
    assert accepted.status == 303 and SESSION_COOKIE in accepted.cookies
    assert accepted.cookies[LOGIN_COOKIE].value == ""  # the pre-session cookie is dropped


async def test_failed_logins_are_rate_limited_per_address_with_retry_after(redis_client: aioredis.Redis) -> None:
    settings = ConsoleSettings(admin_keys=frozenset({hash_admin_key(KEY)}), login_max_failures=3,
                               login_failure_window_s=120)
    pages = ConsoleWeb(ReadModelStore(redis_client), redis_client, settings, RULES)
    app = web.Application()
    pages.register(app.router)
    async with TestClient(TestServer(app)) as client:
        token = await login_token(client)
        # A success clears the count: two failures, a login, then three more are still allowed.
        for _ in range(2):
            assert (await client.post("/login", data={"key": "guess", "csrf": token})).status == 401
        assert (await client.post("/login", data={"key": KEY, "csrf": token}, allow_redirects=False)).status == 303
        client.session.cookie_jar.clear()
        token = await login_token(client)
        for _ in range(3):
            assert (await client.post("/login", data={"key": "guess", "csrf": token})).status == 401
        # Locked out: even the right key is refused, with how long to wait.
        blocked = await client.post("/login", data={"key": KEY, "csrf": token}, allow_redirects=False)
        assert blocked.status == 429 and SESSION_COOKIE not in blocked.cookies
        assert 0 < int(blocked.headers["Retry-After"]) <= 120
        assert "Too many failed logins" in await blocked.text()
        assert blocked.headers["Content-Security-Policy"] == CSP
        # Stored in Redis under a digest of the address, never the address itself.
        keys = [k.decode() async for k in redis_client.scan_iter(match="ts:console:login_failures:*")]
        assert len(keys) == 1 and "127.0.0.1" not in keys[0]
        assert 0 < await redis_client.ttl(keys[0]) <= 120
        await redis_client.delete(keys[0])  # the window ends
        assert (await client.post("/login", data={"key": KEY, "csrf": token}, allow_redirects=False)).status == 303


async def test_the_login_throttle_counts_each_address_on_its_own(redis_client: aioredis.Redis) -> None:
    throttle = LoginThrottle(redis_client, "test:throttle:", max_failures=2, window_s=60, max_account_failures=100)
    for _ in range(2):
        await throttle.failed("198.51.100.7")
    await throttle.failed("203.0.113.9")
    lockout = await throttle.lockout("198.51.100.7")
    assert lockout is not None and 0 < lockout.wait_s <= 60 and not lockout.all_addresses
    assert await throttle.lockout("203.0.113.9") is None
    # The window runs from the first failure: later ones do not extend it.
    ttl = await redis_client.ttl(throttle.by_address.key("198.51.100.7"))
    await throttle.failed("198.51.100.7")
    assert await redis_client.ttl(throttle.by_address.key("198.51.100.7")) <= ttl
    await throttle.clear("198.51.100.7")
    assert await throttle.lockout("198.51.100.7") is None


def throttled_console(redis_client: aioredis.Redis, **settings: object) -> web.Application:
    """A console with its own Redis prefix, so the failures it counts are this test's alone."""
    config = ConsoleSettings(admin_keys=frozenset({hash_admin_key(KEY)}), key_prefix=f"test:{uuid.uuid4().hex}:",
                             **settings)
    pages = ConsoleWeb(ReadModelStore(redis_client), redis_client, config, RULES)
    app = web.Application()
    pages.register(app.router)
    return app


async def login_from(client: TestClient, token: str, key: str, forwarded_for: str) -> int:
    response = await client.post("/login", data={"key": key, "csrf": token}, allow_redirects=False,
                                 headers={"X-Forwarded-For": forwarded_for})
    return response.status


async def test_behind_a_trusted_proxy_each_client_address_has_its_own_login_limit(
        redis_client: aioredis.Redis) -> None:
    # The test client connects from 127.0.0.1: here it plays the ingress every operator comes through.
    app = throttled_console(redis_client, trusted_proxies=["127.0.0.1/32"], login_max_failures=2)
    async with TestClient(TestServer(app)) as client:
        token = await login_token(client)
        for _ in range(2):
            assert await login_from(client, token, "guess", "198.51.100.7") == 401
        assert await login_from(client, token, KEY, "198.51.100.7") == 429
        # Another operator behind the same ingress is not locked out by the first one's failures...
        assert await login_from(client, token, KEY, "203.0.113.9") == 303
        # ...and a client cannot pick its address: the proxy appends the one it saw, which is what counts.
        assert await login_from(client, token, KEY, "203.0.113.9, 198.51.100.7") == 429


async def test_x_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(redis_client: aioredis.Redis) -> None:
    app = throttled_console(redis_client, trusted_proxies=["10.0.0.0/8"], login_max_failures=2)
    async with TestClient(TestServer(app)) as client:
        token = await login_token(client)
        assert await login_from(client, token, "guess", "198.51.100.7") == 401
        assert await login_from(client, token, "guess", "198.51.100.8") == 401
        # Both failures counted on the peer (127.0.0.1): a made-up header does not escape the lockout.
        assert await login_from(client, token, KEY, "203.0.113.9") == 429


async def test_failed_logins_from_many_addresses_lock_the_account(redis_client: aioredis.Redis) -> None:
    app = throttled_console(redis_client, trusted_proxies=["127.0.0.1/32"], login_max_failures=10,
                            login_max_failures_per_account=3, login_failure_window_s=120)
    async with TestClient(TestServer(app)) as client:
        token = await login_token(client)
        for n in range(3):
            assert await login_from(client, token, "guess", f"198.51.100.{n}") == 401
        blocked = await client.post("/login", data={"key": KEY, "csrf": token}, allow_redirects=False,
                                    headers={"X-Forwarded-For": "203.0.113.9"})
        assert blocked.status == 429 and 0 < int(blocked.headers["Retry-After"]) <= 120
        assert "Too many failed logins on this console" in await blocked.text()


async def test_delete_asks_for_the_typed_id_then_calls_identity_with_the_admin_key(
        redis_client: aioredis.Redis) -> None:
    # identity's DELETE /v1/customers/{id} stood in by a stub HTTP peer that records each call
    # (tests/e2e/test_console_browser.py deletes through the real identity).
    calls: list[tuple[str, str, str]] = []
    request_ids: list[str] = []
    identity = web.Application()

    async def delete(request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        calls.append((request.method, cid, request.headers.get("Authorization", "")))
        request_ids.append(request.query.get("request_id", ""))
        if cid == "c_gone":
            return web.json_response({"error": "unknown customer"}, status=404)
        if cid == "c_broken":
            return web.Response(text="boom <b>", status=500)
        if cid == "c_lost":
            assert request.transport is not None
            request.transport.close()  # the request arrived; its answer never comes back
            return web.Response(status=200)
        # identity's answer: the live id it erased and the ids merged into it.
        return web.json_response({"deleted": True, "deletion_id": "del_0123", "customer_id": cid,
                                  "merged_ids": ["c_0"], "identifiers_suppressed": 2})

    identity.router.add_delete("/v1/customers/{cid}", delete)
    identity_server = TestServer(identity)
    await identity_server.start_server()
    identity_url = str(identity_server.make_url("")).rstrip("/")

    def console_app(url: str | None) -> web.Application:
        settings = ConsoleSettings(admin_keys=frozenset({hash_admin_key(KEY)}), identity_url=url,
                                   identity_admin_key="identity-key")
        pages = ConsoleWeb(ReadModelStore(redis_client), redis_client, settings, RULES)
        app = web.Application()
        pages.register(app.router)
        return app

    await ReadModelStore(redis_client).apply([
        TouchpointSeen("c_1", "m-1", 1000, "track", "Page Viewed", "web", "t", None, None, None, None, {}, ())])
    try:
        async with TestClient(TestServer(console_app(identity_url))) as client:
            csrf = await logged_in(client)
            profile = await (await client.get("/customers/c_1")).text()
            assert 'href="/customers/c_1/delete"' in profile
            confirm = await client.get("/customers/c_1/delete")
            text = await confirm.text()
            assert confirm.status == 200 and "Delete customer" in text and 'name="confirm_id"' in text
            assert '<span class="mono" id="delete-customer-id">c_1</span>' in text
            [request_id] = re.findall(r'name="request_id" value="([0-9a-f]{32})"', text)
            assert calls == []  # a GET changes nothing
            # Not confirmed, a wrong id typed, a forged token: nothing reaches identity.
            assert (await client.post("/customers/c_1/delete", data={"csrf": csrf})).status == 400
            wrong = await client.post("/customers/c_1/delete", data={"csrf": csrf, "confirm_id": "c_2",
                                                                      "request_id": request_id})
            wrong_text = await wrong.text()
            assert wrong.status == 400 and "Type the customer id exactly" in wrong_text
            assert f'name="request_id" value="{request_id}"' in wrong_text  # the re-shown form is the same request
            forged = await client.post("/customers/c_1/delete", data={"csrf": "forged", "confirm_id": "c_1"})
            assert forged.status == 403
            assert calls == []
            done = await client.post("/customers/c_1/delete", data={"csrf": csrf, "confirm_id": " c_1 ",
                                                                     "request_id": request_id})
            done_text = await done.text()
            assert done.status == 200 and "identity deleted customer" in done_text
            assert '<span class="mono merged-id">c_0</span>' in done_text and "del_0123" in done_text
            assert calls == [("DELETE", "c_1", "Bearer identity-key")] and request_ids == [request_id]
            gone = await client.post("/customers/c_gone/delete", data={"csrf": csrf, "confirm_id": "c_gone"})
            assert gone.status == 404 and "identity does not know customer c_gone" in await gone.text()
            broken = await client.post("/customers/c_broken/delete", data={"csrf": csrf, "confirm_id": "c_broken"})
            assert broken.status == 502 and "boom &lt;b&gt;" in await broken.text()
            lost = await client.post("/customers/c_lost/delete", data={"csrf": csrf, "confirm_id": "c_lost"})
            lost_text = await lost.text()
            assert lost.status == 502 and "may or may not be deleted" in lost_text and "not deleted" not in lost_text
    finally:
        await identity_server.close()
    assert [c[1] for c in calls] == ["c_1", "c_gone", "c_broken", "c_lost"]
    # identity down (its server closed): a clear message, and nothing claims the customer was deleted.
    async with TestClient(TestServer(console_app(identity_url))) as client:
        csrf = await logged_in(client)
        down = await client.post("/customers/c_1/delete", data={"csrf": csrf, "confirm_id": "c_1"})
        text = await down.text()
        assert down.status == 502 and "identity did not answer" in text and "c_1 was not deleted" in text
    async with TestClient(TestServer(console_app(None))) as client:
        csrf = await logged_in(client)
        assert "Deletion is not configured" in await (await client.get("/customers/c_1/delete")).text()
        assert (await client.post("/customers/c_1/delete", data={"csrf": csrf, "confirm_id": "c_1"})).status == 503


async def test_overview_shows_events_per_second_by_stage_and_latency_from_ingest(
        redis_client: aioredis.Redis) -> None:
    totals = {"ingest": 1000.0, "identity": 990.0, "scoring": 980.0, "triggers": 970.0}
    services = web.Application()

    def metrics_of(stage: str, metric: str, topic: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            # The stage's counter plus a series of another topic that must not be counted.
            return web.Response(text=f'{metric}{{topic="{topic}"}} {totals[stage]}\n'
                                     f'{metric}{{topic="elsewhere"}} 1e6\n')
        return handler

    for stage in STAGES:
        services.router.add_get(f"/{stage.name}/metrics", metrics_of(stage.name, stage.metric, stage.topic))
    server = TestServer(services)
    await server.start_server()
    settings = ConsoleSettings(admin_keys=frozenset({hash_admin_key(KEY)}),
                               **{f"{stage.name}_metrics_url": str(server.make_url(f"/{stage.name}/metrics"))
                                  for stage in STAGES[:3]})  # triggers left unset
    arrivals = LatencyWindow()
    now = time.time()
    for latency in (0.1, 0.2, 0.3, 0.4):
        arrivals.add("scores", latency, now)
    pages = ConsoleWeb(ReadModelStore(redis_client), redis_client, settings, RULES,
                       arrivals=arrivals)
    await pages.sample_pipeline(now - 10)
    for stage in totals:
        totals[stage] += 500.0 if stage != "scoring" else 0.0
    app = web.Application()
    pages.register(app.router)
    try:
        async with TestClient(TestServer(app)) as client:
            await logged_in(client)
            asked_at = time.time()
            page = await (await client.get("/overview")).text()
            answered_at = time.time()
    finally:
        await server.close()

    def rate(stage: str) -> str:
        found = re.search(rf'<tr data-stage="{stage}">.*?<td class="rate"[^>]*>(.*?)</td>', page, re.S)
        assert found, stage
        return found.group(1)

    # 500 more events between the first sample (10 s before `now`) and the page view, which took the
    # second: so the rate lies between 500 over the longest and over the shortest such interval.
    slowest, fastest = 500 / (answered_at - (now - 10)), 500 / (asked_at - (now - 10))
    for stage in ("ingest", "identity"):
        assert round(slowest, 1) <= float(rate(stage)) <= round(fastest, 1), (stage, slowest, fastest)
    assert rate("scoring") == "0.0"
    assert "set TOUCHSTREAM_CONSOLE_TRIGGERS_METRICS_URL" in rate("triggers")
    assert "events accepted" in page and "End-to-end latency, from ingest accepting an event" in page
    row = re.search(r'<tr class="arrival"><th>visible here as a score \(after scoring\)</th>.*?</tr>', page, re.S)
    assert row, page
    assert "4 records" in row.group(0) and "<td>200 ms</td><td>400 ms</td><td>400 ms</td>" in row.group(0)


async def test_a_failure_count_without_an_expiry_never_locks_an_address_out_for_good(
        redis_client: aioredis.Redis) -> None:
    throttle = LoginThrottle(redis_client, "test:throttle:", max_failures=2, window_s=60, max_account_failures=100)
    await redis_client.set(throttle.by_address.key("192.0.2.1"), 5)  # e.g. written by hand, with no TTL
    assert await throttle.lockout("192.0.2.1") == Lockout(60, all_addresses=False)
    assert 0 < await redis_client.ttl(throttle.by_address.key("192.0.2.1")) <= 60


async def test_the_console_finds_a_customer_through_the_real_identity_worker(
        identity_worker: int, producer: AIOKafkaProducer,  # noqa: F811 (fixtures)
        all_topics: str, redis_client: aioredis.Redis) -> None:
    run = uuid.uuid4().hex[:8]
    email = f"dee.{run}@example.org"
    await producer.send_and_wait(TOUCHPOINTS_RAW.name, touchpoint(f"{run}-1", int(time.time() * 1000),
                                                                 ("email", email)), key=run.encode())
    [(_, resolved)] = await collect(all_topics, TOUCHPOINTS_RESOLVED.name, TOUCHPOINTS_RESOLVED.schema, 1,
                                    lambda _key, r: r["event"]["message_id"] == f"{run}-1")
    settings = ConsoleSettings(admin_keys=frozenset({hash_admin_key(KEY)}),
                               identity_url=f"http://127.0.0.1:{identity_worker}", identity_admin_key=IDENTITY_KEY)
    app = web.Application()
    ConsoleWeb(ReadModelStore(redis_client), redis_client, settings, RULES).register(app.router)
    async with TestClient(TestServer(app)) as client:
        csrf = await logged_in(client)
        found = await client.post("/customers", data={"q": f"email: {email.upper()}", "csrf": csrf},
                                  allow_redirects=False)
        assert found.status == 303 and found.headers["Location"] == f"/customers/{resolved['customer_id']}"
        missing = await client.post("/customers", data={"q": f"email:nobody.{run}@example.org", "csrf": csrf})
        assert missing.status == 404
        # The read model here has not seen the customer; identity's GET /v1/customers/{id} shows its e-mail's hash.
        page = await client.get(found.headers["Location"])
        text = await page.text()
        [hashed] = [i["value"] for i in resolved["event"]["identifiers"] if i["type"] == "email"]
        assert page.status == 200 and hashed[:12] in text and email not in text


async def next_event(response: Any, within_s: float = 10.0) -> str:
    """Read a Server-Sent Events stream until an event (not a comment) arrives; return its name."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        line = (await asyncio.wait_for(response.content.readline(), timeout=within_s)).decode().strip()
        if line.startswith("event: "):
            return line[len("event: "):]
    raise AssertionError("no event")


async def test_the_overview_and_rules_pages_hear_of_changes_and_serve_their_fresh_parts(
        redis_client: aioredis.Redis) -> None:
    settings = ConsoleSettings(admin_keys=frozenset({hash_admin_key(KEY)}), live_poll_s=0.1, min_group_size=1)
    store = ReadModelStore(redis_client)
    app = web.Application()
    ConsoleWeb(store, store.client, settings, RULES).register(app.router)
    async with TestClient(TestServer(app)) as client:
        await logged_in(client)
        overview = await client.get("/overview/live")
        assert overview.headers["Content-Type"] == "text/event-stream"
        await store.apply([DeadLettered("scoring", "bad feature", "d-1")])
        assert await next_event(overview) == "changed"
        overview.close()
        fragment = await (await client.get("/overview/fragment")).text()
        assert "<html" not in fragment and "scoring: bad feature" in fragment and 'id="dead-letters"' in fragment
        rules = await client.get("/rules/live")
        await store.apply([ActionTaken("a-1", "churn-high", "c_1", "fired", None, "marketing", 1000, 1000)])
        assert await next_event(rules) == "changed"
        rules.close()
        part = await (await client.get("/rules/fragment")).text()
        assert '<tr data-rule="churn-high">' in part and '<td class="fired">1</td>' in part
        assert (await client.get("/overview/fragment", allow_redirects=False)).status == 200
    async with TestClient(TestServer(app)) as anonymous:  # a stranger gets the login, never the numbers
        assert (await anonymous.get("/overview/fragment", allow_redirects=False)).status == 303
        assert (await anonymous.get("/rules/live", allow_redirects=False)).status == 303


async def test_each_sample_of_the_pipeline_is_kept_for_an_hour_and_shown_on_the_overview(
        redis_client: aioredis.Redis) -> None:
    scoring = web.Application()

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="touchstream_scoring_prequential_roc_auc_ratio 0.8125\n"
                                 'touchstream_scoring_examples_learned_total{label="1"} 12.0\n'
                                 'touchstream_scoring_events_in_total{topic="touchpoints.resolved"} 10.0\n')

    scoring.router.add_get("/metrics", metrics)
    server = TestServer(scoring)
    await server.start_server()
    store = ReadModelStore(redis_client)
    arrivals = LatencyWindow()
    now = time.time()
    for latency in (0.1, 0.2, 0.3):
        arrivals.add("scores", latency, now)
    settings = ConsoleSettings(admin_keys=frozenset({hash_admin_key(KEY)}),
                               scoring_metrics_url=str(server.make_url("/metrics")))
    pages = ConsoleWeb(store, store.client, settings, RULES, arrivals=arrivals)
    app = web.Application()
    pages.register(app.router)
    try:
        old = PipelineSample(int(now // 60) - 61, {"ingest": 5.0})
        await store.record_pipeline_sample(old)
        await pages.sample_pipeline(now)
        [sample] = await store.pipeline_samples()  # the one past the hour went when the new one came
        assert sample.minute == int(now // 60) and sample.quality["roc_auc"] == 0.8125
        assert sample.latency == {"visible here as a score (after scoring)": {"0.5": 0.2, "0.95": 0.3, "0.99": 0.3}}
        async with TestClient(TestServer(app)) as client:
            await logged_in(client)  # the overview samples again (the same minute: its latest sample wins)
            page = await (await client.get("/overview/fragment")).text()
    finally:
        await server.close()
    assert 'id="chart-quality"' in page and 'id="quality-history"' in page and "0.8125" in page
    assert 'id="chart-latency"' in page and "visible here as a score (after scoring) p50" in page


BACKTEST = {"rules_file": "deploy/rules/default.yaml", "source": "the scores topic", "bucket": "day",
            "window": {"from": "2026-09-01T00:00:00+00:00", "to": None}, "scores_replayed": 120,
            "scores_in_window": 100, "customers_in_window": 40, "first_event": None, "last_event": None,
            "unreadable_records": 0,
            "rules": [{"rule_id": "churn-high", "fired": 5, "customers": 4,
                       "fired_by_period": {"2026-09-01": 2, "2026-09-03": 3}, "held_out": 1,
                       "held_for_quiet_hours": 0, "stopped": {"cooldown": 2}}]}


async def test_a_backtest_report_needs_the_admin_key_is_checked_by_field_and_shows_on_the_rules_page(
        console: TestClient) -> None:
    await logged_in(console)
    # A session cookie is not enough: only a bearer admin key may send a report.
    assert (await console.put("/v1/rules/backtest", json=BACKTEST)).status == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    page = await (await console.get("/rules")).text()
    assert 'id="backtest-none"' in page
    for broken, field in (({**BACKTEST, "bucket": "month"}, "bucket"),
                          ({**BACKTEST, "rules": [{**BACKTEST["rules"][0], "fired": -1}]}, "rules[0].fired"),
                          ({**BACKTEST, "rules": [{**BACKTEST["rules"][0], "fired_by_period": {"2026-W36": 1}}]},
                           "rules[0].fired_by_period.2026-W36")):
        response = await console.put("/v1/rules/backtest", json=broken, headers=auth)
        assert response.status == 400 and (await response.json())["error"].startswith(f"{field}: "), broken
    response = await console.put("/v1/rules/backtest", data=b"{not json", headers=auth)
    assert response.status == 400 and "not JSON" in (await response.json())["error"]
    assert 'id="backtest-none"' in await (await console.get("/rules")).text()  # nothing half-stored
    response = await console.put("/v1/rules/backtest", json=BACKTEST, headers=auth)
    assert response.status == 200 and await response.json() == {"rules": 1, "periods": 2}
    page = await (await console.get("/rules/fragment")).text()
    assert 'id="chart-backtest-fired"' in page and 'id="chart-backtest-totals"' in page
    rows = re.findall(r"<tr><td>(2026-09-0\d)</td><td>(\d+)</td></tr>", page)
    assert rows == [("2026-09-01", "2"), ("2026-09-03", "3")]
    assert "deploy/rules/default.yaml" in page


async def test_rules_page_charts_each_rules_actions_per_day_as_the_json_says(console: TestClient,
                                                                              redis_client: aioredis.Redis) -> None:
    store = ReadModelStore(redis_client)
    now = int(time.time() * 1000)
    day = 86_400_000
    await store.apply([ActionTaken(f"a{n}", "churn-high", f"c_{n}", outcome, reason, "marketing",
                                   now - back * day, now) for n, (outcome, reason, back) in enumerate(
        [("fired", None, 2), ("fired", None, 2), ("held_out", "holdout", 2), ("suppressed", "cooldown", 0)])])
    await logged_in(console)
    body = await (await console.get("/v1/rules/churn-high/outcomes",
                                    headers={"Authorization": f"Bearer {KEY}"})).json()
    two_days_ago = time.strftime("%Y-%m-%d", time.gmtime((now - 2 * day) / 1000))
    today = time.strftime("%Y-%m-%d", time.gmtime(now / 1000))
    assert body["by_day"] == {two_days_ago: {"fired": 2, "held_out": 1}, today: {"suppressed": 1}}
    page = await (await console.get("/rules")).text()
    assert 'id="chart-activity-1"' in page
    rows = re.findall(r'<tr data-t="\d+"><td>([\d-]+)</td>((?:<td>\d+</td>)+)</tr>', page)
    assert [(d, re.findall(r"\d+", cells)) for d, cells in rows] == [
        (two_days_ago, ["2", "1", "0", "0"]), (today, ["0", "0", "1", "0"])]


async def test_touchstream_rules_backtest_sends_its_report_to_the_console(
        console: TestClient, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from touchstream_cli.cli import main

    day, start = 86_400_000, 1_767_225_600_000  # 2026-01-01
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(
        f'{{"customer_id": "c_{n}", "message_id": "m{n}-{d}", "event_time_ms": {start + (n + d) * day}, '
        f'"churn_risk": {risk}, "purchase_propensity": {1 - risk}}}\n'
        for n in range(3) for d, risk in ((0, 0.2), (1, 0.8))))
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - id: churn-high\n    when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.6}\n"
                     "    action: {endpoint: marketing}\n")
    url = str(console.make_url("/")).rstrip("/")
    command = ["rules", "backtest", str(rules), "--scores", str(scores), "--console", url]
    monkeypatch.delenv("TOUCHSTREAM_CONSOLE_ADMIN_KEY", raising=False)
    assert await asyncio.to_thread(main, command) == 2  # no key: said so, nothing sent
    monkeypatch.setenv("TOUCHSTREAM_CONSOLE_ADMIN_KEY", "not-the-key")
    assert await asyncio.to_thread(main, command) == 1  # the console refused it
    monkeypatch.setenv("TOUCHSTREAM_CONSOLE_ADMIN_KEY", KEY)
    assert await asyncio.to_thread(main, command) == 0
    await logged_in(console)
    page = await (await console.get("/rules")).text()
    # One customer fired per day, from 2026-01-02 to 2026-01-04.
    assert re.findall(r"<tr><td>(2026-01-0\d)</td><td>(\d+)</td></tr>", page) == [
        ("2026-01-02", "1"), ("2026-01-03", "1"), ("2026-01-04", "1")]
    assert str(rules) in page


async def test_the_json_api_locks_out_an_address_that_sends_wrong_admin_keys(redis_client: aioredis.Redis) -> None:
    from prometheus_client import CollectorRegistry, Counter
    refused = Counter("api_refused", "", ["reason"], registry=CollectorRegistry())
    settings = ConsoleSettings(admin_keys=frozenset({hash_admin_key(KEY)}), api_max_failures=3,
                               api_failure_window_s=120, trusted_proxies=("127.0.0.0/8",))  # type: ignore[arg-type]
    app = web.Application()
    ConsoleWeb(ReadModelStore(redis_client), redis_client, settings, RULES, api_refused=refused).register(app.router)
    async with TestClient(TestServer(app)) as client:
        async def outcomes(key: str | None, address: str) -> Any:
            headers = {"X-Forwarded-For": address, **({"Authorization": f"Bearer {key}"} if key else {})}
            return await client.get("/v1/rules/churn-high/outcomes", headers=headers)

        assert [(await outcomes(None, "203.0.113.9")).status for _ in range(5)] == [401] * 5  # no key: not counted
        assert [(await outcomes("wrong", "203.0.113.9")).status for _ in range(3)] == [401] * 3
        locked = await outcomes(KEY, "203.0.113.9")  # even the right key, once locked out
        assert locked.status == 429 and 0 < int(locked.headers["Retry-After"]) <= 120
        backtest = await client.put("/v1/rules/backtest", json=BACKTEST,
                                    headers={"X-Forwarded-For": "203.0.113.9", "Authorization": f"Bearer {KEY}"})
        assert backtest.status == 429  # the same count guards every bearer route
        assert (await outcomes(KEY, "198.51.100.7")).status == 200  # another client is not held up
        assert refused.labels("bad_key")._value.get() == 3 and refused.labels("locked_out")._value.get() == 2
        # A logged-in operator on the locked-out address keeps working: the session is no key guess.
        await logged_in(client)
        assert (await outcomes(None, "203.0.113.9")).status == 200
