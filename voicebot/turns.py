"""Turn-taking: a state machine over 32 ms VAD windows that finds where user turns start and end.

Pure logic on the sample clock (16 kHz samples since the call started), no I/O and no wall
clock, so it is exact and testable; the stream handler maps sample positions to wall time.

Compared with FastRTC's ReplyOnPause, which looks for a pause every 0.6 s, every window is
decided as it arrives: a turn ends ``end_silence_ms`` after the last voiced window, and a
barge-in is reported ``bargein_min_speech_ms`` into the interrupting speech, not after it.

With a turn-end model (``endpointing.TurnEndModel``), silence timing depends on what was said:
the model is asked once per pause, ``turn_end_ask_ms`` into it, whether the turn sounds
complete. A complete turn ends ``complete_silence_ms`` after speech, an unfinished one only
after ``incomplete_silence_ms``; if the model fails or is late the plain ``end_silence_ms``
applies. Given an executor, the model runs there (~50 ms on one core) while the audio keeps
flowing; the detector waits for its answer only if it is still missing at
``complete_silence_ms`` by holding the decision, never the audio: each later window looks
whether the answer has come, and ``turn_end_timeout_ms`` of audio past the short end without
one means silence timing decides. Without an executor it runs inline (offline measurement
and tests, where the result must not depend on timing).
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np

from voicebot.audio import Samples
from voicebot.endpointing import TurnEndModel
from voicebot.vad import VAD_SAMPLE_RATE, WINDOW_SAMPLES, VadStream

logger = logging.getLogger(__name__)

WINDOW_MS = WINDOW_SAMPLES * 1000 / VAD_SAMPLE_RATE


@dataclass(frozen=True)
class TurnConfig:
    """Endpointing parameters (see Settings for what each means)."""

    threshold: float = 0.5
    min_speech_ms: int = 96
    end_silence_ms: int = 320
    pre_roll_ms: int = 320
    max_utterance_s: float = 30.0
    bargein_min_speech_ms: int = 160
    speculative_silence_ms: int = 128
    """Silence after which the turn is offered for early transcription (0 = never)."""
    preemptive_replies: bool = True
    """At an end candidate, start answering (STT → LLM → TTS) with the audio held back; the
    reply plays at once if the turn then ends there, and is dropped if the user goes on."""
    stt_drafts: bool = True
    """With preemptive replies: start the answer on the transcriber's quick draft, played
    only if the transcript then says the same words."""
    backchannel_max_ms: int = 1200
    """Overlapping speech up to this long may be a backchannel: the agent pauses instead of
    stopping, and resumes if it was one (0 = every barge-in stops the agent)."""
    turn_end_ask_ms: int = 64
    """With a turn-end model: silence after which the model is asked if the turn is over."""
    complete_silence_ms: int = 160
    """With a turn-end model: silence that ends a turn the model calls complete."""
    incomplete_silence_ms: int = 1500
    """With a turn-end model: silence that ends a turn the model calls unfinished."""
    turn_end_threshold: float = 0.7
    """Model probability at or above which the turn counts as complete."""
    turn_end_timeout_ms: int = 200
    """Longest wait (audio time) for the model's answer past ``complete_silence_ms``; then
    silence timing decides."""

    @property
    def release_threshold(self) -> float:
        """Below this a window counts as silence once speech has started (hysteresis)."""
        return max(self.threshold - 0.15, 0.01)


@dataclass(frozen=True)
class SpeechStarted:
    """The user started a turn; ``start_sample`` is the first voiced window's first sample."""

    start_sample: int


@dataclass(frozen=True)
class BargeIn:
    """Sustained speech while the agent is talking."""

    start_sample: int
    detected_sample: int
    audio: Samples
    """The interrupting speech so far (pre-roll included), for a quick look at what it is."""


@dataclass(frozen=True)
class EndCandidate:
    """The user has paused long enough that the turn will probably end: transcribe early."""

    audio: Samples
    speech_end_sample: int


@dataclass(frozen=True)
class SpeechResumed:
    """Speech came back after an ``EndCandidate``: that pause did not end the turn."""

    speech_end_sample: int
    """The speech end of the withdrawn candidate."""


@dataclass(frozen=True)
class UserTurn:
    """A finished user utterance at 16 kHz."""

    audio: Samples
    start_sample: int
    speech_end_sample: int
    """End of the last voiced window."""
    closed_sample: int
    """Where the turn was closed (speech end + silence, or the length cap)."""
    truncated: bool = False
    """Cut at the maximum utterance length."""
    complete_probability: float | None = None
    """The turn-end model's answer at the last pause (None: no model, or it failed)."""


TurnEvent = SpeechStarted | BargeIn | EndCandidate | SpeechResumed | UserTurn


class TurnDetector:
    """Feed 16 kHz mono float32 audio; get turn events back."""

    def __init__(
        self,
        config: TurnConfig,
        vad: VadStream,
        turn_end: TurnEndModel | None = None,
        executor: Executor | None = None,
    ) -> None:
        """``turn_end``: the optional turn-end model; ``executor``: where it runs (None: inline,
        blocking ``push``)."""
        self._config = config
        self._vad = vad
        self._turn_end = turn_end
        self._executor = executor
        self._pending = np.zeros(0, dtype=np.float32)
        self._sample = 0  # samples consumed by the VAD so far
        pre_roll_windows = max(1, round(config.pre_roll_ms / WINDOW_MS))
        self._pre_roll: deque[Samples] = deque(maxlen=pre_roll_windows)
        self._min_speech_windows = max(1, round(config.min_speech_ms / WINDOW_MS))
        self._end_silence_windows = max(1, round(config.end_silence_ms / WINDOW_MS))
        self._bargein_windows = max(1, round(config.bargein_min_speech_ms / WINDOW_MS))
        spec = config.speculative_silence_ms
        self._speculative_windows = round(spec / WINDOW_MS) if spec > 0 else 0
        self._max_windows = max(1, int(config.max_utterance_s * 1000 / WINDOW_MS))
        self._ask_windows = max(1, round(config.turn_end_ask_ms / WINDOW_MS))
        self._complete_windows = max(
            self._ask_windows, round(config.complete_silence_ms / WINDOW_MS)
        )
        self._incomplete_windows = max(
            self._complete_windows, round(config.incomplete_silence_ms / WINDOW_MS)
        )
        self._timeout_windows = max(1, round(config.turn_end_timeout_ms / WINDOW_MS))
        self._verdict: Future[float] | None = None
        self._probability: float | None = None
        self._reset_utterance()

    def _reset_utterance(self) -> None:
        self._in_speech = False
        self._started = False  # min speech reached: a real turn
        self._voiced_run = 0
        self._voiced_total = 0
        self._silence_run = 0
        self._windows: list[Samples] = []
        self._start_sample = 0
        self._last_voiced_end = 0
        self._bargein_sent = False
        self._candidate_sent = False
        self._forget_verdict()

    def _forget_verdict(self) -> None:
        if self._verdict is not None:
            self._verdict.cancel()  # the user went on: the answer is about an old pause
        self._verdict = None
        self._probability = None
        self._limit_windows: int | None = None  # decided silence limit for this pause

    @property
    def speaking(self) -> bool:
        """Whether the current window is inside an utterance (started or not yet)."""
        return self._in_speech

    @property
    def utterance_samples(self) -> int:
        """How long the current utterance has lasted, in 16 kHz samples (0 when none)."""
        return self._sample - self._start_sample if self._in_speech else 0

    @property
    def samples_seen(self) -> int:
        """16 kHz samples fed to the VAD so far."""
        return self._sample

    def push(self, samples: Samples, agent_speaking: bool = False) -> list[TurnEvent]:
        """Consume audio; return the events it completes, in order."""
        if samples.size:
            self._pending = np.concatenate((self._pending, samples.astype(np.float32, copy=False)))
        events: list[TurnEvent] = []
        while self._pending.size >= WINDOW_SAMPLES:
            window = self._pending[:WINDOW_SAMPLES]
            self._pending = self._pending[WINDOW_SAMPLES:]
            event = self._step(window, agent_speaking)
            if event is not None:
                events.append(event)
        return events

    def _step(self, window: Samples, agent_speaking: bool) -> TurnEvent | None:
        config = self._config
        probability = self._vad.probability(window)
        window_start = self._sample
        self._sample += WINDOW_SAMPLES

        if not self._in_speech:
            if probability >= config.threshold:
                self._in_speech = True
                self._start_sample = window_start
                self._windows = list(self._pre_roll)
                self._pre_roll.clear()
                self._windows.append(window)
                self._voiced_run = self._voiced_total = 1
                self._last_voiced_end = self._sample
                return self._maybe_started(agent_speaking)
            self._pre_roll.append(window)
            return None

        self._windows.append(window)
        voiced = probability >= (config.release_threshold if self._started else config.threshold)
        if voiced:
            withdrawn = self._last_voiced_end if self._candidate_sent else None
            self._voiced_run += 1
            self._voiced_total += 1
            self._silence_run = 0
            self._candidate_sent = False
            self._forget_verdict()
            self._last_voiced_end = self._sample
            event = self._maybe_started(agent_speaking)
            if event is None and len(self._windows) >= self._max_windows and self._started:
                return self._close(truncated=True)
            if event is None and withdrawn is not None:
                return SpeechResumed(withdrawn)
            return event

        self._voiced_run = 0
        self._silence_run += 1
        if not self._started:
            # A blip shorter than the minimum speech: forget it once the silence is long enough.
            if self._silence_run >= self._end_silence_windows:
                self._discard()
            return None
        if self._silence_run >= self._silence_limit():
            return self._close(truncated=False)
        if len(self._windows) >= self._max_windows:
            return self._close(truncated=True)
        if (
            self._speculative_windows
            and self._silence_run == self._speculative_windows
            and not self._candidate_sent
        ):
            self._candidate_sent = True
            return EndCandidate(self._audio(), self._last_voiced_end)
        return None

    def _silence_limit(self) -> int:
        """Silent windows that end the turn at this pause (never blocks on the model)."""
        if self._turn_end is None:
            return self._end_silence_windows
        if self._silence_run == self._ask_windows and self._verdict is None:
            self._verdict = self._ask(self._turn_end, self._audio())
        if self._limit_windows is None and self._silence_run >= self._complete_windows:
            if self._verdict is not None and self._verdict.done():
                self._probability = self._answer(self._verdict)
                if self._probability is None:
                    self._limit_windows = self._end_silence_windows
                elif self._probability >= self._config.turn_end_threshold:
                    self._limit_windows = self._complete_windows
                else:
                    self._limit_windows = self._incomplete_windows
            elif self._silence_run >= self._complete_windows + self._timeout_windows:
                logger.warning(
                    "turn-end model gave no answer within %d ms; ending the turn on silence alone",
                    self._config.turn_end_timeout_ms,
                )
                self._limit_windows = self._end_silence_windows
        return self._limit_windows if self._limit_windows is not None else self._incomplete_windows

    def _ask(self, model: TurnEndModel, audio: Samples) -> Future[float]:
        if self._executor is not None:
            return self._executor.submit(model.complete_probability, audio)
        done: Future[float] = Future()
        try:
            done.set_result(model.complete_probability(audio))
        except Exception as e:  # reported by _answer, like an executor's failure
            done.set_exception(e)
        return done

    def _answer(self, verdict: Future[float]) -> float | None:
        """The finished model call's probability, None when it failed."""
        try:
            return verdict.result(timeout=0)
        except Exception:
            logger.exception("turn-end model failed; ending the turn on silence alone")
        return None

    def _maybe_started(self, agent_speaking: bool) -> TurnEvent | None:
        if not self._started and self._voiced_total >= self._min_speech_windows:
            self._started = True
            if not agent_speaking:
                return SpeechStarted(self._start_sample)
        if (
            agent_speaking
            and not self._bargein_sent
            and self._voiced_total >= self._bargein_windows
        ):
            self._bargein_sent = True
            return BargeIn(self._start_sample, self._sample, self._audio())
        return None

    def _audio(self) -> Samples:
        return np.concatenate(self._windows) if self._windows else np.zeros(0, np.float32)

    def _close(self, *, truncated: bool) -> UserTurn:
        pre_roll_samples = len(self._windows) * WINDOW_SAMPLES - (self._sample - self._start_sample)
        turn = UserTurn(
            audio=self._audio(),
            start_sample=self._start_sample - pre_roll_samples,
            speech_end_sample=self._last_voiced_end,
            closed_sample=self._sample,
            truncated=truncated,
            complete_probability=self._probability,
        )
        self._reset_utterance()
        return turn

    def _discard(self) -> None:
        # Keep the tail as pre-roll so a real start right after is not clipped.
        for window in self._windows[-self._pre_roll.maxlen :] if self._pre_roll.maxlen else []:
            self._pre_roll.append(window)
        self._reset_utterance()
