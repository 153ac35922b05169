"""Backchannels (aizuchi): short acknowledgements that must not stop the agent.

A pure decision on what the overlapping speech said and how long it lasted; the handler
pauses the agent at once when the user starts talking over it, then either resumes (a
backchannel) or drops the rest of the reply (a real interruption).

The transcript comes from whisper, which writes the same aizuchi many ways ("Uh-huh." /
"uh huh" / "Mm-hmm", 「はい。」/「ハイ」/「はーい」, 「うんうんうん」, 「はい、そうですね」), so
both the transcript and the phrase list are reduced to a canonical form (NFKC, lower case,
katakana as hiragana, no punctuation, spaces or long-vowel marks, doubled Latin letters
collapsed) and the transcript counts as a backchannel when it is nothing but a sequence of
known phrases. Any other word ("wait", 「すみません」, 「いいえ」) makes it an interruption.

Duration is the other cue. Whisper rarely gets a half-second syllable right (「ええ」 comes back
as 「どうも」, 「へえ」 as 「よっ」), so a *short* overlap (at most ``SHORT_OVERLAP_S`` of
speech) whose transcript is short too (a few kana or two words) is a backchannel whatever the
words, unless one of them claims the floor (``STOP_WORDS``: 「待って」, 「いいえ」, "no",
"wait", …). The price: a short content word said over the agent ("Friday.", 「三名」) does
not stop it either.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache

__all__ = [
    "DEFAULT_BACKCHANNELS",
    "MAX_BACKCHANNEL_S",
    "NOISE_TRANSCRIPTS",
    "SHORT_OVERLAP_S",
    "SHORT_TRANSCRIPT",
    "STOP_WORDS",
    "is_backchannel",
    "normalize",
]

DEFAULT_BACKCHANNELS: dict[str, tuple[str, ...]] = {
    "en": (
        "uh-huh",
        "mm-hmm",
        "mhm",
        "mm",
        "hmm",
        "um-hmm",
        "yeah",
        "yes",
        "yep",
        "yup",
        "yah",
        "right",
        "okay",
        "ok",
        "k",
        "sure",
        "i see",
        "got it",
        "gotcha",
        "oh",
        "ah",
        "aha",
        "uh",
        "alright",
        "all right",
        "cool",
        "great",
        "nice",
        "good",
        "wow",
        "really",
        "exactly",
        "true",
        "indeed",
        "of course",
        "sounds good",
        "makes sense",
        "fair enough",
        "interesting",
        "perfect",
        "thanks",
        "thank you",
    ),
    "ja": (
        "はい",
        "はーい",
        "ええ",
        "うん",
        "うーん",
        "ん",
        "そう",
        "そうそう",
        "そうですね",
        "そうですよね",
        "そうですか",
        "そうなんですね",
        "そうなんですか",
        "そうなんだ",
        "そっか",
        "そうか",
        "なるほど",
        "なるほどね",
        "なるほどですね",
        "たしかに",
        "確かに",
        "ですね",
        "ですよね",
        "へえ",
        "へー",
        "ほう",
        "ふーん",
        "ああ",
        "あー",
        "あ",
        "おお",
        "おー",
        "ね",
        "ねえ",
        "わかりました",
        "分かりました",
        "了解",
        "了解です",
        "承知しました",
        "いいですね",
        "本当",
        "ほんと",
        "オッケー",
        "ok",
        "okay",
    ),
}
"""Used for a persona's language in addition to the persona's own ``backchannels``."""

NOISE_TRANSCRIPTS: dict[str, tuple[str, ...]] = {
    "en": ("you", "thank you for watching", "bye"),
    "ja": ("ご視聴ありがとうございました", "ご清聴ありがとうございました", "おやすみなさい"),
}
"""What whisper writes for a breath, a cough or line noise it cannot make sense of: the
overlapping sound said nothing, which is no reason to stop the agent."""

STOP_WORDS: dict[str, tuple[str, ...]] = {
    "en": (
        "no",
        "nope",
        "not",
        "wait",
        "stop",
        "hold",
        "hang",
        "sorry",
        "pardon",
        "what",
        "excuse",
        "actually",
        "but",
        "cancel",
        "change",
        "repeat",
    ),
    "ja": (
        "いいえ",
        "いえ",
        "いや",
        "違",
        "ちが",
        "待",
        "まって",
        "あの",
        "ちょっと",
        "やめ",
        "ストップ",
        "すみません",
        "すいません",
        "でも",
        "けど",
        "キャンセル",
        "変更",
        "もう一度",
    ),
}
"""Words that claim the floor: a transcript holding one is never read as a near-miss of a
backchannel (「いいえ」 is one letter away from 「ええ」), however short the overlap. Japanese
ones are looked for anywhere in the transcript (there are no spaces); English ones at the
start of a word ("no" also finds "nope" and "not", but not "know")."""

MAX_BACKCHANNEL_S = 1.2
"""Longer overlapping speech is always a real interruption."""

SHORT_OVERLAP_S = 0.7
"""Up to this much speech an overlap is too short to be anything but an aizuchi, a single
word or a cough: its transcript is trusted only for floor-claiming words. Kokoro and piper
say はい/ええ/うん/へえ/"yeah"/"uh-huh" in 0.2–0.5 s of VAD speech and はいはい/うんうん in
0.6–0.7 s; 「待って」「違います」「すみません」 take 0.7–0.9 s and have to be heard as such."""

SHORT_TRANSCRIPT: dict[str, int] = {"ja": 5, "en": 2}
"""The most a short overlap's transcript may hold to be judged by duration: kana/kanji
(canonical form) for Japanese, words for English. A longer transcript means whisper heard
words, and they are judged as words. Languages not listed are never judged by duration."""

_NOT_SPOKEN = re.compile(r"[\s\W_ー〜~]+", re.UNICODE)
_DOUBLED_LATIN = re.compile(r"([a-z])\1+")
_KATAKANA = re.compile(r"[\u30a1-\u30f6]")
_KANA_RUN = re.compile(r"([\u3041-\u3096])\1{2,}")
# Small vowels and っ lengthen or clip a sound (「へぇ」「はいっ」): read them as the sound itself.
_SMALL_KANA = str.maketrans("ぁぃぅぇぉっ", "あいうえお ")
_WORD = re.compile(r"\w+(?:['-]\w+)*")
# A lone 「え？」 ("huh?") asks the agent to stop and say it again; 「ええ」 agrees.
_JA_HUH = re.compile(r"(?<!え)えっ?\s*[?？]")


def normalize(text: str) -> str:
    """The canonical form that transcripts and phrases are compared in.

    'Uh-huh.' and 'uh huh' → 'uhuh'; 「ハイ。」 and 「はーい」 → 「はい」; 「ええええ」 → 「ええ」.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = _hiragana(text).translate(_SMALL_KANA)
    text = _NOT_SPOKEN.sub("", text)
    text = _DOUBLED_LATIN.sub(r"\1", text)  # "mmm", "hmmm", "yeahhh", "okk"
    return _KANA_RUN.sub(r"\1\1", text)  # 「えええ」 → 「ええ」


@lru_cache(maxsize=64)
def _vocabulary(phrases: tuple[str, ...], language: str) -> frozenset[str]:
    base = DEFAULT_BACKCHANNELS.get(_language(language), ())
    return frozenset(p for p in (normalize(x) for x in (*base, *phrases)) if p)


@lru_cache(maxsize=8)
def _noise(language: str) -> frozenset[str]:
    return frozenset(normalize(x) for x in NOISE_TRANSCRIPTS.get(_language(language), ()))


def _language(language: str) -> str:
    return language.strip().lower().replace("_", "-").split("-")[0]


def _only_phrases(said: str, vocabulary: Iterable[str], edits: int = 0) -> bool:
    """Whether ``said`` is a concatenation of vocabulary items (「はいはいはい」, 'yeahright'),
    allowing up to ``edits`` letters inserted, dropped or changed in all."""
    words = sorted(set(vocabulary), key=len, reverse=True)
    # cost[i]: fewest edits to read said[:i] as phrases.
    cost = [0] + [edits + 1] * len(said)
    for end in range(1, len(said) + 1):
        best = edits + 1
        for w in words:
            if len(w) <= end and said.endswith(w, 0, end):
                best = min(best, cost[end - len(w)])
            elif edits:
                for start in range(max(0, end - len(w) - edits), end):
                    if cost[start] < best:
                        best = min(best, cost[start] + _distance(said[start:end], w))
        best = min(best, cost[end - 1] + 1)  # a stray letter
        cost[end] = best
    return cost[-1] <= edits


def _distance(a: str, b: str) -> int:
    """Levenshtein distance (short strings only)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def is_backchannel(text: str, duration_s: float, phrases: Sequence[str], language: str) -> bool:
    """Whether overlapping speech of ``duration_s`` that said ``text`` is only a backchannel.

    ``phrases`` (the persona's list) adds to the language's defaults.
    """
    if duration_s > MAX_BACKCHANNEL_S:
        return False
    said = normalize(text)
    if not said or said in _noise(language):
        return True  # nothing intelligible: a cough or a breath is no reason to stop
    vocabulary = _vocabulary(tuple(phrases), language)
    if _only_phrases(said, vocabulary):
        return True
    if _claims_floor(text, said, language):
        return False
    if duration_s <= SHORT_OVERLAP_S and _is_short(text, said, language):
        return True  # too short for whisper to be trusted, and nothing in it claims the floor
    # Whisper often mishears a short clip by a letter (「はい」 → 「はよい」, 'yeah' → 'yeh'):
    # one slip is forgiven in three letters or more.
    return len(said) >= 3 and _only_phrases(said, vocabulary, edits=1)


def _claims_floor(text: str, said: str, language: str) -> bool:
    """Whether the transcript holds a stop word (or, in Japanese, a questioning 「え？」)."""
    lang = _language(language)
    if lang == "en":
        return any(w.startswith(_stop_words(lang)) for w in _words(text))
    if lang == "ja" and _JA_HUH.search(_hiragana(unicodedata.normalize("NFKC", text))):
        return True
    return any(w in said for w in _stop_words(lang))


def _is_short(text: str, said: str, language: str) -> bool:
    limit = SHORT_TRANSCRIPT.get(_language(language))
    if limit is None:
        return False
    if _language(language) == "en":
        return len(_words(text)) <= limit
    return len(said) <= limit


def _words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def _hiragana(text: str) -> str:
    return _KATAKANA.sub(lambda m: chr(ord(m.group(0)) - 0x60), text)


@lru_cache(maxsize=8)
def _stop_words(language: str) -> tuple[str, ...]:
    # English ones are matched against words, which keep their doubled letters ("sorry").
    form = str.lower if language == "en" else normalize
    return tuple(sorted({form(x) for x in STOP_WORDS.get(language, ())}))
