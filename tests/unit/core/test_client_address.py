"""The client address behind trusted proxies: only a trusted peer's X-Forwarded-For is read, right to left."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from services.console.settings import ConsoleSettings
from touchstream.client_address import client_address

PROXIES = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


@pytest.mark.parametrize(("peer", "forwarded_for", "expected"), [
    # No trusted proxy in the way: the TCP peer, whatever the header claims.
    ("203.0.113.9", [], "203.0.113.9"),
    ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),
    # The ingress appended the address it saw; what the client wrote before it is not believed.
    ("10.0.0.2", ["203.0.113.9"], "203.0.113.9"),
    ("10.0.0.2", ["198.51.100.1, 203.0.113.9"], "203.0.113.9"),
    ("10.0.0.2", ["198.51.100.1", "203.0.113.9"], "203.0.113.9"),
    # A chain of trusted proxies is walked to the first address that is not one.
    ("10.0.0.2", ["203.0.113.9, 10.1.1.1, 10.2.2.2"], "203.0.113.9"),
    ("fd00::2", ["[2001:db8::7]:443"], "2001:db8::7"),
    ("::ffff:10.0.0.2", ["203.0.113.9:5555"], "203.0.113.9"),
    # Only proxies in the header: the one farthest away is the nearest thing to a client.
    ("10.0.0.2", ["10.1.1.1"], "10.1.1.1"),
    # A trusted proxy without the header, or with an entry no proxy would write: the last good hop.
    ("10.0.0.2", [], "10.0.0.2"),
    ("10.0.0.2", [" , "], "10.0.0.2"),
    ("10.0.0.2", ["203.0.113.9, unknown"], "10.0.0.2"),
    # No peer address at all (a Unix socket, a test client).
    (None, ["203.0.113.9"], "unknown"),
    ("testclient", ["203.0.113.9"], "testclient"),
])
def test_client_address(peer: str | None, forwarded_for: list[str], expected: str) -> None:
    assert client_address(peer, forwarded_for, PROXIES) == expected


def test_without_trusted_proxies_the_header_is_never_read() -> None:
    assert client_address("10.0.0.2", ["203.0.113.9"], []) == "10.0.0.2"


def test_trusted_proxies_are_networks_read_from_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOUCHSTREAM_CONSOLE_TRUSTED_PROXIES", '["10.0.0.0/8", "192.0.2.1", "fd00::/8"]')
    proxies = ConsoleSettings().trusted_proxies
    assert [str(p) for p in proxies] == ["10.0.0.0/8", "192.0.2.1/32", "fd00::/8"]
    assert ConsoleSettings(trusted_proxies=()).trusted_proxies == ()
    monkeypatch.setenv("TOUCHSTREAM_CONSOLE_TRUSTED_PROXIES", '["ingress.local"]')
    with pytest.raises(ValidationError, match="trusted_proxies"):
        ConsoleSettings()
