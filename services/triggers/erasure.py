"""Erasure in triggers: forget a customer's rule states, caps, timers and queued deliveries, and tell
marketing with a `customer.deleted` webhook that carries pseudonymous customer ids only.

A CustomerDeletion record (topic customers.deletions, from identity) lists the live customer id
and every id merged into it. Triggers then
- records the ids as erased (`ErasedCustomers`, kept longer than the event logs): their scores are
  no longer evaluated and their actions never queued nor sent, even by a worker that restarts or
  lags and reads `scores` or `actions` again;
- deletes every `triggers:state:{<id>}:*` and `triggers:cap:{<id>}:*` key (named by the customer's key
  index `triggers:keys:{<id>}`, plus each current rule's state key: the keyspace is never scanned, so an
  erasure costs what the customer has, not what Redis holds) and the ids' silence timers;
- drops the actions still queued for delivery to them (pending retries included): they are never
  sent. A request already on the wire when the erasure arrives cannot be recalled, but its retry
  is not written back (`DeliveryQueue.reschedule` only updates an action still queued);
- emits one `customer.deleted` RetentionAction per endpoint in TOUCHSTREAM_TRIGGERS_DELETION_ENDPOINTS
  (default: every registered endpoint, since each may hold actions about the customer), signed and
  retried like any action. Its id is derived from the deletion id, so a replayed erasure is one webhook.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from services.triggers.state_store import (
    TIMERS_KEY,
    DeliveryQueue,
    customer_keys_key,
    indexed_key,
    state_key,
    timer_member,
)
from touchstream.privacy import DELETED_RULE_ID, ErasedCustomers

DELETED_TYPE = "customer.deleted"
# Keys per DEL command.
DELETE_CHUNK = 1000


def deleted_ids(record: Mapping[str, Any]) -> list[str]:
    """Return every customer id a CustomerDeletion record erases, the live one first.

    >>> deleted_ids({"customer_id": "c_1", "merged_ids": ["c_0", "c_1"]})
    ['c_1', 'c_0']
    """
    return list(dict.fromkeys([record["customer_id"], *record.get("merged_ids", [])]))


def deletion_action_id(deletion_id: str, endpoint: str) -> str:
    """Return the deletion notice's idempotency key (its webhook-id) for one endpoint.

    >>> deletion_action_id("del_1", "marketing") == deletion_action_id("del_1", "marketing")
    True
    >>> deletion_action_id("del_1", "marketing")[:4]
    'act_'
    """
    digest = hashlib.sha256(f"{DELETED_RULE_ID}\x1f{deletion_id}\x1f{endpoint}".encode()).hexdigest()
    return f"act_{digest[:32]}"


def deletion_action_records(record: Mapping[str, Any], endpoints: Iterable[str],
                            created_at_ms: int) -> list[dict[str, Any]]:
    """Return the `customer.deleted` RetentionAction records (one per endpoint) for an erasure.

    >>> [a] = deletion_action_records({"deletion_id": "del_1", "customer_id": "c_1", "merged_ids": ["c_0"],
    ...                                "requested_at_ms": 0}, ["marketing"], 5)
    >>> a["rule_id"], a["outcome"], json.loads(a["payload_json"])["data"]
    ('customer.deleted', 'fired', {'customer_id': 'c_1', 'merged_ids': ['c_0'], 'deletion_id': 'del_1'})
    """
    requested_at_ms = int(record["requested_at_ms"])
    records = []
    for endpoint in endpoints:
        the_action_id = deletion_action_id(record["deletion_id"], endpoint)
        envelope = {
            "type": DELETED_TYPE,
            "timestamp": _iso_utc(requested_at_ms),
            "action_id": the_action_id,
            "rule_id": DELETED_RULE_ID,
            "customer_id": record["customer_id"],
            "data": {"customer_id": record["customer_id"], "merged_ids": list(record.get("merged_ids", [])),
                     "deletion_id": record["deletion_id"]},
        }
        records.append({
            "action_id": the_action_id,
            "rule_id": DELETED_RULE_ID,
            "customer_id": record["customer_id"],
            "outcome": "fired",
            "reason": None,
            "endpoint": endpoint,
            "payload_json": json.dumps(envelope, separators=(",", ":")),
            "event_time_ms": requested_at_ms,
            "received_at_ms": requested_at_ms,
            "created_at_ms": created_at_ms,
        })
    return records


def _iso_utc(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def forget_customers(redis: aioredis.Redis, queue: DeliveryQueue, erased: ErasedCustomers,
                           customer_ids: Sequence[str], rule_ids: Iterable[str],
                           endpoints: Iterable[str]) -> tuple[int, int]:
    """Record the customers as erased, then delete their rule states, caps and timers, and their
    queued deliveries.

    Idempotent. Returns (keys deleted, queued actions dropped).
    """
    ids = sorted(set(customer_ids))
    if not ids:
        return 0, 0
    await erased.add(ids)
    rule_ids = list(rule_ids)
    async with redis.pipeline(transaction=False) as pipe:
        for cid in ids:
            pipe.smembers(customer_keys_key(cid))
        indexed = await pipe.execute()
    # The indexes name every key written since they exist; the current rules' state keys are named
    # too, for states written before (a cap key lives 3 days; a state of a rule since removed, its TTL).
    doomed = sorted({*(indexed_key(cid, m.decode() if isinstance(m, bytes) else str(m))
                       for cid, members in zip(ids, indexed, strict=True) for m in members),
                     *(state_key(rule_id, cid) for rule_id in rule_ids for cid in ids)})
    deleted = 0
    async with redis.pipeline(transaction=False) as pipe:
        for start in range(0, len(doomed), DELETE_CHUNK):
            pipe.delete(*doomed[start:start + DELETE_CHUNK])
        pipe.delete(*(customer_keys_key(cid) for cid in ids))
        timers = [timer_member((rule_id, cid)) for rule_id in rule_ids for cid in ids]
        if timers:
            pipe.zrem(TIMERS_KEY, *timers)
        replies = await pipe.execute()
        deleted = sum(int(r) for r in replies[: -2 if timers else -1])
    dropped = 0
    for endpoint in endpoints:
        stale = []
        for action_id, state_json in await queue.all_queued(endpoint):
            try:
                customer = json.loads(state_json)["action"]["customer_id"]
            except (ValueError, KeyError, TypeError):
                continue
            if customer in ids:
                stale.append(action_id)
        await queue.remove_many(endpoint, stale)
        dropped += len(stale)
    return deleted, dropped
