"""SSRF policy with no I/O: which addresses a webhook may connect to, and which networks an allowlist may open.

Three tiers:
- always refused, whatever an allowlist says: link-local (where cloud metadata services
  live), the other known metadata addresses, unspecified, multicast and broadcast;
- not globally routable (loopback, private, CGNAT, unique-local, site-local, documentation,
  reserved, ...): refused unless the address is inside a network on the allowlist;
- everything else (global unicast): allowed.

An IPv6 address that carries an IPv4 one (IPv4-mapped or -translated, IPv4-compatible,
6to4, Teredo, NAT64) is judged by the IPv4 address it leads to, so `::ffff:169.254.169.254`
or `64:ff9b::7f00:1` cannot slip past as "a global IPv6 address". Python's own `is_global`
is not used: before 3.13 it misjudges several of these forms, and it counts `fec0::/10` as global.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _classes(*pairs: tuple[str, str]) -> tuple[tuple[Network, str], ...]:
    return tuple((ipaddress.ip_network(network), name) for network, name in pairs)


ALWAYS_REFUSED = _classes(
    ("169.254.0.0/16", "link-local"),  # 169.254.169.254: AWS, GCP, Azure, OCI metadata; 169.254.170.2: ECS
    ("fe80::/10", "link-local"),
    ("100.100.100.200/32", "cloud metadata"),  # Alibaba Cloud
    ("fd00:ec2::254/128", "cloud metadata"),  # AWS IMDS over IPv6
    ("fd20:ce::254/128", "cloud metadata"),  # GCP metadata over IPv6
    ("192.0.0.192/32", "cloud metadata"),  # Oracle Cloud Classic
    ("0.0.0.0/32", "unspecified"),  # connecting to it reaches the host itself
    ("::/128", "unspecified"),
    ("224.0.0.0/4", "multicast"),
    ("ff00::/8", "multicast"),
    ("255.255.255.255/32", "broadcast"),
)

# The IANA special-purpose registries' entries that are not globally reachable.
_NOT_GLOBAL_V4 = _classes(
    ("0.0.0.0/8", "this-network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "cgnat"),
    ("127.0.0.0/8", "loopback"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "ietf-protocol"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4-relay"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("240.0.0.0/4", "reserved"),
)
# Global unicast IPv6 is 2000::/3; outside it everything is special or unassigned.
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
_NOT_GLOBAL_V6_INSIDE_2000 = _classes(
    ("2001:db8::/32", "documentation"),
    ("2001::/23", "ietf-protocol"),
    ("2002::/16", "6to4"),
    ("3fff::/20", "documentation"),
)
_NAMED_V6_OUTSIDE_2000 = _classes(
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "ipv4-mapped"),
    ("64:ff9b:1::/48", "nat64-local"),
    ("64:ff9b::/96", "nat64"),
    ("100::/64", "discard"),
    ("5f00::/16", "srv6"),
    ("fc00::/7", "unique-local"),
    ("fec0::/10", "site-local"),
)

_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# RFC 8215's local-use prefix; operators use it as a /96 like the well-known one.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_TEREDO = ipaddress.IPv6Network("2001::/32")


def _last_32_bits(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)


def embedded_ipv4(ip: Address) -> tuple[ipaddress.IPv4Address, ...]:
    """Return the IPv4 addresses an IPv6 address leads to (none for a plain address).

    >>> [str(a) for a in embedded_ipv4(ipaddress.ip_address("2002:a9fe:a9fe::1"))]
    ['169.254.169.254']
    >>> [str(a) for a in embedded_ipv4(ipaddress.ip_address("2001:0:4136:e378:8000:63bf:3fff:fdd2"))]
    ['65.54.227.120', '192.0.2.45']
    >>> embedded_ipv4(ipaddress.ip_address("::1")), embedded_ipv4(ipaddress.ip_address("8.8.8.8"))
    ((), ())
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return ()
    if ip in _IPV4_MAPPED or ip in _IPV4_TRANSLATED or ip in _NAT64 or ip in _NAT64_LOCAL:
        return (_last_32_bits(ip),)
    if ip in _SIX_TO_FOUR:
        return (ip.sixtofour,) if ip.sixtofour is not None else ()
    if ip in _TEREDO and ip.teredo is not None:
        return ip.teredo
    # `::` and `::1` are the unspecified and loopback addresses, not IPv4-compatible ones.
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:
        return (_last_32_bits(ip),)
    return ()


def _addresses_to_judge(ip: Address) -> tuple[Address, ...]:
    embedded = embedded_ipv4(ip)
    if not embedded:
        return (ip,)
    # The local-use NAT64 prefix is itself not global; the other wrappers are only as good as what they carry.
    return (ip, *embedded) if ip in _NAT64_LOCAL else embedded


def _class_in(ip: Address, classes: Iterable[tuple[Network, str]]) -> str | None:
    return next((name for network, name in classes if ip in network), None)


def always_refused_class(ip: Address) -> str | None:
    """Name the class of `ip` no allowlist can open (link-local, cloud metadata, ...), or None.

    >>> [always_refused_class(ipaddress.ip_address(a)) for a in ("169.254.169.254", "fd00:ec2::254", "10.0.0.1")]
    ['link-local', 'cloud metadata', None]
    """
    return _class_in(ip, ALWAYS_REFUSED)


def non_global_class(ip: Address) -> str | None:
    """Name why `ip` is not globally routable (loopback, private, ...), or None if it is.

    >>> non_global_class(ipaddress.ip_address("fec0::1")), non_global_class(ipaddress.ip_address("2606:4700::1111"))
    ('site-local', None)
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return _class_in(ip, _NOT_GLOBAL_V4)
    if ip in _GLOBAL_UNICAST_V6:
        return _class_in(ip, _NOT_GLOBAL_V6_INSIDE_2000)
    return _class_in(ip, _NAMED_V6_OUTSIDE_2000) or "reserved"


def address_refusal(address: str, allow_networks: Sequence[Network] = ()) -> str | None:
    """Say why a webhook must not connect to `address`, or None if it may.

    A not globally routable address is allowed when it lies in one of `allow_networks`;
    link-local and metadata addresses never are.

    >>> address_refusal("127.0.0.1"), address_refusal("127.0.0.1", [ipaddress.ip_network("127.0.0.0/8")])
    ('loopback', None)
    >>> address_refusal("::ffff:10.0.0.1"), address_refusal("64:ff9b::a9fe:a9fe", [ipaddress.ip_network("::/0")])
    ('private (10.0.0.1 inside ::ffff:a00:1)', 'link-local (169.254.169.254 inside 64:ff9b::a9fe:a9fe)')
    >>> address_refusal("93.184.215.14") is None
    True
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    judged = _addresses_to_judge(ip)
    for candidate in judged:
        refused = always_refused_class(candidate)
        if refused is not None:
            return _described(refused, candidate, ip)
    for candidate in judged:
        kind = non_global_class(candidate)
        if kind is not None and not any(candidate in network for network in allow_networks):
            return _described(kind, candidate, ip)
    return None


def _described(kind: str, candidate: Address, ip: Address) -> str:
    return kind if candidate == ip else f"{kind} ({candidate} inside {ip})"


def parse_network(text: str) -> Network:
    """Parse an allowlist entry: a network in CIDR form or a single address.

    >>> parse_network("127.0.0.0/8"), parse_network("fd12::7")
    (IPv4Network('127.0.0.0/8'), IPv6Network('fd12::7/128'))
    >>> parse_network("10.1.2.3/8")
    Traceback (most recent call last):
    ...
    ValueError: '10.1.2.3/8' has host bits set; write the network, 10.0.0.0/8
    """
    try:
        return ipaddress.ip_network(text)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not a network (CIDR such as 127.0.0.0/8, or one address)") from exc
        raise ValueError(f"{text!r} has host bits set; write the network, {loose}") from exc


def _overlapping_class(network: Network, classes: Iterable[tuple[Network, str]]) -> str | None:
    return next((name for known, name in classes
                 if known.version == network.version and network.overlaps(known)), None)


def _inside(inner: Network, outer: Network) -> bool:
    return (inner.version == outer.version and int(outer.network_address) <= int(inner.network_address)
            and int(inner.broadcast_address) <= int(outer.broadcast_address))


def allowlist_refusal(network: Network, production: bool) -> str | None:
    """Say why `network` may not be on a webhook allowlist, or None if it may.

    A network wholly inside an always-refused class would open nothing; in production no
    network holding non-global addresses may be opened at all.

    >>> allowlist_refusal(ipaddress.ip_network("127.0.0.0/8"), production=False) is None
    True
    >>> allowlist_refusal(ipaddress.ip_network("127.0.0.0/8"), production=True)
    'holds loopback addresses; only globally routable networks may be allowed in production'
    >>> allowlist_refusal(ipaddress.ip_network("169.254.169.254/32"), production=False)
    'is link-local, which is always refused'
    """
    for known, name in ALWAYS_REFUSED:
        if _inside(network, known):
            return f"is {name}, which is always refused"
    if not production:
        return None
    if isinstance(network, ipaddress.IPv4Network):
        kind = _overlapping_class(network, _NOT_GLOBAL_V4)
    elif not _inside(network, _GLOBAL_UNICAST_V6):
        kind = _overlapping_class(network, _NAMED_V6_OUTSIDE_2000) or "reserved"
    else:
        kind = _overlapping_class(network, _NOT_GLOBAL_V6_INSIDE_2000)
    kind = kind or _overlapping_class(network, ALWAYS_REFUSED)
    if kind is None:
        return None
    return f"holds {kind} addresses; only globally routable networks may be allowed in production"
