"""Per-record cost of the Avro codec (touchstream.avro) against plain fastavro on the same schema.

`fastavro` is schemaless_writer/reader with an already parsed schema and no framing: the floor the
codec cannot go under. `codec` is avro.encode/avro.decode, framing and checks included.
`score_update_older_versions` decodes ScoreUpdate records of older versions into today's (schema
resolution), under their own ids and under id 4, as they lie on `scores` from before ids were per
version. Prints JSON, microseconds per record, the best of several rounds (the machine is shared;
the minimum is the least disturbed measurement).

    .venv/bin/python bench/bench_avro_codec.py [--records 20000] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import fastavro

from touchstream import avro
from touchstream.topics import SCORES, TOUCHPOINTS_RAW, TOUCHPOINTS_RESOLVED

TOUCHPOINT = {
    "message_id": "6f1c2a9e-0d4b-4a43-9b8e-6a3c9f1d2e77", "type": "track", "event": "Order Completed",
    "channel": "app", "source": "shop-backend", "timestamp_ms": 1_764_000_000_000, "received_at_ms": 1_764_000_000_120,
    "identifiers": [{"type": "email", "value": "9c1e5b0d2f7a4e6b8d3c1a0f9e8d7c6b"},
                    {"type": "device_id", "value": "a1b2c3d4e5f60718293a4b5c6d7e8f90"}],
    "order": {"order_id": "o-1001", "amount": 42.5, "currency": "EUR",
              "items": [{"sku": "sku-1", "quantity": 2, "price": 12.5},
                        {"sku": "sku-2", "quantity": 1, "price": 17.5}]},
    "feedback": None, "consent": ["marketing_email"], "properties_json": '{"coupon": "WELCOME10"}',
}
SCORE = {
    "customer_id": "c-0f9e8d7c6b5a4938", "message_id": "6f1c2a9e-0d4b-4a43-9b8e-6a3c9f1d2e77",
    "event_time_ms": 1_764_000_000_000, "received_at_ms": 1_764_000_000_120, "churn_risk": 0.31,
    "purchase_propensity": 0.69, "segment": "loyal", "stage": "active",
    "reasons": [{"feature": f"feature_{i}", "contribution": 0.1 * i} for i in range(5)],
    "features": {f"feature_{i}": float(i) for i in range(12)}, "model_version": "logreg-2026-11-25T10:00:00Z",
    "event_type": "track", "event_name": "Order Completed", "consent": ["marketing_email", "sms"],
    "channel": "app", "time_zone": "Europe/Berlin",
}
CASES: dict[str, dict[str, Any]] = {
    TOUCHPOINTS_RAW.schema: TOUCHPOINT,
    TOUCHPOINTS_RESOLVED.schema: {"customer_id": "c-0f9e8d7c6b5a4938", "event": TOUCHPOINT,
                                  "resolved_at_ms": 1_764_000_000_130},
    SCORES.schema: SCORE,
}


def best_us_per_record(runs: dict[str, Callable[[], object]], records: int, rounds: int) -> dict[str, float]:
    """Best of `rounds` timings of `records` calls of each of `runs`, in microseconds per call.

    The variants take turns within each round, so a burst of load from elsewhere hits all of them.
    """
    for run in runs.values():  # warm-up: first calls fill caches and wake the CPU up
        for _ in range(min(records, 1000)):
            run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            for _ in range(records):
                run()
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: round(seconds / records * 1e6, 2) for name, seconds in best.items()}


def measure(schema_name: str, record: dict[str, Any], records: int, rounds: int) -> dict[str, float]:
    parsed = avro.schema(schema_name)
    framed = avro.encode(schema_name, record)
    body = framed[5:]

    def fastavro_encode() -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, record, strict_allow_default=True)
        return buf.getvalue()

    def fastavro_decode() -> object:
        return fastavro.schemaless_reader(io.BytesIO(body), parsed, None)

    timings = best_us_per_record({
        "fastavro_encode_us": fastavro_encode,
        "codec_encode_us": lambda: avro.encode(schema_name, record),
        "fastavro_decode_us": fastavro_decode,
        "codec_decode_us": lambda: avro.decode(schema_name, framed),
    }, records, rounds)
    return {"bytes": len(framed), **timings}


def measure_older_versions(records: int, rounds: int) -> dict[str, float]:
    """Decode ScoreUpdate records written by older versions: schema resolution against today's reader."""
    codec = avro.default_codec()
    today = codec.current[SCORES.schema]
    older = [v for v in codec.versions if v.name == SCORES.schema and v.version < today.version]
    runs: dict[str, Callable[[], object]] = {}
    for version in older:
        writer = codec.parsed(version.schema_id)
        fields = {f["name"] for f in writer["fields"]}
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, {k: v for k, v in SCORE.items() if k in fields})
        body = buf.getvalue()
        under_own_id = struct.pack(">bI", 0, version.schema_id) + body
        runs[f"v{version.version}_decode_us"] = partial(avro.decode, SCORES.schema, under_own_id)
        if (version.name, version.version) in avro.LEGACY_WRITERS.get(today.schema_id, ()):
            # How it lies on the compacted topic when written before ids were per version.
            under_legacy_id = struct.pack(">bI", 0, today.schema_id) + body
            runs[f"v{version.version}_under_id_{today.schema_id}_decode_us"] = partial(
                avro.decode, SCORES.schema, under_legacy_id)
    return best_us_per_record(runs, records, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2,000 records, 3 rounds")
    args = parser.parse_args()
    records, rounds = (2_000, 3) if args.quick else (args.records, args.rounds)
    load_before = os.getloadavg()[0]
    result = {name: measure(name, record, records, rounds) for name, record in CASES.items()}
    older = measure_older_versions(records, rounds)
    print(json.dumps({"records": records, "rounds": rounds, "per_schema": result,
                      "score_update_older_versions": older,
                      "load_average_1m_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)]},
                     indent=2))


if __name__ == "__main__":
    main()
