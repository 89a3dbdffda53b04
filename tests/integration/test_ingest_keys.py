"""Write keys and rate limits live in Redis, so two ingest workers agree at once."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from starlette.testclient import TestClient

from services.ingest.app import build_app
from services.ingest.keys import KEYS_HASH, WriteKeyStore
from services.ingest.settings import IngestSettings, hash_write_key
from touchstream.settings import CoreSettings
from touchstream_cli.cli import main as cli_main

pytestmark = pytest.mark.integration
BOOTSTRAP_KEY = "bootstrap-key"
EVENT = {"type": "track", "event": "Viewed", "userId": "u1"}


def two_workers(all_topics: str, redis_url: str, **settings: object) -> tuple[TestClient, TestClient]:
    core = CoreSettings(kafka_bootstrap=all_topics, redis_url=redis_url, partitions=2)
    config = IngestSettings(write_keys={"pos": hash_write_key(BOOTSTRAP_KEY)}, **settings)  # type: ignore[arg-type]
    return TestClient(build_app(core, config)), TestClient(build_app(core, config))


@pytest.fixture
def workers(all_topics: str, redis_url: str, redis_client: aioredis.Redis) -> Iterator[tuple[TestClient, TestClient]]:
    first, second = two_workers(all_topics, redis_url)
    with first, second:
        yield first, second


def test_cli_key_is_stored_hashed_and_revoked_on_every_worker_at_once(
    workers: tuple[TestClient, TestClient], redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = workers
    assert cli_main(["keys", "add", "shop", "--redis-url", redis_url]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("tsk_")
    stored = first.portal.call(lambda: _hgetall(redis_url))  # type: ignore[union-attr]
    assert stored == {hash_write_key(key): "shop"}, "only the hash is stored"
    assert key not in str(stored)

    for worker in (first, second):
        assert worker.post("/v1/batch", auth=(key, ""), json={"batch": [EVENT]}).status_code == 200
    assert cli_main(["keys", "revoke", "shop", "--redis-url", redis_url]) == 0
    for worker in (first, second):
        refused = worker.post("/v1/batch", auth=(key, ""), json={"batch": [EVENT]})
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Basic")
    assert cli_main(["keys", "list", "--redis-url", redis_url]) == 0
    assert "shop\trevoked" in capsys.readouterr().out
    assert cli_main(["keys", "add", "shop", "--redis-url", redis_url]) == 0
    rotated = capsys.readouterr().out.strip()
    assert second.post("/v1/track", auth=(rotated, ""), json=EVENT).status_code == 200


def test_revoking_a_source_refuses_its_bootstrap_key_too(workers: tuple[TestClient, TestClient],
                                                        redis_url: str) -> None:
    first, second = workers
    assert first.post("/v1/track", auth=(BOOTSTRAP_KEY, ""), json=EVENT).status_code == 200
    new_key = first.portal.call(lambda: _revoke_and_add(redis_url, "pos"))  # type: ignore[union-attr]
    assert second.post("/v1/track", auth=(BOOTSTRAP_KEY, ""), json=EVENT).status_code == 401
    assert first.post("/v1/track", json={**EVENT, "writeKey": BOOTSTRAP_KEY}).status_code == 401
    # A key added after the revocation works: revoke, then hand out a new key, is how keys rotate.
    assert second.post("/v1/track", auth=(new_key, ""), json=EVENT).status_code == 200


def test_rate_limit_holds_across_workers_with_retry_after(all_topics: str, redis_url: str,
                                                          redis_client: aioredis.Redis) -> None:
    # 1 event/s with bursts of 4: the margins below are seconds, so a slow machine does not flake.
    first, second = two_workers(all_topics, redis_url, rate_limit_events_per_s=1.0, rate_limit_burst_events=4)
    with first, second:
        auth = (BOOTSTRAP_KEY, "")
        assert first.post("/v1/batch", auth=auth, json={"batch": [EVENT] * 3}).status_code == 200
        assert second.post("/v1/track", auth=auth, json=EVENT).status_code == 200
        limited = second.post("/v1/batch", auth=auth, json={"batch": [EVENT] * 2})
        assert limited.status_code == 429, limited.text
        wait = int(limited.headers["Retry-After"])
        assert 1 <= wait <= 2 and limited.json()["retry"] is True and limited.json()["code"] == "rate_limited"
        assert first.post("/v1/batch", auth=auth, json={"batch": [EVENT] * 3}).status_code == 429
        time.sleep(wait)
        assert first.post("/v1/batch", auth=auth, json={"batch": [EVENT] * 2}).status_code == 200
        # A request bigger than the burst is not refused forever: it costs a full burst.
        time.sleep(4.1)
        assert second.post("/v1/batch", auth=auth, json={"batch": [EVENT] * 6}).status_code == 200
        metrics = first.get("/metrics").text + second.get("/metrics").text
        assert 'touchstream_ingest_events_rate_limited_total{source="pos"}' in metrics


def test_per_source_rate_override(all_topics: str, redis_url: str, redis_client: aioredis.Redis) -> None:
    first, second = two_workers(all_topics, redis_url, rate_limit_events_per_s=1.0, rate_limit_burst_events=1,
                                rate_limits={"pos": 1000.0})
    with first, second:
        for worker in (first, second, first):
            assert worker.post("/v1/batch", auth=(BOOTSTRAP_KEY, ""), json={"batch": [EVENT] * 5}).status_code == 200


async def _hgetall(redis_url: str) -> dict[str, str]:
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        stored = await client.hgetall(KEYS_HASH)
        return {str(k): str(v) for k, v in stored.items()}
    finally:
        await client.aclose()


async def _revoke_and_add(redis_url: str, source: str) -> str:
    client = aioredis.from_url(redis_url)
    try:
        store = WriteKeyStore(client)
        await store.revoke(source)
        return await store.add(source)
    finally:
        await client.aclose()
