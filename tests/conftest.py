"""Session fixtures: one real Apache Kafka broker and one real Valkey per test session, on free loopback ports.

Tests get fresh state from factories (a fresh Redis database index, unique topic names)
rather than sharing mutable state.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from tests.stacks import ARTIFACTS
from touchstream.embedded import (
    ManagedProcess,
    broker_client_env,
    create_topics,
    embedded_broker_kind,
    free_port,
    start_broker,
    start_valkey,
)
from touchstream.topics import TOPIC_PREFIX_SETTING


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where a test keeps logs for CI: test-artifacts/<pytest-xdist worker>/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def broker(artifacts_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """The embedded broker (Apache Kafka unless TOUCHSTREAM_EMBEDDED_BROKER says tansu)."""
    kind = embedded_broker_kind()
    # Services and clients built by the tests read their settings from the environment.
    os.environ.update(broker_client_env(kind))
    proc = start_broker(kind, free_port(), tmp_path_factory.mktemp("kafka"), artifacts_dir / f"{kind}.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(broker: ManagedProcess) -> str:
    return f"127.0.0.1:{broker.port}"


@pytest.fixture(scope="session")
def redis_server(artifacts_dir: Path) -> Iterator[ManagedProcess]:
    proc = start_valkey(free_port(), artifacts_dir / "valkey.log")
    yield proc
    proc.stop()


_db_numbers = itertools.count(1)


@pytest.fixture
def redis_url(redis_server: ManagedProcess) -> str:
    """A Redis URL on an empty database: the next of the server's 16, emptied before the test gets it.

    Tests of one process run one after another and stop their workers before the next starts, so
    emptying the database at the start is enough: no test sees keys another left (services keep
    process-wide keys too, such as identity's matching model, that unique ids would not separate).
    """
    db = next(_db_numbers) % 16
    with redis.Redis(port=redis_server.port, db=db) as client:
        client.flushdb()
    return f"redis://127.0.0.1:{redis_server.port}/{db}"


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


@pytest.fixture
def topic_prefix(kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh TOUCHSTREAM_TOPIC_PREFIX, set for the test, with the catalogue's topics created under it (2 partitions).

    Services, kernels and clients the test builds (and processes it starts) then use their own
    topics, consumer groups and Faust apps on the session broker: nothing another test sent.
    """
    prefix = f"t{uuid.uuid4().hex[:10]}."
    monkeypatch.setenv(TOPIC_PREFIX_SETTING, prefix)
    asyncio.run(create_topics(kafka_bootstrap, 2))
    return prefix


@pytest.fixture(scope="session")
def all_topics(kafka_bootstrap: str) -> str:
    """The catalogue's topics, created on the session broker with 2 partitions."""
    asyncio.run(create_topics(kafka_bootstrap, 2))
    return kafka_bootstrap
