"""The customer's voice: a sentiment score in [-1, 1] for the text of a complaint, feedback or review.

Pure: text in, a `Sentiment` out, no I/O beyond the scorers' own files inside their packages.
The language is chosen by the text's script: Han characters -> Chinese, scored by snownlp (a
naive Bayes model trained on product and hotel reviews, shipped in the package; its P(positive)
p becomes 2p - 1); Latin letters -> English, scored by VADER (a rule-based lexicon shipped in
the package; its `compound` is already in [-1, 1]). Neither reaches the network.

Anything else is "no sentiment" (`score` None) with the reason in `unscored`, never an
exception, so one odd message cannot fail a batch:

| unscored | when |
|---|---|
| `empty` | no text, or only spaces |
| `too_long` | more than MAX_TEXT_CHARS characters: the cap bounds a message's cost (see MAX_TEXT_CHARS) |
| `binary` | a NUL, or more than 10% control or replacement characters: bytes that were never text |
| `undecodable` | bytes that are not UTF-8 |
| `unsupported_language` | no Han and no Latin letters (Cyrillic; only digits), or kana/hangul (not Chinese) |
| `scorer_error` | the scorer raised (a bug upstream of us; counted, not fatal) |

    >>> score_text("").unscored, score_text(b"\\xff\\xfe").unscored, score_text("a\\x00b").unscored
    ('empty', 'undecodable', 'binary')
    >>> score_text("x" * (MAX_TEXT_CHARS + 1)).unscored
    'too_long'
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

# A complaint or a review is a few sentences; 500 characters is a long one. Beyond it a
# message is not scored (and counted) rather than scored in part: the first 500 characters of a
# long letter need not carry its tone, and the cap bounds one message's cost (snownlp: ~60 ms at 500
# Chinese characters on a loaded 2-core machine, ~0.4 s at 1,000: its cost grows faster than the length).
MAX_TEXT_CHARS = 500
# Shares of odd characters above which text is taken for binary.
BINARY_SHARE = 0.10
UNSCORED_REASONS = ("empty", "too_long", "binary", "undecodable", "unsupported_language", "scorer_error")

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
_KANA_HANGUL = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uac00-\ud7af\u1100-\u11ff]")
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+")
_ODD = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd\ud800-\udfff]")


@dataclass(frozen=True)
class Sentiment:
    """A text's sentiment: `score` in [-1, 1] (negative to positive), or None with the reason in `unscored`."""

    score: float | None
    language: str | None = None
    unscored: str | None = None


def script_language(text: str) -> str | None:
    """Return "zh" or "en" by the text's script, or None when neither model fits it.

    Chinese when there are at least as many Han characters as Latin words (a brand name in a
    Chinese sentence stays Chinese); English when there are Latin words and no Han.

    >>> script_language("iPhone 屏幕坏了"), script_language("Great service!"), script_language("Отлично")
    ('zh', 'en', None)
    >>> script_language("とても良い"), script_language("12345 !!!")
    (None, None)
    """
    if _KANA_HANGUL.search(text):
        return None
    han = len(_HAN.findall(text))
    latin_words = len(_LATIN_WORD.findall(text))
    if han and han >= latin_words:
        return "zh"
    if latin_words:
        return "en"
    return None


def score_text(text: str | bytes | None) -> Sentiment:
    """Return the sentiment of `text`, or "no sentiment" with the reason (never raises).

    >>> score_text("Two hours late and the food was cold. Terrible.").score < 0 < score_text("Lovely, thank you!").score
    True
    >>> s = score_text("送餐太慢了，饭菜都凉了，再也不点了"); (s.language, s.score < -0.5)
    ('zh', True)
    """
    if isinstance(text, bytes | bytearray | memoryview):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            return Sentiment(None, unscored="undecodable")
    if text is None or not text.strip():
        return Sentiment(None, unscored="empty")
    if len(text) > MAX_TEXT_CHARS:
        return Sentiment(None, unscored="too_long")
    if "\x00" in text or len(_ODD.findall(text)) > BINARY_SHARE * len(text):
        return Sentiment(None, unscored="binary")
    language = script_language(text)
    if language is None:
        return Sentiment(None, unscored="unsupported_language")
    try:
        score = _SCORERS[language](text)
    except Exception:
        return Sentiment(None, language, "scorer_error")
    if score != score:  # NaN
        return Sentiment(None, language, "scorer_error")
    return Sentiment(max(-1.0, min(1.0, score)), language)


@functools.cache
def _vader() -> Callable[[str], float]:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return lambda text: float(analyzer.polarity_scores(text)["compound"])


@functools.cache
def _snownlp() -> Callable[[str], float]:
    # snownlp.sentiment loads only the sentiment model (about 3 s for the whole package at import).
    from snownlp import sentiment

    return lambda text: 2.0 * float(sentiment.classify(text)) - 1.0


_SCORERS: dict[str, Callable[[str], float]] = {
    "en": lambda text: _vader()(text),
    "zh": lambda text: _snownlp()(text),
}


def load_scorers() -> None:
    """Load both models now (a worker calls it at start, so the first message does not wait seconds)."""
    _vader()
    _snownlp()
