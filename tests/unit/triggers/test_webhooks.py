"""Delivery policy: status verdicts, backoff, SSRF address classes, endpoint settings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.triggers.settings import TriggersSettings, WebhookEndpoint
from services.triggers.webhooks import Verdict, address_refusal, retry_delay_s, verdict_for_status

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.mark.parametrize(
    ("status", "verdict"),
    [(200, Verdict.DELIVERED), (204, Verdict.DELIVERED), (302, Verdict.RETRY), (408, Verdict.RETRY),
     (429, Verdict.RETRY), (500, Verdict.RETRY), (503, Verdict.RETRY), (400, Verdict.GIVE_UP),
     (401, Verdict.GIVE_UP), (404, Verdict.GIVE_UP), (410, Verdict.GIVE_UP)],
)
def test_status_verdicts(status: int, verdict: Verdict) -> None:
    assert verdict_for_status(status) is verdict


def test_backoff_doubles_and_jitter_only_stretches() -> None:
    assert [retry_delay_s(n, 1.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert retry_delay_s(2, 1.0, jitter=0.1) == pytest.approx(2.2)


@pytest.mark.parametrize(
    ("address", "refusal"),
    [("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.10", "private"),
     ("172.16.5.5", "private"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
     ("100.64.0.1", "cgnat"), ("fd00::1", "private"), ("::ffff:127.0.0.1", "loopback"), ("0.0.0.0", "unspecified"),
     ("224.0.0.1", "multicast"), ("8.8.8.8", None), ("2606:4700:4700::1111", None)],
)
def test_address_classes(address: str, refusal: str | None) -> None:
    assert address_refusal(address) == refusal


def test_endpoints_come_from_json_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOUCHSTREAM_TRIGGERS_ENDPOINTS",
                       f'{{"marketing": {{"url": "http://127.0.0.1:9999/hook", "secret": "{SECRET}"}}}}')
    monkeypatch.setenv("TOUCHSTREAM_TRIGGERS_ALLOW_PRIVATE_ENDPOINTS", "true")
    settings = TriggersSettings()
    assert settings.endpoints["marketing"].url == "http://127.0.0.1:9999/hook"
    assert settings.endpoints["marketing"].secret.get_secret_value() == SECRET
    assert SECRET not in repr(settings)
    assert settings.allow_private_endpoints and settings.web_port == 6069
    assert settings.rules_file.name == "default.yaml" and settings.rules_file.exists()


@pytest.mark.parametrize(
    ("url", "secret", "message"),
    [("ftp://host/x", SECRET, "must be http"), ("http://host/x", "not base64!", "not a Standard Webhooks secret"),
     ("http://host/x", "whsec_", "not a Standard Webhooks secret")],
)
def test_bad_endpoints_are_refused(url: str, secret: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        WebhookEndpoint(url=url, secret=secret)


def test_settings_are_frozen() -> None:
    settings = TriggersSettings()
    with pytest.raises(ValidationError):
        settings.web_port = 1  # type: ignore[misc]
