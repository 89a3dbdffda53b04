"""Every service's live /metrics passes `promtool check metrics` and carries no personal data in labels.

Starts the whole stack as `touchstream local up` does (separate processes, real Tansu and
Valkey), sends events carrying a clear e-mail, phone and user id through ingest with a rule
that fires on a fresh model, waits until the webhook arrives (so every stage has counted
something, deliveries and latency histograms included), then scrapes each service.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.stacks import running_stack
from touchstream.topics import SCORES, TOUCHPOINTS_RAW, TOUCHPOINTS_RESOLVED
from touchstream_cli import local

pytestmark = pytest.mark.integration

# Fires on the first score of a fresh model (churn risk 0.25), like tests/e2e/test_pipeline.py.
RULES = """
rules:
  - id: ops-metrics
    when:
      score: churn_risk
      crosses_above: 0.1
      rearm_below: 0.05
    action:
      endpoint: marketing
      template:
        kind: retention_offer
    cooldown_hours: 24
    holdout_percent: 0
"""

# promtool findings already reported to the owning service (exact promtool lines); anything
# else fails the test. Remove an entry once its service is fixed.
KNOWN_PROBLEMS: dict[str, set[str]] = {}

SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? ')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: `make test` installs it (Debian package prometheus)")
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str) -> Iterator[local.StackState]:
    # TOUCHSTREAM_<SERVICE>_WEB_HOST is how docker-compose.yml and deploy/k8s make every service's
    # pages reachable from outside the container; the stack here runs with it to prove that it
    # takes effect, and with Faust's own WEB_BIND set otherwise to prove that one is ignored.
    env = {f"TOUCHSTREAM_{s.upper()}_WEB_HOST": "0.0.0.0" for s in local.SERVICES} | {"WEB_BIND": "127.0.0.1"}
    with running_stack(tmp_path_factory.mktemp("ops-stack"), RULES, "ops-logs", env,
                       shared_broker=kafka_bootstrap) as state:
        yield state


@pytest.fixture(scope="module")
def personal_data(stack: local.StackState) -> list[str]:
    """Send events through ingest; return the clear identifiers they carried once the webhooks arrived."""
    tag = uuid.uuid4().hex[:8]
    sent: list[str] = []
    for i in range(3):
        user, email, phone = f"ops-user-{tag}-{i}", f"ops.{tag}.{i}@example.com", f"+1415555{i:04d}"
        sent += [user, email, phone, phone.lstrip("+")]
        response = httpx.post(f"{stack.url('ingest')}/v1/track", auth=(stack.write_key, ""), timeout=10, json={
            "userId": user, "event": "Order Completed", "messageId": f"ops-{tag}-{i}", "email": email,
            "phone": phone, "timestamp": "2026-11-01T10:00:00Z", "order": {"amount": 42.0, "currency": "EUR"},
        })
        assert response.status_code == 200, response.text
    # A refused event makes ingest count a rejection by field.
    refused = httpx.post(f"{stack.url('ingest')}/v1/track", auth=(stack.write_key, ""), timeout=10,
                         json={"userId": f"ops-bad-{tag}", "messageId": f"ops-bad-{tag}"})
    assert refused.status_code == 400, refused.text
    sent.append(f"ops-bad-{tag}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if len(httpx.get(f"{stack.url('receiver')}/deliveries", timeout=5).json()) >= 3:
            return sent
        time.sleep(0.3)
    raise AssertionError("the webhooks did not arrive within 60 s; the pipeline is not flowing")


def listening_addresses(port: int) -> set[str]:
    """Return the local IPv4 addresses with a TCP socket listening on `port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local_address, state = line.split()[1], line.split()[3]
        address, port_hex = local_address.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found


def scrape(stack: local.StackState, service: str) -> str:
    response = httpx.get(f"{stack.url(service)}/metrics", timeout=10)
    assert response.status_code == 200
    return response.text


@pytest.mark.parametrize("service", local.SERVICES)
def test_live_metrics_pass_promtool(
    stack: local.StackState, personal_data: list[str], promtool: str, service: str
) -> None:
    body = scrape(stack, service)
    assert f"touchstream_{service}_up_info 1.0" in body
    checked = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30)
    problems = {line.strip() for line in (checked.stdout + checked.stderr).splitlines() if line.strip()}
    unexpected = problems - KNOWN_PROBLEMS.get(service, set())
    assert not unexpected, f"promtool check metrics on {service}:\n" + "\n".join(sorted(unexpected))


@pytest.mark.parametrize("service", local.SERVICES)
def test_no_label_value_carries_personal_data(
    stack: local.StackState, personal_data: list[str], service: str
) -> None:
    body = scrape(stack, service)
    values = [value for line in body.splitlines() if (m := SAMPLE.match(line)) and m["labels"]
              for _name, value in LABEL.findall(m["labels"])]
    assert values, f"{service} exposes no labelled samples; the events did not reach it"
    leaks = sorted({v for v in values for pii in personal_data if pii in v})
    assert not leaks, f"{service} label values contain identifiers that were sent: {leaks}"
    # Anything shaped like an e-mail or a phone number is personal data whatever its origin.
    shaped = [v for v in values if re.search(r"[^@\s]+@[^@\s]+\.\w+|\+?\d{9,}", v)]
    assert not shaped, f"{service} label values look like e-mails or phone numbers: {shaped}"


def test_counters_saw_the_events(stack: local.StackState, personal_data: list[str]) -> None:
    """The scrape above is not of an idle stack: each stage counted the events."""
    expected = {
        "ingest": f'touchstream_ingest_events_out_total{{topic="{TOUCHPOINTS_RAW.name}"}} 3.0',
        "identity": f'touchstream_identity_events_in_total{{topic="{TOUCHPOINTS_RAW.name}"}} 3.0',
        "scoring": f'touchstream_scoring_events_in_total{{topic="{TOUCHPOINTS_RESOLVED.name}"}} 3.0',
        "triggers": f'touchstream_triggers_events_in_total{{topic="{SCORES.name}"}} 3.0',
    }
    for service, line in expected.items():
        assert line in scrape(stack, service).splitlines(), (service, line)
    triggers = scrape(stack, "triggers")
    assert re.search(r'touchstream_triggers_deliveries_total\{[^}]*result="succeeded"[^}]*\} 3\.0', triggers)



@pytest.mark.parametrize("service", local.SERVICES)
def test_web_host_opens_the_pages_on_every_interface(stack: local.StackState, service: str) -> None:
    """Every service's TOUCHSTREAM_<SERVICE>_WEB_HOST is what compose and k8s set; Faust's WEB_BIND is not read."""
    assert listening_addresses(stack.ports[service]) == {"0.0.0.0"}
