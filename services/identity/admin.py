"""Admin authentication of the identity API: keys are configured and compared as sha256 hashes only."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable

DEV_ADMIN_KEY = "dev-admin-key"
# sha256 of DEV_ADMIN_KEY: only hashes of admin keys are ever configured. Here rather than in the
# settings so the console can default to the same key without loading identity's graph code.
DEV_ADMIN_KEY_SHA256 = "df76ff796f70d2c9cb055ea6280553caa27eda26b70e01082c160de75a05a4a9"


def hash_admin_key(key: str) -> str:
    """Return the stored form of an admin key.

    >>> hash_admin_key("k")[:16]
    '8254c329a92850f6'
    """
    return hashlib.sha256(key.encode()).hexdigest()


def presented_key(authorization: str) -> str | None:
    """Read the key from an Authorization header: ``Bearer <key>`` or Basic with the key as password.

    >>> presented_key("Bearer s3cret"), presented_key("Basic " + base64.b64encode(b"ops:s3cret").decode())
    ('s3cret', 's3cret')
    >>> presented_key("Basic !!!") is None and presented_key("") is None
    True
    """
    scheme, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip()
    if not credentials:
        return None
    if scheme.lower() == "bearer":
        return credentials
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(credentials, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password or user or None
    return None


def is_admin(authorization: str, key_hashes: Iterable[str]) -> bool:
    """Say whether the header carries one of the admin keys (constant-time compare on the hashes).

    >>> is_admin("Bearer k", {hash_admin_key("k")}), is_admin("Bearer x", {hash_admin_key("k")})
    (True, False)
    """
    key = presented_key(authorization)
    if key is None:
        return False
    digest = hash_admin_key(key)
    found = False
    for stored in key_hashes:
        found |= hmac.compare_digest(stored, digest)
    return found
