"""Delivery policy: status verdicts, backoff, endpoint settings."""

from __future__ import annotations

import base64
import json
from ipaddress import ip_network

import pytest
from pydantic import ValidationError

from services.triggers.settings import TriggersSettings, WebhookEndpoint
from services.triggers.webhooks import (
    RETRY_SCHEDULE_S,
    Circuit,
    CircuitBreaker,
    Verdict,
    next_retry_at,
    retry_after_s,
    verdict_for_status,
)
from touchstream.startup import configuration_problems

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.mark.parametrize(
    ("status", "verdict"),
    [(200, Verdict.DELIVERED), (204, Verdict.DELIVERED), (302, Verdict.RETRY), (408, Verdict.RETRY),
     (429, Verdict.RETRY), (500, Verdict.RETRY), (503, Verdict.RETRY), (400, Verdict.GIVE_UP),
     (401, Verdict.GIVE_UP), (404, Verdict.GIVE_UP), (410, Verdict.DISABLE), (307, Verdict.RETRY)],
)
def test_status_verdicts(status: int, verdict: Verdict) -> None:
    assert verdict_for_status(status) is verdict


def test_schedule_is_the_standard_webhooks_one() -> None:
    assert RETRY_SCHEDULE_S == (0, 5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600, 14 * 3600, 20 * 3600,
                                24 * 3600)
    waits = [next_retry_at(n, 0.0, jitter=0.0) for n in range(1, 10)]
    assert waits == list(RETRY_SCHEDULE_S[1:])
    assert next_retry_at(10, 0.0, jitter=0.0) is None  # ten tries, then deadletter


def test_jitter_stretches_by_at_most_ten_percent() -> None:
    assert next_retry_at(1, 100.0, jitter=0.0) == 105.0
    assert next_retry_at(1, 100.0, jitter=0.999) == pytest.approx(105.4995)
    assert next_retry_at(4, 0.0, jitter=0.5) == pytest.approx(7200 * 1.05)


def test_retry_after_is_a_floor_not_a_ceiling() -> None:
    assert next_retry_at(1, 0.0, 0.0, retry_after=120) == 120
    assert next_retry_at(3, 0.0, 0.0, retry_after=120) == 1800  # the schedule already waits longer
    assert retry_after_s("7", 0) == 7.0
    assert retry_after_s("999999999", 0) == 86_400.0  # at most a day
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480 - 60) == 60.0
    assert retry_after_s(None, 0) is None and retry_after_s("-1", 0) is None


def test_breaker_opens_after_the_threshold_and_a_failed_probe_reopens() -> None:
    breaker = CircuitBreaker(threshold=3, cool_off_s=10)
    for t in range(2):
        breaker.record_failure(t)
    assert breaker.state(2) is Circuit.CLOSED and breaker.allows(2)
    breaker.record_failure(2)
    assert breaker.state(3) is Circuit.OPEN and not breaker.allows(11.9)
    assert breaker.allows(12) and not breaker.allows(12)  # one probe at a time
    breaker.record_failure(12)
    assert breaker.state(13) is Circuit.OPEN and breaker.state(22) is Circuit.HALF_OPEN
    assert breaker.allows(22)
    breaker.record_success()
    assert breaker.state(22) is Circuit.CLOSED and breaker.failures_in_a_row == 0


def test_a_success_resets_the_count_of_failures_in_a_row() -> None:
    breaker = CircuitBreaker(threshold=2, cool_off_s=10)
    breaker.record_failure(0)
    breaker.record_success()
    breaker.record_failure(1)
    assert breaker.state(1) is Circuit.CLOSED


def test_endpoints_come_from_json_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOUCHSTREAM_TRIGGERS_ENDPOINTS",
                       f'{{"marketing": {{"url": "http://127.0.0.1:9999/hook", "secret": "{SECRET}"}}}}')
    monkeypatch.setenv("TOUCHSTREAM_TRIGGERS_ALLOW_NETWORKS", '["127.0.0.0/8"]')
    settings = TriggersSettings()
    assert settings.endpoints["marketing"].url == "http://127.0.0.1:9999/hook"
    assert settings.endpoints["marketing"].secret.get_secret_value() == SECRET
    assert SECRET not in repr(settings)
    assert settings.networks_allowed_for("marketing") == (ip_network("127.0.0.0/8"),)
    assert settings.web_port == 6069
    assert settings.rules_file.name == "default.yaml" and settings.rules_file.exists()


@pytest.mark.parametrize(
    ("url", "secret", "message"),
    [("ftp://host/x", SECRET, "must be http"), ("http://host/x", "whsec_not base64!", "not whsec_ \\+ valid base64"),
     ("http://host/x", "whsec_", "decodes to 0 bytes")],
)
def test_bad_endpoints_are_refused(url: str, secret: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        WebhookEndpoint(url=url, secret=secret)


@pytest.mark.parametrize(
    ("secret", "reason"),
    [("whsec_AA==", "decodes to 1 bytes; use 24 to 64"),
     ("whsec_" + base64.b64encode(b"x" * 23).decode(), "decodes to 23 bytes"),
     ("whsec_" + base64.b64encode(b"x" * 65).decode(), "decodes to 65 bytes"),
     (SECRET.removeprefix("whsec_"), "must start with whsec_"),
     ("WHSEC_" + SECRET.removeprefix("whsec_"), "must start with whsec_")],
)
def test_weak_or_unprefixed_secrets_are_refused_naming_the_endpoint(
        secret: str, reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOUCHSTREAM_TRIGGERS_ENDPOINTS",
                       json.dumps({"crm": {"url": "https://crm.example/hook", "secrets": [SECRET, secret]}}))
    with pytest.raises(ValidationError) as refused:
        TriggersSettings()
    (problem,) = configuration_problems(refused.value, "TOUCHSTREAM_TRIGGERS_")
    assert problem.startswith("TOUCHSTREAM_TRIGGERS_ENDPOINTS (crm.secrets.1): endpoint secret ")
    assert reason in problem
    assert secret not in problem


def test_secrets_of_24_to_64_bytes_are_accepted() -> None:
    for size in (24, 32, 64):
        secret = "whsec_" + base64.b64encode(bytes(range(size))).decode()
        assert WebhookEndpoint(url="https://crm.example/hook", secret=secret).signing_secrets == (secret,)


def test_settings_are_frozen() -> None:
    settings = TriggersSettings()
    with pytest.raises(ValidationError):
        settings.web_port = 1  # type: ignore[misc]


NEW_SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"


def test_endpoint_with_rotating_secrets_signs_with_each_once() -> None:
    endpoint = WebhookEndpoint(url="https://crm.example/hook", secret=SECRET, secrets=(NEW_SECRET, SECRET))
    assert endpoint.signing_secrets == (SECRET, NEW_SECRET)
    assert WebhookEndpoint(url="https://crm.example/hook", secrets=(NEW_SECRET,)).signing_secrets == (NEW_SECRET,)
    with pytest.raises(ValidationError, match="needs a `secret`"):
        WebhookEndpoint(url="https://crm.example/hook")
    with pytest.raises(ValidationError, match="not whsec_ \\+ valid base64"):
        WebhookEndpoint(url="https://crm.example/hook", secrets=(SECRET, "whsec_***"))
