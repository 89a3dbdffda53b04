"""The pipeline as the console's overview shows it: each service's /metrics scraped every few seconds, its
events counter turned into a rate, and one sample a minute kept in the read model for the charts."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import httpx

from services.console.charts import PipelineSample
from services.console.identity_api import tls_context
from services.console.quality import (
    CounterRate,
    LatencyWindow,
    RateMeter,
    counter_total,
    model_quality,
    seconds_in_words,
)
from services.console.settings import ConsoleSettings
from services.console.store import ReadModel
from touchstream.metrics import events_in_total, events_out_total
from touchstream.topics import ACTION_DELIVERIES, ACTIONS, SCORES, TOUCHPOINTS_RAW, TOUCHPOINTS_RESOLVED

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline on the overview: whose /metrics, which counter, what it counts."""

    name: str
    counts: str
    metric: str
    topic: str


# Each stage's counter of the events it took in (ingest: accepted and acknowledged by the broker).
STAGES = (
    Stage("ingest", "events accepted", events_out_total("ingest"), TOUCHPOINTS_RAW.name),
    Stage("identity", "events resolved", events_in_total("identity"), TOUCHPOINTS_RAW.name),
    Stage("scoring", "events scored", events_in_total("scoring"), TOUCHPOINTS_RESOLVED.name),
    Stage("triggers", "scores evaluated", events_in_total("triggers"), SCORES.name),
)
# Topics whose records carry ingest's received_at_ms: how long after ingest accepted an event it shows here
# (a delivery outcome: how long until the receiver acknowledged the webhook).
ARRIVALS = (
    (TOUCHPOINTS_RESOLVED.name, "visible here as a touchpoint (after identity)"),
    (SCORES.name, "visible here as a score (after scoring)"),
    (ACTIONS.name, "visible here as an action (after triggers)"),
    (ACTION_DELIVERIES.name, "webhook acknowledged (2xx)"),
)


# The console's own line on the pipeline charts: records it applied to the read model.
CONSOLE_STAGE = "console"


class PipelineSampler:
    """Scrapes the services' /metrics and keeps each stage's rate and the latest texts."""

    def __init__(self, store: ReadModel, settings: ConsoleSettings, feed_rate: RateMeter | None = None,
                 arrivals: LatencyWindow | None = None) -> None:
        self.store = store
        self.settings = settings
        self.feed_rate = feed_rate
        self.arrivals = arrivals
        self.stage_rates = {stage.name: CounterRate() for stage in STAGES}
        # The services' /metrics texts of the latest sample (the live overview reads these, never scrapes).
        self.last_texts: dict[str, str | None] = {}

    async def scrape(self, url: str | None) -> str | None:
        if not url:
            return None
        try:
            async with httpx.AsyncClient(timeout=1.0, verify=tls_context()) as http:
                response = await http.get(url)
                response.raise_for_status()
        except httpx.HTTPError as exc:
            # debug: the app samples every few seconds, so a service that is down would flood the log.
            log.debug("metrics at %s unreachable: %s", url, type(exc).__name__)
            return None
        return response.text

    def metrics_url(self, stage: str) -> str | None:
        return {"ingest": self.settings.ingest_metrics_url, "identity": self.settings.identity_metrics_url,
                "scoring": self.settings.scoring_metrics_url, "triggers": self.settings.triggers_metrics_url}[stage]

    async def sample(self, now_s: float | None = None) -> dict[str, str | None]:
        """Scrape every configured service's /metrics once and sample its events counter; return the texts.

        Called every `pipeline_sample_s` by the app (so a rate is there when someone opens the overview)
        and on each overview.
        """
        texts = await asyncio.gather(*(self.scrape(self.metrics_url(stage.name)) for stage in STAGES))
        now = time.time() if now_s is None else now_s
        for stage, text in zip(STAGES, texts, strict=True):
            total = counter_total(text, stage.metric, {"topic": stage.topic}) if text is not None else None
            if total is not None:
                self.stage_rates[stage.name].add(total, now)
        self.last_texts = {stage.name: text for stage, text in zip(STAGES, texts, strict=True)}
        await self.store.record_pipeline_sample(self._pipeline_sample(now))
        return self.last_texts

    def _pipeline_sample(self, now_s: float) -> PipelineSample:
        """This minute of the pipeline, for the overview's last hour: rates, latencies over the last minute, quality."""
        rates = {stage.name: self.stage_rates[stage.name].per_second(now_s) for stage in STAGES}
        rates[CONSOLE_STAGE] = self.feed_rate.per_second(now_s) if self.feed_rate is not None else None
        latency = {}
        for topic, label in ARRIVALS:
            seen = self.arrivals.quantiles(topic, now_s) if self.arrivals is not None else None
            if seen is not None:
                latency[label] = {str(q): v for q, v in seen[1].items()}
        scoring = self.last_texts.get("scoring")
        quality = model_quality(scoring) if scoring is not None else None
        learned = quality is not None and bool(quality.examples_learned)
        return PipelineSample(int(now_s // 60), rates, latency, {
            key: getattr(quality, key) if learned else None
            for key in ("roc_auc", "log_loss", "brier", "calibration_error")})

    def arrival_rows(self, now_s: float) -> list[tuple[str, int, dict[float, str]]]:
        rows = []
        for topic, label in ARRIVALS:
            seen = self.arrivals.quantiles(topic, now_s) if self.arrivals is not None else None
            if seen is not None:
                rows.append((label, seen[0], {q: seconds_in_words(v) for q, v in seen[1].items()}))
        return rows
