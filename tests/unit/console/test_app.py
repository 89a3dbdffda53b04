"""The agent's decode step: records from five topics become updates in arrival order; garbage is counted."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry

from services.console.app import updates_of
from services.console.readmodel import ActionTaken, CustomersMerged, ScoreUpdated
from touchstream import avro
from touchstream.metrics import ServiceMetrics
from touchstream.topics import ACTIONS, IDENTITY_MERGES, SCORES


def an_event(topic: str, value: bytes) -> Any:
    return SimpleNamespace(message=SimpleNamespace(topic=topic), value=value, key=b"k")


def test_a_mixed_batch_decodes_in_order_and_garbage_is_counted_not_raised() -> None:
    registry = CollectorRegistry()
    metrics = ServiceMetrics("console", registry)
    score = {"customer_id": "c_1", "message_id": "m", "event_time_ms": 1, "received_at_ms": 1, "churn_risk": 0.4,
             "purchase_propensity": 0.6, "segment": "s", "stage": "t", "model_version": "v"}
    merge = {"merge_id": "g", "survivor_id": "c_1", "merged_id": "c_2", "reason": "shared_identifier",
             "event_time_ms": 2}
    action = {"action_id": "a", "rule_id": "r", "customer_id": "c_1", "outcome": "held_out", "reason": "holdout",
              "endpoint": "marketing", "payload_json": "{}", "event_time_ms": 3, "received_at_ms": 3,
              "created_at_ms": 3}
    updates = updates_of([
        an_event(SCORES.name, avro.encode(SCORES.schema, score)),
        an_event(SCORES.name, b"not avro"),
        an_event(IDENTITY_MERGES.name, avro.encode(IDENTITY_MERGES.schema, merge)),
        an_event(ACTIONS.name, avro.encode(ACTIONS.schema, action)),
    ], metrics)
    assert [type(u) for u in updates] == [ScoreUpdated, CustomersMerged, ActionTaken]
    assert registry.get_sample_value("touchstream_console_events_in_total", {"topic": SCORES.name}) == 2
    assert registry.get_sample_value("touchstream_console_events_failed_total",
                                     {"reason": "scores undecodable"}) == 1
