"""The scoring hop's own cost over the whole CDNOW demo, in-process: CPU and batch time by event-time quarter.

The demo's scoring hop (bench_demo_hops.py) is a batch's wall time plus the wait for the batch
before it; a full demo run needs the whole stack and minutes. This drives this checkout's
ScoringService + RedisScoringStore in-process on an embedded Valkey with the demo's 69,659
CDNOW purchases (4 partitions, `--batch` events per call, about what the demo's paced worker
gets), and reports per quarter of event time: the service's process CPU per event, Valkey's
CPU per event, and each call's wall time (p50/p99/max), plus the crossing checks it ran.

`outputs_sha256` digests every ScoreUpdate the run produced (in order, floats to 12 significant
digits), the model's final description and its prequential quality: two checkouts that give the same digest produced
the same scores; `--dump FILE` writes the records as JSON lines to compare when they do not.

Usage: PYTHONPATH=. .venv/bin/python bench/bench_scoring_hotpath.py [--batch 200] [--limit N] [--dump FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proc_cpu import process_cpu_s

from touchstream.datasets import cdnow_purchases
from touchstream.embedded import free_port, start_valkey
from touchstream.receiver import percentile


def rounded(value: Any) -> Any:
    """Return `value` with every float cut to 12 significant digits (the digest ignores the last bits)."""
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    return value


def quarter_of(t_ms: int) -> str:
    day = datetime.fromtimestamp(t_ms / 1000, UTC)
    return f"{day.year}Q{(day.month - 1) // 3 + 1}"


async def replay(redis_url: str, valkey_pid: int, batch: int, limit: int | None, partitions: int,
                 dump: Path | None) -> dict[str, Any]:
    import redis.asyncio as aioredis
    from prometheus_client import CollectorRegistry

    from services.scoring.metrics import ScoringMetrics
    from services.scoring.service import ResolvedInput, ScoringService
    from services.scoring.settings import ScoringSettings
    from services.scoring.state import Touchpoint
    from services.scoring.store import RedisScoringStore

    purchases = cdnow_purchases()[:limit] if limit else cdnow_purchases()
    redis = aioredis.from_url(redis_url)
    service = ScoringService(RedisScoringStore(redis, "bench"), ScoringSettings(key_prefix="bench"),
                             ScoringMetrics(CollectorRegistry()))
    digest = hashlib.sha256()
    out = dump.open("w") if dump else None
    by_quarter: dict[str, dict[str, Any]] = {}
    scores = 0
    started = time.perf_counter()
    for start in range(0, len(purchases), batch):
        chunk = purchases[start : start + batch]
        inputs = [ResolvedInput(zlib.crc32(p.customer.encode()) % partitions, p.customer,
                                Touchpoint(f"cdnow-{p.line}", p.timestamp_ms, p.timestamp_ms,
                                           event_name="Order Completed", order_amount=p.amount))
                  for p in chunk]
        quarter = by_quarter.setdefault(quarter_of(chunk[-1].timestamp_ms),
                                        {"events": 0, "cpu_s": 0.0, "redis_cpu_s": 0.0, "calls_ms": [],
                                         "checks": 0.0})
        checks_before = service.metrics.crossing_checks._value.get()
        cpu, redis_cpu, wall = time.process_time(), process_cpu_s(valkey_pid), time.perf_counter()
        records = await service.score_touchpoints(inputs)
        quarter["calls_ms"].append((time.perf_counter() - wall) * 1000)
        quarter["cpu_s"] += time.process_time() - cpu
        quarter["redis_cpu_s"] += process_cpu_s(valkey_pid) - redis_cpu
        quarter["events"] += len(chunk)
        quarter["checks"] += service.metrics.crossing_checks._value.get() - checks_before
        scores += len(records)
        for record in records:
            line = json.dumps(rounded(record), sort_keys=True)
            digest.update(line.encode())
            if out:
                out.write(line + "\n")
    seconds = time.perf_counter() - started
    model = service.engine.learner.model
    quality = service.engine.learner.quality
    digest.update(json.dumps(rounded(model.describe()), sort_keys=True, default=str).encode())
    digest.update(json.dumps(rounded([quality.examples, quality.roc_auc.get(), quality.log_loss.get(),
                                      quality.brier.get(), quality.calibration.get()])).encode())
    if out:
        out.close()
    await redis.aclose()
    quarters = {}
    for name, q in by_quarter.items():
        calls = sorted(q["calls_ms"])
        quarters[name] = {"events": q["events"], "cpu_us_per_event": round(q["cpu_s"] / q["events"] * 1e6),
                          "redis_cpu_us_per_event": round(q["redis_cpu_s"] / q["events"] * 1e6),
                          "crossing_checks_per_event": round(q["checks"] / q["events"], 2),
                          "call_p50_ms": round(percentile(calls, 0.5), 1),
                          "call_p99_ms": round(percentile(calls, 0.99), 1),
                          "call_max_ms": round(calls[-1], 1)}
    total_cpu = sum(q["cpu_s"] for q in by_quarter.values())
    return {"events": len(purchases), "batch": batch, "seconds": round(seconds, 1),
            "cpu_us_per_event": round(total_cpu / len(purchases) * 1e6),
            "redis_cpu_us_per_event": round(sum(q["redis_cpu_s"] for q in by_quarter.values()) / len(purchases) * 1e6),
            "scores": scores, "model_version": model.version, "outputs_sha256": digest.hexdigest(),
            "by_quarter": quarters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=200, help="events per ScoringService call")
    parser.add_argument("--limit", type=int, default=None, help="only the first N purchases")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--dump", type=Path, default=None, help="write every ScoreUpdate as a JSON line here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scoring-hotpath-") as tmp:
        port = free_port()
        valkey = start_valkey(port, Path(tmp, "valkey.log"))
        try:
            load_before = [round(v, 2) for v in os.getloadavg()]
            result = asyncio.run(replay(f"redis://127.0.0.1:{port}/0", valkey.pid, args.batch, args.limit,
                                        args.partitions, args.dump))
        finally:
            valkey.stop()
    print(json.dumps({"bench": "scoring_hotpath", **result, "load_average_before": load_before,
                      "load_average": [round(v, 2) for v in os.getloadavg()],
                      "command": " ".join(["bench/bench_scoring_hotpath.py", *sys.argv[1:]])}, indent=2))


if __name__ == "__main__":
    main()
