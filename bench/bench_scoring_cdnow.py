"""Quality of the online scoring model on CDNOW against BG/NBD and Pareto/NBD; prints JSON.

Replays the calibration period of CDNOW (1997-01-01 .. 1997-09-30, 39 weeks) through
scoring, in event order, one of two ways:
- `--via worker` (default): a real scoring worker process (`python -m services.scoring`)
  on the embedded broker (Apache Kafka) and Valkey; the events go to `touchpoints.resolved` as
  ResolvedTouchpoint Avro, and the run waits until the worker has sent every ScoreUpdate.
  The worker is then stopped (it checkpoints its model on shutdown) and the forecasts are
  read from its Redis state and checkpoint.
- `--via service`: the service layer the worker runs (ScoringService + RedisScoringStore on
  the embedded Valkey) called in-process, batch by batch; no Kafka around it.
At the cutoff it asks every customer's
P(purchase in the next 39 weeks) "as of" the cutoff, chained from the 90-day model (see
services/scoring/engine.py), and compares with the holdout (1997-10-01 .. 1998-06-30).
Nothing of the holdout is replayed, so the model never sees a holdout label.

In the same run, BG/NBD (Fader, Hardie & Lee 2005) and Pareto/NBD are fitted with
`lifetimes` on the calibration period (daily resolution), scored by P(alive), expected
purchases, and P(at least one purchase in the holdout).

    .venv/bin/python bench/bench_scoring_cdnow.py [--via worker|service] [--partitions 4] [--model logreg]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from services.scoring.features import features_at
from services.scoring.metrics import ScoringMetrics
from services.scoring.model import PropensityModel
from services.scoring.service import ResolvedInput, ScoringService
from services.scoring.settings import ScoringSettings
from services.scoring.state import Touchpoint
from services.scoring.store import RedisScoringStore
from touchstream import avro
from touchstream.datasets import Purchase, cdnow_purchases
from touchstream.embedded import (
    broker_client_env,
    broker_description,
    create_topics,
    embedded_broker_kind,
    free_port,
    spawn,
    start_broker,
    start_valkey,
    wait_for_port,
)
from touchstream.replay import sum_metric
from touchstream.topics import SCORES, TOUCHPOINTS_RESOLVED

CALIBRATION_START = datetime(1997, 1, 1, tzinfo=UTC)
CUTOFF = datetime(1997, 10, 1, tzinfo=UTC)
HOLDOUT_END = datetime(1998, 7, 1, tzinfo=UTC)
HOLDOUT_DAYS = (HOLDOUT_END - CUTOFF).days  # 273 = 39 weeks


def ms(day: datetime) -> int:
    return int(day.timestamp() * 1000)


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney ROC AUC with ties counted half."""
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    # Average ranks of ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    positives = int(y.sum())
    negatives = len(y) - positives
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-9, 1 - 1e-9)
    return float(-np.mean(np.where(y, np.log(p), np.log(1 - p))))


def summary(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {"roc_auc": round(roc_auc(y, p), 4), "log_loss": round(log_loss(y, p), 4),
            "brier": round(float(np.mean((p - y) ** 2)), 4), "predicted_buyers": round(float(p.sum()), 1)}


def touchpoint(purchase: Purchase, t: int) -> Touchpoint:
    return Touchpoint(f"cdnow-{purchase.line}", t, t, event_name="Order Completed", order_amount=purchase.amount)


async def replay_calibration(
    service: ScoringService, purchases: list[Purchase], times: list[int], partitions: int, batch: int
) -> dict[str, float]:
    inputs = [
        ResolvedInput(zlib.crc32(p.customer.encode()) % partitions, p.customer, touchpoint(p, t))
        for p, t in zip(purchases, times, strict=True)
    ]
    started = time.perf_counter()
    for start in range(0, len(inputs), batch):
        await service.score_touchpoints(inputs[start : start + batch])
    elapsed = time.perf_counter() - started
    rescores = service.metrics.rescores._value.get()
    return {"events": len(inputs), "rescores": rescores, "seconds": round(elapsed, 2),
            "events_per_s_per_worker": round(len(inputs) / elapsed, 1),
            "scorings_per_s_per_worker": round((len(inputs) + rescores) / elapsed, 1)}


def resolved_record(purchase: Purchase, t: int) -> dict[str, Any]:
    return {
        "customer_id": purchase.customer,
        "resolved_at_ms": t,
        "event": {
            "message_id": f"cdnow-{purchase.line}", "type": "track", "event": "Order Completed", "channel": "web",
            "source": "cdnow", "timestamp_ms": t, "received_at_ms": t, "identifiers": [],
            "order": {"order_id": f"cdnow-{purchase.line}", "amount": purchase.amount, "currency": "USD",
                      "items": [{"sku": "cd", "quantity": purchase.quantity, "price": None}]},
            "feedback": None, "consent": [], "properties_json": None,
        },
    }


async def scraped(client: httpx.AsyncClient, port: int, name: str, **labels: str) -> float:
    try:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=10.0)).text
    except httpx.HTTPError:
        return -1.0
    return sum_metric(text, name, **labels)


async def wait_ready(client: httpx.AsyncClient, port: int) -> None:
    for _ in range(600):
        if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("the scoring worker did not get ready in 120 s")


async def replay_through_worker(
    redis_url: str, purchases: list[Purchase], times: list[int], settings: ScoringSettings, partitions: int,
    run_dir: Path,
) -> dict[str, float]:
    """Run a scoring worker on the embedded broker, produce the events, wait for every ScoreUpdate, stop it."""
    broker_port, web_port = free_port(), free_port()
    kind = embedded_broker_kind()
    broker = start_broker(kind, broker_port, run_dir / "kafka", run_dir / "broker.log")
    bootstrap = f"127.0.0.1:{broker_port}"
    worker = None
    try:
        await create_topics(bootstrap, partitions)
        env = {
            "TOUCHSTREAM_KAFKA_BOOTSTRAP": bootstrap, **broker_client_env(kind), "TOUCHSTREAM_REDIS_URL": redis_url,
            "TOUCHSTREAM_PARTITIONS": str(partitions), "TOUCHSTREAM_STATE_DIR": str(run_dir / "state"),
            "TOUCHSTREAM_SCORING_WEB_PORT": str(web_port), "TOUCHSTREAM_SCORING_KEY_PREFIX": settings.key_prefix,
            "TOUCHSTREAM_SCORING_MODEL": settings.model, "TOUCHSTREAM_SCORING_TICK_DAYS": str(settings.tick_days),
            "TOUCHSTREAM_SCORING_LEARNING_RATE": str(settings.learning_rate),
            "TOUCHSTREAM_SCORING_CHECKPOINT_INTERVAL_S": "10",
        }
        worker = spawn("scoring", [sys.executable, "-m", "services.scoring"], run_dir / "scoring-worker.log", env=env)
        wait_for_port(web_port, timeout=60, process=worker)
        async with httpx.AsyncClient() as client:
            await wait_ready(client, web_port)
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=256 * 1024)
            await producer.start()
            started = time.perf_counter()
            try:
                for purchase, t in zip(purchases, times, strict=True):
                    value = avro.encode(TOUCHPOINTS_RESOLVED.schema, resolved_record(purchase, t))
                    await producer.send(TOUCHPOINTS_RESOLVED.name, value, key=purchase.customer.encode())
                await producer.flush()
            finally:
                await producer.stop()
            produced_s = time.perf_counter() - started
            while True:
                if not worker.alive():
                    raise RuntimeError(f"the scoring worker died; see {run_dir / 'scoring-worker.log'}")
                sent = await scraped(client, web_port, "touchstream_scoring_events_out_total", topic=SCORES.name)
                if sent >= len(purchases):
                    break
                await asyncio.sleep(1.0)
            elapsed = time.perf_counter() - started
            rescores = await scraped(client, web_port, "touchstream_scoring_rescores_total")
    finally:
        if worker is not None:
            # SIGTERM: the worker checkpoints its model before it exits.
            worker.stop(timeout=60)
        broker.stop()
    return {"events": len(purchases), "rescores": rescores, "produce_seconds": round(produced_s, 2),
            "seconds": round(elapsed, 2), "events_per_s_per_worker": round(len(purchases) / elapsed, 1),
            "scorings_per_s_per_worker": round((len(purchases) + rescores) / elapsed, 1)}


def bare_river_rate(model_kind: str, learning_rate: float, rows: list[dict[str, float]]) -> float:
    """Learn+predict per second of a fresh model of the same kind on real feature rows (labels random)."""
    model = PropensityModel(learning_rate, kind=model_kind)  # type: ignore[arg-type]
    rng = random.Random(0)
    labels = [rng.random() < 0.3 for _ in rows]
    started = time.perf_counter()
    for features, label in zip(rows, labels, strict=True):
        model.predict_propensity(features)
        model.learn(features, label)
    return round(len(rows) / (time.perf_counter() - started), 1)


def btyd(purchases: list[Purchase], customers: list[str], y: np.ndarray) -> dict[str, Any]:
    from lifetimes import BetaGeoFitter, ParetoNBDFitter
    from lifetimes.utils import calibration_and_holdout_data

    frame = pd.DataFrame({
        "customer": [p.customer for p in purchases],
        "date": pd.to_datetime([p.date for p in purchases], format="%Y%m%d"),
        "amount": [p.amount for p in purchases],
    })
    # pandas 3 needs monetary_value_col here, though the models do not use it.
    rfm = calibration_and_holdout_data(
        frame, "customer", "date", calibration_period_end=(CUTOFF - pd.Timedelta(days=1)).strftime("%Y-%m-%d"),
        observation_period_end=(HOLDOUT_END - pd.Timedelta(days=1)).strftime("%Y-%m-%d"), freq="D",
        monetary_value_col="amount",
    ).reindex(customers)
    x, t_x, big_t = rfm["frequency_cal"], rfm["recency_cal"], rfm["T_cal"]
    actual_repeat = float(rfm["frequency_holdout"].sum())
    out: dict[str, Any] = {"actual_repeat_purchase_days_holdout": actual_repeat}

    started = time.perf_counter()
    bg = BetaGeoFitter(penalizer_coef=0.0)
    bg.fit(x, t_x, big_t)
    expected = np.asarray(bg.conditional_expected_number_of_purchases_up_to_time(HOLDOUT_DAYS, x, t_x, big_t))
    alive = np.asarray(bg.conditional_probability_alive(x, t_x, big_t))
    r, alpha = bg._unload_params("r", "alpha")
    # BG/NBD: an alive customer cannot die before its next purchase, so
    # P(X = 0 | x, t_x, T) = 1 - P(alive) + P(alive) * ((alpha + T) / (alpha + T + t)) ** (r + x).
    none = 1 - alive + alive * ((alpha + big_t) / (alpha + big_t + HOLDOUT_DAYS)) ** (r + x)
    p_any = np.asarray(1 - none)
    out["bg_nbd"] = {
        "params": {k: round(float(v), 4) for k, v in bg.params_.items()},
        "fit_seconds": round(time.perf_counter() - started, 2),
        "roc_auc_expected_purchases": round(roc_auc(y, expected), 4),
        "roc_auc_p_alive": round(roc_auc(y, alive), 4),
        "p_any_purchase": summary(y, p_any),
        "predicted_repeat_purchases": round(float(expected.sum()), 1),
    }

    started = time.perf_counter()
    pnbd = ParetoNBDFitter(penalizer_coef=0.0)
    pnbd.fit(x, t_x, big_t)
    expected = np.asarray(pnbd.conditional_expected_number_of_purchases_up_to_time(HOLDOUT_DAYS, x, t_x, big_t))
    alive = np.asarray(pnbd.conditional_probability_alive(x, t_x, big_t))
    none = np.asarray(pnbd.conditional_probability_of_n_purchases_up_to_time(0, HOLDOUT_DAYS, x, t_x, big_t))
    out["pareto_nbd"] = {
        "params": {k: round(float(v), 4) for k, v in pnbd.params_.items()},
        "fit_seconds": round(time.perf_counter() - started, 2),
        "roc_auc_expected_purchases": round(roc_auc(y, expected), 4),
        "roc_auc_p_alive": round(roc_auc(y, alive), 4),
        "p_any_purchase": summary(y, 1 - none),
        "predicted_repeat_purchases": round(float(expected.sum()), 1),
    }
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    purchases = cdnow_purchases()
    cutoff_ms = ms(CUTOFF)
    # Purchase.timestamp_ms parses the date on every call; once is enough.
    times = [p.timestamp_ms for p in purchases]
    calibration = [p for p, t in zip(purchases, times, strict=True) if t < cutoff_ms]
    holdout = [p for p, t in zip(purchases, times, strict=True) if cutoff_ms <= t < ms(HOLDOUT_END)]
    customers = sorted({p.customer for p in purchases})
    bought = {p.customer for p in holdout}
    y = np.array([c in bought for c in customers])

    run_dir = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    port = free_port()
    valkey = start_valkey(port, run_dir / "valkey.log")
    redis_url = f"redis://127.0.0.1:{port}/0"
    redis = aioredis.from_url(redis_url)
    settings = ScoringSettings(key_prefix="bench:scoring", model=args.model, tick_days=args.tick_days,
                               learning_rate=args.learning_rate)
    try:
        if args.via == "worker":
            throughput = await replay_through_worker(
                redis_url, calibration, times[: len(calibration)], settings, args.partitions, run_dir
            )
        # A fresh service restores the worker's checkpoint (worker path) or is the one that learned.
        service = ScoringService(RedisScoringStore(redis, settings.key_prefix), settings,
                                 ScoringMetrics(CollectorRegistry()))
        if args.via == "service":
            throughput = await replay_calibration(
                service, calibration, times[: len(calibration)], args.partitions, args.batch
            )
        forecasts = await service.forecasts(customers, cutoff_ms, HOLDOUT_DAYS)
        short = await service.forecasts(customers, cutoff_ms, settings.horizon_days)
        states, _ = await service.store.load(customers[:20000])
    finally:
        await redis.aclose()
        valkey.stop()

    p_any = np.array([forecasts[c].propensity for c in customers])
    p_short = np.array([short[c].propensity for c in customers])
    expected = np.array([forecasts[c].expected_purchases for c in customers])
    learner = service.engine.learner
    rows = [features_at(state, cutoff_ms) for state in states.values()]
    result: dict[str, Any] = {
        "dataset": "CDNOW master (lifetimes)",
        "customers": len(customers),
        "calibration": [CALIBRATION_START.date().isoformat(), (CUTOFF - pd.Timedelta(days=1)).date().isoformat()],
        "cutoff": CUTOFF.isoformat(),
        "logs": str(run_dir),
        "holdout_days": HOLDOUT_DAYS,
        "actual_buyers_holdout": int(y.sum()),
        "actual_transactions_holdout": len(holdout),
        "touchstream": {
            "path": {"worker": f"scoring worker process on {broker_description(embedded_broker_kind())} + Valkey",
                     "service": "ScoringService + RedisScoringStore on embedded Valkey, in-process"}[args.via],
            "model": learner.model.version,
            "settings": {"model": settings.model, "horizon_days": settings.horizon_days,
                         "learning_rate": settings.learning_rate, "tick_days": settings.tick_days,
                         "partitions": args.partitions,
                         "batch": args.batch if args.via == "service" else "worker (TOUCHSTREAM_BATCH_SIZE)"},
            "p_any_purchase_39w": summary(y, p_any),
            "roc_auc_90d_propensity_at_cutoff": round(roc_auc(y, p_short), 4),
            "predicted_transactions_39w": round(float(expected.sum()), 1),
            "purchases_per_positive_window": round(float(learner.purchases_per_positive.get()), 3),
            "prequential_90d": {"examples": learner.quality.examples,
                                "roc_auc": round(learner.quality.roc_auc.get(), 4),
                                "log_loss": round(learner.quality.log_loss.get(), 4),
                                "brier": round(learner.quality.brier.get(), 4),
                                "calibration_error": round(learner.quality.calibration.get(), 4)},
            **throughput,
            "bare_river_learn_predict_per_s": bare_river_rate(settings.model, settings.learning_rate, rows),
        },
    }
    result.update(btyd(purchases, customers, y))
    best_btyd = max(result["bg_nbd"]["roc_auc_expected_purchases"], result["pareto_nbd"]["roc_auc_expected_purchases"])
    ours = result["touchstream"]["p_any_purchase_39w"]
    result["targets"] = {
        "auc_at_least_best_btyd": ours["roc_auc"] >= best_btyd,
        "log_loss_below_bg_nbd": ours["log_loss"] < result["bg_nbd"]["p_any_purchase"]["log_loss"],
    }
    assert not math.isnan(ours["roc_auc"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--via", choices=("worker", "service"), default="worker")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch", type=int, default=500, help="--via service: events per call (the worker's batch)")
    parser.add_argument("--model", choices=("logreg", "forest"), default="logreg")
    parser.add_argument("--tick-days", type=float, default=14.0)
    parser.add_argument("--learning-rate", type=float, default=0.002)
    print(json.dumps(asyncio.run(run(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
