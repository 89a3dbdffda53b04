"""The console in headless Chromium over the whole stack: what a service agent and a marketer see.

`touchstream local up` runs every service (the console included) as separate processes on a
real Tansu and Valkey; events go in through ingest, pages are read in Debian's Chromium driven
by Playwright. Screenshots land in test-artifacts/console-*.png.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import playwright.sync_api as playwright_api
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiokafka import AIOKafkaProducer

from services.console.charts import PipelineSample
from services.console.readmodel import ActionTaken, DeadLettered, ScoreUpdated, TouchpointSeen
from services.console.settings import ConsoleSettings
from services.console.store import ReadModelStore
from services.console.web import ConsoleWeb
from services.identity.admin import hash_admin_key
from services.identity.settings import DEV_ADMIN_KEY
from services.triggers.rules import parse_rules
from tests.stacks import ARTIFACTS, running_stack
from touchstream import avro
from touchstream.embedded import free_port
from touchstream.topics import ACTIONS, SCORES, TOUCHPOINTS_RAW, TOUCHPOINTS_RESOLVED
from touchstream_cli import local

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
ADMIN_KEY = "e2e-console-admin-key"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RULES = """
rules:
  - id: e2e-risk
    description: Fires on the first score above 0.3 (a fresh model scores 0.5).
    when: {score: churn_risk, crosses_above: 0.1, rearm_below: 0.05}
    action: {endpoint: marketing, template: {kind: retention_offer, churn_risk: "${scores.churn_risk}"}}
    cooldown_hours: 24
    holdout_percent: 0
"""
# Records every CSP violation and page error in the page itself (Playwright puts this script in before the
# page's own, outside the page's CSP), so a test can read them back.
WATCH_PAGE = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", function (e) {
  window.__cspViolations.push(e.violatedDirective + " " + (e.blockedURI || "") + " " + (e.sample || ""));
});
"""
HOSTILE = {"note": "<script>window.__pwned = 1; alert(1)</script>",
           "img": "<img src=x onerror=\"window.__pwned = 2; alert(2)\">",
           "link": "javascript:window.__pwned=3;alert(3)"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str) -> Iterator[local.StackState]:
    with running_stack(tmp_path_factory.mktemp("console-stack"), RULES, "e2e-console-logs", {
        "TOUCHSTREAM_CONSOLE_ADMIN_KEYS": f'["{hash_admin_key(ADMIN_KEY)}"]',
        "TOUCHSTREAM_CONSOLE_MIN_GROUP_SIZE": "10",
        "TOUCHSTREAM_CONSOLE_LIVE_POLL_S": "0.5",
    },
                       shared_broker=kafka_bootstrap) as state:
        yield state


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # Fail, never skip: a browser test that quietly does not run proves nothing.
    assert shutil.which("chromium"), "install Debian's chromium: apt-get install -y chromium"
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, stack: local.StackState) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(WATCH_PAGE)
    page = context.new_page()
    page.dialogs = []  # type: ignore[attr-defined]
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))  # type: ignore[attr-defined]
    # Chromium reports a CSP violation on the console too: kept across navigations (the in-page list is per document).
    page.csp = []  # type: ignore[attr-defined]
    page.on("console", lambda message: page.csp.append(message.text)  # type: ignore[attr-defined]
            if "Content Security Policy" in message.text else None)
    page.goto(f"{stack.url('console')}/login")
    page.fill("#key", ADMIN_KEY)
    page.click("button[type=submit]")
    page.wait_for_url("**/overview")
    yield page
    assert page.csp == [] and page.evaluate("window.__cspViolations") == []  # type: ignore[attr-defined]
    context.close()


def run_async(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine to the end from a test that Playwright's sync API already gave an event loop."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coroutine).result()


def send(stack: local.StackState, payload: dict[str, Any]) -> None:
    response = httpx.post(f"{stack.url('ingest')}/v1/track", auth=(stack.write_key, ""), json=payload, timeout=10)
    assert response.status_code == 200, response.text


def fits_a_phone(page: Any, url: str, name: str) -> None:
    """Open `url` at a phone's width with the same login: nothing may overflow the screen sideways."""
    phone = page.context.browser.new_context(viewport={"width": 390, "height": 844},
                                             storage_state=page.context.storage_state()).new_page()
    try:
        phone.goto(url)
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390, url
        phone.screenshot(path=str(ARTIFACTS / f"console-{name}-phone.png"), full_page=True)
    finally:
        phone.context.close()


def reload_until(page: Any, ready: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            page.screenshot(path=str(ARTIFACTS / "console-timeout.png"), full_page=True)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(1.0)
        page.reload()


def search(page: Any, stack: local.StackState, query: str) -> None:
    """Type `query` into the console's customer search as an agent would, and submit it."""
    page.goto(f"{stack.url('console')}/customers")
    page.fill("#q", query)
    page.click("form.search button[type=submit]")
    page.wait_for_load_state()


def open_customer(page: Any, stack: local.StackState, query: str, timeout: float = 60.0) -> str:
    """Search for `query` until identity has resolved it and its profile opens; return the customer id."""
    deadline = time.monotonic() + timeout
    search(page, stack, query)
    while "/customers/c_" not in page.url:
        assert time.monotonic() < deadline, f"identity never resolved {query!r}"
        time.sleep(1.0)
        search(page, stack, query)
    return str(page.url.rsplit("/", 1)[-1])


def test_customer_page_shows_the_merged_profile_score_action_and_live_updates(
        stack: local.StackState, page: Any) -> None:
    run = uuid.uuid4().hex[:8]
    email, phone = f"ann.{run}@example.com", f"+1415555{int(run, 16) % 10_000:04d}"
    base = {"channel": "web", "properties": HOSTILE}
    send(stack, {**base, "messageId": f"v-{run}", "event": "Product Viewed", "email": email,
                 "timestamp": "2026-11-01T10:00:00Z"})
    send(stack, {**base, "messageId": f"c-{run}", "event": "Called Support", "phone": phone, "channel": "call_center",
                 "timestamp": "2026-11-02T10:00:00Z"})
    # Both identifiers on one event: identity merges the two customers.
    send(stack, {**base, "messageId": f"l-{run}", "event": "Logged In", "email": email, "phone": phone,
                 "channel": "app", "timestamp": "2026-11-03T10:00:00Z"})
    send(stack, {"messageId": f"o-{run}", "event": "Order Completed", "email": email, "channel": "store_pos",
                 "timestamp": "2026-11-04T10:00:00Z", "properties": {"total": 59.9, "currency": "EUR"}})

    open_customer(page, stack, f"email:  {email.upper()} ")  # normalised and hashed as identity does
    assert email not in page.url and "ann" not in page.url

    def complete() -> bool:
        text = page.inner_text("main")
        return ("Order Completed" in text and "Called Support" in text and "delivered to marketing" in text
                and page.locator("#merges li").count() >= 1 and page.locator("#churn-risk").count() == 1)

    reload_until(page, complete, "the merged, scored profile with a delivered action")
    customer_id = page.inner_text("#customer-id").strip()
    identities = page.inner_text("#identities")
    assert "email" in identities and "phone" in identities  # one profile holds both identifiers
    assert email not in page.content() and phone not in page.content()  # hashes only
    assert page.locator("#timeline > li").count() == 4
    assert re.fullmatch(r"\d+\.\d%", page.inner_text("#churn-risk"))
    assert page.inner_text("#model-version").strip()
    actions = page.inner_text("#actions")
    assert "e2e-risk" in actions and "fired" in actions
    # The risk/propensity chart is drawn, with the rule's threshold labelled on it.
    playwright_api.expect(page.locator("#chart-scores[data-rendered] svg")).to_have_count(1, timeout=20_000)
    assert page.locator("#chart-scores svg text", has_text="e2e-risk (churn_risk 0.1)").count() == 1

    # Attacker-controlled properties show as text and nothing runs.
    timeline = page.inner_text("#timeline")
    for value in HOSTILE.values():
        assert value in timeline
    assert page.evaluate("window.__pwned") is None
    assert page.dialogs == []  # type: ignore[attr-defined]
    assert page.locator("#timeline img").count() == 0 and page.locator("#timeline a").count() == 0

    # Live: a new event and a new score appear without a reload (a marker set on this document survives).
    # A fresh model has all-zero weights and so gives no reason codes; this score, written to the
    # scores topic as scoring would, stands in for a trained model's.
    page.evaluate("window.__sameDocument = true")
    send(stack, {"messageId": f"p-{run}", "event": "Coupon Opened", "email": email, "channel": "email",
                 "timestamp": "2026-11-05T10:00:00Z"})
    run_async(produce(stack.kafka_bootstrap, SCORES.name, customer_id, avro.encode(SCORES.schema, {
        "customer_id": customer_id, "message_id": f"s-{run}", "event_time_ms": 1_794_052_800_000,
        "received_at_ms": 1_794_052_800_000, "churn_risk": 0.82, "purchase_propensity": 0.18,
        "segment": "at_risk", "stage": "lapsing", "model_version": "trained-v9", "features": {"overdue_ratio": 2.5},
        "reasons": [{"feature": "overdue_ratio", "contribution": 1.4},
                    {"feature": "log_purchase_count", "contribution": -0.1}]})))
    # Playwright's locator assertions poll without page-side eval, which the strict CSP forbids.
    playwright_api.expect(page.locator("#timeline")).to_contain_text("Coupon Opened", timeout=60_000)
    playwright_api.expect(page.locator("#reasons li")).to_have_count(2, timeout=60_000)
    assert page.evaluate("window.__sameDocument") is True
    assert page.inner_text("#churn-risk") == "82.0%" and page.inner_text("#model-version") == "trained-v9"
    # The swapped-in profile's chart is drawn again, with the new score as its newest point.
    playwright_api.expect(page.locator("#chart-scores[data-rendered] svg")).to_have_count(1, timeout=20_000)
    assert page.evaluate("echarts.getInstanceByDom(document.getElementById('chart-scores'))"
                         ".getOption().series[0].data.at(-1)[1]") == 0.82
    reasons = page.inner_text("#reasons")
    assert "How overdue the next purchase is strongly raises churn risk" in reasons
    assert "Number of purchases slightly lowers churn risk" in reasons
    assert page.dialogs == []  # type: ignore[attr-defined]
    page.screenshot(path=str(ARTIFACTS / "console-customer.png"), full_page=True)

    phone_page = page.context.browser.new_context(viewport={"width": 390, "height": 844},
                                                  storage_state=page.context.storage_state()).new_page()
    phone_page.goto(page.url)
    assert phone_page.evaluate("document.documentElement.scrollWidth") <= 390
    phone_page.screenshot(path=str(ARTIFACTS / "console-customer-phone.png"), full_page=True)
    phone_page.context.close()

    # Un-merge: split the phone off again, confirmed, through identity's API; the profile shows it.
    page.locator("#identities tr", has_text="phone").locator("a.split").click()
    page.wait_for_url("**/split?identifier=phone*")
    page.check("#confirm")
    page.click("#split-form button[type=submit]")
    new_customer = page.locator("#split-result a").inner_text().strip()
    assert new_customer.startswith("c_") and new_customer != customer_id
    page.goto(f"{stack.url('console')}/customers/{customer_id}")
    reload_until(page, lambda: "split off" in page.inner_text("#merges"), "the un-merge on the profile", 60)
    assert "phone" not in page.inner_text("#identities")
    assert page.dialogs == []  # type: ignore[attr-defined]

    assert page.evaluate("window.__pwned") is None
    assert page.dialogs == []  # type: ignore[attr-defined]


def test_deleting_a_customer_in_the_console_erases_it_in_identity_and_the_read_model(
        stack: local.StackState, page: Any) -> None:
    run = uuid.uuid4().hex[:8]
    email, phone = f"dora.{run}@example.com", f"+1650555{int(run, 16) % 10_000:04d}"
    send(stack, {"messageId": f"dv-{run}", "event": "Product Viewed", "email": email, "channel": "web",
                 "timestamp": "2026-11-08T10:00:00Z"})
    send(stack, {"messageId": f"dc-{run}", "event": "Called Support", "phone": phone, "channel": "call_center",
                 "timestamp": "2026-11-08T11:00:00Z"})
    # Two customers first, then one event with both identifiers merges them: the deletion takes both ids.
    first_ids = {open_customer(page, stack, f"email:{email}"), open_customer(page, stack, f"phone:{phone}")}
    send(stack, {"messageId": f"do-{run}", "event": "Order Completed", "email": email, "phone": phone,
                 "channel": "store_pos", "timestamp": "2026-11-09T10:00:00Z",
                 "properties": {"total": 19.9, "currency": "EUR"}})
    open_customer(page, stack, f"email:{email}")
    reload_until(page, lambda: all(e in page.inner_text("#timeline") for e in (
        "Product Viewed", "Called Support", "Order Completed")), "the merged profile", 30)
    customer_id = page.inner_text("#customer-id").strip()  # the survivor (the search may predate the merge)
    [merged_id] = first_ids - {customer_id}
    identity_admin = {"Authorization": f"Bearer {DEV_ADMIN_KEY}"}  # the key the local stack's console presents

    def in_identity(cid: str) -> int:
        return httpx.get(f"{stack.url('identity')}/v1/customers/{cid}", headers=identity_admin, timeout=5).status_code

    assert in_identity(customer_id) == 200 and in_identity(merged_id) == 200

    # The profile links to a confirmation page that names the customer and wants its id typed.
    page.click("#delete-link")
    page.wait_for_url(f"**/customers/{customer_id}/delete")
    assert page.inner_text("#delete-customer-id") == customer_id
    page.screenshot(path=str(ARTIFACTS / "console-delete.png"), full_page=True)
    fits_a_phone(page, page.url, "delete")
    page.fill("#confirm-id", "c_not_this_one")
    with page.expect_response(lambda r: r.request.method == "POST") as refused:
        page.click("#delete-form button[type=submit]")
    assert refused.value.status == 400
    assert "Type the customer id exactly" in page.inner_text("main")

    # The right id with this session's cookie but without (or with a forged) CSRF token: refused.
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    confirm_url = f"{stack.url('console')}/customers/{customer_id}/delete"
    assert httpx.get(confirm_url, cookies=cookies, timeout=5).status_code == 200  # the session itself is good
    for form in ({"confirm_id": customer_id}, {"confirm_id": customer_id, "csrf": "A" * 43}):
        forged = httpx.post(confirm_url, data=form, cookies=cookies, timeout=10)
        assert forged.status_code == 403 and "This form has expired" in forged.text, form
    assert in_identity(customer_id) == 200  # nothing deleted yet

    page.fill("#confirm-id", customer_id)
    with page.expect_response(lambda r: r.request.method == "POST") as confirmed:
        page.click("#delete-form button[type=submit]")
    assert confirmed.value.status == 200
    assert page.inner_text("h1") == "Customer deleted"
    assert page.inner_text("#deleted-customer-id") == customer_id
    assert page.locator(".merged-id").all_inner_texts() == [merged_id]
    assert page.inner_text("#deletion-id").startswith("del_")
    page.screenshot(path=str(ARTIFACTS / "console-deleted.png"), full_page=True)
    assert in_identity(customer_id) == 404 and in_identity(merged_id) == 404

    # The deletion record reaches the read model, which forgets both ids; neither identifier finds anybody.
    for cid in (customer_id, merged_id):
        page.goto(f"{stack.url('console')}/customers/{cid}")
        reload_until(page, lambda: "Unknown customer." in page.inner_text("main"), f"the read model to forget {cid}",
                     30)
    for query in (f"email:{email}", f"phone:{phone}"):
        search(page, stack, query)
        assert "No customer has this identifier." in page.inner_text("main"), query
    assert page.dialogs == []


async def produce(bootstrap: str, topic: str, key: str, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key.encode())
    finally:
        await producer.stop()


def resolved_purchase(customer_id: str, message_id: str, t_ms: int) -> dict[str, Any]:
    return {"customer_id": customer_id, "resolved_at_ms": t_ms, "event": {
        "message_id": message_id, "type": "track", "event": "Order Completed", "channel": "web", "source": "e2e",
        # Received now: triggers measures event-to-webhook latency from it.
        "timestamp_ms": t_ms, "received_at_ms": int(time.time() * 1000),
        "identifiers": [{"type": "user_id", "value": message_id}],
        "order": {"order_id": message_id, "amount": 25.0, "currency": "EUR", "items": []},
        "feedback": None, "consent": [], "properties_json": None}}


def an_action(rule_id: str, customer_id: str, outcome: str, t_ms: int) -> dict[str, Any]:
    return {"action_id": f"{rule_id}:{customer_id}", "rule_id": rule_id, "customer_id": customer_id,
            "outcome": outcome, "reason": "holdout" if outcome == "held_out" else None, "endpoint": "marketing",
            "payload_json": "{}", "event_time_ms": t_ms, "received_at_ms": int(time.time() * 1000),
            "created_at_ms": t_ms}


async def produce_outcomes(bootstrap: str, rule_id: str, run: str) -> None:
    """20 treated (12 buy within the window), 20 held out (6 buy): uplift exactly 0.60 - 0.30 = +30 pp."""
    t0, hour = 1_790_000_000_000, 3_600_000
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for group, outcome, buyers in (("t", "fired", 12), ("h", "held_out", 6)):
            for i in range(20):
                cid = f"c_{group}{run}{i:02d}"
                await producer.send(ACTIONS.name, avro.encode(ACTIONS.schema, an_action(rule_id, cid, outcome, t0)),
                                    key=cid.encode())
                if i < buyers:
                    record = resolved_purchase(cid, f"buy-{cid}", t0 + hour)
                    await producer.send(TOUCHPOINTS_RESOLVED.name,
                                        avro.encode(TOUCHPOINTS_RESOLVED.schema, record), key=cid.encode())
                elif i < buyers + 2:
                    # Bought, but after the 7-day attribution window: not a conversion.
                    record = resolved_purchase(cid, f"late-{cid}", t0 + 8 * 24 * hour)
                    await producer.send(TOUCHPOINTS_RESOLVED.name,
                                        avro.encode(TOUCHPOINTS_RESOLVED.schema, record), key=cid.encode())
        await producer.flush()
    finally:
        await producer.stop()


def test_rules_page_shows_the_known_uplift_and_the_json_agrees(stack: local.StackState, page: Any) -> None:
    run = uuid.uuid4().hex[:6]
    rule_id = f"uplift-{run}"
    # An event through ingest, so its events counter exists for the overview's events/s below.
    send(stack, {"messageId": f"u-{run}", "event": "Page Viewed", "userId": f"u-{run}", "channel": "web",
                 "timestamp": "2026-11-06T10:00:00Z"})
    run_async(produce_outcomes(stack.kafka_bootstrap, rule_id, run))
    url = f"{stack.url('console')}/v1/rules/{rule_id}/outcomes"

    def settled() -> bool:
        response = httpx.get(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=5)
        if response.status_code != 200:
            return False
        o = response.json()["outcome"]
        return (o["treated"], o["holdout"], o["treated_converted"], o["holdout_converted"]) == (20, 20, 12, 6)

    deadline = time.monotonic() + 90
    while not settled():
        assert time.monotonic() < deadline, "the read model never counted the outcomes"
        time.sleep(0.5)
    body = httpx.get(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert (body["fired"], body["held_out"]) == (20, 20)
    assert body["outcome"]["uplift"] == pytest.approx(0.30)
    # se = sqrt(0.6*0.4/20 + 0.3*0.7/20) = 0.15 exactly
    assert body["outcome"]["ci_low"] == pytest.approx(0.30 - 1.959964 * 0.15, abs=1e-5)

    page.goto(f"{stack.url('console')}/rules")
    row = page.locator(f"tr[data-rule='{rule_id}']")
    assert row.locator(".fired").inner_text() == "20" and row.locator(".held-out").inner_text() == "20"
    assert row.locator(".treated").inner_text() == "12/20 (60.0%)"
    assert row.locator(".holdout").inner_text() == "6/20 (30.0%)"
    assert row.locator(".uplift").inner_text() == "+30.0 pp (+0.6 to +59.4 pp)"
    # Newer events (the late purchases, 8 days on) closed every 7-day window: none still open.
    assert row.locator(".open").inner_text() == "0"
    # triggers delivers the 20 fired actions to the receiver; the rules page counts the acknowledged ones.
    reload_until(page, lambda: page.locator(f"tr[data-rule='{rule_id}'] .delivery").inner_text() == "20 / 0",
                 "the deliveries on the rules page", 60)
    page.screenshot(path=str(ARTIFACTS / "console-rules.png"), full_page=True)
    fits_a_phone(page, page.url, "rules")

    page.goto(f"{stack.url('console')}/overview")
    assert int(page.inner_text("#customer-count")) >= 40
    assert page.locator("#segments").count() == 1
    # scoring's /metrics is reachable in the stack: the quality card shows, waiting for labels to mature.
    assert page.locator("#quality").count() == 1 and page.inner_text("#drift-alarms") == "0"
    # Webhooks were delivered (the fired uplift actions), so triggers reports event-to-webhook latency.
    assert page.inner_text("#latency-p50").startswith("≤ ")
    # Events/s of every stage, from its own /metrics: a rate needs two of the console's samples
    # (taken every few seconds), which a loaded machine may not have taken yet at the first load.
    def every_stage_has_a_rate() -> bool:
        return all(re.fullmatch(r"\d+\.\d", page.inner_text(f"#pipeline-rates tr[data-stage='{stage}'] .rate"))
                   for stage in ("ingest", "identity", "scoring", "triggers"))
    reload_until(page, every_stage_has_a_rate, "every stage's events/s on the overview", 60)
    # A fresh event: how long after ingest accepted it its touchpoint showed here, over the last minute.
    send(stack, {"messageId": f"f-{run}", "event": "Page Viewed", "userId": f"u-{run}", "channel": "web",
                 "timestamp": "2026-11-07T10:00:00Z"})
    reload_until(page, lambda: page.locator("#latency tr.arrival", has_text="touchpoint (after identity)").count()
                 == 1, "the touchpoint latency on the overview", 60)
    # Bytes that are not Avro on touchpoints.raw: identity dead-letters them, the overview counts them.
    run_async(produce(stack.kafka_bootstrap, TOUCHPOINTS_RAW.name, f"junk-{run}", b"not avro at all"))
    reload_until(page, lambda: page.locator("#dead-letters td", has_text="identity").count() >= 1,
                 "the dead letter on the overview", timeout=60)
    page.screenshot(path=str(ARTIFACTS / "console-overview.png"), full_page=True)
    fits_a_phone(page, page.url, "overview")


def test_logged_out_browser_sees_the_login_page_only(stack: local.StackState, browser: Any) -> None:
    context = browser.new_context()
    anonymous = context.new_page()
    anonymous.goto(f"{stack.url('console')}/customers/c_anything")
    assert "/login" in anonymous.url and anonymous.locator("#key").count() == 1
    # The login form carries a CSRF token bound to a pre-session cookie that script cannot read.
    assert anonymous.locator("input[name=csrf]").get_attribute("value")
    [pre] = [c for c in context.cookies() if c["name"] == "ts_console_login"]
    assert pre["httpOnly"] and pre["sameSite"] == "Strict"
    assert all(c["name"] != "ts_console_session" for c in context.cookies())
    anonymous.fill("#key", ADMIN_KEY)
    anonymous.click("button[type=submit]")
    anonymous.wait_for_url("**/customers/c_anything")
    [session] = [c for c in context.cookies() if c["name"] == "ts_console_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert anonymous.evaluate("document.cookie") == ""  # script cannot read the session
    context.close()


# -- charts, on a console over a read model seeded with known numbers ---------------------------------------

CHART_RULES = """
rules:
  - id: win-back
    when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.6}
    action: {endpoint: marketing}
  - id: quiet
    when: {score: churn_risk, crosses_above: 0.9, rearm_below: 0.8}
    action: {endpoint: marketing}
"""
HOUR_MS = 3_600_000


class SeededConsole:
    """A console (the real pages) on its own event loop in a thread, over a read model seeded with known numbers."""

    def __init__(self, redis_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.redis_url = redis_url
        self.prefix = f"charts-{uuid.uuid4().hex[:8]}:"

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    async def start(self) -> None:
        self.client = aioredis.from_url(self.redis_url)
        self.store = ReadModelStore(self.client, self.prefix)
        settings = ConsoleSettings(admin_keys=frozenset({hash_admin_key(ADMIN_KEY)}), key_prefix=self.prefix,
                                   min_group_size=2, attribution_window_hours=1, live_poll_s=0.3)
        self.pages = ConsoleWeb(self.store, self.client, settings, parse_rules(CHART_RULES))
        app = web.Application()
        self.pages.register(app.router)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        await self.runner.cleanup()
        await self.client.aclose()


def value_features(value: float, tier: int, purchases: float = 1.0) -> dict[str, float]:
    """Scoring's value features of a ScoreUpdate (services/scoring/README.md, "Predicted value")."""
    return {"predicted_value": value, "value_tier": float(tier), "expected_purchases_value_horizon": purchases,
            "expected_order_value": value / purchases}


# Each segment customer's predicted value and tier (c_seg5 was scored before scoring could rank values).
SEEDED_VALUES = [(900.0, 4), (410.0, 3), (95.25, 2), (12.0, 1), (8.0, 1), (3.0, 0)]


def seeded_updates(now_ms: int) -> list[Any]:
    """Known numbers: segments, their changes, predicted values, dead letters, two rules' outcomes, one customer's
    scores."""
    t0 = now_ms - 10 * HOUR_MS
    updates: list[Any] = []
    for n, (segment, stage) in enumerate([("champion", "active")] * 3 + [("at_risk", "lapsing")] * 2
                                         + [("new", "active")]):
        updates.append(ScoreUpdated(f"c_seg{n}", f"s{n}", t0, 0.3, 0.7, segment, stage, "v1", (),
                                    value_features(*SEEDED_VALUES[n])))
    # c_seg0's newer score predicts more: it counts once, with its newest value.
    updates.append(ScoreUpdated("c_seg0", "s0-later", t0 + HOUR_MS, 0.8, 0.2, "at_risk", "lapsing", "v1", (),
                                value_features(1200.0, 4, 6.0)))
    updates += [DeadLettered("identity", "no usable identifier", f"d{n}") for n in range(3)]
    updates.append(DeadLettered("ingest", "schema", "d-schema"))
    # win-back: treated 4 (3 buy within the hour), hold-out 4 (1 buys): uplift 50 pp. quiet: too few.
    for group, outcome, buyers in (("t", "fired", 3), ("h", "held_out", 1)):
        for i in range(4):
            cid = f"c_{group}{i}"
            updates.append(ActionTaken(f"a-{cid}", "win-back", cid, outcome, None if outcome == "fired" else "holdout",
                                       "marketing", t0, t0))
            if i < buyers:
                updates.append(TouchpointSeen(cid, f"buy-{cid}", t0 + 600_000, "track", "Order Completed", "web",
                                              "t", 20.0, "EUR", None, None, {}, ()))
    updates.append(ActionTaken("a-q", "quiet", "c_q", "fired", None, "marketing", t0, t0))
    # One customer with a risk line crossing the threshold, an action fired and one held out.
    updates += [ScoreUpdated("c_line", f"l{n}", t0 + n * HOUR_MS, risk, 1 - risk, "loyal", "active", "v2",
                             (("overdue_ratio", 0.8),), value_features(100.0 + 50 * n, 3, 4.0 + n))
                for n, risk in enumerate((0.2, 0.5, 0.75, 0.6))]
    updates += [ActionTaken("a-line", "win-back", "c_line", "fired", None, "marketing", t0 + 2 * HOUR_MS, 0),
                ActionTaken("a-line-q", "quiet", "c_line", "held_out", "holdout", "marketing", t0 + 3 * HOUR_MS, 0)]
    return updates


def seeded_samples(now_minute: int) -> list[PipelineSample]:
    return [PipelineSample(now_minute - back, {"ingest": 100.0 + back, "identity": 99.0 + back, "scoring": 98.0,
                                               "triggers": None, "console": 250.0},
                           {"webhook acknowledged (2xx)": {"0.5": 0.2 + back / 100, "0.95": 0.5, "0.99": 0.9}},
                           {"roc_auc": 0.7 + back / 100, "log_loss": 0.5, "brier": 0.2, "calibration_error": None})
            for back in (4, 3, 2, 1)]  # the current minute is the console's own sampler's


@pytest.fixture(scope="module")
def seeded(module_redis_server: Any) -> Iterator[SeededConsole]:
    console = SeededConsole(f"redis://127.0.0.1:{module_redis_server.port}/0")
    console.run(console.start())
    now_ms = int(time.time() * 1000)
    console.run(console.store.apply(seeded_updates(now_ms)))
    for sample in seeded_samples(now_ms // 60_000):
        console.run(console.store.record_pipeline_sample(sample))
    yield console
    console.run(console.stop())
    console.loop.call_soon_threadsafe(console.loop.stop)


@pytest.fixture
def chart_page(browser: Any, seeded: SeededConsole) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(WATCH_PAGE)
    page = context.new_page()
    page.errors = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda error: page.errors.append(str(error)))  # type: ignore[attr-defined]
    page.on("console", lambda message: page.errors.append(  # type: ignore[attr-defined]
        f"{message.text} ({message.location.get('url')})") if message.type == "error" else None)
    page.goto(f"{seeded.url}/login")
    page.fill("#key", ADMIN_KEY)
    page.click("button[type=submit]")
    page.wait_for_url("**/overview")
    yield page
    assert page.evaluate("window.__cspViolations") == []
    assert page.errors == []  # type: ignore[attr-defined]
    context.close()


def charts_drawn(page: Any, names: list[str]) -> None:
    """Wait until each named chart is drawn (an svg in it), then hover each: tooltips must not break the CSP."""
    for name in names:
        playwright_api.expect(page.locator(f"#chart-{name}[data-rendered] svg")).to_have_count(1, timeout=20_000)
        page.hover(f"#chart-{name}")
    assert page.evaluate("window.__cspViolations") == []


def option(page: Any, name: str) -> Any:
    """The option ECharts draws the chart with (read through the page, as a user's browser has it)."""
    return page.evaluate(f"echarts.getInstanceByDom(document.getElementById('chart-{name}')).getOption()")


def table(page: Any, selector: str) -> list[list[str]]:
    """The cells of a table, row by row (read from the DOM: the table is in a closed <details>)."""
    return page.evaluate(f"""Array.from(document.querySelectorAll('{selector} tbody tr')).map(
        r => Array.from(r.children).map(c => c.textContent.trim()))""")


def test_overview_charts_draw_the_read_models_numbers_and_their_tables_agree(chart_page: Any,
                                                                            seeded: SeededConsole) -> None:
    page = chart_page
    charts_drawn(page, ["segments", "flow", "rates", "latency", "quality", "dead-letters"])
    segments = seeded.run(seeded.store.segments())
    assert segments == {("champion", "active"): 2, ("at_risk", "lapsing"): 3, ("new", "active"): 1,
                        ("loyal", "active"): 1}
    # Heatmap: every cell is a (stage, segment) count of the read model, and so is the table.
    heat = option(page, "segments")
    columns, rows = heat["xAxis"][0]["data"], heat["yAxis"][0]["data"]
    drawn = {(rows[y], columns[x]): n for x, y, n in heat["series"][0]["data"]}
    assert drawn == segments
    tabled = {(row[0], stage): int(n) for row in table(page, "#segments")
              for stage, n in zip(columns, row[1:-1], strict=True) if int(n)}
    assert tabled == segments
    # The numbers are one click away: the table is folded until its summary is clicked.
    assert not page.locator("#numbers-segments").evaluate("d => d.open")
    page.click("#numbers-segments summary")
    assert page.locator("#segments").is_visible()
    # Sankey: the flow's links are the table's rows.
    flow = seeded.run(seeded.store.segment_flow(30))
    links = {(link["source"], link["target"]): link["value"] for link in option(page, "flow")["series"][0]["links"]}
    # Seven customers arrived (c_seg0's two scores came in one batch: it arrives at risk straight away).
    assert sum(links.values()) == sum(n for _, _, n in flow) == 7
    assert links[("from new customer", "to at_risk · lapsing")] == 3
    assert sorted((r[0], r[1], int(r[2])) for r in table(page, "#flow")) == sorted(
        (b.replace("|", " · ") if b else "new customer", a.replace("|", " · "), n) for b, a, n in flow)
    # Events/s of the last hour: one point a minute per stage, as the ring buffer holds them, as the table says.
    samples = seeded_samples(int(time.time() * 1000) // 60_000)
    rates = {s["name"]: s["data"] for s in option(page, "rates")["series"]}
    assert set(rates) == {"ingest", "identity", "scoring", "console"}  # triggers had no rate
    assert [v for _, v in rates["ingest"]] == [s.rates["ingest"] for s in samples]
    rate_rows = table(page, "#rates-history")
    assert [float(r[1]) for r in rate_rows] == [s.rates["ingest"] for s in samples]
    # Latency quantiles and model quality likewise.
    latency = {s["name"]: [v for _, v in s["data"]] for s in option(page, "latency")["series"]}
    assert latency["webhook acknowledged (2xx) p50"] == [  # seconds, to the 0.1 ms
        round(s.latency["webhook acknowledged (2xx)"]["0.5"], 4) for s in samples]
    quality = {s["name"]: [v for _, v in s["data"]] for s in option(page, "quality")["series"]}
    assert quality["ROC AUC"] == [round(s.quality["roc_auc"], 4) for s in samples]
    assert "calibration error" not in quality
    # Dead letters by reason: bars, and the same counts in the table.
    bars = option(page, "dead-letters")
    assert dict(zip(bars["yAxis"][0]["data"], bars["series"][0]["data"], strict=True)) == {
        "identity: no usable identifier": 3, "ingest: schema": 1}
    assert table(page, "#dead-letters") == [["identity", "no usable identifier", "3"], ["ingest", "schema", "1"]]
    page.screenshot(path=str(ARTIFACTS / "console-charts-overview.png"), full_page=True)


def test_overview_and_customer_page_show_predicted_value_by_tier(chart_page: Any, seeded: SeededConsole) -> None:
    page = chart_page
    charts_drawn(page, ["value"])
    # Each customer counts once, in the tier of its newest score: c_seg0's 1,200 replaced its 900.
    tiers = [(t.tier, t.customers, t.predicted_value) for t in seeded.run(seeded.store.value_tiers())]
    assert tiers == [(4, 1, 1200.0), (3, 2, 660.0), (2, 1, 95.25), (1, 2, 20.0), (0, 1, 3.0)]
    bars = option(page, "value")
    assert dict(zip(bars["yAxis"][0]["data"], bars["series"][0]["data"], strict=True)) == {
        "tier 4 (top quarter): 1 customer": 1200.0, "tier 3: 2 customers": 660.0, "tier 2: 1 customer": 95.25,
        "tier 1 (bottom quarter): 2 customers": 20.0, "not ranked yet: 1 customer": 3.0}
    assert table(page, "#value-tiers") == [
        ["tier 4 (top quarter)", "1", "1,200.00", "1,200.00"], ["tier 3", "2", "660.00", "330.00"],
        ["tier 2", "1", "95.25", "95.25"], ["tier 1 (bottom quarter)", "2", "20.00", "10.00"],
        ["not ranked yet", "1", "3.00", "3.00"]]
    # The customer page: the newest score's predicted value, tier, expected purchases and order value.
    page.goto(f"{seeded.url}/customers/c_line")
    assert page.locator("#predicted-value").inner_text() == "250.00"
    assert page.locator("#value-tier").inner_text() == "tier 3"
    assert page.locator("#expected-purchases").inner_text() == "7.00"
    assert page.locator("#expected-order-value").inner_text() == "35.71"
    # A customer never scored with a value shows none.
    page.goto(f"{seeded.url}/customers/c_t0")
    assert page.locator("#predicted-value").count() == 0


def test_overview_charts_follow_the_read_model_live(chart_page: Any, seeded: SeededConsole) -> None:
    page = chart_page
    charts_drawn(page, ["dead-letters"])
    page.evaluate("window.__sameDocument = true")
    seeded.run(seeded.store.apply([DeadLettered("scoring", "bad feature", "d-live")]))
    playwright_api.expect(page.locator("#dead-letters")).to_contain_text("bad feature", timeout=20_000)
    charts_drawn(page, ["dead-letters"])
    assert "scoring: bad feature" in option(page, "dead-letters")["yAxis"][0]["data"]
    # A newer score (a crossing check's: no segment) moves a customer to another value tier and back: the tiers
    # follow without a reload, and end as seeded (the other tests read them).
    now_ms = int(time.time() * 1000)
    for n, (value, tier), customers in ((1, (5000.0, 4), "2"), (2, SEEDED_VALUES[5], "1")):
        seeded.run(seeded.store.apply([ScoreUpdated("c_seg5", f"s-live-{n}", now_ms + n, 0.1, 0.9, "", "", "v1", (),
                                                    value_features(value, tier))]))
        playwright_api.expect(page.locator("#value-tiers tr[data-tier='4'] td").first).to_have_text(
            customers, timeout=20_000)
    assert page.evaluate("window.__sameDocument") is True  # refreshed in place, not reloaded


def test_rules_forest_plot_draws_each_rules_uplift_and_interval_as_the_api_says(chart_page: Any,
                                                                                seeded: SeededConsole) -> None:
    page = chart_page
    page.goto(f"{seeded.url}/rules")
    charts_drawn(page, ["forest"])
    forest = option(page, "forest")
    assert forest["yAxis"][0]["data"] == ["win-back"]  # quiet has too few customers for an interval
    outcome = httpx.get(f"{seeded.url}/v1/rules/win-back/outcomes",
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).json()["outcome"]
    assert (outcome["treated"], outcome["holdout"]) == (5, 4) and outcome["enough_data"]
    interval = {s["name"]: s["data"] for s in forest["series"]}
    assert interval["95% interval"] == [[round(100 * outcome["ci_low"], 2), round(100 * outcome["ci_high"], 2), 0]]
    assert interval["uplift"] == [[round(100 * outcome["uplift"], 2), "win-back"]]
    assert interval["treated conversion"] == [[round(100 * outcome["treated_rate"], 2), "win-back"]]
    [row] = table(page, "#forest-numbers")
    assert row == ["win-back", *(str(round(100 * outcome[k], 2)) for k in (
        "treated_rate", "holdout_rate", "uplift", "ci_low", "ci_high"))]
    assert "quiet" in page.inner_text("#forest-waiting")
    page.screenshot(path=str(ARTIFACTS / "console-charts-rules.png"), full_page=True)


def test_customer_chart_draws_risk_propensity_thresholds_and_actions(chart_page: Any, seeded: SeededConsole) -> None:
    page = chart_page
    page.goto(f"{seeded.url}/customers/c_line")
    charts_drawn(page, ["scores"])
    view = seeded.run(seeded.store.customer("c_line"))
    drawn = {s["name"]: s for s in option(page, "scores")["series"]}
    risk = [[s.event_time_ms, s.churn_risk] for s in view.scores]
    assert drawn["churn risk"]["data"] == risk
    assert drawn["purchase propensity"]["data"] == [[s.event_time_ms, s.purchase_propensity] for s in view.scores]
    thresholds = {line["name"]: line["yAxis"] for line in drawn["churn risk"]["markLine"]["data"]}
    assert thresholds == {"win-back (churn_risk 0.7)": 0.7, "quiet (churn_risk 0.9)": 0.9}
    assert sorted(p["name"] for p in drawn["actions"]["data"]) == ["quiet: held out", "win-back: fired"]
    assert [[int(r[0] != ""), float(r[1]), float(r[2])] for r in table(page, "#score-points")] == [
        [1, s.churn_risk, s.purchase_propensity] for s in view.scores]
    assert sorted(r[1:] for r in table(page, "#score-actions")) == [["quiet", "held out"], ["win-back", "fired"]]
    assert page.locator("svg text", has_text="win-back (churn_risk 0.7)").count() == 1  # the threshold is labelled
    page.screenshot(path=str(ARTIFACTS / "console-charts-customer.png"), full_page=True)


def test_rules_page_charts_actions_over_time_and_a_backtest_sent_later_arrives_live(chart_page: Any,
                                                                                    seeded: SeededConsole) -> None:
    page = chart_page
    page.goto(f"{seeded.url}/rules")
    activity = {page.locator(f"#chart-activity-{n}").evaluate("e => e.closest('.activity').dataset.rule"): n
                for n in (1, 2)}
    assert set(activity) == {"quiet", "win-back"}
    charts_drawn(page, [f"activity-{n}" for n in activity.values()])
    for rule, n in activity.items():
        by_day = httpx.get(f"{seeded.url}/v1/rules/{rule}/outcomes", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                           timeout=10).json()["by_day"]
        drawn: dict[str, dict[str, int]] = {}
        for series in option(page, f"activity-{n}")["series"]:
            for t, count in series["data"]:
                day = time.strftime("%Y-%m-%d", time.gmtime(t / 1000))
                drawn.setdefault(day, {})[series["name"].replace(" ", "_")] = count
        assert drawn == by_day and by_day, rule
        assert sum(sum(day.values()) for day in by_day.values()) == {"win-back": 9, "quiet": 2}[rule]
        tabled = {row[0]: [int(v) for v in row[1:]] for row in table(page, f"#activity-{n}-numbers")}
        assert tabled == {day: [counts.get(k, 0) for k in ("fired", "held_out", "suppressed", "backfill")]
                          for day, counts in by_day.items()}
    # A backtest sent by a machine while the page is open: its charts arrive without a reload.
    assert page.locator("#backtest-none").count() == 1
    page.evaluate("window.__sameDocument = true")
    report = {"bucket": "week", "window": {"from": None, "to": None}, "scores_replayed": 50, "scores_in_window": 50,
              "customers_in_window": 20, "rules": [
                  {"rule_id": "win-back", "fired": 7, "customers": 6, "fired_by_period": {"2026-W40": 3, "2026-W42": 4},
                   "held_out": 2, "held_for_quiet_hours": 0, "stopped": {"cooldown": 1}},
                  {"rule_id": "quiet", "fired": 1, "customers": 1, "fired_by_period": {"2026-W41": 1}, "held_out": 0,
                   "held_for_quiet_hours": 0, "stopped": {}}]}
    response = httpx.put(f"{seeded.url}/v1/rules/backtest", json=report,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert response.status_code == 200, response.text
    charts_drawn(page, ["backtest-fired", "backtest-totals"])
    assert page.evaluate("window.__sameDocument") is True
    fired = option(page, "backtest-fired")
    assert fired["xAxis"][0]["data"] == ["2026-W40", "2026-W41", "2026-W42"]
    assert {s["name"]: s["data"] for s in fired["series"]} == {"win-back": [3, 0, 4], "quiet": [0, 1, 0]}
    totals = option(page, "backtest-totals")
    assert totals["yAxis"][0]["data"] == ["win-back", "quiet"]
    assert {s["name"]: s["data"] for s in totals["series"]} == {"fired": [7, 1], "held out": [2, 0],
                                                                "stopped: cooldown": [1, 0]}
    assert table(page, "#backtest-fired-numbers") == [["2026-W40", "3", "0"], ["2026-W41", "0", "1"],
                                                      ["2026-W42", "4", "0"]]
    page.screenshot(path=str(ARTIFACTS / "console-charts-rules-over-time.png"), full_page=True)
