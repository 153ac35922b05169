"""The call's transcription worker: one pass at a time, the newest request first.

Every request gets an id. A request that arrives while another waits replaces it (the
replaced one never runs); the pass under way cannot be stopped, but the policy drops a result
it no longer wants. So a long utterance with many short pauses costs at most one pass in
flight and one waiting, on one thread, however many pauses it has.

A request may ask for a draft first (``Transcriber.draft``): the worker posts it as soon as it
is ready, then transcribes the same audio for real, unless a newer request came meanwhile.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from voicebot.audio import Samples
from voicebot.call.clock import Clock
from voicebot.call.events import CallEvent, Transcribed
from voicebot.stt import Transcriber
from voicebot.vad import VAD_SAMPLE_RATE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Request:
    id: int
    audio: Samples
    transcriber: Transcriber
    language: str | None
    draft: bool


class TranscriptionWorker:
    """Transcribes 16 kHz audio on one thread of its own, started on the first request."""

    def __init__(self, clock: Clock, post: Callable[[CallEvent], None]) -> None:
        self._clock = clock
        self._post = post
        self._cond = clock.condition()
        self._waiting: _Request | None = None
        self._ids = itertools.count(1)
        self._started = False
        self._closed = False
        self.replaced = 0
        """Requests replaced before they ran (or, after their draft, before the real pass)."""

    def request(
        self,
        audio: Samples,
        transcriber: Transcriber,
        language: str | None,
        *,
        draft: bool = False,
    ) -> int:
        """Queue a pass over ``audio``, replacing any that has not started; returns its id.
        ``draft``: post the transcriber's draft first, when it has one."""
        with self._cond:
            request = _Request(next(self._ids), audio, transcriber, language, draft)
            if self._waiting is not None:
                self.replaced += 1
            self._waiting = request
            start = not self._started and not self._closed
            self._started = True
            self._cond.notify_all()
        if start:
            self._clock.start_thread(self._run, "stt")
        return request.id

    def close(self) -> None:
        """Stop after the pass under way (its result is dropped by the policy)."""
        with self._cond:
            self._closed = True
            self._waiting = None
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._waiting is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                request, self._waiting = self._waiting, None
            assert request is not None
            if request.draft:
                self._post_draft(request)
                with self._cond:
                    if self._waiting is not None:
                        # A newer request supersedes this one: its answer is already moot.
                        self.replaced += 1
                        continue
            try:
                text = request.transcriber.transcribe(
                    (VAD_SAMPLE_RATE, request.audio), request.language
                )
                event = Transcribed(request.id, text, None, self._clock.now())
            except Exception as e:  # reported to the policy, which logs it if it still cares
                event = Transcribed(request.id, "", e, self._clock.now())
            self._post(event)

    def _post_draft(self, request: _Request) -> None:
        try:
            text = request.transcriber.draft((VAD_SAMPLE_RATE, request.audio), request.language)
        except Exception:  # the real pass follows and reports its own failure
            logger.debug("draft transcription failed", exc_info=True)
            return
        if text:
            self._post(Transcribed(request.id, text, None, self._clock.now(), draft=True))
