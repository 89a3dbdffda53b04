"""Fixtures: one real Apache Kafka broker per test process, a real Valkey per test, on free loopback ports.

Tests get fresh state from factories (a Valkey server of their own, a fresh topic prefix)
rather than sharing mutable state.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.stacks import ARTIFACTS
from touchstream.embedded import (
    ManagedProcess,
    broker_client_env,
    create_topics,
    embedded_broker_kind,
    free_port,
    spawn_valkey,
    start_broker,
    wait_for_port,
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


class ValkeyPerTest:
    """Hands out a Valkey server of its own to each test (or module), started while the previous test ran.

    A server per test is the isolation: nothing another test wrote or left running can reach it,
    whatever keys a service uses (identity's matching model is process-wide, not per customer).
    Starting one costs ~4 ms of CPU but ~40 ms of waiting until it listens, so the next is spawned
    as soon as one is taken and is ready by the time the next test asks. Returned servers are
    killed at once: they hold nothing to persist.
    """

    def __init__(self, log_path: Path) -> None:
        self._log_path = log_path
        self._spare = self._spawn()

    def _spawn(self) -> ManagedProcess:
        return spawn_valkey(free_port(), self._log_path)

    def take(self) -> ManagedProcess:
        server, self._spare = self._spare, self._spawn()
        try:
            wait_for_port(server.port, process=server)
        except RuntimeError:
            # Its port was taken between free_port and the bind: one more try on another port.
            server = self._spawn()
            wait_for_port(server.port, process=server)
        return server

    @staticmethod
    def give_back(server: ManagedProcess) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.process.wait()

    def close(self) -> None:
        self.give_back(self._spare)


@pytest.fixture(scope="session")
def valkey_servers(artifacts_dir: Path) -> Iterator[ValkeyPerTest]:
    servers = ValkeyPerTest(artifacts_dir / "valkey.log")
    yield servers
    servers.close()


@pytest.fixture
def redis_server(valkey_servers: ValkeyPerTest) -> Iterator[ManagedProcess]:
    """A Valkey server for this test alone, empty, killed when the test ends."""
    server = valkey_servers.take()
    yield server
    valkey_servers.give_back(server)


@pytest.fixture(scope="module")
def module_redis_server(valkey_servers: ValkeyPerTest) -> Iterator[ManagedProcess]:
    """A Valkey server for the fixtures of one module (a client or console kept across its tests)."""
    server = valkey_servers.take()
    yield server
    valkey_servers.give_back(server)


@pytest.fixture
def redis_url(redis_server: ManagedProcess) -> str:
    """A Redis URL on a server of the test's own (see ValkeyPerTest)."""
    return f"redis://127.0.0.1:{redis_server.port}/0"


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


def fresh_topics(kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Set a fresh TOUCHSTREAM_TOPIC_PREFIX and create the catalogue's topics under it (2 partitions)."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    monkeypatch.setenv(TOPIC_PREFIX_SETTING, prefix)
    asyncio.run(create_topics(kafka_bootstrap, 2))
    return prefix


@pytest.fixture
def topic_prefix(kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh TOUCHSTREAM_TOPIC_PREFIX for the test, its topics created (see all_topics); returns the prefix."""
    return fresh_topics(kafka_bootstrap, monkeypatch)


@pytest.fixture
def all_topics(kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The catalogue's topics, the test's own: created under a fresh prefix (2 partitions); returns the bootstrap.

    Services, kernels and clients the test builds (and processes it starts, which inherit the
    environment) then use their own topics, consumer groups and Faust apps on the process's broker:
    nothing another test sent, no offsets another test's workers committed (~0.1 s per test).
    """
    fresh_topics(kafka_bootstrap, monkeypatch)
    return kafka_bootstrap
