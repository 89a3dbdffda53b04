"""The sentiment scorer: languages by script, "no sentiment" for bad input, never an exception."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scoring.sentiment import (
    MAX_TEXT_CHARS,
    UNSCORED_REASONS,
    Sentiment,
    score_text,
    script_language,
)


@pytest.mark.parametrize(("text", "sign"), [
    ("Terrible service, the order arrived broken and nobody answers my calls.", -1),
    ("Great quality and super fast delivery, thank you!", 1),
    ("送餐太慢了，饭菜都凉了，再也不点了", -1),
    ("很快，好吃，味道足，量大，下次还点", 1),
])
def test_scores_chinese_and_english_by_sign(text: str, sign: int) -> None:
    result = score_text(text)
    assert result.unscored is None
    assert result.language == ("zh" if any("\u4e00" <= c <= "\u9fff" for c in text) else "en")
    assert result.score is not None and result.score * sign > 0.3


@pytest.mark.parametrize(("text", "reason"), [
    (None, "empty"),
    ("", "empty"),
    ("   \n\t ", "empty"),
    ("好" * (MAX_TEXT_CHARS + 1), "too_long"),
    ("bad\x00\x01\x02 service", "binary"),
    ("\x01\x02\x03\x04 bad", "binary"),
    ("\ufffd\ufffd\ufffd awful", "binary"),
    (b"\xff\xfe\x00\x81", "undecodable"),
    ("Ужасное обслуживание", "unsupported_language"),
    ("サービスが最悪です", "unsupported_language"),
    ("12345 !!! ???", "unsupported_language"),
])
def test_bad_input_is_no_sentiment_with_the_reason(text: str | bytes | None, reason: str) -> None:
    assert score_text(text) == Sentiment(None, unscored=reason)


def test_text_at_the_cap_is_scored_and_utf8_bytes_are_decoded() -> None:
    assert score_text("好" * MAX_TEXT_CHARS).score is not None
    assert score_text("服务太差了".encode()).language == "zh"


def test_script_decides_the_language_of_mixed_text() -> None:
    assert script_language("iPhone 的屏幕坏了，客服不理人") == "zh"
    assert script_language("The 客服 was rude and the refund never came") == "en"


def test_a_scorer_that_raises_is_counted_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.scoring import sentiment

    def broken(text: str) -> float:
        raise RuntimeError("model file damaged")

    monkeypatch.setitem(sentiment._SCORERS, "en", broken)
    assert score_text("fine") == Sentiment(None, "en", "scorer_error")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=MAX_TEXT_CHARS + 20), st.binary(max_size=200), st.none(),
                 st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=80)))
def test_any_input_gives_a_score_in_range_or_a_named_reason(text: str | bytes | None) -> None:
    result = score_text(text)
    if result.score is None:
        assert result.unscored in UNSCORED_REASONS
    else:
        assert result.unscored is None and result.language in ("zh", "en")
        assert -1.0 <= result.score <= 1.0 and not math.isnan(result.score)


def _feedback_record(message_id: str, day: float, text: str | None) -> dict[str, object]:
    t = int(day * 86_400_000)
    return {"message_id": message_id, "type": "track", "event": "Complaint Submitted", "timestamp_ms": t,
            "received_at_ms": t, "order": None, "feedback": {"kind": "complaint", "text": text, "rating": None},
            "consent": []}


def test_a_complaints_text_becomes_features_and_only_its_score_is_kept() -> None:
    import json

    from services.scoring.codec import state_from_dict, state_to_dict
    from services.scoring.engine import ScoringEngine, score_update_record
    from services.scoring.model import Learner, PropensityModel
    from services.scoring.state import CustomerState, touchpoint_from_record
    from touchstream import avro
    from touchstream.topics import SCORES

    text = "送餐太慢了，饭菜都凉了，再也不点了"
    scoring = ScoringEngine(Learner(PropensityModel()))
    state = CustomerState()
    touch = touchpoint_from_record(_feedback_record("m1", 1, text))
    point = scoring.observe_event("c1", state, touch, touch.timestamp_ms, None)
    [scored] = scoring.assess([point])
    update = score_update_record("c1", point, scored)
    features = update["features"]
    assert features["message_sentiment"] == features["sentiment_last"] == features["sentiment_recent"] < -0.5
    assert avro.decode(SCORES.schema, avro.encode(SCORES.schema, update))["features"] == features
    stored = json.dumps(state_to_dict(state), ensure_ascii=False)
    assert text not in stored and "送餐" not in stored
    restored = state_from_dict(json.loads(stored))
    assert (restored.sentiment_last, restored.sentiment_sum) == (state.sentiment_last, state.sentiment_sum)

    # A later event without text keeps the customer's voice but has no message_sentiment of its own.
    quiet = touchpoint_from_record(_feedback_record("m2", 2, None))
    later = scoring.observe_event("c1", state, quiet, quiet.timestamp_ms, None)
    assert "message_sentiment" not in later.features and later.features["sentiment_last"] < -0.5
    assert quiet.sentiment_unscored is None  # no text is not a failure to count


def test_merging_customers_keeps_both_voices_and_the_newest_last() -> None:
    from services.scoring.features import sentiment_features
    from services.scoring.state import CustomerState, Touchpoint, apply_touchpoint, merge_states

    a, b = CustomerState(), CustomerState()
    apply_touchpoint(a, Touchpoint("m1", 86_400_000, 0, sentiment=0.8))
    apply_touchpoint(b, Touchpoint("m2", 2 * 86_400_000, 0, sentiment=-0.6))
    merge_states(a, b, "merge-1")
    voice = sentiment_features(a)
    assert voice["sentiment_last"] == -0.6
    assert -0.6 < voice["sentiment_recent"] < 0.8


def test_an_unscoreable_text_is_noted_not_raised() -> None:
    from services.scoring.state import touchpoint_from_record

    touch = touchpoint_from_record(_feedback_record("m1", 1, "x" * (MAX_TEXT_CHARS + 5)))
    assert touch.sentiment is None and touch.sentiment_unscored == "too_long"
