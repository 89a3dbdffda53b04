"""`touchstream local up|down|status`: the whole pipeline on this machine, no Docker.

Starts the embedded broker (Apache Kafka, or the Tansu fallback) and Redis, creates the
topics, then the five services and a webhook receiver, each in its own process group, logs,
PIDs and the broker's and Redis's data under one run directory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from touchstream.embedded import (
    ManagedProcess,
    broker_client_env,
    create_topics,
    embedded_broker_kind,
    free_port,
    spawn,
    start_broker,
    start_valkey,
    stop_pid,
    stop_pids,
)
from touchstream.topics import topic_prefix as current_topic_prefix
from touchstream.topics import validate_topic_prefix
from touchstream.write_keys import hash_write_key

SERVICES = ("ingest", "identity", "scoring", "triggers", "console")
# Stream services scale by workers in one consumer group; ingest scales behind a load balancer.
STREAM_SERVICES = ("identity", "scoring", "triggers")
STATE_FILE = "state.json"
# Valkey's append-only file, and the receiver's record of what it got: both survive a
# restart of their process while the stack runs; `up` starts them empty.
REDIS_DATA_DIR = "redis-data"
KAFKA_DATA_DIR = "kafka-data"
RECEIVER_JOURNAL = "receiver-journal.jsonl"


@dataclass
class StackState:
    run_dir: str
    partitions: int
    ports: dict[str, int]
    pids: dict[str, int] = field(default_factory=dict)
    webhook_secret: str = ""
    write_key: str = ""
    env_overrides: dict[str, str] = field(default_factory=dict)
    broker: str = "kafka"
    # A broker (cluster) this stack did not start: its bootstrap list, and the topics' replication.
    external_bootstrap: str = ""
    replication_factor: int = 1
    # Begins the names of this stack's topics, consumer groups and Faust apps (TOUCHSTREAM_TOPIC_PREFIX):
    # stacks with different prefixes share a broker without reading each other's records.
    topic_prefix: str = ""

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def kafka_bootstrap(self) -> str:
        return self.external_bootstrap or f"127.0.0.1:{self.ports['broker']}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports['redis']}/0"

    def save(self) -> None:
        Path(self.run_dir, STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, run_dir: Path) -> StackState:
        path = run_dir / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"no stack recorded in {run_dir} (no {STATE_FILE}); run `touchstream local up`")
        return cls(**json.loads(path.read_text()))


def service_env(state: StackState, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment every service process gets: where the broker and Redis are, its port."""
    env = {
        "TOUCHSTREAM_KAFKA_BOOTSTRAP": state.kafka_bootstrap,
        "TOUCHSTREAM_REDIS_URL": state.redis_url,
        "TOUCHSTREAM_PARTITIONS": str(state.partitions),
        "TOUCHSTREAM_REPLICATION_FACTOR": str(state.replication_factor),
        "TOUCHSTREAM_STATE_DIR": str(Path(state.run_dir, "state")),
        "TOUCHSTREAM_INGEST_WEB_PORT": str(state.ports["ingest"]),
        "TOUCHSTREAM_INGEST_WRITE_KEYS": json.dumps({"local": hash_write_key(state.write_key)}),
        "TOUCHSTREAM_IDENTITY_WEB_PORT": str(state.ports["identity"]),
        "TOUCHSTREAM_SCORING_WEB_PORT": str(state.ports["scoring"]),
        "TOUCHSTREAM_TRIGGERS_WEB_PORT": str(state.ports["triggers"]),
        "TOUCHSTREAM_CONSOLE_WEB_PORT": str(state.ports["console"]),
        "TOUCHSTREAM_CONSOLE_SCORING_METRICS_URL": f"{state.url('scoring')}/metrics",
        "TOUCHSTREAM_CONSOLE_TRIGGERS_METRICS_URL": f"{state.url('triggers')}/metrics",
        "TOUCHSTREAM_CONSOLE_INGEST_METRICS_URL": f"{state.url('ingest')}/metrics",
        "TOUCHSTREAM_CONSOLE_IDENTITY_METRICS_URL": f"{state.url('identity')}/metrics",
        "TOUCHSTREAM_CONSOLE_IDENTITY_URL": state.url("identity"),
        "TOUCHSTREAM_TRIGGERS_ENDPOINTS": json.dumps(
            {"marketing": {"url": f"{state.url('receiver')}/hook", "secret": state.webhook_secret}}),
        # The demo receiver is on loopback, which the SSRF guard refuses unless allowed.
        "TOUCHSTREAM_TRIGGERS_ALLOW_NETWORKS": '["127.0.0.0/8"]',
        "TOUCHSTREAM_TOPIC_PREFIX": state.topic_prefix,
        "PYTHONUNBUFFERED": "1",
        **broker_client_env(state.broker),
    }
    env.update(extra or {})
    return env


def wait_ready(name: str, url: str, process: ManagedProcess | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(f"{name} exited with code {process.process.returncode}; see {process.log_path}")
        try:
            response = httpx.get(f"{url}/readyz", timeout=1.0)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise TimeoutError(f"{name} not ready after {timeout}s ({last}); see its log")


def worker_name(service: str, index: int) -> str:
    """Name of a service's index-th worker: the first keeps the service's name.

    >>> worker_name("scoring", 0), worker_name("scoring", 2)
    ('scoring', 'scoring-3')
    """
    return service if index == 0 else f"{service}-{index + 1}"


def up(run_dir: Path, partitions: int = 4, env_overrides: dict[str, str] | None = None,
       ready_timeout: float = 90.0, progress: bool = True, workers: int = 1, broker: str | None = None,
       kafka_bootstrap: str | None = None, replication_factor: int = 1,
       topic_prefix: str | None = None) -> StackState:
    """Start everything (`workers` processes per stream service) and return once every one answers ready.

    `broker`: kafka (the default, or TOUCHSTREAM_EMBEDDED_BROKER) or tansu. With `kafka_bootstrap`
    the stack uses that running broker or cluster instead of starting one (topics created with
    `replication_factor`). `topic_prefix` defaults to this process's TOUCHSTREAM_TOPIC_PREFIX.
    """
    run_dir = run_dir.resolve()
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if (run_dir / STATE_FILE).exists() and any(_alive(p) for p in StackState.load(run_dir).pids.values()):
        raise RuntimeError(f"a stack is already running from {run_dir}; run `touchstream local down` first")
    extra_workers = [worker_name(s, i) for s in STREAM_SERVICES for i in range(1, workers)]
    own_broker = ("broker",) if kafka_bootstrap is None else ()
    names = (*own_broker, "redis", "receiver", *SERVICES, *extra_workers)
    state = StackState(
        run_dir=str(run_dir), partitions=partitions, ports={n: free_port() for n in names},
        webhook_secret="whsec_" + base64.b64encode(secrets.token_bytes(24)).decode(),
        write_key="local-" + secrets.token_hex(12), broker=embedded_broker_kind(broker),
        external_bootstrap=kafka_bootstrap or "", replication_factor=replication_factor,
        topic_prefix=validate_topic_prefix(topic_prefix) if topic_prefix is not None else current_topic_prefix(),
    )
    say = print if progress else (lambda *_a, **_k: None)
    started: list[ManagedProcess] = []
    try:
        t0 = time.monotonic()
        # Every `up` starts from empty: broker, Redis and receiver together, so no state in
        # one describes records the others never had. A restart of one component (`start`)
        # keeps its data.
        for data_dir in (KAFKA_DATA_DIR, REDIS_DATA_DIR):
            shutil.rmtree(run_dir / data_dir, ignore_errors=True)
        (run_dir / RECEIVER_JOURNAL).unlink(missing_ok=True)
        if own_broker:
            started.append(start_broker(state.broker, state.ports["broker"], run_dir / KAFKA_DATA_DIR,
                                        logs / "broker.log"))
        started.append(start_valkey(state.ports["redis"], logs / "redis.log", run_dir / REDIS_DATA_DIR))
        asyncio.run(create_topics(state.kafka_bootstrap, partitions, replication_factor=replication_factor,
                                  topic_prefix=state.topic_prefix))
        say(f"broker ({state.broker if own_broker else 'external'}) {state.kafka_bootstrap} and redis "
            f":{state.ports['redis']} up, topics created ({time.monotonic() - t0:.1f}s)")
        state.env_overrides = dict(env_overrides or {})
        for name in ("receiver", *SERVICES, *extra_workers):
            started.append(spawn_component(state, name))
        state.pids = {p.name: p.pid for p in started}
        state.save()
        for proc in started[len(own_broker) + 1:]:
            wait_ready(proc.name, state.url(proc.name), proc, ready_timeout)
            say(f"{proc.name:9s} ready on {state.url(proc.name)} ({time.monotonic() - t0:.1f}s)")
    except BaseException:
        for proc in reversed(started):
            proc.stop()
        raise
    return state


def spawn_component(state: StackState, name: str) -> ManagedProcess:
    """Start the receiver, a service, or a service's extra worker (`scoring-2`) of `state`'s stack.

    `broker` and `redis` restart the embedded broker and Valkey on their old ports and data
    (Kafka's log directory, Valkey's append-only file; the Tansu fallback comes back empty).
    """
    python = sys.executable
    log = Path(state.run_dir, "logs", f"{name}.log")
    if name == "broker":
        process = start_broker(state.broker, state.ports["broker"], Path(state.run_dir, KAFKA_DATA_DIR), log)
        # Only the Tansu fallback lost them.
        asyncio.run(create_topics(state.kafka_bootstrap, state.partitions, topic_prefix=state.topic_prefix))
        return process
    if name == "redis":
        return start_valkey(state.ports["redis"], log, Path(state.run_dir, REDIS_DATA_DIR))
    env = service_env(state, state.env_overrides)
    if name == "receiver":
        argv = [python, "-m", "touchstream_cli", "receiver", "--port", str(state.ports["receiver"]),
                "--secret", state.webhook_secret, "--journal", str(Path(state.run_dir, RECEIVER_JOURNAL))]
        return spawn(name, argv, log, env)
    service = name if name in SERVICES else name.rsplit("-", 1)[0]
    if service not in SERVICES:
        raise ValueError(f"unknown component {name!r}")
    if name != service:
        env[f"TOUCHSTREAM_{service.upper()}_WEB_PORT"] = str(state.ports[name])
    return spawn(name, [python, "-m", f"services.{service}"], log, env)


def kill_and_restart(run_dir: Path, name: str, ready_timeout: float = 90.0) -> int:
    """SIGKILL one component (no chance to commit or flush), start it again as a supervisor would.

    Returns the new PID once the component answers ready.
    """
    kill(run_dir, name)
    return start(run_dir, name, ready_timeout)


def kill(run_dir: Path, name: str) -> None:
    """SIGKILL one component of the stack in `run_dir` and wait until it is gone."""
    state = StackState.load(run_dir.resolve())
    with contextlib.suppress(ProcessLookupError):
        os.killpg(state.pids[name], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(state.pids[name]) and time.monotonic() < deadline:
        time.sleep(0.02)


def start(run_dir: Path, name: str, ready_timeout: float = 90.0) -> int:
    """Start one (stopped) component of the stack again on its port; return its PID once it is ready."""
    return start_components(run_dir, [name], ready_timeout)[name]


def stop_components(run_dir: Path, names: Sequence[str]) -> None:
    """Stop components of the stack in `run_dir` in an orderly way (SIGTERM, all at once) and wait until they are gone.

    Stream workers leave their consumer groups as they stop, so the group is theirs to hand over at
    once, rather than after the session timeout a killed member leaves behind.
    """
    state = StackState.load(run_dir.resolve())
    stop_pids([state.pids[name] for name in names])


def start_components(run_dir: Path, names: Sequence[str], ready_timeout: float = 90.0) -> dict[str, int]:
    """Start stopped components at once, each on its port; return their PIDs once all are ready."""
    state = StackState.load(run_dir.resolve())
    running = [f"{name} (pid {state.pids[name]})" for name in names if _alive(state.pids.get(name, 0))]
    if running:
        raise RuntimeError(f"still running: {', '.join(running)}")
    processes = {name: spawn_component(state, name) for name in names}
    state.pids.update({name: process.pid for name, process in processes.items()})
    state.save()
    for name, process in processes.items():
        if name not in ("broker", "redis"):  # those two are up once their port answers
            wait_ready(name, state.url(name), process, ready_timeout)
    return {name: process.pid for name, process in processes.items()}


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of this process stays a zombie until reaped; it is gone all the same.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def down(run_dir: Path) -> list[str]:
    """Stop every process the stack in `run_dir` started, services first; return their names.

    The services and the receiver stop together (each only needs the broker and Redis while it
    stops), then Redis, then the broker.
    """
    state = StackState.load(run_dir.resolve())
    running = [name for name in reversed(list(state.pids)) if _alive(state.pids[name])]
    infrastructure = ("redis", "broker")
    stop_pids([state.pids[name] for name in running if name not in infrastructure], timeout=15.0)
    for name in infrastructure:
        if name in running:
            stop_pid(state.pids[name], timeout=15.0)
    state.pids = {}
    state.save()
    return running


def status(run_dir: Path) -> dict[str, str]:
    """Return each component's state: ready, running (not ready), or stopped."""
    state = StackState.load(run_dir.resolve())
    result = {}
    for name, pid in state.pids.items():
        if not _alive(pid):
            result[name] = "stopped"
        elif name in ("broker", "redis"):
            result[name] = f"running (pid {pid}, port {state.ports[name]})"
        else:
            try:
                ok = httpx.get(f"{state.url(name)}/readyz", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                ok = False
            result[name] = f"{'ready' if ok else 'running, not ready'} (pid {pid}, {state.url(name)})"
    return result
