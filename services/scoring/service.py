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

import numpy as np

from services.scoring.checkpoint import UntrustedCheckpoint
from services.scoring.crossings import WatchedChanges, watched_changes
from services.scoring.engine import HorizonForecast, ScoringEngine, ScoringPoint, score_update_record
from services.scoring.features import PATH_FIELDS
from services.scoring.features import silent_path as silent_path_of
from services.scoring.metrics import ScoringMetrics
from services.scoring.model import MODEL_FAMILIES, IncompatibleCheckpoint, Learner, PropensityModel
from services.scoring.segments import StageRules
from services.scoring.settings import ScoringSettings
from services.scoring.state import CustomerState, Touchpoint, merge_states
from services.scoring.store import RedisScoringStore, StateChanges, customer_of
from services.triggers.rules import parse_rule_file
from touchstream.eventtime import DEFAULT_EVENT_TIME_TOLERANCE_S, event_time_ceiling_ms

log = logging.getLogger(__name__)
# Crossing checks of one customer run within one batch at most this many times (each one
# starts after the last, so this only bounds a batch that jumps far in event time).
MAX_CHECKS_PER_BATCH = 8


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


def rule_watches(settings: ScoringSettings) -> WatchedChanges:
    """Return what the rule file's rules watch; a missing or broken file stops the worker with its reason."""
    path = settings.rules_file
    return watched_changes(parse_rule_file(path.read_text(encoding="utf-8"), source=str(path)))


def build_engine(settings: ScoringSettings, watched: WatchedChanges | None = None) -> ScoringEngine:
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
        Learner(PropensityModel(settings.step_days, kind=settings.model, learning_rates=settings.learning_rates)),
        horizon_days=horizon,
        step_days=settings.step_days,
        lateness_days=settings.lateness_days,
        rules=rules,
        reason_count=settings.reason_count,
        value_horizon_days=float(settings.value_horizon_days),
        max_silence_days=settings.max_silence_days,
        watched=rule_watches(settings) if watched is None else watched,
    )


def batch_maxima(inputs: Iterable[ResolvedInput], ceiling_ms: int) -> dict[int, int]:
    """Return each partition's newest event time in `inputs`, none past `ceiling_ms`.

    >>> from services.scoring.state import Touchpoint
    >>> batch_maxima([ResolvedInput(0, "a", Touchpoint("m1", 5, 0)), ResolvedInput(0, "b", Touchpoint("m2", 9, 0)),
    ...               ResolvedInput(1, "c", Touchpoint("m3", 50, 0))], ceiling_ms=20)
    {0: 9, 1: 20}
    """
    maxima: dict[int, int] = {}
    for item in inputs:
        t = item.touch.timestamp_ms
        maxima[item.partition] = min(max(maxima.get(item.partition, t), t), ceiling_ms)
    return maxima


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
                family = getattr(learner.model, "family", None)
                if family != MODEL_FAMILIES[self.settings.model]:
                    raise IncompatibleCheckpoint(f"checkpoint holds a {family or 'older'} model")
                if getattr(learner.model, "step_days", None) != self.settings.step_days:
                    raise IncompatibleCheckpoint(f"checkpoint learned {learner.model.step_days}-day steps")
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
        """Apply and score `inputs` in order, with the crossing checks they pass; return the ScoreUpdates.

        One ScoreUpdate per input, plus one per crossing check whose scores crossed what a
        rule watches. A check due at T runs just before the first input that moves its
        partition's watermark to T, so it sees the events up to T and none after. A watermark never
        passes the wall clock plus the event-time tolerance, so one event stamped years ahead matures
        no label and passes no check early (a watermark stored beyond it before is pulled back).
        """
        async with self._lock:
            ceiling = event_time_ceiling_ms(int(self._clock() * 1000), self.event_time_tolerance_s)
            by_partition: dict[int, list[str]] = {}
            for item in inputs:
                by_partition.setdefault(item.partition, []).append(item.customer_id)
            # One round trip for erasures, due checks and silent schedules. The checks are asked up to
            # the batch's newest times before erased events are dropped; only those the watermarks
            # reach below run (_run_checks), the rest stay scheduled.
            found = await self.store.batch_schedules(by_partition, batch_maxima(inputs, ceiling))
            # Erased customers' events (in flight during the erasure, or read again by a restarted or
            # lagging worker) are dropped: scoring them would bring the customer back.
            if found.erased:
                self.metrics.events_erased.inc(sum(i.customer_id in found.erased for i in inputs))
                inputs = [i for i in inputs if i.customer_id not in found.erased]
            if not inputs:
                return []
            await self._restore_once()
            partitions = sorted({i.partition for i in inputs})
            self.metrics.events_ahead.inc(sum(i.touch.timestamp_ms > ceiling for i in inputs))
            checks, silent_next = found.checks, found.silent_next
            check_ids = [customer_id for due in checks.values() for customer_id, _ in due]
            states, watermarks = await self.store.load([*(i.customer_id for i in inputs), *check_ids], partitions)
            queues = {p: [(t, c) for c, t in checks.get(p, [])] for p in partitions}
            for queue in queues.values():
                heapq.heapify(queue)
            changes = StateChanges()
            points: list[tuple[ScoringPoint, bool]] = []
            home: dict[str, int] = {}
            for item in inputs:
                t = item.touch.timestamp_ms
                watermark = min(max(watermarks.get(item.partition, t), t), ceiling)
                watermarks[item.partition] = watermark
                points.extend((point, False) for point in self._run_checks(
                    item.partition, queues[item.partition], watermark, states, changes, home))
                points.append((self._apply_event(item, watermark, states, silent_next, changes), True))
                home[item.customer_id] = item.partition
            records = self._decide(points, states)
            records += self._schedule_checks(points, states, watermarks, home, changes)
            changes.watermarks = {p: watermarks[p] for p in partitions}
            await self._learn_matured(states, changes)
            pending = await self.store.save(changes, count_pending=partitions)
        self._report(pending, changes.watermarks)
        return records

    def _apply_event(self, item: ResolvedInput, watermark: int, states: dict[str, CustomerState],
                     silent_next: dict[str, int], changes: StateChanges) -> ScoringPoint:
        t = item.touch.timestamp_ms
        state = states.setdefault(item.customer_id, CustomerState())
        in_order = state.last_touch_ms is None or t >= state.last_touch_ms
        previous = silent_next.get(item.customer_id)
        if state.has_applied(item.touch.message_id):
            self.metrics.duplicates.inc()
        point = self.engine.observe_event(item.customer_id, state, item.touch, watermark, previous)
        if point.late:
            self.metrics.late_events.inc()
        for example in point.new_examples:
            changes.add_due(item.partition, item.customer_id, example.t_ms, example.due_ms)
        # Silent examples already made (by the queue, or closed by this event) are not made again.
        not_before = max(previous or t, t) if in_order else previous
        following = self.engine.next_silent_example_ms(state, not_before)
        if following is not None:
            silent_next[item.customer_id] = following
        changes.schedule_silent(item.partition, item.customer_id, following, point.path)
        changes.states[item.customer_id] = state
        return point

    def _run_checks(
        self, partition: int, queue: list[tuple[int, str]], watermark: int, states: dict[str, CustomerState],
        changes: StateChanges, home: dict[str, int],
    ) -> list[ScoringPoint]:
        points = []
        while queue and queue[0][0] <= watermark:
            t_ms, customer_id = heapq.heappop(queue)
            state = states.get(customer_id)
            if state is None or state.next_check_ms != t_ms:
                # Merged away, erased, or superseded by a newer schedule: the state decides.
                changes.schedule_tick(partition, customer_id, None if state is None else state.next_check_ms)
                continue
            self.metrics.crossing_checks.inc()
            points.append(self.engine.observe_check(customer_id, state, t_ms))
            home[customer_id] = partition
        return points

    def _schedule_checks(
        self, points: list[tuple[ScoringPoint, bool]], states: dict[str, CustomerState], watermarks: dict[int, int],
        home: dict[str, int], changes: StateChanges,
    ) -> list[dict[str, Any]]:
        """Set each scored customer's next crossing check; run those already passed by its partition's watermark.

        A customer's check scheduled in this batch may fall before the watermark the batch
        reached (one check found the first crossing, the next one lies a few days on): it
        runs here, after the customer's last event, rather than a batch late.
        """
        since: dict[str, int] = {}
        for point, _ in points:
            since[point.customer_id] = max(since.get(point.customer_id, point.t_ms), point.t_ms)
        scheduled = {c: states[c].next_check_ms for c in since}
        records: list[dict[str, Any]] = []
        pending = dict(since)
        for _ in range(MAX_CHECKS_PER_BATCH):
            checks = self.engine.schedule_checks(states, pending)
            passed = {c: t for c, t in checks.items() if t is not None and t <= watermarks[home[c]]}
            if not passed:
                break
            self.metrics.crossing_checks.inc(len(passed))
            records += self._decide([(self.engine.observe_check(c, states[c], t), False) for c, t in passed.items()],
                                    states)
            pending = passed
        for customer_id, was in scheduled.items():
            changes.states[customer_id] = states[customer_id]
            if states[customer_id].next_check_ms != was:
                changes.schedule_tick(home[customer_id], customer_id, states[customer_id].next_check_ms)
        return records

    def _decide(
        self, points: list[tuple[ScoringPoint, bool]], states: dict[str, CustomerState]
    ) -> list[dict[str, Any]]:
        """Score all points at once; keep every event's update and each check's that crossed something watched."""
        records = []
        for (point, is_event), scored in zip(points, self.engine.assess([p for p, _ in points]), strict=True):
            state = states[point.customer_id]
            if not is_event:
                if not self.engine.changed_enough(state, scored):
                    continue
                self.metrics.crossings.inc()
            self.engine.remember_sent(state, scored)
            records.append(score_update_record(point.customer_id, point, scored))
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
                if not states:
                    continue
                found = list(states)
                paths = np.stack([silent_path_of(states[c]) for c in found])
                propensity, expected = self.engine.horizon_forecasts(paths, np.full(len(found), float(t_ms)),
                                                                     horizon_days)
                for customer_id, p, e in zip(found, propensity, expected, strict=True):
                    result[customer_id] = HorizonForecast(horizon_days, float(p), float(e))
        return result

    async def _learn_matured(self, states: dict[str, CustomerState], changes: StateChanges) -> None:
        cutoffs = {p: self.engine.maturity_cutoff(w) for p, w in changes.watermarks.items()}
        step = self.engine.step_ms
        # One round trip each for every partition's waiting examples and silent customers due
        # (learning one partition's examples changes nothing stored for another's before the save).
        matured = await self.store.matured_members(cutoffs, {p: c - step for p, c in cutoffs.items()})
        stored_due, stored_silent = matured.due, matured.silent
        for partition, cutoff in cutoffs.items():
            members = stored_due[partition]
            # Examples added earlier in this batch are not in Redis yet but may be due already.
            members += [m for m, due in changes.due_added.get(partition, {}).items() if due <= cutoff]
            due_ids = {customer_of(m) for m in members}
            missing = [c for c in due_ids if c not in states]
            if missing:
                loaded, _ = await self.store.load(missing)
                states.update(loaded)
            # A member whose customer is gone was merged away; its examples moved with the state.
            due_states = {c: states[c] for c in due_ids if c in states}
            silent_ids, silent_paths, silent_from = await self._silent_due(
                partition, stored_silent.get(partition, []), cutoff - step, changes)
            silent = self.engine.silent_examples(silent_paths, silent_from, cutoff)
            for customer_id, following in zip(silent_ids, silent.next_ms.tolist(), strict=True):
                if np.isnan(following):
                    changes.schedule_silent(partition, customer_id, None, None)
                else:
                    changes.advance_silent(partition, customer_id, int(following))
            outcome = self.engine.learn_matured(due_states.values(), cutoff, silent_paths, silent)
            changes.states.update(due_states)
            if members:
                changes.remove_due(partition, members)
            self.metrics.examples_learned.labels("positive").inc(outcome.positives)
            self.metrics.examples_learned.labels("negative").inc(outcome.learned - outcome.positives)
            self.metrics.drift_alarms.inc(outcome.drift_alarms)

    async def _silent_due(self, partition: int, stored: list[tuple[str, int]], up_to_ms: int,
                          changes: StateChanges) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Return the partition's silent customers whose next example's step has passed: ids, paths, next times."""
        # This batch's schedules replace the stored ones.
        written = changes.silent.get(partition, {})
        gone = changes.silent_removed.get(partition, set())
        due = {c: t for c, t in stored if c not in written and c not in gone}
        due |= {c: t for c, t in written.items() if t <= up_to_ms}
        stored_paths = await self.store.load_paths([c for c in due if c not in changes.paths])
        ids, paths, starts = [], [], []
        for customer_id, t in due.items():
            path = changes.paths.get(customer_id)
            if path is None:
                path = stored_paths.get(customer_id)
            if path is None:
                # Merged away or erased: its path went with it.
                changes.schedule_silent(partition, customer_id, None, None)
                continue
            ids.append(customer_id)
            paths.append(path)
            starts.append(t)
        if not ids:
            return [], np.zeros((0, len(PATH_FIELDS))), np.zeros(0)
        return ids, np.stack(paths), np.array(starts, dtype=np.float64)

    def _report(self, pending: dict[int, int], watermarks: dict[int, int]) -> None:
        quality = self.engine.learner.quality
        if quality.examples:
            self.metrics.roc_auc.set(quality.roc_auc.get())
            self.metrics.log_loss.set(quality.log_loss.get())
            self.metrics.brier.set(quality.brier.get())
            self.metrics.calibration_error.set(quality.calibration.get())
        for partition, count in pending.items():
            self.metrics.pending_examples.labels(str(partition)).set(count)
        for partition, watermark in watermarks.items():
            self.metrics.watermark.labels(str(partition)).set(watermark / 1000)

    async def forget_customers(self, customer_ids: Iterable[str], partitions: Iterable[int]) -> int:
        """Erase customers: their states, silent paths, the examples waiting for a label, their schedules.

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
            by_partition: dict[int, list[str]] = {}
            for merge in merges:
                by_partition.setdefault(merge.partition, []).append(merge.survivor_id)
            silent_next = await self.store.silent_schedule(by_partition)
            changes = StateChanges()
            since: dict[str, int] = {}
            home: dict[str, int] = {}
            for merge in merges:
                outcome = self._merge_one(merge, states, changes, silent_next)
                self.metrics.merges.labels(outcome).inc()
                survivor = states.get(merge.survivor_id)
                if outcome == "merged" and survivor is not None and survivor.last_touch_ms is not None:
                    since[merge.survivor_id], home[merge.survivor_id] = survivor.last_touch_ms, merge.partition
            for customer_id, check in self.engine.schedule_checks(states, since).items():
                changes.schedule_tick(home[customer_id], customer_id, check)
            await self.store.save(changes)

    def _merge_one(self, merge: MergeInput, states: dict[str, CustomerState], changes: StateChanges,
                   silent_next: dict[str, int]) -> str:
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
        # The merged customer's due members, silent schedule and checks stay in its own
        # partition's sets and are skipped when they come due (its state and path are gone);
        # the examples mature from the survivor's partition.
        changes.paths_deleted.add(merge.merged_id)
        for example in survivor.pending:
            changes.add_due(merge.partition, merge.survivor_id, example.t_ms, example.due_ms)
        following = self.engine.next_silent_example_ms(survivor, silent_next.get(merge.survivor_id))
        changes.schedule_silent(merge.partition, merge.survivor_id, following, silent_path_of(survivor))
        return "merged"
