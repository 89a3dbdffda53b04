"""Ingest write keys as they are stored: the core needs the same form to hand keys to a local stack."""

from __future__ import annotations

import hashlib


def hash_write_key(key: str) -> str:
    """Return the stored form of a write key (sha256 hex: keys are never stored in clear).

    >>> hash_write_key("k")[:16]
    '8254c329a92850f6'
    """
    return hashlib.sha256(key.encode()).hexdigest()
