"""Backchannels (aizuchi): short acknowledgements that must not stop the agent.

A pure decision on what the overlapping speech said and how long it lasted; the handler
pauses the agent at once when the user starts talking over it, then either resumes (a
backchannel) or drops the rest of the reply (a real interruption).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

DEFAULT_BACKCHANNELS: dict[str, tuple[str, ...]] = {
    "en": (
        "uh-huh",
        "uh huh",
        "mm-hmm",
        "mhm",
        "mm",
        "hmm",
        "yeah",
        "yes",
        "yep",
        "right",
        "okay",
        "ok",
        "sure",
        "i see",
        "got it",
        "oh",
        "ah",
        "alright",
        "all right",
        "cool",
    ),
    "ja": (
        "はい",
        "ええ",
        "うん",
        "そうですね",
        "なるほど",
        "はいはい",
        "うんうん",
        "ええええ",
        "へえ",
        "へー",
        "そうなんですね",
        "そうですか",
        "ですね",
        "たしかに",
        "確かに",
        "ああ",
    ),
}

MAX_BACKCHANNEL_S = 1.2
"""Longer overlapping speech is always a real interruption."""

_PUNCTUATION = re.compile(r"[\s\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """Lower-case, NFKC, without punctuation or spaces, so 'Uh-huh.' matches 'uh huh'."""
    return _PUNCTUATION.sub("", unicodedata.normalize("NFKC", text).lower())


def is_backchannel(text: str, duration_s: float, phrases: Sequence[str], language: str) -> bool:
    """Whether overlapping speech of ``duration_s`` that said ``text`` is only a backchannel."""
    if duration_s > MAX_BACKCHANNEL_S:
        return False
    said = normalize(text)
    if not said:
        return True  # nothing intelligible: a cough or a breath is no reason to stop
    known = {normalize(p) for p in (phrases or DEFAULT_BACKCHANNELS.get(language, ()))}
    return said in known
