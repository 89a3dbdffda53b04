"""A messageId claim is provisional until the broker acknowledged its event (real broker and Valkey).

A fault between the claim and the ack (the produce fails and releasing the claim fails too; the
worker is killed with SIGKILL while it waits for the ack) must never turn the client's retry into
a `200` duplicate of an event the broker does not have: while the claim is provisional the retry is
answered `503` with `Retry-After`, and once it has expired the retry is produced, exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.testclient import TestClient

from services.ingest.admission import CLAIM_PREFIX, Admitter, claim_key, seen_prefix
from services.ingest.app import build_app
from services.ingest.service import IngestService
from services.ingest.settings import IngestSettings, hash_write_key
from tests.kafka_reading import collect
from tests.stacks import ingest_process
from touchstream.embedded import free_port
from touchstream.settings import CoreSettings
from touchstream.topics import TOUCHPOINTS_RAW

pytestmark = pytest.mark.integration
WRITE_KEY = "claims-key"
SOURCE = "shop"


def an_event() -> dict[str, Any]:
    return {"event": "Viewed", "userId": f"u-{uuid.uuid4().hex[:8]}", "messageId": f"m-{uuid.uuid4().hex}"}


def produced(bootstrap: str, message_id: str, wait_s: float = 10.0) -> int:
    """How many records with `message_id` are on touchpoints.raw (up to 2), once the answers are in: every
    produce ingest acknowledged (and no killed worker can produce any more) is below the end read first."""
    found = asyncio.run(collect(bootstrap, TOUCHPOINTS_RAW.name, TOUCHPOINTS_RAW.schema, 2,
                                lambda _key, r: r["message_id"] == message_id, wait_s=wait_s, stop_at_end=True))
    return len(found)


def retry_until_accepted(post: Callable[[], httpx.Response], within_s: float) -> list[int]:
    """Send the same request again, honouring Retry-After, until a 2xx; return every status seen."""
    statuses = []
    deadline = time.monotonic() + within_s
    while True:
        response = post()
        statuses.append(response.status_code)
        if response.status_code == 200:
            assert response.json() == {"success": True, "accepted": 1, "duplicates": 0, "suppressed": 0}
            return statuses
        assert response.status_code == 503, response.text
        assert response.json()["retry"] is True and "being accepted by another request" in response.json()["message"]
        assert time.monotonic() < deadline, f"still refused after {within_s} s: {statuses}"
        time.sleep(min(float(response.headers["Retry-After"]), 0.5))


@pytest.fixture
def settings() -> IngestSettings:
    # A claim is provisional for 1 + 1 s.
    return IngestSettings(write_keys={SOURCE: hash_write_key(WRITE_KEY)}, produce_timeout_s=1.0, claim_margin_s=1.0)


def test_a_failed_produce_whose_release_fails_too_leaves_the_retry_to_be_produced(
        all_topics: str, redis_url: str, settings: IngestSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    core = CoreSettings(kafka_bootstrap=all_topics, redis_url=redis_url, partitions=2)
    produce = IngestService._produce
    broker_down = {"now": True}

    async def flaky_produce(self: IngestService, encoded: Any) -> None:
        if broker_down["now"]:
            raise ConnectionError("broker unreachable")
        await produce(self, encoded)

    async def release_fails(self: Admitter, source: str, *args: Any) -> None:
        raise RedisConnectionError("Redis went away")

    monkeypatch.setattr(IngestService, "_produce", flaky_produce)
    monkeypatch.setattr(Admitter, "release", release_fails)
    event = an_event()
    with TestClient(build_app(core, settings)) as client:
        def post() -> httpx.Response:
            return client.post("/v1/track", auth=(WRITE_KEY, ""), json=event)

        first = post()
        assert first.status_code == 503 and first.headers["Retry-After"] == "1", first.text
        broker_down["now"] = False
        # The claim is still there (the release failed) but provisional: no "duplicate" answer.
        statuses = retry_until_accepted(post, within_s=10)
        assert statuses[0] == 503, statuses
        again = post()
        assert again.json() == {"success": True, "accepted": 0, "duplicates": 1, "suppressed": 0}
    assert produced(all_topics, event["messageId"]) == 1


def worker_settings(bootstrap: str, redis_url: str) -> dict[str, str]:
    return {
        "TOUCHSTREAM_KAFKA_BOOTSTRAP": bootstrap,
        "TOUCHSTREAM_REDIS_URL": redis_url,
        "TOUCHSTREAM_PARTITIONS": "2",
        "TOUCHSTREAM_INGEST_WEB_PORT": str(free_port()),
        "TOUCHSTREAM_INGEST_WRITE_KEYS": json.dumps({SOURCE: hash_write_key(WRITE_KEY)}),
        # A claim is provisional for 4 + 1 s; the stuck worker is killed long before its 4 s run out.
        "TOUCHSTREAM_INGEST_PRODUCE_TIMEOUT_S": "4",
        "TOUCHSTREAM_INGEST_CLAIM_MARGIN_S": "1",
    }


def test_a_worker_killed_between_the_claim_and_the_ack_leaves_the_retry_to_be_produced(
        all_topics: str, redis_url: str, artifacts_dir: Path) -> None:
    event = an_event()
    claim = claim_key(SOURCE, event["messageId"])
    answers: list[BaseException | int] = []
    store = redis.Redis.from_url(redis_url)
    try:
        with ingest_process(worker_settings(all_topics, redis_url), artifacts_dir / "ingest-stuck.log",
                            script=Path(__file__).with_name("stuck_ingest.py")) as (url, stuck):
            def first_try() -> None:
                try:
                    answers.append(httpx.post(f"{url}/v1/track", auth=(WRITE_KEY, ""), json=event,
                                              timeout=30).status_code)
                except httpx.HTTPError as exc:
                    answers.append(exc)

            sender = threading.Thread(target=first_try)
            sender.start()
            deadline = time.monotonic() + 3
            while not store.exists(claim):
                assert time.monotonic() < deadline, "the stuck worker never claimed the messageId"
                time.sleep(0.01)
            os.killpg(stuck.pid, signal.SIGKILL)
            stuck.process.wait(10)
            sender.join(10)
    finally:
        store.close()
    assert answers and not isinstance(answers[0], int), f"the first try got an answer: {answers}"

    with ingest_process(worker_settings(all_topics, redis_url), artifacts_dir / "ingest-after-kill.log") as (url, _):
        def post() -> httpx.Response:
            return httpx.post(f"{url}/v1/track", auth=(WRITE_KEY, ""), json=event, timeout=30)

        statuses = retry_until_accepted(post, within_s=15)
        assert statuses[0] == 503, statuses
    assert produced(all_topics, event["messageId"]) == 1


async def test_a_confirmed_messageid_is_a_duplicate_for_the_whole_ttl_kept_as_a_digest_not_a_key(
        redis_client: Any) -> None:
    # A TTL of 2 s: buckets of 1 s (BUCKETS_PER_TTL = 4 rounds up), so the window spans several buckets.
    admitter = Admitter(redis_client, dedupe_ttl_s=2, provisional_ttl_ms=5_000)
    ids = [f"m-{uuid.uuid4().hex}" for _ in range(300)]
    first = await admitter.admit(SOURCE, ids, 0.0, 1_000)
    assert first.allowed and all(first.fresh)
    await admitter.confirm(SOURCE, first.token, ids)
    # Final claims are digests in the bucket's sets: no key per messageId is left.
    assert [k async for k in redis_client.scan_iter(match=f"{CLAIM_PREFIX}*")] == []
    sets = [k async for k in redis_client.scan_iter(match=f"{seen_prefix(SOURCE)}*")]
    assert sum([await redis_client.scard(k) for k in sets]) == len(ids)
    assert {(await redis_client.object("encoding", k)) for k in sets} == {b"intset"}
    # Still a duplicate one bucket and more later, within the TTL ...
    await asyncio.sleep(1.5)
    again = await admitter.admit(SOURCE, [*ids, "m-new"], 0.0, 1_000)
    assert again.fresh == [False] * len(ids) + [True]
    await admitter.release(SOURCE, again.token, ["m-new"])
    # ... and new again once the TTL and its last bucket have passed (the sets expired whole).
    deadline = time.monotonic() + 10
    while [k async for k in redis_client.scan_iter(match=f"{seen_prefix(SOURCE)}*")]:
        assert time.monotonic() < deadline, "the remembered digests never expired"
        await asyncio.sleep(0.2)
    assert all((await admitter.admit(SOURCE, ids, 0.0, 1_000)).fresh)
