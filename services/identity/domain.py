"""Identity resolution without I/O: prepare an event for the graph, read the graph's answer, build records.

The graph itself (Redis + one Lua script) lives in `graph.py`; everything it needs as input
and everything it answers is defined here, so the rules can be tested without Redis.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from touchstream.identifiers import (
    KEY_PRIORITY,
    KNOWN_TYPES,
    Identifier,
    InvalidIdentifier,
    normalise,
    pseudonymise,
)

MERGE_REASON_SHARED_IDENTIFIER = "shared_identifier"
MERGE_REASON_PROBABILISTIC = "probabilistic"
MERGE_REASON_OPERATOR = "operator"
# Why the graph refused a merge or left an identifier out; each is a metric label value.
REFUSAL_REASONS = ("conflicting_strong_id", "type_limit", "shared_identifier", "operator_split")


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
    # The record the event was read from (`answer_slot`): its answer is then kept only until the
    # record's offset is committed. "" (no record): kept event_ttl_s under the message id.
    answer_slot: str = ""


def answer_slot(topic: str, partition: int, offset: int) -> str:
    """Name the record an event was read from, where the resolve script keeps its answer for redeliveries.

    >>> answer_slot("touchpoints.raw", 3, 1207)
    'touchpoints.raw:3:1207'
    """
    return f"{topic}:{partition}:{offset}"


@dataclass(frozen=True)
class IdentityMerged:
    """Two customers became one (kind merge), or an operator split a new one off (kind unmerge)."""

    merge_id: str
    survivor_id: str
    merged_id: str
    linking_identifiers: tuple[Identifier, ...]
    reason: str = MERGE_REASON_SHARED_IDENTIFIER
    kind: str = "merge"
    score: float | None = None


@dataclass(frozen=True)
class MergeRefused:
    """A merge the rules refused (customer_id set) or an identifier left out (customer_id empty)."""

    customer_id: str
    reason: str
    identifiers: tuple[Identifier, ...] = ()


@dataclass(frozen=True)
class GraphRules:
    """Merge protection, passed to every script call so all workers apply the same rules.

    >>> GraphRules(frozenset({"user_id"}), {"user_id": 1}, 5, 3).to_json()
    '{"strong": ["user_id"], "limits": {"user_id": 1}, "default_limit": 5, "shared_max": 3}'
    """

    strong_types: frozenset[str]
    type_limits: dict[str, int]
    default_limit: int
    shared_max: int

    def to_json(self) -> str:
        return self._json

    @functools.cached_property
    def _json(self) -> str:
        # Every script call carries the rules: encode them once.
        return json.dumps({"strong": sorted(self.strong_types), "limits": dict(sorted(self.type_limits.items())),
                           "default_limit": self.default_limit, "shared_max": self.shared_max})

    def limit_of(self, kind: str) -> int:
        return self.type_limits.get(kind, self.default_limit)


@dataclass(frozen=True)
class PossibleMatch:
    """Another customer the event's person may be: plausible to the matching model, not likely enough to merge."""

    customer_id: str
    probability: float
    weight: float  # log2 likelihood ratio of the best pair of records


@dataclass(frozen=True)
class Resolution:
    """The graph's answer for one event."""

    customer_id: str
    created: bool
    replayed: bool
    merges: tuple[IdentityMerged, ...]
    refused: tuple[MergeRefused, ...]
    # The event carried an identifier of an erased customer: dropped, nothing resolved.
    suppressed: bool = False
    # Found by probabilistic matching and kept for review (never merged).
    possible_matches: tuple[PossibleMatch, ...] = ()


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

    def history_key(self, customer_id: str) -> str:
        return f"{self.prefix}customer:{customer_id}:merges"

    def event_key(self, message_id: str) -> str:
        return f"{self.prefix}event:{message_id}"

    # Probabilistic matching's keys (scripts.py lists what each holds).
    def match_key(self, name: str) -> str:
        """Name one of matching's single keys: model, records, pairs, review.

        >>> GraphLayout("p:").match_key("model"), GraphLayout("p:").match_possible_key("c_1")
        ('p:match:model', 'p:match:possible:c_1')
        """
        return f"{self.prefix}match:{name}"

    def match_person_key(self, customer_id: str) -> str:
        return f"{self.prefix}match:person:{customer_id}"

    def match_possible_key(self, customer_id: str) -> str:
        return f"{self.prefix}match:possible:{customer_id}"

    def match_patterns_key(self, chunk: int) -> str:
        return f"{self.prefix}match:patterns:{chunk}"


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


def resolution_request(event: dict[str, Any], identifiers: Sequence[Identifier],
                       slot: str = "") -> ResolutionRequest:
    """Build the graph input for a decoded TouchpointEvent, its usable hashed identifiers and its record."""
    return ResolutionRequest(
        message_id=event["message_id"],
        event_time_ms=int(event["timestamp_ms"]),
        identifiers=tuple(identifiers),
        new_customer_id=new_customer_id(identifiers),
        answer_slot=slot,
    )


def _common_args(layout: GraphLayout, rules: GraphRules, op_id: str, time_ms: int, event_ttl_s: int) -> list[str]:
    return [layout.prefix, rules.to_json(), op_id, str(time_ms), str(event_ttl_s)]


def script_call(
    request: ResolutionRequest, layout: GraphLayout, rules: GraphRules, event_ttl_s: int
) -> tuple[list[str], list[str]]:
    """Return (KEYS, ARGV) of the resolve script for one event; the order is the script's contract."""
    refs = [identifier_ref(i) for i in request.identifiers]
    keys = [layout.identifier_key(ref) for ref in refs]
    args = [
        *_common_args(layout, rules, request.message_id, request.event_time_ms, event_ttl_s),
        request.answer_slot,
        request.new_customer_id,
        *refs,
    ]
    return keys, args


def merge_call(
    op_id: str, time_ms: int, customers: tuple[str, str], reason: str, score: float | None,
    layout: GraphLayout, rules: GraphRules, event_ttl_s: int,
) -> list[str]:
    """Return ARGV of the merge script of two customers (whatever they have been merged into since)."""
    return [*_common_args(layout, rules, op_id, time_ms, event_ttl_s), *customers, reason,
            "" if score is None else repr(score)]


def unmerge_call(
    op_id: str, time_ms: int, customer_id: str, identifiers: Sequence[Identifier], reason: str,
    layout: GraphLayout, rules: GraphRules, event_ttl_s: int,
) -> list[str]:
    """Return ARGV of the unmerge script: split `identifiers` off `customer_id` into a new customer."""
    return [*_common_args(layout, rules, op_id, time_ms, event_ttl_s), customer_id,
            new_customer_id(identifiers), reason, *(identifier_ref(i) for i in identifiers)]


class GraphRefused(ValueError):
    """An operation the graph refused as a whole (unknown customer, identifier not a member, ...)."""


def _refs(items: Any) -> tuple[Identifier, ...]:
    return tuple(parse_identifier_ref(ref) for ref in (items or []))


def parse_resolution(answer: str | bytes) -> Resolution:
    """Read a graph script's JSON answer.

    Lua's cjson writes an empty array as ``{}``, hence the ``or []``.

    >>> parse_resolution('{"customer_id":"c_1","created":true,"replayed":false,"merges":{},"refused":{}}')
    Resolution(customer_id='c_1', created=True, replayed=False, merges=(), refused=(), suppressed=False, \
possible_matches=())
    >>> parse_resolution('{"customer_id":"","created":false,"replayed":false,"suppressed":true}').suppressed
    True
    """
    data = orjson.loads(answer)
    if "error" in data:
        raise GraphRefused(data["error"])
    if data.get("suppressed"):
        return Resolution("", False, False, (), (), suppressed=True)
    survivor = data["customer_id"]
    merges = tuple(
        IdentityMerged(
            merge_id=m["merge_id"],
            survivor_id=m.get("survivor_id") or survivor,
            merged_id=m["merged_id"],
            linking_identifiers=_refs(m.get("identifiers")),
            reason=m.get("reason") or MERGE_REASON_SHARED_IDENTIFIER,
            kind=m.get("kind") or "merge",
            score=m.get("score"),
        )
        for m in (data.get("merges") or [])
    )
    refused = tuple(MergeRefused(r["customer_id"], r["reason"], _refs(r.get("identifiers")))
                    for r in (data.get("refused") or []))
    return Resolution(survivor, bool(data.get("created")), bool(data.get("replayed")), merges, refused)


@dataclass(frozen=True)
class Erasure:
    """The graph's answer to an erasure: what the customer was (all pseudonymous), or found=False."""

    found: bool
    customer_id: str = ""
    merged_ids: tuple[str, ...] = ()
    identifiers: tuple[Identifier, ...] = ()
    suppressed: int = 0

    @property
    def customer_ids(self) -> tuple[str, ...]:
        """The live id first, then every id merged into it."""
        return (self.customer_id, *self.merged_ids) if self.found else ()


def erase_call(op_id: str, time_ms: int, customer_id: str, mode: str, layout: GraphLayout, rules: GraphRules,
               event_ttl_s: int) -> list[str]:
    """Return ARGV of the erase script; `mode` is "plan" (suppress only) or "erase" (suppress and delete)."""
    if mode not in ("plan", "erase"):
        raise ValueError(f"erase mode must be plan or erase, not {mode!r}")
    return [*_common_args(layout, rules, op_id, time_ms, event_ttl_s), customer_id, mode]


def parse_erasure(answer: str | bytes) -> Erasure:
    """Read the erase script's JSON answer (cjson writes an empty array as ``{}``).

    >>> erased = parse_erasure('{"found":true,"customer_id":"c_1","merged_ids":{},"identifiers":["email:ab"],'
    ...                        '"suppressed":1}')
    >>> erased.customer_ids, erased.identifiers, erased.suppressed
    (('c_1',), (Identifier(type='email', value='ab'),), 1)
    >>> parse_erasure('{"found":false}').customer_ids
    ()
    """
    data = json.loads(answer)
    if not data.get("found"):
        return Erasure(False)
    return Erasure(True, data["customer_id"], tuple(sorted(data.get("merged_ids") or [])),
                   tuple(sorted(_refs(data.get("identifiers")), key=identifier_ref)), int(data.get("suppressed") or 0))


def deletion_id(request_id: str) -> str:
    """Return the erasure's idempotency key from the client's request id (a retry gives the same id).

    >>> deletion_id("r-1") == deletion_id("r-1"), deletion_id("r-1")[:4]
    (True, 'del_')
    """
    return "del_" + hashlib.sha256(f"erase\x1f{request_id}".encode()).hexdigest()[:24]


def customer_deletion_record(erasure: Erasure, the_deletion_id: str, requested_at_ms: int) -> dict[str, Any]:
    """Build the CustomerDeletion record announcing the erasure (pseudonymous ids only)."""
    return {"deletion_id": the_deletion_id, "customer_id": erasure.customer_id,
            "merged_ids": list(erasure.merged_ids), "requested_at_ms": requested_at_ms}


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
        "kind": merge.kind,
        "reason": merge.reason,
        "score": merge.score,
        "identifiers": [{"type": i.type, "value": i.value} for i in merge.linking_identifiers],
        "event_time_ms": int(event["timestamp_ms"]),
        "caused_by": event["message_id"],
    }


def lookup_identifier(
    kind: str, clear_value: str, hash_key: bytes, default_region: str, blocklist: Iterable[str]
) -> Identifier:
    """Normalise and hash a clear identifier exactly as the pipeline does, for a lookup by an operator.

    >>> lookup_identifier("email", " Ann@Example.com", b"k", "US", ()) == lookup_identifier(
    ...     "email", "ann@example.com", b"k", "US", ())
    True
    """
    return pseudonymise(normalise(Identifier(kind, clear_value), default_region, frozenset(blocklist)), hash_key)


def short_ref(identifier: Identifier) -> str:
    """Name a hashed identifier in a log line: its type and a hash prefix, enough to find it, nothing personal.

    >>> short_ref(Identifier("email", "e8154de8bf08e8154de8"))
    'email:e8154de8bf08'
    """
    return f"{identifier.type}:{identifier.value[:12]}"


def refusal_log_lines(message_id: str, resolution: Resolution) -> list[str]:
    """Explain each refusal of a resolution in one log line, with hashes only."""
    lines = []
    for refusal in resolution.refused:
        linking = ", ".join(short_ref(i) for i in refusal.identifiers) or "-"
        if refusal.customer_id:
            lines.append(f"identity: refused merging {refusal.customer_id} into {resolution.customer_id} "
                         f"for event {message_id}: {refusal.reason} (via {linking})")
        else:
            lines.append(f"identity: left {linking} off {resolution.customer_id} for event {message_id}: "
                         f"{refusal.reason}")
    return lines
