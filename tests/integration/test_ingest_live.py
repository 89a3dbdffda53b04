"""A live ingest server (`python -m services.ingest`, real Tansu and Valkey) driven by the official
Segment and RudderStack Python SDKs, and fuzzed with schemathesis against schemas/openapi.yaml."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from aiokafka import AIOKafkaConsumer, TopicPartition
from hypothesis import strategies as st
from rudderstack.analytics.client import Client as RudderClient
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from segment.analytics.client import Client as SegmentClient

from tests.stacks import running_ingest_for
from touchstream import avro
from touchstream.topics import TOUCHPOINTS_RAW

pytestmark = pytest.mark.integration
WRITE_KEY = "live-test-key"


@pytest.fixture
def live_ingest(all_topics: str, redis_url: str, artifacts_dir: Path) -> Iterator[str]:
    """Run `python -m services.ingest` on a free port; yield its base URL."""
    with running_ingest_for(all_topics, redis_url, {"sdk": WRITE_KEY}, artifacts_dir / "ingest-live.log") as url:
        yield url


async def raw_events(bootstrap: str, message_ids: set[str], wait_s: float = 15.0) -> dict[str, dict[str, Any]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    found: dict[str, dict[str, Any]] = {}
    try:
        partitions = [TopicPartition(TOUCHPOINTS_RAW.name, p) for p in range(2)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and len(found) < len(message_ids):
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    try:
                        event = avro.decode(TOUCHPOINTS_RAW.schema, record.value)
                    except avro.DecodeError:  # other tests put garbage on the shared topic on purpose
                        continue
                    if event["message_id"] in message_ids:
                        found[event["message_id"]] = event
    finally:
        await consumer.stop()
    return found


SDKS: dict[str, Callable[..., Any]] = {"segment": SegmentClient, "rudderstack": RudderClient}


@pytest.mark.parametrize("sdk", sorted(SDKS))
def test_official_sdk_calls_arrive_on_the_raw_topic(live_ingest: str, all_topics: str, sdk: str) -> None:
    errors: list[Any] = []
    client = SDKS[sdk](write_key=WRITE_KEY, host=live_ingest, gzip=True, max_retries=1,
                       on_error=lambda error, batch: errors.append(error))
    run = uuid.uuid4().hex[:8]
    ids = {kind: f"{sdk}-{run}-{kind}" for kind in ("track", "identify", "page", "screen", "group", "alias")}
    user = f"user-{run}"
    when = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    client.track(user, "Order Completed", {"total": 42.5, "currency": "EUR", "order_id": f"o-{run}"},
                 timestamp=when, message_id=ids["track"])
    client.identify(user, {"email": f"ann.{run}@example.org", "name": "Ann"}, message_id=ids["identify"])
    client.page(user, "Docs", "Pricing", {"url": "https://example.org/pricing"}, message_id=ids["page"])
    client.screen(user, "App", "Cart", message_id=ids["screen"])
    client.group(user, f"acme-{run}", {"plan": "gold"}, message_id=ids["group"])
    client.alias(f"anon-{run}", user, message_id=ids["alias"])
    client.flush()
    client.join()
    assert errors == []

    events = asyncio.run(raw_events(all_topics, set(ids.values())))
    assert set(events) == set(ids.values())
    for kind, message_id in ids.items():
        event = events[message_id]
        assert event["type"] == kind and event["source"] == "sdk"
        assert {"type": "user_id", "value": user} in event["identifiers"]
        context = json.loads(event["properties_json"])["context"]
        assert context["library"]["name"] == "analytics-python"
    track = events[ids["track"]]
    assert track["event"] == "Order Completed"
    assert track["order"]["amount"] == 42.5 and track["order"]["currency"] == "EUR"
    # Clock-skew correction moves the event by the send delay only (same clock here): well under a minute.
    assert abs(track["timestamp_ms"] - int(when.timestamp() * 1000)) < 60_000
    assert {"type": "email", "value": f"ann.{run}@example.org"} in events[ids["identify"]]["identifiers"]
    assert events[ids["page"]]["event"] == "Pricing" and events[ids["screen"]]["event"] == "Cart"
    assert json.loads(events[ids["group"]]["properties_json"])["groupId"] == f"acme-{run}"
    assert {"type": "user_id", "value": f"anon-{run}"} in events[ids["alias"]]["identifiers"]


@pytest.mark.parametrize("sdk", sorted(SDKS))
def test_spec_event_names_from_the_sdks_arrive_with_their_meaning(live_ingest: str, all_topics: str, sdk: str) -> None:
    errors: list[Any] = []
    client = SDKS[sdk](write_key=WRITE_KEY, host=live_ingest, max_retries=1,
                       on_error=lambda error, batch: errors.append(error))
    run = uuid.uuid4().hex[:8]
    user = f"user-{run}"
    calls = {
        "complaint": ("Complaint Submitted", {"text": "Parcel broken", "rating": 1}),
        "feedback": ("Product Reviewed", {"review_body": "meh", "rating": "2"}),  # the spec's rating is text
        "refund": ("order_refunded", {"order_id": "o-1", "total": 30, "currency": "EUR"}),
        "unsubscribe": ("Unsubscribed", {"email_id": "e-1"}),
    }
    for kind, (name, properties) in calls.items():
        client.track(user, name, properties, message_id=f"{sdk}-{run}-{kind}")
    client.flush()
    client.join()
    assert errors == []
    events = asyncio.run(raw_events(all_topics, {f"{sdk}-{run}-{kind}" for kind in calls}))
    meaning = {kind: events[f"{sdk}-{run}-{kind}"] for kind in calls}
    assert meaning["complaint"]["feedback"] == {"kind": "complaint", "text": "Parcel broken", "rating": 1}
    assert meaning["feedback"]["feedback"] == {"kind": "complaint", "text": "meh", "rating": 2}
    assert meaning["refund"]["order"]["amount"] == -30.0
    assert meaning["unsubscribe"]["consent"] == ["-email", "-marketing"]


@pytest.mark.parametrize("sdk", sorted(SDKS))
def test_sdks_see_a_400_as_final_not_as_a_reason_to_retry(live_ingest: str, sdk: str) -> None:
    errors: list[Any] = []
    client = SDKS[sdk](write_key=WRITE_KEY, host=live_ingest, max_retries=3,
                       on_error=lambda error, batch: errors.append(error))
    client.track("u-bad", "Order Completed", {"total": "not a number"})
    client.flush()
    client.join()
    [error] = errors
    assert (error.status, error.code) == (400, "invalid_request")
    assert "properties.total" in error.message
    metrics = httpx.get(f"{live_ingest}/metrics").text
    assert 'touchstream_ingest_requests_total{endpoint="batch",status="400"} 1.0' in metrics


def test_sdk_resend_is_deduplicated(live_ingest: str) -> None:
    client = SegmentClient(write_key=WRITE_KEY, host=live_ingest, sync_mode=True, max_retries=0)
    message_id = f"dup-{uuid.uuid4().hex}"
    for _ in range(2):
        client.track("u-dup", "Viewed", message_id=message_id)
    metrics = httpx.get(f"{live_ingest}/metrics").text
    assert "touchstream_ingest_events_duplicate_total 1.0" in metrics


# `make test` runs a fixed 40 examples per operation (~20 s); set TOUCHSTREAM_FUZZ_EXAMPLES for a longer,
# random run when changing the API.
FUZZ_EXAMPLES = int(os.environ.get("TOUCHSTREAM_FUZZ_EXAMPLES", "40"))
FUZZ_FIXED = "TOUCHSTREAM_FUZZ_EXAMPLES" not in os.environ
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def test_fuzzing_finds_no_server_error_and_no_response_outside_the_document(live_ingest: str) -> None:
    schema = schemathesis.openapi.from_url(f"{live_ingest}/openapi.json")
    auth = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    # schemathesis leaves out the operation serving the document it was loaded from.
    assert {o.label for o in operations} >= {"POST /v1/track", "POST /v1/batch", "POST /v1/{callType}", "GET /readyz"}
    for operation in operations:
        strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                             operation.as_strategy(GenerationMode.NEGATIVE))

        @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=FUZZ_FIXED,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=strategy)
        def fuzz(case: Any) -> None:
            case.call_and_validate(headers=auth, checks=CHECKS, timeout=10)

        fuzz()


def test_document_covers_every_route_and_status(live_ingest: str) -> None:
    document = httpx.get(f"{live_ingest}/openapi.json").json()
    paths = set(document["paths"])
    calls = {f"/v1/{kind}" for kind in ("track", "identify", "page", "screen", "group", "alias", "batch")}
    assert calls | {"/metrics", "/healthz", "/readyz", "/openapi.json"} <= paths
    for path in calls:
        assert set(document["paths"][path]["post"]["responses"]) == {"200", "400", "401", "413", "429", "503"}
    assert "404" in document["paths"]["/v1/{callType}"]["post"]["responses"]
