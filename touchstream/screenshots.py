"""`touchstream demo --screenshots DIR` (`make screenshots`): the README's console pictures, taken in headless
Chromium from the CDNOW demo's data once the pipeline has drained, never from test fixtures."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

from touchstream import local

# Debian's chromium, driven by Playwright (a dev dependency): no browser download.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 900}


def showcase_customer(deliveries: Iterable[Mapping[str, Any]]) -> str | None:
    """Return the customer to show: of those a webhook went to, the one with the highest lifetime spend.

    >>> showcase_customer([{"body": {"customer_id": "c_1", "data": {"lifetime_spend": 80.0}}},
    ...                    {"body": {"customer_id": "c_2", "data": {"lifetime_spend": 120.5}}},
    ...                    {"body": {"customer_id": "c_3", "data": {}}}])
    'c_2'
    """
    best: tuple[float, str] | None = None
    for delivery in deliveries:
        body = delivery.get("body") or {}
        customer, data = body.get("customer_id"), body.get("data") or {}
        spend = data.get("lifetime_spend") if isinstance(data, Mapping) else None
        if isinstance(customer, str) and isinstance(spend, int | float):
            candidate = (float(spend), customer)
            best = candidate if best is None or candidate > best else best
    return None if best is None else best[1]


def capture_console(state: local.StackState, out_dir: Path, admin_key: str) -> list[Path]:
    """Log in to the stack's console and save the customer, overview and rules pages as PNGs in `out_dir`."""
    chromium = shutil.which("chromium")
    if chromium is None:
        raise RuntimeError("screenshots need Debian's chromium: `make tools` (apt-get install -y chromium)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError as exc:
        raise RuntimeError("screenshots need Playwright: `make install` (the dev extras)") from exc
    deliveries = httpx.get(f"{state.url('receiver')}/deliveries", params={"limit": 1_000_000}, timeout=60).json()
    customer = showcase_customer(deliveries)
    if customer is None:
        raise RuntimeError("no webhook carried a customer with a lifetime spend: replay more of CDNOW (--limit)")
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
                page.screenshot(path=str(out_dir / name), full_page=True)
                saved.append(out_dir / name)
        finally:
            browser.close()
    return saved
