"""Ingest drops events carrying an erased customer's identifier (the suppression list identity writes)."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from starlette.testclient import TestClient

from services.ingest.app import build_app
from services.ingest.settings import IngestSettings, hash_write_key
from touchstream.identifiers import Identifier, normalise, pseudonymise
from touchstream.privacy import DEFAULT_SUPPRESSION_KEY, suppression_token
from touchstream.settings import CoreSettings

pytestmark = pytest.mark.integration
WRITE_KEY = "test-key"


@pytest.fixture
def core(all_topics: str, redis_url: str) -> CoreSettings:
    return CoreSettings(kafka_bootstrap=all_topics, redis_url=redis_url, partitions=2)


@pytest.fixture
def ingest(core: CoreSettings) -> Iterator[TestClient]:
    settings = IngestSettings(write_keys={"shop": hash_write_key(WRITE_KEY)}, suppression_refresh_s=0,
                              default_phone_region="CN")
    with TestClient(build_app(core, settings)) as client:
        yield client


async def suppress(url: str, *clear: Identifier, key: bytes, region: str = "CN") -> None:
    client = aioredis.from_url(url)
    try:
        await client.flushdb()
        tokens = [suppression_token(pseudonymise(normalise(i, region), key)) for i in clear]
        await client.sadd(DEFAULT_SUPPRESSION_KEY, *tokens)
        await client.incr(DEFAULT_SUPPRESSION_KEY + ":version")
    finally:
        await client.aclose()


def suppressed_total(ingest: TestClient) -> float:
    found = re.search(r"^touchstream_ingest_events_suppressed_total (\S+)$", ingest.get("/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def test_events_with_a_suppressed_identifier_are_dropped_and_counted(ingest: TestClient, core: CoreSettings) -> None:
    run = uuid.uuid4().hex[:8]
    key = core.pii_hash_key.get_secret_value().encode()
    asyncio.run(suppress(core.redis_url, Identifier("email", f"ann-{run}@example.com"),
                         Identifier("phone", "138 0013 8000"), key=key))
    batch = {"batch": [
        # Written differently from what was erased: normalised and hashed as identity does.
        {"type": "track", "event": "Viewed", "userId": f"u-{run}", "email": f" ANN-{run}@Example.com"},
        {"type": "identify", "userId": f"v-{run}", "traits": {"phone": "+86 138 0013 8000"}},
        {"type": "track", "event": "Viewed", "userId": f"bob-{run}", "email": f"bob-{run}@example.com"},
    ]}
    response = ingest.post("/v1/batch", json=batch, auth=(WRITE_KEY, ""))
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True, "accepted": 1, "duplicates": 0, "suppressed": 2}
    assert suppressed_total(ingest) == 2
    only = ingest.post("/v1/track", auth=(WRITE_KEY, ""),
                       json={"event": "Viewed", "email": f"ann-{run}@example.com"})
    assert only.json() == {"success": True, "accepted": 0, "duplicates": 0, "suppressed": 1}
    # The metrics page names no identifier, clear or hashed.
    assert run not in ingest.get("/metrics").text
