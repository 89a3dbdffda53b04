"""One event travels ingest -> identity -> scoring -> triggers -> webhook on a real broker and Redis.

The stack is the one `touchstream local up` starts: separate processes, real Apache Kafka and Redis.
The rule file used here fires on the first score above 0.1, which a fresh model (propensity
0.75, churn risk 0.25 from the BTYD prior's neutral start) crosses, so the test does not
depend on what the model has learned.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.stacks import running_stack
from touchstream_cli import local

pytestmark = pytest.mark.integration

RULES = """
rules:
  - id: e2e-risk
    when:
      score: churn_risk
      crosses_above: 0.1
      rearm_below: 0.05
    action:
      endpoint: marketing
      template:
        kind: retention_offer
        offer: e2e
        churn_risk: ${scores.churn_risk}
    cooldown_hours: 24
    holdout_percent: 0
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str) -> Iterator[local.StackState]:
    with running_stack(tmp_path_factory.mktemp("stack"), RULES, "e2e-logs",
                       shared_broker=kafka_bootstrap) as state:
        yield state


def wait_for_delivery(state: local.StackState, predicate: Any, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        seen = httpx.get(f"{state.url('receiver')}/deliveries", timeout=5).json()
        for delivery in seen:
            if predicate(delivery["body"]):
                return delivery  # type: ignore[no-any-return]
        time.sleep(0.3)
    raise AssertionError(f"no matching webhook within {timeout}s; receiver saw {len(seen)}: {seen[-3:]}")


def test_event_becomes_a_signed_webhook(stack: local.StackState) -> None:
    user = f"user-{uuid.uuid4().hex[:8]}"
    email = f"{user}@example.com"
    response = httpx.post(f"{stack.url('ingest')}/v1/track", auth=(stack.write_key, ""), json={
        "userId": user, "event": "Order Completed", "messageId": f"m-{user}", "email": email,
        "timestamp": "2026-11-01T10:00:00Z", "order": {"amount": 42.0, "currency": "EUR"},
    })
    assert response.status_code == 200, response.text

    delivery = wait_for_delivery(stack, lambda body: body.get("rule_id") == "e2e-risk")
    body = delivery["body"]
    assert body["customer_id"].startswith("c_")
    assert body["type"] == "retention.action" and body["action_id"] == delivery["webhook_id"]
    assert body["data"]["offer"] == "e2e" and body["data"]["kind"] == "retention_offer"
    assert 0.1 <= body["data"]["churn_risk"] <= 1.0
    # Pseudonymised end to end: the clear identifiers never reach the webhook.
    assert user not in str(body) and email not in str(body)

    stats = httpx.get(f"{stack.url('receiver')}/stats").json()
    assert stats["rejected_signatures"] == 0
    assert stats["duplicates"] == 0


def test_every_service_reports_metrics_and_health(stack: local.StackState) -> None:
    for name in ("ingest", "identity", "scoring", "triggers"):
        assert httpx.get(f"{stack.url(name)}/healthz").status_code == 200
        assert httpx.get(f"{stack.url(name)}/readyz").status_code == 200
        metrics = httpx.get(f"{stack.url(name)}/metrics").text
        assert f"touchstream_{name}_" in metrics, name
    assert local.status(Path(stack.run_dir))["triggers"].startswith("ready")
