"""What a new user meets first, on the whole stack (`touchstream local up`) with the shipped rules:

- the unchanged official Segment and RudderStack SDKs send `Complaint Submitted` and `Order Completed`,
  and deploy/rules/default.yaml fires on them (webhooks at the receiver);
- `touchstream import` of history trains and fills customer state but sends no webhook: what would have
  fired is a `backfill` outcome on `actions` and in the metrics, and a live event after it sees that state.

Which customers a rule's hold-out keeps back depends on the customer id identity assigns, so each
check reads the rule's decision off the `actions` topic: a `fired` one must reach the receiver, a
`held_out` one must be the customer the hold-out picks (services.triggers.crossing.is_held_out).
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from rudderstack.analytics.client import Client as RudderClient
from segment.analytics.client import Client as SegmentClient

from services.ingest.importer import ImportOptions, default_paths, run_import
from services.ingest.keys import WriteKeyStore
from services.triggers.actions import action_id
from services.triggers.crossing import is_held_out
from services.triggers.rules import parse_rule_file
from services.triggers.settings import DEFAULT_RULES_FILE, TriggersSettings
from tests.kafka_reading import collect
from tests.stacks import running_stack
from touchstream.topics import ACTIONS
from touchstream_cli import local

pytestmark = pytest.mark.integration
RULES = parse_rule_file(DEFAULT_RULES_FILE.read_text())
HOLDOUT = {rule.id: rule.holdout_percent for rule in RULES.rules}
SDKS: dict[str, Callable[..., Any]] = {"segment": SegmentClient, "rudderstack": RudderClient}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str) -> Iterator[local.StackState]:
    # The shipped horizon, not the tests' usual "act on any date": history must stay history here.
    horizon = TriggersSettings.model_fields["backfill_horizon_hours"].default
    with running_stack(tmp_path_factory.mktemp("first-use"), DEFAULT_RULES_FILE.read_text(), "e2e-first-use-logs",
                       {"TOUCHSTREAM_TRIGGERS_BACKFILL_HORIZON_HOURS": str(horizon)},
                                          shared_broker=kafka_bootstrap) as state:
        yield state


def decisions(stack: local.StackState, wanted: int, match: Callable[[dict[str, Any]], bool],
              wait_s: float = 120.0) -> list[dict[str, Any]]:
    """Return the first `wanted` decisions on `actions` that `match`, or all there are after `wait_s`."""
    found = asyncio.run(collect(stack.kafka_bootstrap, ACTIONS.name, ACTIONS.schema, wanted,
                                lambda _key, record: match(record), wait_s=wait_s))
    return [record for _, record in found]


def data_of(action: dict[str, Any]) -> dict[str, Any]:
    return json.loads(action["payload_json"])["data"]  # type: ignore[no-any-return]


def delivered(stack: local.StackState, webhook_id: str, timeout_s: float = 60.0) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout_s
    while True:
        for delivery in httpx.get(f"{stack.url('receiver')}/deliveries", timeout=5).json():
            if delivery["webhook_id"] == webhook_id:
                return delivery  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            return None
        time.sleep(0.3)


def assert_acted_on(stack: local.StackState, action: dict[str, Any]) -> None:
    """A live decision: fired and delivered, or held out because the hold-out picks this customer."""
    held = is_held_out(action["rule_id"], action["customer_id"], HOLDOUT[action["rule_id"]])
    assert action["outcome"] == ("held_out" if held else "fired"), action
    if not held:
        delivery = delivered(stack, action["action_id"])
        assert delivery is not None, f"no webhook for {action['rule_id']}"
        assert delivery["body"]["rule_id"] == action["rule_id"]


@pytest.mark.parametrize("sdk", sorted(SDKS))
def test_the_unchanged_sdks_complaint_and_orders_fire_the_shipped_rules(stack: local.StackState, sdk: str) -> None:
    errors: list[Any] = []
    client = SDKS[sdk](write_key=stack.write_key, host=stack.url("ingest"), max_retries=2,
                       on_error=lambda error, batch: errors.append(error))
    run = uuid.uuid4().hex[:8]
    user = f"{sdk}-{run}"
    complaint_id = f"{user}-complaint"
    client.track(user, "Complaint Submitted", {"text": "The parcel arrived broken", "rating": 1},
                 message_id=complaint_id)
    for n in (1, 2, 3):
        client.track(user, "Order Completed", {"order_id": f"{user}-o{n}", "total": 20.0 * n, "currency": "EUR",
                                               "products": [{"product_id": "p-1", "price": 20.0, "quantity": n}]},
                     message_id=f"{user}-order-{n}")
    client.flush()
    client.join()
    assert errors == []

    [complaint] = decisions(stack, 1, lambda r: r["rule_id"] == "first-complaint-recovery"
                            and data_of(r).get("complaint_event") == complaint_id)
    assert_acted_on(stack, complaint)
    customer = complaint["customer_id"]
    loyalty_id = action_id("third-purchase-loyalty", customer, f"{user}-order-3")
    [loyalty] = decisions(stack, 1, lambda r: r["action_id"] == loyalty_id)
    assert_acted_on(stack, loyalty)
    # Three orders of 20, 40 and 60 EUR reached scoring as purchases from the spec's property names.
    if loyalty["outcome"] == "fired":
        assert data_of(loyalty)["purchases"] == 3.0 and data_of(loyalty)["lifetime_spend"] == 120.0


def test_imported_history_fills_state_and_records_backfill_outcomes_without_a_webhook(
        stack: local.StackState, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    user = f"history-{run}"
    now = datetime.now(UTC)

    def days_ago(days: int) -> str:
        return (now - timedelta(days=days)).isoformat()

    history = tmp_path / "history.jsonl"
    rows = [
        {"userId": user, "event": "Complaint Submitted", "timestamp": days_ago(40), "messageId": f"{user}-c1",
         "properties": {"text": "late delivery"}},
        {"userId": user, "event": "Order Completed", "timestamp": days_ago(30), "properties": {"total": 80}},
        {"userId": user, "event": "Order Refunded", "timestamp": days_ago(25), "properties": {"total": 30}},
        {"userId": user, "event": "Order Completed", "timestamp": days_ago(20), "properties": {"total": 50}},
    ]
    history.write_text("".join(json.dumps(row) + "\n" for row in rows))
    key = asyncio.run(add_write_key(stack.redis_url, "backfill"))
    out = io.StringIO()
    assert run_import(history, ImportOptions(url=stack.url("ingest"), write_key=key, file_format="jsonl",
                                             events_per_s=0, **default_paths(history)), out) == 0, out.getvalue()

    # The complaint 40 days ago would have fired the recovery rule (and started the 24 h escalation timer).
    [recovery] = decisions(stack, 1, lambda r: r["rule_id"] == "first-complaint-recovery"
                           and data_of(r).get("complaint_event") == f"{user}-c1")
    assert recovery["outcome"] == "backfill" and recovery["reason"] in ("fired", "holdout")
    customer = recovery["customer_id"]

    # Live: a second complaint, then the third order (the refund was no purchase).
    live = httpx.post(f"{stack.url('ingest')}/v1/batch", auth=(stack.write_key, ""), json={"batch": [
        {"type": "track", "userId": user, "event": "Complaint Submitted", "messageId": f"{user}-c2"},
        {"type": "track", "userId": user, "event": "Order Completed", "messageId": f"{user}-o3",
         "properties": {"total": 40}},
    ]})
    assert live.status_code == 200, live.text
    [loyalty] = decisions(stack, 1, lambda r: r["action_id"] == action_id("third-purchase-loyalty", customer,
                                                                          f"{user}-o3"))
    assert_acted_on(stack, loyalty)
    if loyalty["outcome"] == "fired":
        assert data_of(loyalty)["lifetime_spend"] == 140.0  # 80 - 30 + 50 + 40

    # Every decision about the customer is on the topic by now (the live order's came after the live complaint's):
    # looking for one more than expected finds none.
    about_customer = decisions(stack, 4, lambda r: r["customer_id"] == customer, wait_s=10)
    # The history's escalation timer expired long ago: backfill too. The live complaint is the second one, so
    # the "first complaint" rule stays quiet: it knows the imported one.
    assert sorted((r["rule_id"], r["outcome"]) for r in about_customer) == [
        ("first-complaint-recovery", "backfill"), ("first-complaint-unanswered-24h", "backfill"),
        ("third-purchase-loyalty", loyalty["outcome"])]
    deliveries = httpx.get(f"{stack.url('receiver')}/deliveries", timeout=5).json()
    assert [d["body"]["rule_id"] for d in deliveries if d["body"].get("customer_id") == customer] == (
        ["third-purchase-loyalty"] if loyalty["outcome"] == "fired" else [])
    metrics = httpx.get(f"{stack.url('triggers')}/metrics", timeout=5).text
    assert 'touchstream_triggers_actions_total{outcome="backfill",reason=' in metrics


async def add_write_key(redis_url: str, source: str) -> str:
    client = aioredis.from_url(redis_url)
    try:
        return await WriteKeyStore(client).add(source)
    finally:
        await client.aclose()
