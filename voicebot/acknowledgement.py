"""The persona's acknowledgement ("Sure,", 「はい、」): its audio, made once per process.

When the answer to a turn is slow, the caller hears the acknowledgement first and the answer
right after it. How a turn uses it (``CallPolicy``): once the turn is closed and its transcript
is in, a ``reply-N-ack`` thread waits until ``persona.acknowledge_after_ms`` after the end of
the caller's speech (and at least ``ANSWER_HEAD_START_S`` after the transcript) and posts
``AcknowledgementDue``; the policy queues the audio before the
answer's (``Playout.push_lead_in``) only if the answer has no audio yet, the reply is still the
one the caller waits for, nobody talks over the agent, and the turn has not had one. A
barge-in stops it like any agent audio. It counts towards ``Timings.first_sound_ms``, never
``v2v_ms``; the turn's ``assistant_text`` starts with what was heard of it, the LLM's history
does not (``Turn.acknowledgement``).
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from voicebot.audio import Samples, resample
from voicebot.errors import StageError
from voicebot.tts import Synthesizer

logger = logging.getLogger(__name__)

ANSWER_HEAD_START_S = 0.3
"""Never due sooner than this after the transcript is in: time for a fast answer (an LLM's
first chunk, a cached opener) to start on its own. Measured: 「はい、」 due at the moment a late
transcript came in played just before an answer that was ready 0.25 s later, which then
waited for the end of it (docs/benchmarks.md)."""
TAIL_S = 0.12
"""Silence kept after the word: a short breath before the answer. Kokoro adds 0.25 s after
every piece, which would sound like hesitation."""
LEAD_S = 0.02
"""Silence kept before it: it is heard the moment it is due."""
_QUIET = 0.02
"""Below this fraction of the peak, a trailing sample counts as silence."""


def synthesize_acknowledgement(text: str, synthesizer: Synthesizer, rate: int) -> Samples:
    """``text`` as one piece of mono float32 audio at ``rate``, leading silence trimmed to
    ``LEAD_S`` and trailing silence to ``TAIL_S``. Raises ``StageError`` when the synthesizer
    fails or says nothing."""
    pieces = [
        resample(samples, piece_rate, rate) for piece_rate, samples in synthesizer.synthesize(text)
    ]
    audio = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
    loud = np.flatnonzero(np.abs(audio) > _QUIET * float(np.max(np.abs(audio), initial=0.0)))
    if audio.size == 0 or loud.size == 0:
        raise StageError("tts", f"{synthesizer.name} produced no audio for the acknowledgement")
    start = max(0, int(loud[0]) - int(LEAD_S * rate))
    return audio[start : min(audio.size, int(loud[-1]) + 1 + int(TAIL_S * rate))]


class AcknowledgementAudio:
    """The acknowledgement's audio per (voice, text, rate), synthesized on first use and kept;
    one per persona stack, so every call of the process shares it. Thread-safe.

    A synthesis that fails is logged once and not retried: that persona's turns go without.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held while synthesizing: two calls make it once
        self._audio: dict[tuple[str, str, int], Samples | None] = {}

    def get(self, text: str, synthesizer: Synthesizer, rate: int) -> Samples | None:
        """The audio of ``text`` at ``rate`` (None if it cannot be made)."""
        if not text:
            return None
        key = (synthesizer.name, text, rate)
        with self._lock:
            if key not in self._audio:
                try:
                    self._audio[key] = synthesize_acknowledgement(text, synthesizer, rate)
                except Exception as e:  # the answer still comes, only without it
                    logger.error("acknowledgement for %s left out: %s", synthesizer.name, e)
                    self._audio[key] = None
            return self._audio[key]
