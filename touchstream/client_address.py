"""The address of the client behind a request, through the reverse proxies an operator trusts.

Behind an ingress every request arrives from the proxy's address, so a limit per TCP peer is
one limit for everybody. A proxy names the address it got the request from by appending it to
`X-Forwarded-For`; a client can put anything in that header before it reaches the proxy. So the
header is read only when the peer itself is a trusted proxy, and from the right: each trusted
hop vouches for the entry to its left, and the first entry that is not a trusted proxy is the
client. Pure: no I/O, used by ingest (failed write keys) and the console (failed logins).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from pydantic import IPvAnyNetwork

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# The type of a `trusted_proxies` setting: a JSON list of networks in the environment, e.g.
# '["10.0.0.0/8", "fd00::/8"]'; a single address is a /32 (or /128).
TrustedProxies = tuple[IPvAnyNetwork, ...]


def parse_address(text: str) -> IPAddress | None:
    """Read one address as a proxy writes it: bare, IPv4 with a port, or IPv6 in brackets with a port.

    >>> parse_address("203.0.113.9"), parse_address("203.0.113.9:4711"), parse_address("[2001:db8::1]:443")
    (IPv4Address('203.0.113.9'), IPv4Address('203.0.113.9'), IPv6Address('2001:db8::1'))
    >>> parse_address("unknown") is None and parse_address("") is None
    True
    """
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: IPAddress, proxies: Sequence[Network]) -> bool:
    return any(address.version == network.version and address in network for network in proxies)


def client_address(peer: str | None, forwarded_for: Iterable[str], trusted_proxies: Sequence[Network]) -> str:
    """Return the client's address: the TCP peer, or, when the peer is a trusted proxy, the nearest
    X-Forwarded-For entry that is not one (`forwarded_for`: the header's values, in order).

    >>> proxies = [ipaddress.ip_network("10.0.0.0/8")]
    >>> client_address("10.0.0.2", ["198.51.100.1, 203.0.113.9"], proxies)
    '203.0.113.9'
    >>> client_address("203.0.113.9", ["198.51.100.1"], proxies)  # not a proxy: its header is not believed
    '203.0.113.9'
    >>> client_address("10.0.0.2", ["203.0.113.9", "10.0.0.7"], proxies)  # two proxies in a row
    '203.0.113.9'
    >>> client_address("10.0.0.2", ["garbage, 10.0.0.7"], proxies)  # a broken chain stops at the last good hop
    '10.0.0.7'
    """
    address = parse_address(peer or "")
    if address is None:
        return peer or "unknown"
    hops = [entry for value in forwarded_for for entry in value.split(",") if entry.strip()]
    while _trusted(address, trusted_proxies) and hops:
        nearer = parse_address(hops.pop())
        if nearer is None:
            break
        address = nearer
    return str(address)
