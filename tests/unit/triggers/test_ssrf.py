"""SSRF policy: address classes, wrapped IPv4 forms, allowlists, and what production refuses."""

from __future__ import annotations

import json
from ipaddress import ip_network

import pytest
from pydantic import ValidationError

from services.triggers.app import check_configuration
from services.triggers.settings import TriggersSettings, WebhookEndpoint
from services.triggers.ssrf import Network, address_refusal, allowlist_refusal
from touchstream.settings import CoreSettings
from touchstream.startup import ConfigurationError

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
EVERYTHING: tuple[Network, ...] = (ip_network("0.0.0.0/0"), ip_network("::/0"))


@pytest.mark.parametrize(
    ("address", "refusal"),
    [("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.10", "private"),
     ("172.16.5.5", "private"), ("100.64.0.1", "cgnat"), ("fd00::1", "unique-local"), ("fec0::1", "site-local"),
     ("fec0:1:2:3::4", "site-local"), ("192.0.2.7", "documentation"), ("2001:db8::1", "documentation"),
     ("198.18.0.1", "benchmarking"), ("240.0.0.1", "reserved"), ("0.1.2.3", "this-network"), ("4000::1", "reserved"),
     ("64:ff9b:1::808:808", "nat64-local"), ("8.8.8.8", None), ("2606:4700:4700::1111", None),
     ("93.184.215.14", None)],
)
def test_address_classes(address: str, refusal: str | None) -> None:
    assert address_refusal(address) == refusal


@pytest.mark.parametrize(
    ("address", "refusal"),
    [("::ffff:127.0.0.1", "loopback (127.0.0.1 inside ::ffff:7f00:1)"),
     ("::ffff:0:a00:1", "private (10.0.0.1 inside ::ffff:0:a00:1)"),  # IPv4-translated
     ("::7f00:1", "loopback (127.0.0.1 inside ::7f00:1)"),  # IPv4-compatible
     ("2002:a00:1::1", "private (10.0.0.1 inside 2002:a00:1::1)"),  # 6to4
     ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback (127.0.0.1 inside 2001:0:4136:e378:8000:63bf:80ff:fffe)"),
     ("64:ff9b::7f00:1", "loopback (127.0.0.1 inside 64:ff9b::7f00:1)"),  # NAT64
     ("64:ff9b::808:808", None), ("::ffff:8.8.8.8", None), ("2002:808:808::1", None)],
)
def test_wrapped_ipv4_is_judged_by_the_address_it_leads_to(address: str, refusal: str | None) -> None:
    assert address_refusal(address) == refusal


@pytest.mark.parametrize(
    "address",
    ["169.254.169.254", "169.254.170.2", "fe80::1", "fe80::1%eth0", "100.100.100.200", "fd00:ec2::254",
     "fd20:ce::254", "0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255",
     "::ffff:169.254.169.254", "2002:a9fe:a9fe::", "64:ff9b::a9fe:a9fe", "::ffff:100.100.100.200"],
)
def test_link_local_and_metadata_are_refused_even_when_everything_is_allowed(address: str) -> None:
    assert address_refusal(address, EVERYTHING) is not None


def test_an_allowlist_opens_exactly_its_networks() -> None:
    loopback = (ip_network("127.0.0.0/8"),)
    assert address_refusal("127.0.0.1", loopback) is None
    assert address_refusal("::ffff:127.0.0.1", loopback) is None
    assert address_refusal("10.0.0.1", loopback) == "private"
    assert address_refusal("::1", loopback) == "loopback"
    assert address_refusal("fec0::1", (ip_network("fec0::/10"),)) is None


@pytest.mark.parametrize(
    ("network", "production", "refusal"),
    [("127.0.0.0/8", False, None), ("10.0.0.0/8", False, None), ("0.0.0.0/0", False, None),
     ("169.254.0.0/16", False, "is link-local, which is always refused"),
     ("fd00:ec2::254", False, "is cloud metadata, which is always refused"),
     ("127.0.0.0/8", True, "holds loopback addresses"), ("10.1.0.0/16", True, "holds private addresses"),
     ("fec0::/10", True, "holds site-local addresses"), ("0.0.0.0/0", True, "holds this-network addresses"),
     ("::/0", True, "addresses; only globally routable networks may be allowed in production"),
     ("2002::/16", True, "holds 6to4 addresses"), ("8.8.8.0/24", True, None), ("2606:4700::/32", True, None)],
)
def test_allowlist_entries(network: str, production: bool, refusal: str | None) -> None:
    found = allowlist_refusal(ip_network(network), production)
    assert found == refusal if refusal is None else refusal in (found or "")


def test_endpoint_allow_networks_are_parsed_and_checked() -> None:
    endpoint = WebhookEndpoint(url="http://127.0.0.1:1/hook", secret=SECRET, allow_networks=("127.0.0.0/8", "::1"))
    assert endpoint.allow_networks == (ip_network("127.0.0.0/8"), ip_network("::1/128"))
    with pytest.raises(ValidationError, match=r"host bits set; write the network, 10\.0\.0\.0/8"):
        WebhookEndpoint(url="http://x/hook", secret=SECRET, allow_networks=("10.1.2.3/8",))
    with pytest.raises(ValidationError, match="is not a network"):
        WebhookEndpoint(url="http://x/hook", secret=SECRET, allow_networks=("localhost",))
    with pytest.raises(ValidationError, match=r"169\.254\.169\.254/32 is link-local, which is always refused"):
        WebhookEndpoint(url="http://x/hook", secret=SECRET, allow_networks=("169.254.169.254",))


def loopback_settings(**allow: object) -> TriggersSettings:
    endpoint: dict[str, object] = {"url": "http://127.0.0.1:9/hook", "secret": SECRET}
    if "endpoint" in allow:
        endpoint["allow_networks"] = allow["endpoint"]
    return TriggersSettings(endpoints={"local": endpoint, "crm": {"url": "http://8.8.8.8/hook", "secret": SECRET}},
                            allow_networks=allow.get("everywhere", ()), deletion_endpoints=())


def test_an_endpoints_allowlist_is_its_own() -> None:
    settings = loopback_settings(endpoint=["127.0.0.0/8"])
    assert settings.networks_allowed_for("local") == (ip_network("127.0.0.0/8"),)
    assert settings.networks_allowed_for("crm") == ()
    check_configuration([], settings)
    global_only = loopback_settings(everywhere=["127.0.0.0/8"])
    assert global_only.networks_allowed_for("crm") == (ip_network("127.0.0.0/8"),)
    check_configuration([], global_only)


def test_a_loopback_endpoint_without_an_allowlist_is_refused_at_start() -> None:
    with pytest.raises(ConfigurationError, match=r"endpoint 'local': 127\.0\.0\.1 resolves to 127\.0\.0\.1, a loop"):
        check_configuration([], loopback_settings())


@pytest.mark.parametrize("where", ["endpoint", "everywhere"])
def test_production_refuses_allowlists_of_non_global_networks(where: str) -> None:
    settings = loopback_settings(**{where: ["127.0.0.0/8"]})
    check_configuration([], settings, production=False)
    with pytest.raises(ConfigurationError) as refused:
        check_configuration([], settings, production=True)
    expected = ("endpoint 'local': allow_networks" if where == "endpoint" else "TOUCHSTREAM_TRIGGERS_ALLOW_NETWORKS")
    assert f"{expected}: 127.0.0.0/8 holds loopback addresses; only globally routable networks may be allowed " \
           "in production" in str(refused.value)


def test_production_is_the_prod_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOUCHSTREAM_PII_HASH_KEY", "a-real-secret")
    monkeypatch.setenv("TOUCHSTREAM_ENVIRONMENT", "prod")
    assert CoreSettings().is_production
    monkeypatch.setenv("TOUCHSTREAM_ENVIRONMENT", "dev")
    assert not CoreSettings().is_production


def test_global_allow_networks_come_from_json_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOUCHSTREAM_TRIGGERS_ALLOW_NETWORKS", json.dumps(["127.0.0.0/8", "fd12::/16"]))
    assert TriggersSettings().allow_networks == (ip_network("127.0.0.0/8"), ip_network("fd12::/16"))
    monkeypatch.setenv("TOUCHSTREAM_TRIGGERS_ALLOW_NETWORKS", json.dumps(["fe80::/64"]))
    with pytest.raises(ValidationError, match="fe80::/64 is link-local, which is always refused"):
        TriggersSettings()
