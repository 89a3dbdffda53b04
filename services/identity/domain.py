"""Identity resolution without I/O: prepare an event for the graph, read the graph's answer, build records.

The graph itself (Redis + one Lua script) lives in `graph.py`; everything it needs as input
and everything it answers is defined here, so the rules can be tested without Redis.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from touchstream.identifiers import (
    KEY_PRIORITY,
    KNOWN_TYPES,
    Identifier,
    InvalidIdentifier,
    normalise,
    pseudonymise,
)

MERGE_REASON_SHARED_IDENTIFIER = "shared_identifier"


@dataclass(frozen=True)
class RejectedIdentifier:
    """An identifier left out of matching; both fields are safe as metric labels."""

    type_label: str
    reason: str


@dataclass(frozen=True)
class PreparedIdentifiers:
    hashed: tuple[Identifier, ...]
    rejected: tuple[RejectedIdentifier, ...]


@dataclass(frozen=True)
class ResolutionRequest:
    """What the graph needs to resolve one event."""

    message_id: str
    event_time_ms: int
    identifiers: tuple[Identifier, ...]
    new_customer_id: str


@dataclass(frozen=True)
class IdentityMerged:
    merge_id: str
    survivor_id: str
    merged_id: str
    linking_identifiers: tuple[Identifier, ...]


@dataclass(frozen=True)
class MergeRefused:
    customer_id: str
    reason: str


@dataclass(frozen=True)
class Resolution:
    """The graph's answer for one event."""

    customer_id: str
    created: bool
    replayed: bool
    merges: tuple[IdentityMerged, ...]
    refused: tuple[MergeRefused, ...]


@dataclass(frozen=True)
class GraphLayout:
    """Redis key layout of the identity graph; the Lua script in graph.py builds the same keys.

    >>> layout = GraphLayout("ts:identity:{graph}:")
    >>> layout.identifier_key("email:ab12")
    'ts:identity:{graph}:ident:email:ab12'
    >>> layout.members_key("c_1")
    'ts:identity:{graph}:customer:c_1:identifiers'
    """

    prefix: str

    def identifier_key(self, ref: str) -> str:
        return f"{self.prefix}ident:{ref}"

    def customer_key(self, customer_id: str) -> str:
        return f"{self.prefix}customer:{customer_id}"

    def members_key(self, customer_id: str) -> str:
        return f"{self.prefix}customer:{customer_id}:identifiers"

    def event_key(self, message_id: str) -> str:
        return f"{self.prefix}event:{message_id}"


def identifier_ref(identifier: Identifier) -> str:
    """Return the graph's name for a hashed identifier.

    >>> identifier_ref(Identifier("email", "ab12"))
    'email:ab12'
    """
    return f"{identifier.type}:{identifier.value}"


def parse_identifier_ref(ref: str) -> Identifier:
    """Split a graph reference back into an identifier; the hash never contains a colon.

    >>> parse_identifier_ref("custom:type:ab12")
    Identifier(type='custom:type', value='ab12')
    """
    kind, _, value = ref.rpartition(":")
    return Identifier(kind, value)


def identifier_type_label(kind: str) -> str:
    """Bound a metric label: upstream may send any identifier type.

    >>> identifier_type_label("Email"), identifier_type_label("shoe_size")
    ('email', 'other')
    """
    kind = kind.strip().lower()
    return kind if kind in KNOWN_TYPES else "other"


def rejection_reason(error: InvalidIdentifier) -> str:
    """Classify why an identifier was rejected without repeating its (personal) value."""
    message = str(error)
    if "blocklist" in message:
        return "blocklisted"
    if message.endswith("is empty"):
        return "empty"
    return "malformed"


def _priority(identifier: Identifier) -> tuple[int, str, str]:
    rank = KEY_PRIORITY.index(identifier.type) if identifier.type in KEY_PRIORITY else len(KEY_PRIORITY)
    return rank, identifier.type, identifier.value


def prepare_identifiers(
    raw: Iterable[dict[str, str]], hash_key: bytes, default_region: str, blocklist: Iterable[str]
) -> PreparedIdentifiers:
    """Normalise, pseudonymise and de-duplicate an event's identifiers, most stable first.

    >>> prepared = prepare_identifiers(
    ...     [{"type": "phone", "value": "(415) 555-2671"}, {"type": "device_id", "value": "unknown"},
    ...      {"type": "user_id", "value": "42"}], b"k", "US", {"unknown"})
    >>> [i.type for i in prepared.hashed], prepared.rejected
    (['user_id', 'phone'], (RejectedIdentifier(type_label='device_id', reason='blocklisted'),))
    """
    blocked = frozenset(blocklist)
    hashed: set[Identifier] = set()
    rejected: list[RejectedIdentifier] = []
    for item in raw:
        try:
            clear = normalise(Identifier(item["type"], item["value"]), default_region, blocked)
        except InvalidIdentifier as exc:
            rejected.append(RejectedIdentifier(identifier_type_label(item["type"]), rejection_reason(exc)))
            continue
        hashed.add(pseudonymise(clear, hash_key))
    return PreparedIdentifiers(tuple(sorted(hashed, key=_priority)), tuple(rejected))


def new_customer_id(identifiers: Sequence[Identifier]) -> str:
    """Derive the id of a new customer from its most stable hashed identifier.

    >>> new_customer_id([Identifier("user_id", "ab12"), Identifier("email", "cd34")])
    'c_b596f34871714ee0e24ac612'
    """
    if not identifiers:
        raise ValueError("a customer needs at least one identifier")
    top = min(identifiers, key=_priority)
    return "c_" + hashlib.sha256(identifier_ref(top).encode()).hexdigest()[:24]


def resolution_request(event: dict[str, Any], identifiers: Sequence[Identifier]) -> ResolutionRequest:
    """Build the graph input for a decoded TouchpointEvent and its usable hashed identifiers."""
    return ResolutionRequest(
        message_id=event["message_id"],
        event_time_ms=int(event["timestamp_ms"]),
        identifiers=tuple(identifiers),
        new_customer_id=new_customer_id(identifiers),
    )


def script_call(
    request: ResolutionRequest, layout: GraphLayout, strong_types: Iterable[str], event_ttl_s: int
) -> tuple[list[str], list[str]]:
    """Return (KEYS, ARGV) of the resolve script for one event; the order is the script's contract."""
    refs = [identifier_ref(i) for i in request.identifiers]
    keys = [layout.identifier_key(ref) for ref in refs]
    args = [
        layout.prefix,
        request.message_id,
        str(request.event_time_ms),
        request.new_customer_id,
        str(event_ttl_s),
        ",".join(sorted(strong_types)),
        *refs,
    ]
    return keys, args


def parse_resolution(answer: str | bytes) -> Resolution:
    """Read the resolve script's JSON answer.

    Lua's cjson writes an empty array as ``{}``, hence the ``or []``.

    >>> parse_resolution('{"customer_id":"c_1","created":true,"replayed":false,"merges":{},"refused":{}}')
    Resolution(customer_id='c_1', created=True, replayed=False, merges=(), refused=())
    """
    data = json.loads(answer)
    survivor = data["customer_id"]
    merges = tuple(
        IdentityMerged(
            merge_id=m["merge_id"],
            survivor_id=survivor,
            merged_id=m["merged_id"],
            linking_identifiers=tuple(parse_identifier_ref(ref) for ref in (m.get("identifiers") or [])),
        )
        for m in (data.get("merges") or [])
    )
    refused = tuple(MergeRefused(r["customer_id"], r["reason"]) for r in (data.get("refused") or []))
    return Resolution(survivor, bool(data.get("created")), bool(data.get("replayed")), merges, refused)


def resolved_touchpoint_record(
    event: dict[str, Any], resolution: Resolution, identifiers: Sequence[Identifier], resolved_at_ms: int
) -> dict[str, Any]:
    """Build the ResolvedTouchpoint: the event with only hashed, usable identifiers and its customer."""
    pseudonymous = {**event, "identifiers": [{"type": i.type, "value": i.value} for i in identifiers]}
    return {"customer_id": resolution.customer_id, "event": pseudonymous, "resolved_at_ms": resolved_at_ms}


def identity_merge_record(merge: IdentityMerged, event: dict[str, Any]) -> dict[str, Any]:
    """Build the IdentityMerge record announcing that `merge.merged_id` became `merge.survivor_id`."""
    return {
        "merge_id": merge.merge_id,
        "survivor_id": merge.survivor_id,
        "merged_id": merge.merged_id,
        "kind": "merge",
        "reason": MERGE_REASON_SHARED_IDENTIFIER,
        "score": None,
        "identifiers": [{"type": i.type, "value": i.value} for i in merge.linking_identifiers],
        "event_time_ms": int(event["timestamp_ms"]),
        "caused_by": event["message_id"],
    }
