"""The console's handler: decoded records of the consumed topics become updates in arrival order; records it
cannot turn into an update are counted, not raised."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from services.console.app import updates_of
from services.console.quality import LatencyWindow
from services.console.readmodel import ActionTaken, CustomersMerged, ScoreUpdated
from touchstream import avro
from touchstream.metrics import ServiceMetrics
from touchstream.streams import Record
from touchstream.topics import ACTIONS, IDENTITY_MERGES, SCORES, TOUCHPOINTS_RESOLVED


def an_event(topic: str, value: dict[str, Any] | None) -> Record:
    return Record(topic, 0, 0, b"k", b"raw", value)


def test_a_mixed_batch_becomes_updates_in_order_and_unreadable_records_are_counted_not_raised() -> None:
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
        an_event(SCORES.name, score),
        an_event(SCORES.name, {"customer_id": "c_1"}),  # decodes (another schema version?) but lacks fields
        an_event(SCORES.name, None),  # a tombstone
        an_event(IDENTITY_MERGES.name, merge),
        an_event(ACTIONS.name, action),
    ], metrics)
    assert [type(u) for u in updates] == [ScoreUpdated, CustomersMerged, ActionTaken]
    assert registry.get_sample_value("touchstream_console_events_failed_total",
                                     {"reason": "scores unreadable"}) == 1


def test_each_record_notes_how_long_after_ingest_accepted_it_it_arrived() -> None:
    registry = CollectorRegistry()
    metrics = ServiceMetrics("console", registry)
    arrival_seconds = metrics.histogram("event_to_read_model", "test", ["topic"])
    arrivals = LatencyWindow()
    now_s = 1_700_000_010.0
    resolved = {"customer_id": "c_1", "resolved_at_ms": 1_700_000_000_600, "event": {
        "message_id": "m-1", "type": "track", "event": "Page Viewed", "channel": "web", "source": "s",
        "timestamp_ms": 1_700_000_000_000, "received_at_ms": 1_700_000_000_500,  # ingest accepted it then
        "identifiers": [{"type": "user_id", "value": "cd" * 32}], "order": None, "feedback": None, "consent": [],
        "properties_json": None}}
    score = {"customer_id": "c_1", "message_id": "m", "event_time_ms": 1, "received_at_ms": 1_700_000_009_000,
             "churn_risk": 0.4, "purchase_propensity": 0.6, "segment": "s", "stage": "t", "model_version": "v"}
    merge = {"merge_id": "g", "survivor_id": "c_1", "merged_id": "c_2", "reason": "shared_identifier",
             "event_time_ms": 2}
    updates_of([
        an_event(TOUCHPOINTS_RESOLVED.name, avro.decode(TOUCHPOINTS_RESOLVED.schema,
                                                        avro.encode(TOUCHPOINTS_RESOLVED.schema, resolved))),
        an_event(SCORES.name, score),
        an_event(IDENTITY_MERGES.name, merge),  # carries no received time
    ], metrics, arrivals, arrival_seconds, now_s=now_s)
    assert arrivals.quantiles(TOUCHPOINTS_RESOLVED.name, now_s) == (1, {0.5: 9.5, 0.95: 9.5, 0.99: 9.5})
    assert arrivals.quantiles(SCORES.name, now_s) == (1, {0.5: 1.0, 0.95: 1.0, 0.99: 1.0})
    assert arrivals.quantiles(IDENTITY_MERGES.name, now_s) is None
    assert registry.get_sample_value("touchstream_console_event_to_read_model_seconds_count",
                                     {"topic": SCORES.name}) == 1
