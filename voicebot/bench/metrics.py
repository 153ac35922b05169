"""Word error rate (character error rate for Japanese) and percentiles."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_UNSPACED = frozenset({"ja", "zh", "yue"})


def _strip_punctuation(text: str) -> str:
    # Unicode categories P* (punctuation) and S* (symbols) become spaces: "don't" stays one
    # word in whisper's output and ours alike, so apostrophes are dropped rather than split.
    out: list[str] = []
    for ch in unicodedata.normalize("NFKC", text).lower():
        if ch in "'’":
            continue
        out.append(" " if unicodedata.category(ch)[0] in "PS" else ch)
    return "".join(out)


def tokens(text: str, language: str) -> list[str]:
    """Words (or characters, for languages written without spaces), normalised."""
    plain = _strip_punctuation(text)
    if language.split("-")[0] in _UNSPACED:
        return [ch for ch in plain if not ch.isspace()]
    return plain.split()


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        current = [i]
        for j, hyp in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


@dataclass(frozen=True)
class ErrorCount:
    """Edits and reference length, summed over utterances before dividing."""

    errors: int
    length: int

    @property
    def rate(self) -> float | None:
        """Errors per reference token; None without reference tokens."""
        return self.errors / self.length if self.length else None


def error_count(reference: str, hypothesis: str, language: str) -> ErrorCount:
    """WER counts (CER for Japanese) of one transcript against its reference."""
    ref = tokens(reference, language)
    return ErrorCount(edit_distance(ref, tokens(hypothesis, language)), len(ref))


@dataclass(frozen=True)
class Percentiles:
    """p50/p95 of a sample (milliseconds); None when it is empty."""

    p50: float | None
    p95: float | None
    n: int


def percentiles(values: Sequence[float | None]) -> Percentiles:
    """p50 and p95 (linear interpolation) of the values that are not None."""
    present = np.array([v for v in values if v is not None], dtype=np.float64)
    if present.size == 0:
        return Percentiles(None, None, 0)
    p50, p95 = np.percentile(present, [50, 95])
    return Percentiles(round(float(p50), 1), round(float(p95), 1), int(present.size))
