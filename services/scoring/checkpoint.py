"""Signed model checkpoints: an HMAC-SHA256 tag over the pickled Learner, checked before anything is unpickled.

Unpickling runs code chosen by whoever wrote the bytes, and the checkpoint lives in Redis,
which more than this service can write. So a checkpoint is only unpickled once its tag
proves it was written by a holder of the key (TOUCHSTREAM_SCORING_CHECKPOINT_KEY).

Layout: FORMAT, then the 32-byte tag of FORMAT + payload, then the payload (the pickle).
"""

from __future__ import annotations

import hashlib
import hmac

FORMAT = b"touchstream-checkpoint-v1\n"
TAG_BYTES = hashlib.sha256().digest_size


class UntrustedCheckpoint(Exception):
    """A checkpoint that must not be unpickled; `reason` is "unsigned" or "bad_signature"."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _tag(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, FORMAT + payload, hashlib.sha256).digest()


def signed_checkpoint(payload: bytes, key: bytes) -> bytes:
    """Return `payload` framed with its tag under `key`.

    >>> verified_payload(signed_checkpoint(b"model", b"k"), b"k")
    b'model'
    """
    return FORMAT + _tag(key, payload) + payload


def verified_payload(checkpoint: bytes, key: bytes) -> bytes:
    """Return the payload of `checkpoint` if its tag is right under `key`; raise UntrustedCheckpoint if not.

    >>> try:
    ...     verified_payload(signed_checkpoint(b"model", b"k"), b"other key")
    ... except UntrustedCheckpoint as refused:
    ...     refused.reason
    'bad_signature'
    """
    if not checkpoint.startswith(FORMAT) or len(checkpoint) < len(FORMAT) + TAG_BYTES:
        raise UntrustedCheckpoint("unsigned",
                                  "checkpoint is not signed (written by an older version, or not by scoring)")
    tag = checkpoint[len(FORMAT) : len(FORMAT) + TAG_BYTES]
    payload = checkpoint[len(FORMAT) + TAG_BYTES :]
    if not hmac.compare_digest(tag, _tag(key, payload)):
        raise UntrustedCheckpoint(
            "bad_signature", "checkpoint signature does not match TOUCHSTREAM_SCORING_CHECKPOINT_KEY")
    return payload
