"""Start the whole local stack (or one service) for a test, and keep its logs."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from touchstream.embedded import ManagedProcess, free_port
from touchstream.metrics import consumer_lag_messages
from touchstream.replay import sum_metric
from touchstream.topics import TOPIC_PREFIX_SETTING
from touchstream_cli import local

REPO = Path(__file__).resolve().parent.parent
# One folder per pytest-xdist worker: each runs its own broker and Redis, whose logs would mix.
ARTIFACTS = REPO / "test-artifacts" / os.environ.get("PYTEST_XDIST_WORKER", "main")


@contextlib.contextmanager
def running_stack(run_dir: Path, rules_yaml: str, logs_name: str,
                  env_overrides: dict[str, str] | None = None, *, shared_broker: str | None = None,
                  **up_options: Any) -> Iterator[local.StackState]:
    """Run `local.up` with `rules_yaml` as the triggers' rule file; copy the logs to test-artifacts/`logs_name`.

    `shared_broker`: the test process's broker (the `kafka_bootstrap` fixture), used instead of
    starting one (a broker start and stop saved per stack). The stack then gets topics, consumer
    groups and Faust apps of its own under a fresh TOUCHSTREAM_TOPIC_PREFIX, set in this process
    too while the stack runs, so the test's own clients (`SCORES.name`, ...) read and write the
    stack's topics. A test that stops or restarts the broker needs a stack with its own.
    """
    if shared_broker is None:
        with _stack(run_dir, rules_yaml, logs_name, env_overrides, **up_options) as state:
            yield state
        return
    previous = os.environ.get(TOPIC_PREFIX_SETTING)
    os.environ[TOPIC_PREFIX_SETTING] = f"s{uuid.uuid4().hex[:10]}."
    try:
        with _stack(run_dir, rules_yaml, logs_name, env_overrides, kafka_bootstrap=shared_broker,
                    **up_options) as state:
            yield state
    finally:
        if previous is None:
            os.environ.pop(TOPIC_PREFIX_SETTING, None)
        else:
            os.environ[TOPIC_PREFIX_SETTING] = previous


@contextlib.contextmanager
def _stack(run_dir: Path, rules_yaml: str, logs_name: str, env_overrides: dict[str, str] | None,
           **up_options: Any) -> Iterator[local.StackState]:
    rules = run_dir / "rules.yaml"
    rules.write_text(rules_yaml)
    # Test events carry fixed dates that age with every day the suite exists: act on them however old
    # (the backfill horizon off) unless a test of the horizon sets it.
    env = {"TOUCHSTREAM_TRIGGERS_RULES_FILE": str(rules), "TOUCHSTREAM_TRIGGERS_BACKFILL_HORIZON_HOURS": "0",
           **(env_overrides or {})}
    state = local.up(run_dir, partitions=2, env_overrides=env, progress=False, **up_options)
    try:
        yield state
    finally:
        local.down(run_dir)
        # Kept for CI: the services' logs explain a failure.
        target = ARTIFACTS / logs_name
        target.mkdir(parents=True, exist_ok=True)
        for log in (run_dir / "logs").glob("*.log"):
            (target / log.name).write_bytes(log.read_bytes())


@contextlib.contextmanager
def running_ingest(settings: dict[str, str], log: Path, ready_within_s: float = 30.0) -> Iterator[str]:
    """Run `python -m services.ingest` with the TOUCHSTREAM_* `settings` (its port among them) until
    its /readyz answers 200; yield its base URL, and check it is still alive when the test is done."""
    with ingest_process(settings, log, ready_within_s) as (url, server):
        yield url
        assert server.alive(), f"ingest exited during the test; see {log}"


@contextlib.contextmanager
def running_ingest_for(bootstrap: str, redis_url: str, write_keys: dict[str, str], log: Path) -> Iterator[str]:
    """Run ingest on a free port for the sources in `write_keys` (source -> clear key), its rate limit out of the
    way, on 2 partitions; yield its base URL."""
    from services.ingest.settings import hash_write_key

    settings = {
        "TOUCHSTREAM_KAFKA_BOOTSTRAP": bootstrap,
        "TOUCHSTREAM_REDIS_URL": redis_url,
        "TOUCHSTREAM_PARTITIONS": "2",
        "TOUCHSTREAM_INGEST_PORT": str(free_port()),
        "TOUCHSTREAM_INGEST_WRITE_KEYS": json.dumps({s: hash_write_key(k) for s, k in write_keys.items()}),
        "TOUCHSTREAM_INGEST_RATE_LIMIT_EVENTS_PER_S": "100000",
    }
    with running_ingest(settings, log) as url:
        yield url


@contextlib.contextmanager
def ingest_process(settings: dict[str, str], log: Path, ready_within_s: float = 30.0,
                   script: Path | None = None) -> Iterator[tuple[str, ManagedProcess]]:
    """Run `python -m services.ingest` (or `python <script>`, an ingest built differently) with the
    TOUCHSTREAM_* `settings` until its /readyz answers 200; yield its base URL and process, stop it after."""
    port = settings.get("TOUCHSTREAM_INGEST_WEB_PORT") or settings["TOUCHSTREAM_INGEST_PORT"]
    env = {**os.environ, **settings, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, str(script)] if script is not None else [sys.executable, "-m", "services.ingest"]
    with log.open("ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, env=env, cwd=REPO)
    server = ManagedProcess("ingest", process)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_within_s
        while True:
            assert server.alive(), f"ingest exited; see {log}"
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"ingest was not ready after {ready_within_s:.0f} s"
            time.sleep(0.1)
        yield url, server
    finally:
        server.stop()


# The stages whose consumer lag says whether the pipeline is still working toward the receiver.
LAGGING_STAGES = ("identity", "scoring", "triggers")


def pipeline_lags(state: local.StackState) -> dict[str, float | None]:
    """Each stage's summed consumer lag from its own /metrics (None: it did not answer)."""
    lags: dict[str, float | None] = {}
    for stage in LAGGING_STAGES:
        try:
            text = httpx.get(f"{state.url(stage)}/metrics", timeout=10).text
        except httpx.HTTPError:
            lags[stage] = None
            continue
        lags[stage] = sum_metric(text, consumer_lag_messages(stage))
    return lags


def webhooks_received(state: local.StackState, count: int, timeout_s: float, poll_s: float = 1.0,
                      stalled_s: float | None = None) -> dict[str, Any]:
    """Poll the receiver's /stats until `count` distinct webhook-ids arrived, `timeout_s` passed, or (with
    `stalled_s`) the pipeline stood still that long; return the last stats, for the caller to assert on.

    Standing still means no new webhook AND no stage's consumer lag moved: a stage still working through a
    backlog (a CPU-starved scoring worker after an outage) is progress, not loss. The stats returned carry
    each stage's last lag (`lags`), so a failed count says where the missing events are.
    """
    deadline = time.monotonic() + timeout_s
    stats: dict[str, Any] = {}
    last: tuple[Any, ...] = ()
    last_change = time.monotonic()
    while time.monotonic() < deadline and (stalled_s is None or time.monotonic() - last_change < stalled_s):
        stats = httpx.get(f"{state.url('receiver')}/stats", timeout=10).json()
        if stats["unique"] >= count:
            break
        lags = pipeline_lags(state) if stalled_s is not None else {}
        stats["lags"] = lags
        progress = (stats["unique"], *lags.values())
        if progress != last:
            last, last_change = progress, time.monotonic()
        time.sleep(poll_s)
    return stats
