"""An in-memory identity graph: the `GraphStore` Protocol (services/identity/graph.py) in Python dicts.

It follows the Lua scripts of services/identity/scripts.py step by step (resolve, merge, unmerge, the
customer-360 reads): the same survivor order, strong-id, type-limit, shared-identifier and operator-split
rules, the same generated ids and the same answers, remembered per operation id so a redelivery gets
the very same answer. tests/integration/test_identity_graph_contract.py runs one suite against this and
against the Redis graph on Valkey, so the two cannot drift apart unseen. Not here: probabilistic
matching, erasure and the sweep (Redis-only, tested on Valkey).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from services.identity.customer360 import CustomerView, IdentityView
from services.identity.domain import (
    GraphRules,
    Identifier,
    Resolution,
    ResolutionRequest,
    identifier_ref,
    new_customer_id,
    parse_identifier_ref,
    parse_resolution,
)

HISTORY_KEPT = 200
MAX_MERGE_HOPS = 64


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _kind_of(ref: str) -> str:
    return ref.rpartition(":")[0]


class InMemoryIdentityGraph:
    """`GraphStore` in dicts, with the Lua scripts' rules (see the module docstring)."""

    def __init__(self, rules: GraphRules) -> None:
        self.rules = rules
        self.identifiers: dict[str, dict[str, str]] = {}  # ref -> owner, first_ms, last_ms, shared
        self.seen_with: dict[str, set[str]] = {}  # ref -> customers it was seen with in refused merges
        self.customers: dict[str, dict[str, str]] = {}  # id -> first/last_seen_ms, status, merged_into, ...
        self.members: dict[str, set[str]] = {}
        self.history: dict[str, list[str]] = {}  # JSON entries, oldest first
        self.apart: dict[str, set[str]] = {}
        self.answers: dict[str, str] = {}  # op id -> the answer kept for a redelivery
        self.suppressed: set[str] = set()

    # -- the scripts' prelude ---------------------------------------------------------------------------

    def _replayed(self, op_id: str) -> Resolution | None:
        kept = self.answers.get(op_id)
        if kept is None:
            return None
        return parse_resolution(json.dumps({**json.loads(kept), "replayed": True}))

    def _remember(self, op_id: str, answer: dict[str, Any]) -> Resolution:
        self.answers[op_id] = json.dumps({k: v for k, v in answer.items() if v is not False and v != [] and v != {}})
        return parse_resolution(json.dumps(answer))

    def _current_id(self, customer_id: str) -> str:
        for _ in range(MAX_MERGE_HOPS):
            into = self.customers.get(customer_id, {}).get("merged_into")
            if into is None:
                return customer_id
            customer_id = into
        return customer_id

    def _seen(self, customer_id: str, now: int) -> int:
        first = self.customers.get(customer_id, {}).get("first_seen_ms")
        return int(first) if first is not None else now

    def _profile(self, customer_id: str) -> tuple[dict[str, set[str]], dict[str, int]]:
        strongs: dict[str, set[str]] = {}
        counts: dict[str, int] = {}
        for ref in self.members.get(customer_id, set()):
            kind = _kind_of(ref)
            counts[kind] = counts.get(kind, 0) + 1
            if kind in self.rules.strong_types:
                strongs.setdefault(kind, set()).add(ref)
        return strongs, counts

    def _apart_from(self, customer_id: str, others: set[str]) -> bool:
        return any(self._current_id(other) in others for other in self.apart.get(customer_id, set()))

    def _refusal(self, customer_id: str, group: set[str], group_strong: dict[str, str],
                 group_counts: dict[str, int]) -> str | None:
        strongs, counts = self._profile(customer_id)
        if any(kind in group_strong and group_strong[kind] != ref for kind, refs in strongs.items() for ref in refs):
            return "conflicting_strong_id"
        if any(group_counts.get(kind, 0) + n > self.rules.limit_of(kind) for kind, n in counts.items()):
            return "type_limit"
        if self._apart_from(customer_id, group) or any(self._apart_from(other, {customer_id}) for other in group):
            return "operator_split"
        return None

    def _absorb(self, customer_id: str, group: set[str], group_strong: dict[str, str],
                group_counts: dict[str, int]) -> None:
        strongs, counts = self._profile(customer_id)
        group.add(customer_id)
        for kind, refs in strongs.items():
            for ref in sorted(refs):
                group_strong.setdefault(kind, ref)
        for kind, n in counts.items():
            group_counts[kind] = group_counts.get(kind, 0) + n

    def _note_history(self, customer_id: str, entry: dict[str, Any]) -> None:
        kept = self.history.setdefault(customer_id, [])
        kept.append(json.dumps(entry))
        del kept[:-HISTORY_KEPT]

    def _claim_id(self, candidate: str, salt: str) -> str:
        status = self.customers.get(candidate, {}).get("status")
        if status is None or status == "merged":
            return candidate
        return "c_" + _sha1(f"{candidate}|{salt}")[:24]

    def _start_customer(self, customer_id: str, first: str, last: str, op_id: str) -> None:
        self.customers[customer_id] = {"first_seen_ms": first, "last_seen_ms": last, "created_by": op_id,
                                       "status": "active"}

    def _stretch(self, customer_id: str, first: int | None, last: int | None) -> None:
        row = self.customers.setdefault(customer_id, {})
        current_first, current_last = row.get("first_seen_ms"), row.get("last_seen_ms")
        if first is not None and (current_first is None or first < int(current_first)):
            row["first_seen_ms"] = str(first)
        if last is not None and (current_last is None or last > int(current_last)):
            row["last_seen_ms"] = str(last)

    def _merge_into(self, survivor: str, merged: str, reason: str, score: float | None, linking: list[str],
                    op_id: str, now: int) -> dict[str, Any]:
        merge_id = "m_" + _sha1(f"{survivor}|{merged}|{op_id}")[:24]
        for ref in self.members.pop(merged, set()):
            self.identifiers.setdefault(ref, {})["owner"] = survivor
            self.members.setdefault(survivor, set()).add(ref)
        for other in self.apart.pop(merged, set()):
            self.apart.setdefault(survivor, set()).add(other)
        row = self.customers.get(merged, {})
        self._stretch(survivor, _int(row.get("first_seen_ms")), _int(row.get("last_seen_ms")))
        self.history.setdefault(survivor, []).extend(self.history.pop(merged, []))
        entry: dict[str, Any] = {"merge_id": merge_id, "kind": "merge", "survivor_id": survivor, "merged_id": merged,
                                 "reason": reason, "at_ms": now, "caused_by": op_id}
        if score is not None:
            entry["score"] = score
        self._note_history(survivor, entry)
        self.customers.setdefault(merged, {}).update(
            {"status": "merged", "merged_into": survivor, "merge_id": merge_id, "merged_at_ms": str(now)})
        answer: dict[str, Any] = {"merge_id": merge_id, "merged_id": merged, "survivor_id": survivor,
                                  "reason": reason, "identifiers": linking}
        if score is not None:
            answer["score"] = score
        return answer

    def _note_seen_with(self, ref: str, customer_ids: list[str]) -> None:
        if _kind_of(ref) in self.rules.strong_types:
            return
        seen = self.seen_with.setdefault(ref, set())
        seen.update(customer_ids)
        if len(seen) <= self.rules.shared_max:
            return
        live = {self._current_id(c) for c in seen}
        self.seen_with[ref] = live
        if len(live) > self.rules.shared_max:
            self.identifiers.setdefault(ref, {})["shared"] = "1"

    # -- the scripts -------------------------------------------------------------------------------------

    async def resolve(self, requests: Sequence[ResolutionRequest]) -> list[Resolution]:
        return [self._resolve(request) for request in requests]

    def _resolve(self, request: ResolutionRequest) -> Resolution:
        op_id, now = request.message_id, request.event_time_ms
        again = self._replayed(op_id)
        if again is not None:
            return again
        refs = [identifier_ref(i) for i in request.identifiers]
        if any(_sha1("suppress:" + ref) in self.suppressed for ref in refs):
            return parse_resolution(json.dumps({"customer_id": "", "created": False, "replayed": False,
                                                "suppressed": True}))
        owners: list[str] = []
        owner_of: dict[str, str] = {}
        linked: dict[str, list[str]] = {}
        shared: dict[str, str | bool] = {}
        refused: list[dict[str, Any]] = []
        for ref in refs:
            row = self.identifiers.get(ref, {})
            if row.get("shared") == "1":
                shared[ref] = self._current_id(row["owner"]) if row.get("owner") else True
            elif row.get("owner"):
                owner = row["owner"]
                owner_of[ref] = owner
                if owner not in linked:
                    linked[owner] = []
                    owners.append(owner)
                linked[owner].append(ref)
        owners.sort(key=lambda c: (self._seen(c, now), c))
        group: set[str] = set()
        group_strong: dict[str, str] = {}
        group_counts: dict[str, int] = {}
        for ref in refs:
            kind = _kind_of(ref)
            if kind in self.rules.strong_types and kind not in group_strong:
                group_strong[kind] = ref
        accepted, refused_ids = [], []
        for owner in owners:
            why = self._refusal(owner, group, group_strong, group_counts)
            if why:
                refused.append({"customer_id": owner, "reason": why, "identifiers": linked[owner]})
                refused_ids.append(owner)
            else:
                self._absorb(owner, group, group_strong, group_counts)
                accepted.append(owner)
        created, merges = False, []
        if accepted:
            survivor = accepted[0]
        else:
            survivor = self._claim_id(request.new_customer_id, op_id)
            self._start_customer(survivor, str(now), str(now), op_id)
            created = True
        for other in accepted[1:]:
            merges.append(self._merge_into(survivor, other, "shared_identifier", None, linked[other], op_id, now))
        candidate = request.new_customer_id
        if not created and candidate != survivor:
            first = self._seen(survivor, now)
            if now < first or (now == first and candidate < survivor):
                status = self.customers.get(candidate, {}).get("status")
                if status is None or status == "merged":
                    row = self.customers[survivor]
                    self._start_customer(candidate, row["first_seen_ms"], row["last_seen_ms"], op_id)
                    merges.append(self._merge_into(candidate, survivor, "earlier_event", None, [], op_id, now))
                    survivor = candidate
        for ref in refs:
            kind = _kind_of(ref)
            if ref in shared:
                if shared[ref] is not True and shared[ref] != survivor:
                    refused.append({"customer_id": shared[ref], "reason": "shared_identifier", "identifiers": [ref]})
            elif ref not in owner_of:
                if kind in self.rules.strong_types and group_strong.get(kind) != ref:
                    refused.append({"customer_id": "", "reason": "conflicting_strong_id", "identifiers": [ref]})
                elif group_counts.get(kind, 0) >= self.rules.limit_of(kind):
                    refused.append({"customer_id": "", "reason": "type_limit", "identifiers": [ref]})
                else:
                    group_counts[kind] = group_counts.get(kind, 0) + 1
                    self.identifiers.setdefault(ref, {}).update(
                        {"owner": survivor, "first_ms": str(now), "last_ms": str(now)})
                    self.members.setdefault(survivor, set()).add(ref)
            row = self.identifiers.get(ref, {})
            if ref not in shared and row.get("owner") == survivor:
                if now < int(row["first_ms"]):
                    row["first_ms"] = str(now)
                if now > int(row["last_ms"]):
                    row["last_ms"] = str(now)
        self._stretch(survivor, now, now)
        if refused_ids:
            for ref in owner_of:
                self._note_seen_with(ref, [survivor, *refused_ids])
        return self._remember(op_id, {"customer_id": survivor, "created": created, "replayed": False,
                                      "merges": merges, "refused": refused})

    async def merge_customers(self, op_id: str, time_ms: int, customers: tuple[str, str], reason: str,
                              score: float | None) -> Resolution:
        again = self._replayed(op_id)
        if again is not None:
            return again
        a, b = self._current_id(customers[0]), self._current_id(customers[1])
        if a == b:
            return self._remember(op_id, {"customer_id": a, "created": False, "replayed": False, "merges": [],
                                          "refused": []})
        survivor, merged = a, b
        if (self._seen(b, time_ms), b) < (self._seen(a, time_ms), a):
            survivor, merged = b, a
        group: set[str] = set()
        group_strong: dict[str, str] = {}
        group_counts: dict[str, int] = {}
        self._absorb(survivor, group, group_strong, group_counts)
        why = self._refusal(merged, group, group_strong, group_counts)
        if why:
            return self._remember(op_id, {"customer_id": a, "created": False, "replayed": False, "merges": [],
                                          "refused": [{"customer_id": b, "reason": why, "identifiers": []}]})
        merge = self._merge_into(survivor, merged, reason, score, [], op_id, time_ms)
        return self._remember(op_id, {"customer_id": survivor, "created": False, "replayed": False,
                                      "merges": [merge], "refused": []})

    async def unmerge(self, op_id: str, time_ms: int, customer_id: str, identifiers: Sequence[Identifier],
                      reason: str) -> Resolution:
        again = self._replayed(op_id)
        if again is not None:
            return again
        source = self._current_id(customer_id)
        if self.customers.get(source, {}).get("status") != "active":
            return self._remember(op_id, {"error": "unknown_customer"})
        refs = [identifier_ref(i) for i in identifiers]
        owned = self.members.get(source, set())
        for ref in refs:
            if ref not in owned:
                return self._remember(op_id, {"error": "not_a_member", "identifier": ref})
        if not refs or len(refs) >= len(owned):
            return self._remember(op_id, {"error": "must_leave_identifiers"})
        new_id = self._claim_id(new_customer_id(identifiers), op_id)
        firsts = [int(self.identifiers[r]["first_ms"]) for r in refs if "first_ms" in self.identifiers.get(r, {})]
        lasts = [int(self.identifiers[r]["last_ms"]) for r in refs if "last_ms" in self.identifiers.get(r, {})]
        self._start_customer(new_id, str(min(firsts, default=time_ms)), str(max(lasts, default=time_ms)), op_id)
        for ref in refs:
            owned.discard(ref)
            self.members.setdefault(new_id, set()).add(ref)
            self.identifiers[ref]["owner"] = new_id
        self.apart.setdefault(source, set()).add(new_id)
        self.apart.setdefault(new_id, set()).add(source)
        merge_id = "u_" + _sha1(f"{source}|{new_id}|{op_id}")[:24]
        entry = {"merge_id": merge_id, "kind": "unmerge", "survivor_id": source, "merged_id": new_id,
                 "reason": reason, "at_ms": time_ms, "caused_by": op_id, "identifiers": refs}
        self._note_history(source, entry)
        self._note_history(new_id, entry)
        return self._remember(op_id, {"customer_id": source, "created": True, "replayed": False, "refused": [],
                                      "merges": [{"merge_id": merge_id, "kind": "unmerge", "survivor_id": source,
                                                  "merged_id": new_id, "reason": reason, "identifiers": refs}]})

    # -- the customer-360 reads ----------------------------------------------------------------------------

    async def customer(self, customer_id: str) -> CustomerView | None:
        live = customer_id
        for _ in range(MAX_MERGE_HOPS):
            row = self.customers.get(live)
            if row is None or "status" not in row:
                return None
            if "merged_into" not in row:
                break
            live = row["merged_into"]
        row = self.customers[live]
        identities = []
        for ref in sorted(self.members.get(live, set())):
            seen = self.identifiers.get(ref, {})
            identifier = parse_identifier_ref(ref)
            identities.append(IdentityView(identifier.type, identifier.value, _int(seen.get("first_ms")),
                                           _int(seen.get("last_ms")), seen.get("shared") == "1"))
        merges = tuple(json.loads(entry) for entry in self.history.get(live, []))
        return CustomerView(live, customer_id, _int(row.get("first_seen_ms")), _int(row.get("last_seen_ms")),
                            tuple(identities), merges)

    async def find(self, identifier: Identifier) -> CustomerView | None:
        owner = self.identifiers.get(identifier_ref(identifier), {}).get("owner")
        return await self.customer(owner) if owner is not None else None


def _int(value: str | None) -> int | None:
    return int(value) if value is not None else None
