"""The replay sends a batch again when its answer was lost, and counts what ingest had accepted the first time."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from touchstream.replay import POST_ATTEMPTS, PipelineState, replay

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


def test_the_replay_posts_no_more_than_max_lag_between_two_looks_at_the_pipeline() -> None:
    # Every event is due at once and the pipeline always reads empty: only the count of events posted
    # since the last look holds the replay back.
    happened: list[int] = []  # 0 for a look, else a post's size

    async def pipeline() -> PipelineState:
        happened.append(0)
        return PipelineState(lag=0)

    def ingest(request: httpx.Request) -> httpx.Response:
        batch = json.loads(request.content)["batch"]
        happened.append(len(batch))
        return httpx.Response(200, json={"accepted": len(batch), "duplicates": 0, "suppressed": 0})

    calls = [(1_000, {"type": "track", "messageId": f"m-{i}"}) for i in range(1_000)]
    accepted = asyncio.run(replay("http://ingest.test", "key", calls, days_per_second=1e9, batch_size=100,
                                  pipeline=pipeline, max_lag=250, look_every_s=0.02,
                                  transport=httpx.MockTransport(ingest)))
    assert accepted == 1_000
    between_looks = [0]
    for size in happened:
        if size == 0:
            between_looks.append(0)
        else:
            between_looks[-1] += size
    assert max(between_looks) <= 300  # the post that reached max_lag (250) ends at 300
    assert happened.count(0) >= 1_000 // 300
