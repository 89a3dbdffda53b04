"""TriggersService over in-memory fakes of its stores: no broker, no Redis (integration tests keep the real ones)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client import CollectorRegistry

from services.triggers.metrics import TriggersMetrics
from services.triggers.service import TriggersService
from services.triggers.settings import TriggersSettings
from tests.unit.triggers.factories import rules_from
from tests.unit.triggers.fakes import InMemoryRuleStates, NoneErased, QueuedActions, SentRecords
from touchstream import avro
from touchstream.streams import Record
from touchstream.topics import ACTIONS, SCORES

RISK_RULE = """
  - id: churn-risk-high
    when: {score: churn_risk, crosses_above: 0.7, rearm_below: 0.6}
    action: {endpoint: marketing}
"""


def score_record(risk: float, customer_id: str = "cus_1", offset: int = 0) -> Record:
    now_ms = int(time.time() * 1000)
    value: dict[str, Any] = {
        "customer_id": customer_id, "message_id": f"m-{customer_id}-{offset}", "event_time_ms": now_ms - 1000,
        "received_at_ms": now_ms - 1000, "churn_risk": risk, "purchase_propensity": 1 - risk,
        "segment": "at_risk", "stage": "lapsing", "reasons": [], "model_version": "m1",
    }
    return Record(SCORES.name, 0, offset, customer_id.encode(), None, value)


def a_service(states: InMemoryRuleStates, delivery: QueuedActions, erased: NoneErased | None = None
              ) -> TriggersService:
    return TriggersService(rules_from(RISK_RULE), TriggersSettings(), None,  # type: ignore[arg-type]
                           states, delivery, None, TriggersMetrics(CollectorRegistry()),  # type: ignore[arg-type]
                           erased or NoneErased())  # type: ignore[arg-type]


class StatesAtFlush(SentRecords):
    """An outbox that records how many rule states were stored when the actions were acknowledged."""

    def __init__(self, states: InMemoryRuleStates) -> None:
        super().__init__()
        self.states = states
        self.states_at_flush: list[int] = []

    async def flush(self) -> None:
        await super().flush()
        self.states_at_flush.append(len(self.states.states))


def test_a_crossing_fires_one_action_queued_for_delivery_and_its_state_is_saved_after_the_ack() -> None:
    states, delivery = InMemoryRuleStates(), QueuedActions()
    outbox = StatesAtFlush(states)
    batch = [score_record(0.5, offset=0), score_record(0.8, offset=1)]
    asyncio.run(a_service(states, delivery).evaluate_score_batch(batch, outbox))  # type: ignore[arg-type]

    (topic, key, value), = outbox.sent
    action = avro.decode(ACTIONS.schema, value)
    assert (topic, key, action["rule_id"], action["outcome"]) == (ACTIONS.name, "cus_1", "churn-risk-high", "fired")
    assert [queued["action_id"] for queued in delivery.queued] == [action["action_id"]]
    assert outbox.states_at_flush == [0]  # nothing saved before the broker acknowledged the action
    assert states.states[("churn-risk-high", "cus_1")].armed is False


def test_a_replayed_batch_emits_the_same_action_ids_so_delivery_drops_the_repeat() -> None:
    # At-least-once: a crash between the ack and the state save replays the batch.
    states, delivery = InMemoryRuleStates(), QueuedActions()
    service = a_service(states, delivery)
    batch = [score_record(0.5, offset=0), score_record(0.8, offset=1)]
    first, replayed = SentRecords(), SentRecords()
    asyncio.run(service.evaluate_score_batch(batch, first))  # type: ignore[arg-type]
    asyncio.run(service.evaluate_score_batch(batch, replayed))  # type: ignore[arg-type]
    ids = [[avro.decode(ACTIONS.schema, value)["action_id"] for _, _, value in out.sent] for out in (first, replayed)]
    assert len(ids[0]) == 1 and ids[0] == ids[1]
    assert {queued["action_id"] for queued in delivery.queued} == set(ids[0])


def test_an_erased_customers_scores_are_not_evaluated() -> None:
    states, delivery = InMemoryRuleStates(), QueuedActions()
    outbox = SentRecords()
    service = a_service(states, delivery, NoneErased({"cus_gone"}))
    asyncio.run(service.evaluate_score_batch([score_record(0.9, "cus_gone", 0), score_record(0.9, "cus_2", 1)],
                                             outbox))  # type: ignore[arg-type]
    assert [key for _, key, _ in outbox.sent] == ["cus_2"]
    assert all(customer != "cus_gone" for _, customer in states.states)
