"""How fast a persona's voice and model are, measured on its replies, and how short a reply's
first chunk may be at that pace.

The chunker sends a reply's first chunk to TTS at the first clause boundary past a minimum
length (``chunking``). A shorter first chunk is heard sooner, but the caller hears a gap if
the next chunk is not synthesized by the time the first has played. The next chunk is ready
``L2 / llm_rate + L2 / speech_rate * rtf`` after the cut (the model writes it, then the voice
synthesizes it); the first plays for ``L1 / speech_rate``. So a first chunk of

    L1 >= L2 * (speech_rate / llm_rate + rtf) * MARGIN

characters leaves no gap. ``ReplyPace`` measures each term as replies go: the voice's
speaking rate (characters per second of audio) and real-time factor (seconds of synthesis,
the wait for the shared voice included, per second of audio), the model's writing rate
(characters per second after its first token), and the typical chunk length (for ``L2``).
On a quiet CPU with a GPU-class model the bound is a few characters ("Sure," goes alone);
with a CPU model, or a voice slowed by other calls, it reaches the language's default and
nothing changes. It only ever lowers the default, never raises it: the default is what was
measured to leave no gap under load (docs/benchmarks.md, "TTS first audio").

Rates that can turn against the caller are trusted pessimistically: a slower sample is taken
at once, a faster one blended in slowly, so a burst of load raises the bound on the next reply.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

__all__ = ["MARGIN", "MIN_FIRST_CHUNK_CHARS", "PaceEstimates", "ReplyPace"]

MARGIN = 1.25
"""Headroom on the no-gap bound, for a next chunk longer than the typical one."""
MIN_FIRST_CHUNK_CHARS = 4
"""The shortest first chunk worth sending alone ("Yes,")."""
_BLEND = 0.2
"""Weight of a new sample in a running estimate."""
_MIN_LLM_CHARS = 20
"""A stream shorter than this says little about the model's pace: not counted."""


def _mean(old: float | None, sample: float) -> float:
    return sample if old is None else old + _BLEND * (sample - old)


def _cautious(old: float | None, sample: float, *, higher_is_worse: bool) -> float:
    """A running estimate that takes a worse sample at once."""
    if old is None or (sample > old) == higher_is_worse:
        return sample
    return _mean(old, sample)


@dataclass(frozen=True)
class PaceEstimates:
    """What ``ReplyPace`` knows so far (None: not measured yet)."""

    speech_rate: float | None
    """The voice's characters per second of audio."""
    rtf: float | None
    """Seconds of synthesis (waiting for the voice included) per second of audio."""
    llm_rate: float | None
    """The model's characters per second after its first token."""
    chunk_chars: float | None
    """Length of a chunk after a reply's first."""


class ReplyPace:
    """Running estimates of one persona's paces, shared by its calls (thread-safe).

    ``adaptive=False`` keeps the language's default first chunk (the setting
    ``VOICEBOT_FIRST_CHUNK_PACED``); the paces are still measured.
    """

    def __init__(self, *, adaptive: bool = True) -> None:
        self.adaptive = adaptive
        self._lock = threading.Lock()
        self._speech_rate: float | None = None
        self._rtf: float | None = None
        self._llm_rate: float | None = None
        self._chunk_chars: float | None = None

    def synthesized(self, chars: int, audio_s: float, elapsed_s: float) -> None:
        """A chunk of ``chars`` characters became ``audio_s`` seconds of audio in
        ``elapsed_s`` (from asking the voice to its last piece)."""
        if chars <= 0 or audio_s <= 0:
            return
        with self._lock:
            self._speech_rate = _mean(self._speech_rate, chars / audio_s)
            self._chunk_chars = _mean(self._chunk_chars, float(chars))
            self._rtf = _cautious(self._rtf, max(elapsed_s, 0.0) / audio_s, higher_is_worse=True)

    def streamed(self, chars: int, elapsed_s: float) -> None:
        """The model wrote ``chars`` characters in ``elapsed_s`` after its first token."""
        if chars < _MIN_LLM_CHARS or elapsed_s <= 0:
            return
        with self._lock:
            self._llm_rate = _cautious(self._llm_rate, chars / elapsed_s, higher_is_worse=False)

    def estimates(self) -> PaceEstimates:
        with self._lock:
            return PaceEstimates(self._speech_rate, self._rtf, self._llm_rate, self._chunk_chars)

    def first_chunk_min_chars(self, default: int) -> int:
        """The first chunk's minimum length for the next reply: the no-gap bound at the
        measured paces, at most ``default`` (also the answer until every pace is measured)."""
        if not self.adaptive:
            return default
        now = self.estimates()
        if now.speech_rate is None or now.rtf is None or now.llm_rate is None:
            return default
        if now.chunk_chars is None:
            return default
        bound = math.ceil(now.chunk_chars * (now.speech_rate / now.llm_rate + now.rtf) * MARGIN)
        return max(MIN_FIRST_CHUNK_CHARS, min(default, bound))
