"""Delivery policy with no I/O: which answers count, when to retry, which addresses are refused."""

from __future__ import annotations

import ipaddress
from enum import StrEnum

# Carrier-grade NAT space; Python's ipaddress does not count it as private.
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


class Verdict(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    GIVE_UP = "give_up"


def verdict_for_status(status: int) -> Verdict:
    """Classify a receiver's HTTP status; a redirect is a failure because we never follow one.

    >>> verdict_for_status(204), verdict_for_status(503), verdict_for_status(301), verdict_for_status(400)
    (<Verdict.DELIVERED: 'delivered'>, <Verdict.RETRY: 'retry'>, <Verdict.RETRY: 'retry'>, <Verdict.GIVE_UP: 'give_up'>)
    """
    if 200 <= status < 300:
        return Verdict.DELIVERED
    # A 3xx is a failed try (following it could lead to an internal address), retried
    # because the receiver may fix its URL; other 4xx will not change on a retry.
    if status in (408, 425, 429) or status >= 500 or 300 <= status < 400:
        return Verdict.RETRY
    return Verdict.GIVE_UP


def retry_delay_s(attempt: int, base_s: float, jitter: float = 0.0) -> float:
    """Return the wait before try `attempt + 1`, doubling from `base_s`; `jitter` in [0, 1) stretches it.

    >>> [retry_delay_s(n, 0.5) for n in (1, 2, 3)]
    [0.5, 1.0, 2.0]
    """
    return base_s * 2 ** (attempt - 1) * (1 + jitter)


def address_refusal(address: str) -> str | None:
    """Say why a webhook must not connect to `address`, or None if it is a public address.

    >>> address_refusal("127.0.0.1"), address_refusal("100.64.1.1"), address_refusal("::ffff:10.0.0.1")
    ('loopback', 'cgnat', 'private')
    >>> address_refusal("93.184.215.14") is None
    True
    """
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "cgnat"
    if ip.is_private or ip.is_reserved:
        return "private"
    return None
