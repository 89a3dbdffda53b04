"""`touchstream demo --screenshots DIR` (`make screenshots`): the README's console pictures, taken in headless
Chromium from the CDNOW demo's data once the pipeline has drained, never from test fixtures."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import httpx

from touchstream_cli import local

# Debian's chromium, driven by Playwright (a dev dependency): no browser download.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 900}
# A customer page with this many events is about 1,500 pixels tall.
MAX_EVENTS_SHOWN = 12
# The tallest picture taken; a page beyond it is cut at the bottom.
MAX_HEIGHT_PX = 2400


def showcase_candidates(user_ids: Iterable[str], count: int, max_events: int = MAX_EVENTS_SHOWN) -> list[str]:
    """Return up to `count` user ids with the most events, none with more than `max_events`: rich customer
    pages that still fit a picture (the page lists every event kept).

    >>> showcase_candidates(["b", "a", "b", "c", "a", "b", "d", "d", "d", "d"], 2, max_events=3)
    ['b', 'a']
    """
    seen = Counter(user_ids)
    fitting = [user for user, events in seen.items() if events <= max_events]
    return sorted(fitting, key=lambda user: (-seen[user], user))[:count]


def showcase_customer(state: local.StackState, user_ids: Iterable[str], admin_key: str) -> str:
    """Return the customer id of the first of `user_ids` a webhook went to (identity's lookup API finds it)."""
    deliveries = httpx.get(f"{state.url('receiver')}/deliveries", params={"limit": 1_000_000}, timeout=60).json()
    delivered = {d["body"].get("customer_id") for d in deliveries}
    for user_id in user_ids:
        response = httpx.post(f"{state.url('identity')}/v1/customers/lookup", timeout=10,
                              headers={"Authorization": f"Bearer {admin_key}"},
                              json={"identifier": {"type": "user_id", "value": user_id}})
        customer_id = response.json().get("customer_id") if response.status_code == 200 else None
        if customer_id in delivered:
            return str(customer_id)
    raise RuntimeError("none of the most active customers got a webhook: replay more of CDNOW (--limit)")


def send_backtest(state: local.StackState, admin_key: str) -> None:
    """Backtest the stack's rule file over its scores topic (by ISO week) and send the report to its console,
    so the rules page's backtest charts show the demo's data too."""
    import os

    from services.triggers.rules import DEFAULT_RULES_FILE
    from touchstream_cli.cli import main

    previous = os.environ.get("TOUCHSTREAM_CONSOLE_ADMIN_KEY")
    os.environ["TOUCHSTREAM_CONSOLE_ADMIN_KEY"] = admin_key
    try:
        # Named relative to the repository, as a reader of the README would type it.
        relative = Path(os.path.relpath(DEFAULT_RULES_FILE, Path(__file__).resolve().parents[1]))
        here = (Path.cwd() / relative).resolve() == DEFAULT_RULES_FILE.resolve()
        rules_file = relative if here else DEFAULT_RULES_FILE
        code = main(["rules", "backtest", str(rules_file), "--bootstrap", state.kafka_bootstrap, "--by", "week",
                     "--console", state.url("console")])
    finally:
        if previous is None:
            del os.environ["TOUCHSTREAM_CONSOLE_ADMIN_KEY"]
        else:
            os.environ["TOUCHSTREAM_CONSOLE_ADMIN_KEY"] = previous
    if code != 0:
        raise RuntimeError(f"the backtest for the rules page failed (exit {code})")


def capture_console(state: local.StackState, out_dir: Path, admin_key: str, user_ids: Iterable[str]) -> list[Path]:
    """Log in to the stack's console and save the customer, overview and rules pages as PNGs in `out_dir`.

    The customer page is that of the first of `user_ids` a webhook went to (the demo passes `showcase_candidates`).
    """
    chromium = shutil.which("chromium")
    if chromium is None:
        raise RuntimeError("screenshots need Debian's chromium: `make tools` (apt-get install -y chromium)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError as exc:
        raise RuntimeError("screenshots need Playwright: `make install` (the dev extras)") from exc
    customer = showcase_customer(state, user_ids, admin_key)
    send_backtest(state, admin_key)
    out_dir.mkdir(parents=True, exist_ok=True)
    console = state.url("console")
    shots = {"console-customer.png": f"{console}/customers/{customer}", "console-overview.png": f"{console}/overview",
             "console-rules.png": f"{console}/rules"}
    saved = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport=VIEWPORT).new_page()  # type: ignore[arg-type]
            page.goto(f"{console}/login")
            page.fill("#key", admin_key)
            page.click("button[type=submit]")
            page.wait_for_url("**/overview")
            for name, url in shots.items():
                page.goto(url)
                # Not "networkidle": the pages keep a live-update stream open. The charts are drawn in the
                # browser: wait until each says it is drawn, then pause for their animation and the fonts.
                page.wait_for_load_state("load")
                expect(page.locator("[data-chart]:not([data-rendered])")).to_have_count(0, timeout=30_000)
                page.wait_for_timeout(1000)
                height = min(int(page.evaluate("document.documentElement.scrollHeight")), MAX_HEIGHT_PX)
                page.screenshot(path=str(out_dir / name), full_page=True,
                                clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": height})
                saved.append(out_dir / name)
                if name == "console-rules.png":
                    # The rules page is taller than a picture: its backtest card gets one of its own.
                    page.locator("#backtest").screenshot(path=str(out_dir / "console-rules-backtest.png"))
                    saved.append(out_dir / "console-rules-backtest.png")
        finally:
            browser.close()
    return saved
