"""Consent and time zone are properties of the customer: the latest stated, on every ScoreUpdate."""

from __future__ import annotations

from services.scoring.codec import state_from_dict, state_to_dict
from services.scoring.engine import ScoringEngine, score_update_record
from services.scoring.model import Learner, PropensityModel
from services.scoring.state import CustomerState, Touchpoint, merge_states
from touchstream import avro
from touchstream.eventtime import DAY_MS


class Scoring(ScoringEngine):
    """The engine, with an event scored the way the service does it (no silent examples waiting)."""

    def score(self, state: CustomerState, touch: Touchpoint, watermark_ms: int) -> dict[str, object]:
        point = self.observe_event("c", state, touch, watermark_ms, None)
        return score_update_record("c", point, self.assess([point])[0])


def engine() -> Scoring:
    return Scoring(Learner(PropensityModel()), horizon_days=90, lateness_days=1)


def at(day: float, message_id: str, consent: tuple[str, ...] = (), time_zone: str | None = None,
       event_type: str = "track") -> Touchpoint:
    t = int(day * DAY_MS)
    return Touchpoint(message_id, t, t, event_type=event_type, consent=consent, time_zone=time_zone)


def test_consent_given_on_identify_is_carried_by_later_events_and_crossing_checks() -> None:
    scoring, state = engine(), CustomerState()
    scoring.score(state, at(1, "identify", ("email", "sms"), "Asia/Shanghai", event_type="identify"), DAY_MS)
    record = scoring.score(state, at(2, "track"), 2 * DAY_MS)
    assert record["consent"] == ["email", "sms"] and record["time_zone"] == "Asia/Shanghai"
    assert avro.validation_errors("ScoreUpdate", record) == []
    check = scoring.observe_check("c", state, 60 * DAY_MS)
    rescore = score_update_record("c", check, scoring.assess([check])[0])
    assert rescore["consent"] == ["email", "sms"] and rescore["time_zone"] == "Asia/Shanghai"
    assert rescore["event_type"] == "rescore" and rescore["channel"] is None


def test_an_empty_list_changes_nothing_and_none_withdraws() -> None:
    scoring, state = engine(), CustomerState()
    scoring.score(state, at(1, "a", ("email",)), DAY_MS)
    scoring.score(state, at(2, "b", ()), 2 * DAY_MS)
    assert state.consent == ["email"]
    scoring.score(state, at(3, "c", ("none",)), 3 * DAY_MS)
    assert state.consent == []
    # A late event's statement is older than the withdrawal: it does not bring consent back.
    scoring.score(state, at(2.5, "d", ("email",)), 3 * DAY_MS)
    assert state.consent == [] and state_from_dict(state_to_dict(state)) == state


def test_never_stated_consent_falls_back_to_the_event() -> None:
    scoring, state = engine(), CustomerState()
    record = scoring.score(state, at(1, "a"), DAY_MS)
    assert record["consent"] == [] and state.consent is None


def test_a_merge_keeps_the_most_recent_statement() -> None:
    scoring = engine()
    survivor, merged = CustomerState(), CustomerState()
    scoring.score(survivor, at(1, "a", ("email",), "Europe/Paris"), DAY_MS)
    scoring.score(merged, at(5, "b", ("none",)), 5 * DAY_MS)
    assert merge_states(survivor, merged, "m1")
    assert survivor.consent == [] and survivor.consent_at_ms == 5 * DAY_MS
    assert survivor.time_zone == "Europe/Paris"
    older = CustomerState()
    scoring.score(older, at(0.5, "c", ("sms",), "Asia/Tokyo"), DAY_MS // 2)
    assert merge_states(survivor, older, "m2")
    assert survivor.consent == [] and survivor.time_zone == "Europe/Paris"
