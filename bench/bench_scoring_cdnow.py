"""Quality of the online scoring model on CDNOW against BG/NBD and Pareto/NBD, at several cuts; prints JSON.

For each calibration cut (weeks after 1997-01-01: 13, 20, 33, 39 and 45 by default) the
purchases before the cut, and nothing after it, are replayed in event order through scoring:
- `--via worker` (default): a real scoring worker process (`python -m services.scoring`) on
  the embedded broker (Apache Kafka) and Valkey; the events go to `touchpoints.resolved` as
  ResolvedTouchpoint Avro, and the run waits until the worker has scored every one. The
  worker is then stopped (it checkpoints its model on shutdown). Its CPU time (from /proc)
  over the replay is reported per event.
- `--via service`: ScoringService + RedisScoringStore on the embedded Valkey, in-process.
Then every customer's P(a purchase between the cut and 1998-06-30) is read from what the
service stored (`ScoringService.forecasts`, chained from its step model as if the customer
stayed silent) and compared with the holdout. In the same run BG/NBD (Fader, Hardie & Lee
2005) and Pareto/NBD are fitted with `lifetimes` on the same calibration period.

`--baseline REF` also replays `--baseline-cuts` (the 39-week cut by default) through the
scoring code of git REF (exported with `git archive` into a temporary directory and run from
there, worker and forecasts alike): quality and the worker's CPU per event before and after,
measured in one run on the same machine.

No holdout label reaches the service: `calibration_events` is the only source of what is
replayed (tests/integration/test_scoring_bench_replay.py holds it to that), and the forecasts read
only the service's own state and model.

Each cut also reports `extrapolation`: the chain's predicted buyers against the actual at shorter horizons
(2 to 64 weeks) inside the scored period, and each of the service's BTYD priors alone over the whole
horizon (its closed form, no regression or calibration): how the long forecast extrapolates.

`--in-stream` is the check settings may be chosen on: each cut's calibration period is split in
two, the first half replayed and its forecasts scored on the second half (`evaluation_window`),
so neither the replay nor the figures read anything after the cut, what the live model could
compute itself once those outcomes matured. The holdout run reports; it chooses nothing.

    .venv/bin/python bench/bench_scoring_cdnow.py [--cuts 13,20,33,39,45] [--via worker|service]
        [--in-stream] [--no-sentiment] [--baseline main] [--baseline-cuts 39] [--partitions 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bench_sentiment
import httpx
import numpy as np
import pandas as pd
from aiokafka import AIOKafkaProducer
from proc_cpu import process_cpu_s

from services.scoring.metrics import CROSSING_CHECKS_TOTAL, CROSSINGS_TOTAL
from touchstream import avro
from touchstream.datasets import Purchase, cdnow_purchases
from touchstream.embedded import (
    ManagedProcess,
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
from touchstream.metrics import events_out_total
from touchstream.replay import sum_metric
from touchstream.topics import SCORES, TOUCHPOINTS_RESOLVED

CALIBRATION_START = datetime(1997, 1, 1, tzinfo=UTC)
HOLDOUT_END = datetime(1998, 7, 1, tzinfo=UTC)
REPO = Path(__file__).resolve().parent.parent
# Run in a subprocess with the code under test first on its path, so the same lines read the
# forecasts of this checkout's scoring and of an older one (`--baseline`).
FORECASTS_SCRIPT = """
import asyncio, json, sys
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from services.scoring.metrics import ScoringMetrics
from services.scoring.service import ScoringService
from services.scoring.settings import ScoringSettings
from services.scoring.store import RedisScoringStore

async def main(redis_url, prefix, cutoff_ms, days, customers, horizons):
    redis = aioredis.from_url(redis_url)
    service = ScoringService(RedisScoringStore(redis, prefix), ScoringSettings(key_prefix=prefix),
                             ScoringMetrics(CollectorRegistry()))
    forecasts = await service.forecasts(customers, cutoff_ms, days)
    # What the service knows of each customer's orders at the cut (the spend model's inputs).
    states, _ = await service.store.load(customers)
    spend = getattr(learner := service.engine.learner, "spend", None)
    order_value = None
    if spend is not None and spend.model.fitted:
        # The service's own spend model (learned online during the replay), as its ScoreUpdates use it.
        import numpy as np
        ids = list(states)
        orders = np.array([states[c].purchase_count for c in ids], dtype=float)
        total = np.array([states[c].monetary_total for c in ids])
        means = np.divide(total, orders, out=np.zeros_like(total), where=orders > 0)
        order_value = dict(zip(ids, spend.expected_order_value(orders, means).tolist()))
    quality = learner.quality
    model = learner.model
    extrapolation = None
    if hasattr(model, "priors"):
        # How the forecast extrapolates: the chain over shorter horizons, and each BTYD prior alone
        # (its own closed form over the whole horizon, no logistic regression or calibration).
        import numpy as np
        from services.scoring.features import path_model_inputs, silent_path
        ids = list(states)
        paths = np.stack([silent_path(states[c]) for c in ids])
        now = np.full(len(ids), float(cutoff_ms))
        _, btyd = path_model_inputs(paths, now)
        extrapolation = {
            "priors_alone": {prior.structure: dict(zip(ids, prior.p_any(btyd, days).tolist()))
                             for prior in model.priors},
            "chain_by_horizon": {str(h): dict(zip(ids, service.engine.horizon_forecasts(paths, now, h)[0].tolist()))
                                 for h in horizons}}
    await redis.aclose()
    return {"p_any": {c: f.propensity for c, f in forecasts.items()},
            "expected": {c: f.expected_purchases for c, f in forecasts.items()},
            "orders": {c: s.purchase_count for c, s in states.items()},
            "spend": {c: s.monetary_total for c, s in states.items()}, "order_value": order_value,
            "model_version": model.version, "extrapolation": extrapolation,
            "model": model.describe() if hasattr(model, "describe") else {},
            "prequential": {"examples": quality.examples, "roc_auc": quality.roc_auc.get(),
                            "log_loss": quality.log_loss.get(), "brier": quality.brier.get(),
                            "calibration_error": quality.calibration.get()}}

arguments = json.load(sys.stdin)
print(json.dumps(asyncio.run(main(**arguments))))
"""


@dataclass(frozen=True)
class CodeTree:
    """A scoring implementation to run: this checkout, or an exported git revision."""

    name: str
    root: Path | None = None

    def python(self) -> list[str]:
        # -P: the exported tree on PYTHONPATH comes before this checkout's editable install.
        return [sys.executable, "-P"] if self.root else [sys.executable]

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.root)} if self.root else {}


def ms(day: datetime) -> int:
    return int(day.timestamp() * 1000)


def cut_at(weeks: int) -> datetime:
    return CALIBRATION_START + timedelta(weeks=weeks)


def calibration_events(purchases: Sequence[Purchase], cutoff_ms: int) -> list[tuple[Purchase, int]]:
    """Return the purchases the service may see for a cut: those strictly before it, with their event times."""
    return [(p, t) for p in purchases if (t := p.timestamp_ms) < cutoff_ms]


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney ROC AUC with ties counted half."""
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    _, first, counts = np.unique(score[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1, counts)
    positives = int(y.sum())
    negatives = len(y) - positives
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def value_figures(actual: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """Spearman, top-decile capture of the actual revenue, MAE and totals of a per-customer spend prediction."""
    from scipy.stats import spearmanr

    top = np.argsort(-predicted, kind="mergesort")[: max(1, len(predicted) // 10)]
    return {"spearman": rounded(float(spearmanr(predicted, actual).statistic)),
            "top_decile_capture": rounded(float(actual[top].sum() / actual.sum())),
            "mae": rounded(float(np.mean(np.abs(predicted - actual))), 2),
            "predicted_revenue": round(float(predicted.sum()), 0), "actual_revenue": round(float(actual.sum()), 0),
            "revenue_error": rounded(float(predicted.sum() / actual.sum() - 1.0))}


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-9, 1 - 1e-9)
    return float(-np.mean(np.where(y, np.log(p), np.log(1 - p))))


def rounded(value: float, digits: int = 4) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), digits)


def touchpoint_record(purchase: Purchase, t: int) -> dict[str, Any]:
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


async def replay(events: list[tuple[Purchase, int]], send: Callable[[Purchase, int], Awaitable[None]]) -> None:
    """Hand each calibration event to `send`, in event order."""
    for purchase, t in events:
        await send(purchase, t)


async def scraped(client: httpx.AsyncClient, port: int, name: str, **labels: str) -> float:
    try:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=10.0)).text
    except httpx.HTTPError:
        return -1.0
    return sum_metric(text, name, **labels)


async def wait_ready(client: httpx.AsyncClient, port: int, worker: ManagedProcess) -> None:
    for _ in range(600):
        if not worker.alive():
            raise RuntimeError(f"the scoring worker exited; see {worker.log_path}")
        try:
            if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("the scoring worker did not get ready in 120 s")


async def replay_through_worker(code: CodeTree, redis_url: str, prefix: str, events: list[tuple[Purchase, int]],
                                partitions: int, run_dir: Path) -> dict[str, Any]:
    """Run a scoring worker of `code` on a fresh embedded broker, produce the events, wait until all are scored."""
    broker_port, web_port = free_port(), free_port()
    kind = embedded_broker_kind()
    broker = start_broker(kind, broker_port, run_dir / "kafka", run_dir / "broker.log")
    bootstrap = f"127.0.0.1:{broker_port}"
    worker = None
    try:
        await create_topics(bootstrap, partitions)
        env = {
            **code.env(), "TOUCHSTREAM_KAFKA_BOOTSTRAP": bootstrap, **broker_client_env(kind),
            "TOUCHSTREAM_REDIS_URL": redis_url, "TOUCHSTREAM_PARTITIONS": str(partitions),
            "TOUCHSTREAM_STATE_DIR": str(run_dir / "state"), "TOUCHSTREAM_SCORING_WEB_PORT": str(web_port),
            "TOUCHSTREAM_SCORING_KEY_PREFIX": prefix, "TOUCHSTREAM_SCORING_CHECKPOINT_INTERVAL_S": "10",
        }
        worker = spawn("scoring", [*code.python(), "-m", "services.scoring"], run_dir / "scoring-worker.log",
                       env=env)
        wait_for_port(web_port, timeout=60, process=worker)
        async with httpx.AsyncClient() as client:
            await wait_ready(client, web_port, worker)
            cpu_before = process_cpu_s(worker.pid)
            producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=256 * 1024)
            await producer.start()
            started = time.perf_counter()

            async def send(purchase: Purchase, t: int) -> None:
                value = avro.encode(TOUCHPOINTS_RESOLVED.schema, touchpoint_record(purchase, t))
                await producer.send(TOUCHPOINTS_RESOLVED.name, value, key=purchase.customer.encode())

            try:
                await replay(events, send)
                await producer.flush()
            finally:
                await producer.stop()
            while True:
                if not worker.alive():
                    raise RuntimeError(f"the scoring worker died; see {run_dir / 'scoring-worker.log'}")
                sent = await scraped(client, web_port, events_out_total("scoring"), topic=SCORES.name)
                crossings = max(0.0, await scraped(client, web_port, CROSSINGS_TOTAL))
                if sent - crossings >= len(events):
                    break
                await asyncio.sleep(0.5)
            elapsed = time.perf_counter() - started
            cpu_s = process_cpu_s(worker.pid) - cpu_before
            checks = max(0.0, await scraped(client, web_port, CROSSING_CHECKS_TOTAL))
    finally:
        if worker is not None:
            # SIGTERM: the worker checkpoints its model before it exits.
            worker.stop(timeout=60)
        broker.stop()
    return {"path": f"scoring worker process on {broker_description(kind)} + Valkey", "events": len(events),
            "seconds": round(elapsed, 2), "events_per_s": round(len(events) / elapsed, 1),
            "worker_cpu_s": round(cpu_s, 2), "worker_cpu_us_per_event": round(1e6 * cpu_s / len(events), 1),
            "crossing_checks": checks, "crossing_updates": crossings}


async def replay_through_service(redis_url: str, prefix: str, events: list[tuple[Purchase, int]],
                                 partitions: int, batch: int) -> dict[str, Any]:
    """Call this checkout's ScoringService in-process with batches of events (no Kafka)."""
    import redis.asyncio as aioredis
    from prometheus_client import CollectorRegistry

    from services.scoring.metrics import ScoringMetrics
    from services.scoring.service import ResolvedInput, ScoringService
    from services.scoring.settings import ScoringSettings
    from services.scoring.state import Touchpoint
    from services.scoring.store import RedisScoringStore

    redis = aioredis.from_url(redis_url)
    service = ScoringService(RedisScoringStore(redis, prefix), ScoringSettings(key_prefix=prefix),
                             ScoringMetrics(CollectorRegistry()))
    inputs: list[ResolvedInput] = []

    async def send(purchase: Purchase, t: int) -> None:
        touch = Touchpoint(f"cdnow-{purchase.line}", t, t, event_name="Order Completed", order_amount=purchase.amount)
        inputs.append(ResolvedInput(zlib.crc32(purchase.customer.encode()) % partitions, purchase.customer, touch))
        if len(inputs) >= batch:
            await service.score_touchpoints(inputs)
            inputs.clear()

    started, cpu_before = time.perf_counter(), time.process_time()
    await replay(events, send)
    if inputs:
        await service.score_touchpoints(inputs)
    await service.checkpoint()
    elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu_before
    await redis.aclose()
    return {"path": "ScoringService + RedisScoringStore on embedded Valkey, in-process", "events": len(events),
            "seconds": round(elapsed, 2), "events_per_s": round(len(events) / elapsed, 1),
            "process_cpu_us_per_event": round(1e6 * cpu_s / len(events), 1),
            "crossing_checks": service.metrics.crossing_checks._value.get(),
            "crossing_updates": service.metrics.crossings._value.get()}


# Steps (14 days) of the shorter horizons the extrapolation figures chain over.
CURVE_STEPS = (1, 2, 4, 8, 16, 32)


def curve_horizons(days: int) -> list[int]:
    """Return the horizons (days) shorter than `days` at which the chain's buyers are compared with the actual.

    >>> curve_horizons(49), curve_horizons(14)
    ([14, 28], [])
    """
    return [14 * k for k in CURVE_STEPS if 14 * k < days]


def extrapolation_figures(read: dict[str, Any], customers: list[str], first_purchase_day: np.ndarray,
                          days: int) -> dict[str, Any] | None:
    """Return how the forecast extrapolates: the chain's predicted against actual buyers by horizon, and each
    BTYD prior alone over the whole horizon. `first_purchase_day[i]`: days from the cut to customer i's first
    purchase in the scored period (inf: none).

    >>> read = {"extrapolation": {"chain_by_horizon": {"14": {"a": 0.5, "b": 0.5}},
    ...                           "priors_alone": {"bg_nbd": {"a": 0.9, "b": 0.2}}}}
    >>> figures = extrapolation_figures(read, ["a", "b"], np.array([3.0, np.inf]), 28)
    >>> figures["chain_by_horizon"], figures["priors_alone"]["bg_nbd"]["predicted_buyers"]
    ([{'days': 14, 'predicted_buyers': 1.0, 'buyers': 1, 'ratio': 1.0}], 1.1)
    """
    found = read.get("extrapolation")
    if not found:
        return None
    curve = []
    for horizon, forecast in found["chain_by_horizon"].items():
        predicted = float(sum(forecast[c] for c in customers))
        buyers = int(np.sum(first_purchase_day < int(horizon)))
        curve.append({"days": int(horizon), "predicted_buyers": round(predicted, 1), "buyers": buyers,
                      "ratio": rounded(predicted / buyers) if buyers else None})
    y = first_purchase_day < days
    priors = {}
    for structure, forecast in found["priors_alone"].items():
        p = np.array([forecast[c] for c in customers])
        priors[structure] = {"predicted_buyers": round(float(p.sum()), 1), "log_loss": rounded(log_loss(y, p)),
                             "auc": rounded(roc_auc(y, p)) if 0 < y.sum() < len(y) else None}
    return {"chain_by_horizon": curve, "priors_alone": priors}


def read_forecasts(code: CodeTree, redis_url: str, prefix: str, cutoff_ms: int, days: int,
                   customers: list[str]) -> dict[str, Any]:
    """Return `code`'s forecasts as of the cut, read by a fresh service from what the replay stored."""
    arguments = {"redis_url": redis_url, "prefix": prefix, "cutoff_ms": cutoff_ms, "days": days,
                 "customers": customers, "horizons": curve_horizons(days)}
    done = subprocess.run([*code.python(), "-c", FORECASTS_SCRIPT], input=json.dumps(arguments), text=True,
                          capture_output=True, env={**os.environ, **code.env()}, cwd=code.root or REPO, check=False)
    if done.returncode:
        raise RuntimeError(f"reading {code.name}'s forecasts failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def btyd_baselines(purchases: list[Purchase], cutoff: datetime, customers: list[str], y: np.ndarray,
                   holdout_end: datetime = HOLDOUT_END) -> dict[str, Any]:
    """Fit BG/NBD and Pareto/NBD on the calibration period (daily resolution) and score the holdout."""
    from lifetimes import BetaGeoFitter, GammaGammaFitter, ParetoNBDFitter
    from lifetimes.utils import calibration_and_holdout_data

    frame = pd.DataFrame({
        "customer": [p.customer for p in purchases],
        "date": pd.to_datetime([p.date for p in purchases], format="%Y%m%d"),
        "amount": [p.amount for p in purchases],
    })
    holdout_days = (holdout_end - cutoff).days
    # pandas 3 needs monetary_value_col here, though the models do not use it.
    rfm = calibration_and_holdout_data(
        frame, "customer", "date", calibration_period_end=(cutoff - pd.Timedelta(days=1)).strftime("%Y-%m-%d"),
        observation_period_end=(holdout_end - pd.Timedelta(days=1)).strftime("%Y-%m-%d"), freq="D",
        monetary_value_col="amount",
    ).reindex(customers)
    x, t_x, big_t = rfm["frequency_cal"], rfm["recency_cal"], rfm["T_cal"]

    bg = fit_or_penalize(BetaGeoFitter, x, t_x, big_t)
    bg_expected = np.asarray(bg.conditional_expected_number_of_purchases_up_to_time(holdout_days, x, t_x, big_t))
    alive = np.asarray(bg.conditional_probability_alive(x, t_x, big_t))
    r, alpha = bg._unload_params("r", "alpha")
    # BG/NBD: an alive customer cannot die before its next purchase, so
    # P(X = 0 | x, t_x, T) = 1 - P(alive) + P(alive) * ((alpha + T) / (alpha + T + t)) ** (r + x).
    bg_p_any = np.asarray(1 - (1 - alive + alive * ((alpha + big_t) / (alpha + big_t + holdout_days)) ** (r + x)))

    pnbd = fit_or_penalize(ParetoNBDFitter, x, t_x, big_t)
    pareto_expected = np.asarray(
        pnbd.conditional_expected_number_of_purchases_up_to_time(holdout_days, x, t_x, big_t))
    pareto_none = np.asarray(pnbd.conditional_probability_of_n_purchases_up_to_time(0, holdout_days, x, t_x, big_t))
    # Gamma-Gamma on repeat buyers' mean repeat order value (lifetimes' convention), then
    # BG/NBD's expected purchases x expected order value: each customer's holdout spend.
    # CDNOW holds some zero-amount orders: Gamma-Gamma needs a positive mean, as value.fit_spend_model does.
    repeat = (rfm["frequency_cal"] > 0) & (rfm["monetary_value_cal"] > 0)
    gg = GammaGammaFitter(penalizer_coef=0.0)
    gg.fit(rfm.loc[repeat, "frequency_cal"], rfm.loc[repeat, "monetary_value_cal"])
    order_value = np.asarray(gg.conditional_expected_average_profit(x, rfm["monetary_value_cal"].fillna(0.0)))
    return {
        "bgnbd_gg_value": bg_expected * order_value,
        "bgnbd_auc": rounded(roc_auc(y, bg_expected)),
        "pareto_auc": rounded(roc_auc(y, pareto_expected)),
        "bgnbd_log_loss": rounded(log_loss(y, bg_p_any)),
        "bgnbd_p_any_auc": rounded(roc_auc(y, bg_p_any)),
        "bgnbd_predicted_buyers": round(float(bg_p_any.sum()), 1),
        "bgnbd_predicted_purchase_days": round(float(bg_expected.sum()), 1),
        "pareto_log_loss": rounded(log_loss(y, 1 - pareto_none)),
        "bgnbd_params": {k: round(float(v), 4) for k, v in bg.params_.items()},
        "pareto_params": {k: round(float(v), 4) for k, v in pnbd.params_.items()},
    }


def evaluation_window(weeks: int, in_stream: bool) -> tuple[datetime, datetime]:
    """Return (cut, end of the scored period) of a cut: the holdout, or with `in_stream` the second half of its
    calibration period, scored from the first half: what the live model could check itself on matured outcomes.

    >>> [d.date().isoformat() for d in evaluation_window(13, True)]
    ['1997-02-12', '1997-04-02']
    """
    if in_stream:
        return cut_at(weeks // 2), cut_at(weeks)
    return cut_at(weeks), HOLDOUT_END


def fit_or_penalize(fitter: Any, *data: Any) -> Any:
    """Fit a lifetimes model unpenalized; where it does not converge (a few weeks of data), with a small penalizer."""
    from lifetimes.utils import ConvergenceError

    try:
        return fitter(penalizer_coef=0.0).fit(*data)
    except ConvergenceError:
        return fitter(penalizer_coef=0.001).fit(*data)


async def evaluate_cut(code: CodeTree, weeks: int, purchases: list[Purchase], redis_url: str, args: argparse.Namespace,
                       run_dir: Path) -> dict[str, Any]:
    """Replay one cut's calibration period through `code` and score its forecasts against the holdout."""
    cutoff, holdout_end = evaluation_window(weeks, args.in_stream)
    events = calibration_events(purchases, ms(cutoff))
    customers = sorted({p.customer for p, _ in events})
    bought = {p.customer for p in purchases if ms(cutoff) <= p.timestamp_ms < ms(holdout_end)}
    known = set(customers)
    orders_holdout = sum(1 for p in purchases if ms(cutoff) <= p.timestamp_ms < ms(holdout_end) and p.customer in known)
    y = np.array([c in bought for c in customers])
    holdout_days = (holdout_end - cutoff).days
    prefix = f"bench:{code.name}:{weeks}w"
    cut_dir = run_dir / f"{code.name}-{weeks}w"
    cut_dir.mkdir(parents=True, exist_ok=True)
    if args.via == "worker":
        throughput = await replay_through_worker(code, redis_url, prefix, events, args.partitions, cut_dir)
    else:
        throughput = await replay_through_service(redis_url, prefix, events, args.partitions, args.batch)
    read = read_forecasts(code, redis_url, prefix, ms(cutoff), holdout_days, customers)
    first_purchase_ms: dict[str, int] = {}
    for p in purchases:
        if ms(cutoff) <= p.timestamp_ms < ms(holdout_end):
            first_purchase_ms[p.customer] = min(p.timestamp_ms, first_purchase_ms.get(p.customer, p.timestamp_ms))
    first_purchase_day = np.array([(first_purchase_ms[c] - ms(cutoff)) / 86_400_000 if c in first_purchase_ms
                                   else np.inf for c in customers])
    extrapolation = extrapolation_figures(read, customers, first_purchase_day, holdout_days)
    p_any = np.array([read["p_any"][c] for c in customers])
    expected = np.array([read["expected"][c] for c in customers])
    prequential = {k: rounded(v) if isinstance(v, float) else v for k, v in read["prequential"].items()}
    value, value_source = None, None
    if read.get("order_value"):
        value = expected * np.array([read["order_value"][c] for c in customers])
        value_source = "the service's online spend model x its expected purchases"
    elif "orders" in read:
        # A replay whose code had no online spend model: the same model fitted at the cut on what
        # the service stored (never a holdout order).
        from services.scoring.value import fit_spend_model, predicted_value

        orders = np.array([read["orders"].get(c, 0) for c in customers], dtype=float)
        spend = np.array([read["spend"].get(c, 0.0) for c in customers])
        mean_value = np.divide(spend, orders, out=np.zeros_like(spend), where=orders > 0)
        spend_model = fit_spend_model(orders, mean_value)
        value = predicted_value(expected, spend_model.expected_order_value(orders, mean_value))
        value_source = "value.fit_spend_model at the cut on the service's stored states x its expected purchases"
    return {
        "code": code.name, "cut_weeks": weeks, "cutoff": cutoff.date().isoformat(), "holdout_days": holdout_days,
        "customers": len(customers), "buyers_holdout": int(y.sum()), "orders_holdout": orders_holdout,
        "auc": rounded(roc_auc(y, p_any)), "log_loss": rounded(log_loss(y, p_any)),
        "brier": rounded(float(np.mean((p_any - y) ** 2))),
        "predicted_buyers": round(float(p_any.sum()), 1), "predicted_purchases": round(float(expected.sum()), 1),
        "model_version": read["model_version"], "model": read["model"], "prequential": prequential,
        "predicted_value": value, "value_source": value_source, "extrapolation": extrapolation, **throughput,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    purchases = cdnow_purchases()
    run_dir = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    port = free_port()
    valkey = start_valkey(port, run_dir / "valkey.log")
    redis_url = f"redis://127.0.0.1:{port}/0"
    result: dict[str, Any] = {"dataset": "CDNOW master (lifetimes)", "holdout_end": "1998-06-30", "via": args.via,
                              "in_stream": args.in_stream,
                              "logs": str(run_dir), "cuts": {}}
    try:
        current = CodeTree("current")
        for weeks in args.cuts:
            ours = await evaluate_cut(current, weeks, purchases, redis_url, args, run_dir)
            cutoff, holdout_end = evaluation_window(weeks, args.in_stream)
            customers = sorted({p.customer for p, _ in calibration_events(purchases, ms(cutoff))})
            bought = {p.customer for p in purchases if ms(cutoff) <= p.timestamp_ms < ms(holdout_end)}
            baselines = btyd_baselines(purchases, cutoff, customers, np.array([c in bought for c in customers]),
                                       holdout_end)
            actual_spend = holdout_spend(purchases, cutoff, customers, holdout_end)
            baseline_value = value_figures(actual_spend, baselines.pop("bgnbd_gg_value"))
            value = ours.pop("predicted_value")
            ours["value"] = value_figures(actual_spend, value) if value is not None else None
            ours["bgnbd_gg_value"] = baseline_value
            if ours["value"] is not None:
                v, b = ours["value"], baseline_value
                # A baseline that could not be computed (None: its fit gave NaN) is no target.
                ours["value_targets"] = {
                    "spearman_at_least_bgnbd_gg": b["spearman"] is None or v["spearman"] >= b["spearman"],
                    "top_decile_at_least_bgnbd_gg": b["top_decile_capture"] is None
                    or v["top_decile_capture"] >= b["top_decile_capture"],
                    "mae_at_most_bgnbd_gg": b["mae"] is None or v["mae"] <= b["mae"],
                    "revenue_within_10_percent": abs(v["revenue_error"]) <= 0.10}
            best = max(baselines["bgnbd_auc"], baselines["pareto_auc"])
            ours.update(baselines)
            ours["targets"] = {"auc_at_least_best_btyd": ours["auc"] >= best,
                               "log_loss_at_most_bgnbd": ours["log_loss"] <= baselines["bgnbd_log_loss"]}
            result["cuts"][f"{weeks}w"] = ours
            print(json.dumps({"done": f"{weeks}w", **ours}), file=sys.stderr, flush=True)
        if args.baseline:
            with tempfile.TemporaryDirectory(prefix="bench-scoring-baseline-") as tree:
                commit = export_tree(args.baseline, Path(tree))
                baseline = CodeTree(f"baseline-{args.baseline}", Path(tree))
                result["baseline"] = {"ref": args.baseline, "commit": commit, "cuts": {}}
                for weeks in args.baseline_cuts:
                    before = await evaluate_cut(baseline, weeks, purchases, redis_url, args, run_dir)
                    before.pop("predicted_value", None)
                    result["baseline"]["cuts"][f"{weeks}w"] = before
                    after = result["cuts"].get(f"{weeks}w")
                    if after is not None:
                        result["baseline"]["cuts"][f"{weeks}w"]["compared"] = compare(before, after)
    finally:
        valkey.stop()
    result["targets_met_on_every_cut"] = all(all(c["targets"].values()) for c in result["cuts"].values())
    result["value_targets_met_on_every_cut"] = all(all(c.get("value_targets", {"missing": False}).values())
                                                   for c in result["cuts"].values())
    result["load_average"] = [round(v, 2) for v in os.getloadavg()]
    return result


def holdout_spend(purchases: Sequence[Purchase], cutoff: datetime, customers: list[str],
                  holdout_end: datetime = HOLDOUT_END) -> np.ndarray:
    """Return each customer's spend between the cut and the holdout's end (scored only, never replayed)."""
    spent: dict[str, float] = {}
    for p in purchases:
        if ms(cutoff) <= p.timestamp_ms < ms(holdout_end):
            spent[p.customer] = spent.get(p.customer, 0.0) + p.amount
    return np.array([spent.get(c, 0.0) for c in customers])


def export_tree(ref: str, into: Path) -> str:
    """Write the files of git `ref` into `into` (git archive); return its commit."""
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return subprocess.run(["git", "rev-parse", ref], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Return the before/after figures of one cut side by side."""
    keys = ("auc", "log_loss", "worker_cpu_us_per_event", "process_cpu_us_per_event", "seconds")
    return {k: {"before": before.get(k), "after": after.get(k)} for k in keys if k in before or k in after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--via", choices=("worker", "service"), default="worker")
    parser.add_argument("--cuts", type=lambda s: [int(w) for w in s.split(",")], default=[13, 20, 33, 39, 45],
                        help="calibration cuts, in weeks after 1997-01-01")
    parser.add_argument("--baseline", default=None, help="git ref whose scoring to run too (e.g. main)")
    parser.add_argument("--baseline-cuts", type=lambda s: [int(w) for w in s.split(",")], default=[39])
    parser.add_argument("--in-stream", action="store_true",
                        help="score each cut's second half of its calibration period from its first half (no holdout "
                             "event is read: the in-stream diagnostic settings may be chosen on)")
    parser.add_argument("--no-sentiment", action="store_true", help="leave out the sentiment scorer's accuracy")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch", type=int, default=500, help="--via service: events per call (the worker's batch)")
    args = parser.parse_args()
    if args.baseline and args.via != "worker":
        parser.error("--baseline runs the older code as a worker process: use --via worker")
    result = asyncio.run(run(args))
    # The customer's voice (issue 20): the sentiment scorer's accuracy per language, same JSON.
    if not args.no_sentiment:
        result["sentiment"] = bench_sentiment.run()
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
