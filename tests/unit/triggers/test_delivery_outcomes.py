"""What triggers says on `actions.deliveries` about how a delivery ended (records built, deletion notices left out)."""

from __future__ import annotations

from typing import Any

from services.triggers.delivery import DeliveryEnded, FailedDelivery
from services.triggers.service import announce_deliveries
from touchstream import avro
from touchstream.privacy import DELETED_RULE_ID
from touchstream.topics import ACTION_DELIVERIES


class RecordingOutbox:
    """Stands in for the kernel's outbox: keeps what would be sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, dict[str, Any]]] = []

    async def send(self, topic: Any, key: str, value: bytes) -> None:
        self.sent.append((topic.name, key.encode(), avro.decode(ACTION_DELIVERIES.schema, value)))


def an_action(rule_id: str = "churn-risk-high", customer_id: str = "c_1") -> dict[str, Any]:
    return {"action_id": f"act_{rule_id}_{customer_id}", "rule_id": rule_id, "customer_id": customer_id,
            "outcome": "fired", "reason": None, "endpoint": "marketing", "payload_json": "{}",
            "event_time_ms": 1_000, "received_at_ms": 2_000, "created_at_ms": 2_500}


async def test_each_final_outcome_becomes_one_record_keyed_by_customer() -> None:
    outbox = RecordingOutbox()
    failed = FailedDelivery(an_action(customer_id="c_2"), "webhook: HTTP 500 after 10 tries", 10, 500, 9_000)
    await announce_deliveries(outbox, [DeliveryEnded(an_action(), "delivered", 1, 204, None, 3_000),  # type: ignore[arg-type]
                                       failed.ended()])
    assert [(topic, key) for topic, key, _ in outbox.sent] == [(ACTION_DELIVERIES.name, b"c_1"),
                                                               (ACTION_DELIVERIES.name, b"c_2")]
    delivered, dead = (record for _, _, record in outbox.sent)
    assert delivered == {"action_id": "act_churn-risk-high_c_1", "rule_id": "churn-risk-high", "customer_id": "c_1",
                         "endpoint": "marketing", "outcome": "delivered", "attempts": 1, "status": 204,
                         "reason": None, "event_time_ms": 1_000, "received_at_ms": 2_000, "created_at_ms": 2_500,
                         "ended_at_ms": 3_000}
    assert (dead["outcome"], dead["attempts"], dead["status"], dead["reason"], dead["ended_at_ms"]) == (
        "dead_lettered", 10, 500, "webhook: HTTP 500 after 10 tries", 9_000)


async def test_a_deletion_notice_is_not_announced() -> None:
    outbox = RecordingOutbox()
    await announce_deliveries(outbox, [  # type: ignore[arg-type]
        DeliveryEnded(an_action(DELETED_RULE_ID, "c_erased"), "delivered", 1, 200, None, 3_000),
        FailedDelivery(an_action(DELETED_RULE_ID, "c_erased"), "endpoint: 'x' is not registered").ended()])
    assert outbox.sent == []
