"""The scoring service layer: load state, run the engine, save state, update metrics."""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from services.scoring.checkpoint import UntrustedCheckpoint
from services.scoring.engine import HorizonForecast, ScoringEngine, rescore_touchpoint, score_update_record
from services.scoring.metrics import ScoringMetrics
from services.scoring.model import IncompatibleCheckpoint, Learner, PropensityModel
from services.scoring.segments import StageRules
from services.scoring.settings import ScoringSettings
from services.scoring.state import CustomerState, Touchpoint, merge_states
from services.scoring.store import RedisScoringStore, StateChanges, customer_of
from touchstream.eventtime import DEFAULT_EVENT_TIME_TOLERANCE_S, event_time_ceiling_ms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedInput:
    """One decoded touchpoint and the partition it came from."""

    partition: int
    customer_id: str
    touch: Touchpoint


@dataclass(frozen=True)
class MergeInput:
    """One decoded identity merge and the partition (the survivor's) it came from."""

    partition: int
    merge_id: str
    survivor_id: str
    merged_id: str


def build_engine(settings: ScoringSettings) -> ScoringEngine:
    """Return a fresh engine with an untrained model, configured by `settings`."""
    horizon = float(settings.horizon_days)
    rules = StageRules(
        at_risk_days=settings.stage_at_risk_days or horizon,
        churned_days=settings.stage_churned_days or 2 * horizon,
        won_back_gap_days=settings.stage_won_back_gap_days or horizon,
        habit_min_purchases=settings.habit_min_purchases,
        loyal_min_purchases=settings.loyal_min_purchases,
    )
    return ScoringEngine(
        Learner(PropensityModel(settings.learning_rate, kind=settings.model)),
        horizon_days=horizon,
        lateness_days=settings.lateness_days,
        rules=rules,
        reason_count=settings.reason_count,
        tick_days=settings.tick_days,
        tick_max_silence_days=settings.tick_max_silence_days,
    )


class ScoringService:
    """Score batches of touchpoints and apply merges against Redis-held state."""

    def __init__(self, store: RedisScoringStore, settings: ScoringSettings, metrics: ScoringMetrics,
                 event_time_tolerance_s: float = DEFAULT_EVENT_TIME_TOLERANCE_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        # No watermark runs past the wall clock plus this (CoreSettings.event_time_tolerance_s).
        self.event_time_tolerance_s = event_time_tolerance_s
        self._clock = clock
        self.engine = build_engine(settings)
        self._checkpoint_key = settings.checkpoint_key.get_secret_value().encode()
        # Both agents read-modify-write the same customer states; one batch at a time.
        self._lock = asyncio.Lock()
        self._restored = False

    async def restore_model(self) -> None:
        """Load the newest model checkpoint once, before the first batch."""
        async with self._lock:
            await self._restore_once()

    async def _restore_once(self) -> None:
        if self._restored:
            return
        data = await self.store.load_checkpoint()
        if data is not None:
            try:
                learner = Learner.from_bytes(data, self._checkpoint_key)
                if learner.model.kind != self.settings.model:
                    raise IncompatibleCheckpoint(f"checkpoint holds a {learner.model.kind} model")
            except UntrustedCheckpoint as exc:
                await self._refuse_checkpoint(data, exc)
            except IncompatibleCheckpoint as exc:
                # Starting fresh costs some quality for a while; refusing to start costs the pipeline.
                log.warning("not restoring the scoring model (%s); starting a new %s model", exc, self.settings.model)
            else:
                self.engine.learner = learner
                log.info("restored scoring model %s", learner.model.version)
        self._restored = True

    async def _refuse_checkpoint(self, data: bytes, exc: UntrustedCheckpoint) -> None:
        # A fresh model rather than a refusal to start: the pipeline keeps scoring and relearns as
        # labels mature, a restart would only meet the same checkpoint again, and an upgrade from
        # unsigned checkpoints or a key rotation needs no one to clear Redis by hand. Loud instead:
        # an ERROR line, a metric that alerts, and the bytes kept aside for whoever investigates.
        self.metrics.checkpoints_refused.labels(exc.reason).inc()
        await self.store.keep_refused_checkpoint(data)
        log.error(
            "REFUSED the scoring model checkpoint in Redis (%s): %s. It was not unpickled; starting a new %s "
            "model. Its %d bytes (sha256 %s) are kept at %s. Expected once after an upgrade to signed "
            "checkpoints or a change of TOUCHSTREAM_SCORING_CHECKPOINT_KEY; otherwise someone who can write "
            "Redis tried to run code in scoring.",
            exc.reason, exc, self.settings.model, len(data), hashlib.sha256(data).hexdigest(),
            self.store.refused_model_key)

    async def checkpoint(self) -> None:
        """Write the model and its quality tracker to Redis, signed."""
        async with self._lock:
            await self.store.save_checkpoint(self.engine.learner.to_bytes(self._checkpoint_key))
        self.metrics.checkpoints.inc()

    async def score_touchpoints(self, inputs: list[ResolvedInput]) -> list[dict[str, Any]]:
        """Apply and score `inputs` in order, with the as-of rescores they pass; return the ScoreUpdates.

        One ScoreUpdate per input, plus one per rescore when `emit_rescores` is set. A rescore
        due at T runs just before the first input that moves its partition's watermark to T,
        so its features see the events up to T and none after. A watermark never passes the wall
        clock plus the event-time tolerance, so one event stamped years ahead matures no label
        and passes no rescore early (a watermark stored beyond it before is pulled back).
        """
        async with self._lock:
            # Erased customers' events (in flight during the erasure, or read again by a restarted or
            # lagging worker) are dropped: scoring them would bring the customer back.
            erased = await self.store.erased.among(i.customer_id for i in inputs)
            if erased:
                self.metrics.events_erased.inc(sum(i.customer_id in erased for i in inputs))
                inputs = [i for i in inputs if i.customer_id not in erased]
            if not inputs:
                return []
            await self._restore_once()
            partitions = sorted({i.partition for i in inputs})
            ceiling = event_time_ceiling_ms(int(self._clock() * 1000), self.event_time_tolerance_s)
            batch_max: dict[int, int] = {}
            for item in inputs:
                t = item.touch.timestamp_ms
                if t > ceiling:
                    self.metrics.events_ahead.inc()
                batch_max[item.partition] = min(max(batch_max.get(item.partition, t), t), ceiling)
            ticks = await self.store.due_ticks(batch_max)
            tick_ids = [customer_id for due in ticks.values() for customer_id, _ in due]
            states, watermarks = await self.store.load([*(i.customer_id for i in inputs), *tick_ids], partitions)
            # Heaps of (tick time, customer): a rescore schedules the next one, maybe due in this batch too.
            queues = {p: [(t, c) for c, t in ticks.get(p, [])] for p in partitions}
            for queue in queues.values():
                heapq.heapify(queue)
            changes = StateChanges()
            records: list[dict[str, Any]] = []
            for item in inputs:
                t = item.touch.timestamp_ms
                watermark = min(max(watermarks.get(item.partition, t), t), ceiling)
                watermarks[item.partition] = watermark
                records.extend(self._run_ticks(item.partition, queues[item.partition], watermark, states, changes))
                state = states.setdefault(item.customer_id, CustomerState())
                applied_before = state.has_applied(item.touch.message_id)
                scored = self.engine.score(state, item.touch, watermark)
                if applied_before:
                    self.metrics.duplicates.inc()
                if scored.late:
                    self.metrics.late_events.inc()
                if scored.new_example is not None:
                    changes.add_due(item.partition, item.customer_id, t, scored.new_example.due_ms)
                changes.schedule_tick(item.partition, item.customer_id, self.engine.next_tick_ms(state))
                changes.states[item.customer_id] = state
                records.append(score_update_record(item.customer_id, item.touch, scored, state))
            changes.watermarks = {p: watermarks[p] for p in partitions}
            await self._learn_matured(states, changes)
            await self.store.save(changes)
        await self._report(partitions, changes.watermarks)
        return records

    def _run_ticks(
        self,
        partition: int,
        queue: list[tuple[int, str]],
        watermark: int,
        states: dict[str, CustomerState],
        changes: StateChanges,
    ) -> list[dict[str, Any]]:
        records = []
        while queue and queue[0][0] <= watermark:
            t_ms, customer_id = heapq.heappop(queue)
            state = states.get(customer_id)
            if state is None:
                # Merged away or deleted: nothing left to rescore.
                changes.schedule_tick(partition, customer_id, None)
                continue
            scored = self.engine.rescore(state, t_ms, watermark, explain=self.settings.emit_rescores)
            next_tick = self.engine.next_tick_ms(state)
            changes.schedule_tick(partition, customer_id, next_tick)
            if scored is None:
                continue
            if next_tick is not None and next_tick <= watermark:
                heapq.heappush(queue, (next_tick, customer_id))
            self.metrics.rescores.inc()
            changes.states[customer_id] = state
            if scored.new_example is not None:
                changes.add_due(partition, customer_id, t_ms, scored.new_example.due_ms)
            if self.settings.emit_rescores:
                records.append(score_update_record(customer_id, rescore_touchpoint(customer_id, t_ms), scored, state))
        return records

    async def forecasts(
        self, customer_ids: Iterable[str], t_ms: int, horizon_days: float, chunk: int = 2000
    ) -> dict[str, HorizonForecast]:
        """Return each stored customer's purchase forecast over `horizon_days` as of `t_ms` (read only)."""
        ids = list(customer_ids)
        result: dict[str, HorizonForecast] = {}
        async with self._lock:
            await self._restore_once()
            for start in range(0, len(ids), chunk):
                states, _ = await self.store.load(ids[start : start + chunk])
                for customer_id, state in states.items():
                    result[customer_id] = self.engine.forecast(state, t_ms, horizon_days)
        return result

    async def _learn_matured(self, states: dict[str, CustomerState], changes: StateChanges) -> None:
        cutoffs = {p: self.engine.maturity_cutoff(w) for p, w in changes.watermarks.items()}
        # One round trip for every partition's due examples (learning one partition's examples
        # changes nothing stored for another's before the batch is saved).
        stored_due = await self.store.due_members_by_partition(cutoffs)
        for partition, cutoff in cutoffs.items():
            members = stored_due[partition]
            # Examples added earlier in this batch are not in Redis yet but may be due already.
            members += [m for m, due in changes.due_added.get(partition, {}).items() if due <= cutoff]
            if not members:
                continue
            due_ids = {customer_of(m) for m in members}
            missing = [c for c in due_ids if c not in states]
            if missing:
                loaded, _ = await self.store.load(missing)
                states.update(loaded)
            # A member whose customer is gone was merged away; its examples moved with the state.
            due_states = {c: states[c] for c in due_ids if c in states}
            outcome = self.engine.learn_matured(due_states.values(), cutoff)
            changes.states.update(due_states)
            changes.remove_due(partition, members)
            self.metrics.examples_learned.labels("positive").inc(outcome.positives)
            self.metrics.examples_learned.labels("negative").inc(outcome.learned - outcome.positives)
            self.metrics.drift_alarms.inc(outcome.drift_alarms)

    async def _report(self, partitions: list[int], watermarks: dict[int, int]) -> None:
        quality = self.engine.learner.quality
        if quality.examples:
            self.metrics.roc_auc.set(quality.roc_auc.get())
            self.metrics.log_loss.set(quality.log_loss.get())
            self.metrics.brier.set(quality.brier.get())
            self.metrics.calibration_error.set(quality.calibration.get())
        for partition, count in (await self.store.pending_counts(partitions)).items():
            self.metrics.pending_examples.labels(str(partition)).set(count)
        for partition, watermark in watermarks.items():
            self.metrics.watermark.labels(str(partition)).set(watermark / 1000)

    async def forget_customers(self, customer_ids: Iterable[str], partitions: Iterable[int]) -> int:
        """Erase customers: their states, the examples waiting for a label, their rescore ticks.

        Under the batch lock, so a batch that loaded a state before cannot save it back after; the
        store records them as erased first, and every later batch drops their records.
        The model keeps what it learned from examples already matured (weights, no per-customer data).
        """
        async with self._lock:
            return await self.store.forget(customer_ids, partitions)

    async def apply_merges(self, merges: list[MergeInput]) -> None:
        """Fold each merged customer's state into its survivor's and delete it; repeats change nothing.

        A merge naming an erased customer is dropped: it would move an erased state or recreate one.
        """
        if not merges:
            return
        async with self._lock:
            erased = await self.store.erased.among(c for m in merges for c in (m.survivor_id, m.merged_id))
            if erased:
                self.metrics.merges.labels("erased").inc(
                    sum(m.survivor_id in erased or m.merged_id in erased for m in merges))
                merges = [m for m in merges if m.survivor_id not in erased and m.merged_id not in erased]
            ids = [c for m in merges for c in (m.survivor_id, m.merged_id)]
            states, _ = await self.store.load(ids)
            changes = StateChanges()
            for merge in merges:
                outcome = self._merge_one(merge, states, changes)
                self.metrics.merges.labels(outcome).inc()
            await self.store.save(changes)

    def _merge_one(self, merge: MergeInput, states: dict[str, CustomerState], changes: StateChanges) -> str:
        if merge.merged_id == merge.survivor_id:
            return "self"
        merged = states.get(merge.merged_id)
        if merged is None:
            return "nothing_to_merge"
        survivor = states.setdefault(merge.survivor_id, CustomerState())
        if not merge_states(survivor, merged, merge.merge_id):
            return "duplicate"
        del states[merge.merged_id]
        changes.states.pop(merge.merged_id, None)
        changes.deleted.add(merge.merged_id)
        changes.deleted.discard(merge.survivor_id)
        changes.states[merge.survivor_id] = survivor
        # The merged customer's due members stay in its own partition's set and are
        # skipped when they come due; the examples mature from the survivor's partition.
        for example in survivor.pending:
            changes.add_due(merge.partition, merge.survivor_id, example.t_ms, example.due_ms)
        changes.schedule_tick(merge.partition, merge.survivor_id, self.engine.next_tick_ms(survivor))
        return "merged"
