"""How one process shares its CPU cores among simultaneous calls.

Two things decide how a few calls on a few cores slow each other down:

- **Threads per model.** Left to themselves, CTranslate2 runs every transcription on 4
  OpenMP threads per worker and onnxruntime on one thread per core, so two transcriptions
  and a synthesis on 2 cores are 10 busy threads fighting for 2 cores. ``thread_plan``
  derives the counts from the number of cores instead: one whisper worker per two cores (up
  to 4), the cores split between them, and the speech synthesis (one sentence at a time, see
  below) on half the cores.
- **Who synthesizes first.** A voice synthesizes one sentence at a time for all calls (its
  phonemizer is not thread-safe). A call waiting for its first sentence has a caller
  waiting in silence; a call whose reply is already playing has seconds of slack. So
  ``PriorityGate`` hands the voice to the first chunk of a reply before later chunks of
  other replies, first come first served within each priority; the reply's synthesis thread
  says which it is with ``synthesis_priority``.
"""

from __future__ import annotations

import contextvars
import itertools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from voicebot.errors import ConfigError

MAX_STT_WORKERS = 4
"""More parallel transcriptions than this gain little: a call waits for one pass at a time."""

FIRST_CHUNK = 0
"""Synthesis priority of a reply's first chunk: a caller is waiting in silence."""
LATER_CHUNK = 1
"""Synthesis priority of the rest of a reply: it plays after audio already queued."""

_priority: contextvars.ContextVar[int] = contextvars.ContextVar(
    "voicebot_synthesis_priority", default=FIRST_CHUNK
)


@dataclass(frozen=True)
class ThreadPlan:
    """Thread counts for the models one process shares among its calls."""

    stt_workers: int
    """Transcriptions that run at the same time (CTranslate2 ``inter_threads``)."""
    stt_threads: int
    """Threads per transcription (CTranslate2 ``intra_threads``)."""
    tts_threads: int
    """onnxruntime intra-op threads of a voice (piper, Kokoro)."""


def thread_plan(
    cpu_count: int | None, *, stt_workers: int = 0, stt_threads: int = 0, tts_threads: int = 0
) -> ThreadPlan:
    """Thread counts for ``cpu_count`` cores (``os.cpu_count()``; None counts as 1); a
    positive argument overrides the derived value, 0 derives it.

    Derived: one whisper worker per two cores (1 to 4) with ``cores // workers`` threads
    each, so whisper alone never runs more threads than there are cores and a single call's
    transcription still gets two cores; the voice on ``cores // 2`` threads (at least 1): it
    runs beside the transcriptions, one sentence at a time.
    """
    for name, value in (
        ("stt_workers", stt_workers),
        ("stt_threads", stt_threads),
        ("tts_threads", tts_threads),
    ):
        if value < 0:
            raise ConfigError(f"{name} must be 0 (derive from the CPU count) or more, got {value}")
    cores = max(1, cpu_count or 1)
    workers = stt_workers or min(max(1, cores // 2), MAX_STT_WORKERS)
    return ThreadPlan(
        stt_workers=workers,
        stt_threads=stt_threads or max(1, cores // workers),
        tts_threads=tts_threads or max(1, cores // 2),
    )


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@contextmanager
def synthesis_priority(priority: int) -> Iterator[None]:
    """Synthesis started in this block (this thread) waits for a voice at ``priority``
    (``FIRST_CHUNK`` or ``LATER_CHUNK``; lower goes first)."""
    token = _priority.set(priority)
    try:
        yield
    finally:
        _priority.reset(token)


def current_synthesis_priority() -> int:
    """The priority ``synthesis_priority`` set for this thread (``FIRST_CHUNK`` if none)."""
    return _priority.get()


class PriorityGate:
    """A lock granted to the waiter of lowest priority, first come first served within a
    priority. Not reentrant."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._tickets = itertools.count()
        self._waiting: list[tuple[int, int]] = []  # (priority, ticket), kept sorted

    @contextmanager
    def hold(self, priority: int | None = None) -> Iterator[None]:
        """Hold the gate for the block; ``priority`` None takes this thread's
        ``synthesis_priority``."""
        self.acquire(current_synthesis_priority() if priority is None else priority)
        try:
            yield
        finally:
            self.release()

    def acquire(self, priority: int, cancel: threading.Event | None = None) -> bool:
        """Wait until every waiter before this one (lower priority, or the same and earlier)
        has held and released the gate, then hold it. False (not held) if ``cancel`` was set
        meanwhile: the waiter gave up its place."""
        with self._cond:
            entry = (priority, next(self._tickets))
            self._waiting.append(entry)
            self._waiting.sort()
            try:
                while self._held or self._waiting[0] != entry:
                    if cancel is not None and cancel.is_set():
                        self._waiting.remove(entry)
                        self._cond.notify_all()
                        return False
                    # with a cancel to watch, look at it every 0.1 s
                    self._cond.wait(None if cancel is None else 0.1)
            except BaseException:
                self._waiting.remove(entry)
                self._cond.notify_all()
                raise
            self._waiting.pop(0)
            if cancel is not None and cancel.is_set():
                self._cond.notify_all()
                return False
            self._held = True
            return True

    def release(self) -> None:
        """Let the next waiter in."""
        with self._cond:
            if not self._held:
                raise RuntimeError("PriorityGate released while not held")
            self._held = False
            self._cond.notify_all()

    def waiting(self) -> int:
        """Threads waiting for the gate (for tests and metrics)."""
        with self._cond:
            return len(self._waiting)
