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
    sentiment_in_words,
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


def test_words_for_scores() -> None:
    assert sentiment_in_words(-0.9) == "strongly negative"
    assert sentiment_in_words(0.1) == "neutral"


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
