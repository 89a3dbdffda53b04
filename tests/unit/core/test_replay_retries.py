"""The replay sends a batch again when its answer was lost, and counts what ingest had accepted the first time."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from touchstream.replay import POST_ATTEMPTS, replay

CALLS = [(1_000 + i, {"type": "track", "event": "Order Completed", "messageId": f"m-{i}", "userId": f"u-{i}"})
         for i in range(30)]


def run(handler: httpx.MockTransport) -> int:
    return asyncio.run(replay("http://ingest.test", "key", CALLS, days_per_second=1e9, batch_size=10,
                              transport=handler))


def test_a_batch_whose_answer_was_lost_is_sent_again_and_counted_once() -> None:
    seen: set[str] = set()
    connections_lost: list[int] = []

    def ingest(request: httpx.Request) -> httpx.Response:
        batch = json.loads(request.content)["batch"]
        fresh = [event for event in batch if event["messageId"] not in seen]
        seen.update(event["messageId"] for event in batch)
        if batch[0]["messageId"] == "m-10" and not connections_lost:
            # Accepted, then the connection went before the answer did.
            connections_lost.append(len(fresh))
            raise httpx.ReadError("connection closed by the server")
        return httpx.Response(200, json={"success": True, "accepted": len(fresh),
                                         "duplicates": len(batch) - len(fresh), "suppressed": 0})

    assert run(httpx.MockTransport(ingest)) == 30
    assert connections_lost == [10] and len(seen) == 30


def test_a_batch_ingest_never_answers_stops_the_replay_naming_the_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    tries: list[int] = []

    def unreachable(request: httpx.Request) -> httpx.Response:
        tries.append(1)
        raise httpx.ConnectError("connection refused")

    async def no_wait(_: float) -> None:
        return None

    monkeypatch.setattr("touchstream.replay.asyncio.sleep", no_wait)
    with pytest.raises(RuntimeError, match=f"no answer to a batch in {POST_ATTEMPTS} tries .*ConnectError"):
        run(httpx.MockTransport(unreachable))
    assert len(tries) >= POST_ATTEMPTS
