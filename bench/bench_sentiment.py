"""Accuracy and cost of scoring's sentiment scorer on labelled text it was not built from; prints JSON.

Per language, on the vendored samples of bench/data/sentiment/ (their README says where each
comes from, and why neither was used to build the scorer it measures; their sha256 is checked
here first):
- `accuracy`: share of all items whose score has the label's sign (a score of exactly 0, or no
  sentiment, counts as wrong), so a scorer cannot look better by declining hard items;
  `accuracy_scored` is the same over the items that got a score, `coverage` the share that did.
- `balanced`: each set has as many positive as negative items, so always guessing one side
  scores 0.5.
- `ms_per_call`: median and 99th percentile of one `score_text` call (wall clock, models
  already loaded), with the machine's load average beside it; `cpu_ms_per_call_mean`: this
  process's CPU time per call, which other load on the machine disturbs less; `load_s`: the
  models' first load. `scored_exactly_zero`: items a scorer found no sentiment words in (VADER).

    .venv/bin/python bench/bench_sentiment.py
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

from services.scoring.sentiment import MAX_TEXT_CHARS, load_scorers, score_text

DATA = Path(__file__).parent / "data" / "sentiment"
CORPORA = {
    "zh": ("zh_waimai_10k_sample.tsv", "49826c96625b6a89ccd717d0260c7f545eaf76e7003d8f83b1e61537dabdfa08",
           "waimai_10k food-delivery reviews (SophonPlus ChineseNlpCorpus), balanced sample; scorer: snownlp 0.12.3"),
    "en": ("en_uci_amazon_yelp.tsv", "6fa8f829d32dd94953c2217a96ec5fa18d3eda19363488d9014dc4122608e3b9",
           "UCI Sentiment Labelled Sentences, Amazon + Yelp (Kotzias et al. 2015, CC BY 4.0); "
           "scorer: vaderSentiment 3.3.2"),
}


def labelled(name: str, sha256: str) -> list[tuple[int, str]]:
    """Return the (label, text) items of a vendored sample after checking its sha256."""
    data = (DATA / name).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{name}: sha256 {digest}, expected {sha256}: the vendored sample changed")
    items = []
    for line in data.decode("utf-8").splitlines():
        label, _, text = line.partition("\t")
        items.append((int(label), text))
    return items


def measure(language: str, items: list[tuple[int, str]]) -> dict[str, Any]:
    right = scored = 0
    unscored: Counter[str] = Counter()
    other_language = 0
    times_ms = []
    zero = 0
    cpu_started = time.process_time()
    for label, text in items:
        started = time.perf_counter()
        result = score_text(text)
        times_ms.append((time.perf_counter() - started) * 1000)
        if result.score is None:
            unscored[result.unscored or "?"] += 1
            continue
        scored += 1
        zero += result.score == 0
        other_language += result.language != language
        if (result.score > 0) == bool(label) and result.score != 0:
            right += 1
    cpu_ms = (time.process_time() - cpu_started) * 1000 / len(items)
    times_ms.sort()
    return {
        "items": len(items),
        "positive": sum(label for label, _ in items),
        "scored": scored,
        "coverage": round(scored / len(items), 4),
        "unscored": dict(unscored),
        "scored_as_other_language": other_language,
        "scored_exactly_zero": zero,
        "accuracy": round(right / len(items), 4),
        "accuracy_scored": round(right / scored, 4) if scored else None,
        "balanced_guess_accuracy": 0.5,
        "ms_per_call": {"median": round(statistics.median(times_ms), 3),
                        "p99": round(times_ms[int(0.99 * (len(times_ms) - 1))], 3)},
        "cpu_ms_per_call_mean": round(cpu_ms, 3),
    }


def run() -> dict[str, Any]:
    started = time.perf_counter()
    load_scorers()
    load_s = time.perf_counter() - started
    languages = {}
    for language, (name, sha256, corpus) in CORPORA.items():
        items = labelled(name, sha256)
        languages[language] = {"corpus": corpus, "file": f"bench/data/sentiment/{name}", **measure(language, items)}
    return {
        "benchmark": "sentiment",
        "max_text_chars": MAX_TEXT_CHARS,
        "load_s": round(load_s, 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "languages": languages,
    }


def main() -> None:
    print(json.dumps(run(), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
