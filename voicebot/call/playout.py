"""Playout: the agent's audio as 20 ms frames, handed out at playback pace.

Owns the frame queue, the pacing (frames go out ``PLAYBACK_LEAD_S`` ahead of real time, enough
to ride out scheduling jitter, little enough that a barge-in silences the agent within a frame
or three), pause/resume/clear, and the count of what was handed out for each chunk of each
reply: what the caller heard. It reports its playback position (a chunk started, a reply's
audio ran out) and decides nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from voicebot.audio import Samples
from voicebot.call.clock import Condition
from voicebot.call.events import CallEvent, ChunkPlaying, PlayoutDrained

OUTPUT_RATE = 24000
FRAME_SAMPLES = OUTPUT_RATE // 50  # 20 ms
FRAME_S = FRAME_SAMPLES / OUTPUT_RATE
PLAYBACK_LEAD_S = 0.06
"""How far ahead of real time audio is handed out."""
RESTART_GAP_S = 0.2
"""Handed out this late, a frame starts a new stretch of speech with its own clock."""
LEAD_IN = -1
"""The chunk index of a reply's lead-in (its acknowledgement), heard before its chunk 0."""


@dataclass
class ChunkHeard:
    """One chunk's audio: how much was queued and how much handed out."""

    pushed: int = 0
    played: int = 0
    complete: bool = False
    """Synthesis finished: ``pushed`` is the chunk's whole length."""


@dataclass
class _Frame:
    reply: int
    chunk: int
    samples: Samples


class Playout:
    """Frames for the transport. Thread-safe: TTS threads push, the transport's output
    thread takes, the policy pauses, resumes and clears.

    ``lock`` is shared with the call's output queue so one wait covers both; ``take_locked``
    is called with it held.
    """

    def __init__(self, lock: Condition, report: Callable[[CallEvent], None]) -> None:
        self._lock = lock
        self._report = report
        self._frames: deque[_Frame] = deque()
        self._heard: dict[int, list[ChunkHeard]] = {}
        self._dropped: set[int] = set()  # cleared replies: their late audio is refused
        self._queued: dict[int, int] = {}  # frames waiting, per reply
        self._held: dict[int, list[_Frame]] = {}  # held replies' frames, not yet playable
        self._lead_ins: dict[int, ChunkHeard] = {}
        self._paused = False
        self._t0: float | None = None
        self._count = 0
        self._last_frame_at: float | None = None

    # -- producers

    def push(self, reply: int, chunk: int, samples: Samples) -> bool:
        """Queue output-rate audio for ``chunk`` of ``reply``; False once it was cleared."""
        with self._lock:
            if reply in self._dropped:
                return False
            heard = self._chunk(reply, chunk)
            held = self._held.get(reply)
            for start in range(0, samples.size, FRAME_SAMPLES):
                piece = samples[start : start + FRAME_SAMPLES]
                if piece.size < FRAME_SAMPLES:
                    piece = np.pad(piece, (0, FRAME_SAMPLES - piece.size))
                heard.pushed += piece.size
                if held is not None:
                    held.append(_Frame(reply, chunk, piece))
                    continue
                self._frames.append(_Frame(reply, chunk, piece))
                self._queued[reply] = self._queued.get(reply, 0) + 1
            self._lock.notify_all()
        return True

    def push_lead_in(self, reply: int, samples: Samples) -> bool:
        """Queue output-rate audio to be heard before ``reply``'s own, reported as chunk
        ``LEAD_IN``; refused (False) once any audio of the reply was queued, once it has a
        lead-in, or once it was cleared. The check and the push are one step, so the reply's
        first chunk is never overtaken."""
        with self._lock:
            pushed = any(c.pushed for c in self._heard.get(reply, ()))
            if reply in self._dropped or reply in self._lead_ins or pushed:
                return False
            heard = self._lead_ins[reply] = ChunkHeard(complete=True)
            for start in range(0, samples.size, FRAME_SAMPLES):
                piece = samples[start : start + FRAME_SAMPLES]
                if piece.size < FRAME_SAMPLES:
                    piece = np.pad(piece, (0, FRAME_SAMPLES - piece.size))
                self._frames.append(_Frame(reply, LEAD_IN, piece))
                self._queued[reply] = self._queued.get(reply, 0) + 1
                heard.pushed += piece.size
            self._lock.notify_all()
        return True

    def lead_in_heard(self, reply: int) -> ChunkHeard | None:
        """A copy of the counts of ``reply``'s lead-in (None: it has none)."""
        with self._lock:
            found = self._lead_ins.get(reply)
            return None if found is None else ChunkHeard(found.pushed, found.played, True)

    def end_chunk(self, reply: int, chunk: int) -> None:
        """Synthesis of the chunk is over: what was pushed is all of it."""
        with self._lock:
            self._chunk(reply, chunk).complete = True

    def _chunk(self, reply: int, chunk: int) -> ChunkHeard:
        chunks = self._heard.setdefault(reply, [])
        while len(chunks) <= chunk:
            chunks.append(ChunkHeard())
        return chunks[chunk]

    # -- the policy

    def hold(self, reply: int) -> None:
        """Keep the audio of ``reply`` back (a preemptive reply) until ``release``: it is
        neither handed out nor counted as queued."""
        with self._lock:
            self._held.setdefault(reply, [])

    def release(self, reply: int) -> None:
        """Queue what ``reply`` holds (behind anything already queued); its later audio
        queues as it comes."""
        with self._lock:
            frames = self._held.pop(reply, None)
            if frames:
                self._frames.extend(frames)
                self._queued[reply] = self._queued.get(reply, 0) + len(frames)
                self._lock.notify_all()

    def held(self, reply: int) -> int:
        """Frames ``reply`` holds back."""
        with self._lock:
            return len(self._held.get(reply, ()))

    def pause(self) -> float | None:
        """Hand out nothing until ``resume``; returns when the last frame was handed out."""
        with self._lock:
            self._paused = True
            return self._last_frame_at

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._lock.notify_all()

    def clear(self, reply: int | None = None) -> None:
        """Drop the queued audio of ``reply`` (of every reply when None), refuse its later
        audio, and play again."""
        with self._lock:
            if reply is None:
                self._dropped.update(self._heard)
                self._dropped.update(self._held)
                self._dropped.update(self._lead_ins)
                self._frames.clear()
                self._queued.clear()
                self._held.clear()
            else:
                self._dropped.add(reply)
                if self._held.pop(reply, None) is not None:
                    return  # it never played: a pause is another reply's
                self._frames = deque(f for f in self._frames if f.reply != reply)
                self._queued.pop(reply, None)
            self._paused = False
            self._lock.notify_all()

    def heard(self, reply: int) -> list[ChunkHeard]:
        """A copy of the per-chunk counts of ``reply``."""
        with self._lock:
            return [ChunkHeard(c.pushed, c.played, c.complete) for c in self._heard.get(reply, [])]

    def forget(self, reply: int) -> None:
        """The reply is recorded: its counts are no longer needed."""
        with self._lock:
            self._heard.pop(reply, None)
            self._lead_ins.pop(reply, None)

    def queued(self, reply: int | None = None) -> int:
        """Frames waiting (of ``reply``, or of all)."""
        with self._lock:
            return len(self._frames) if reply is None else self._queued.get(reply, 0)

    @property
    def last_frame_at(self) -> float | None:
        with self._lock:
            return self._last_frame_at

    # -- the transport's output thread

    def take_locked(self, now: float) -> tuple[Samples | None, float | None]:
        """``(frame, None)`` when a frame is due, else ``(None, seconds until one is)``
        (None: nothing queued, or paused). Call with the lock held."""
        if not self._frames or self._paused:
            return None, None
        if self._t0 is None or now > self._due() + RESTART_GAP_S:
            self._t0, self._count = now, 0  # a new stretch of speech: its clock starts now
        due = self._due()
        if due > now:
            return None, due - now
        frame = self._frames.popleft()
        self._count += 1
        self._last_frame_at = now
        if frame.chunk == LEAD_IN:
            heard = self._lead_ins.setdefault(frame.reply, ChunkHeard(complete=True))
        else:
            heard = self._chunk(frame.reply, frame.chunk)
        if heard.played == 0:
            self._report(ChunkPlaying(frame.reply, frame.chunk, now))
        heard.played += frame.samples.size
        left = self._queued[frame.reply] - 1
        self._queued[frame.reply] = left
        if left == 0:
            self._report(PlayoutDrained(frame.reply, now))
        self._lock.notify_all()
        return frame.samples, None

    def _due(self) -> float:
        assert self._t0 is not None
        return self._t0 + self._count * FRAME_S - PLAYBACK_LEAD_S


def played_text(texts: list[str], heard: list[ChunkHeard], joiner: str) -> str:
    """The part of a reply the caller heard: whole chunks, then a prefix of the last one
    (cut at a word boundary where words are spaced, and marked with "…")."""
    parts: list[str] = []
    for index, text in enumerate(texts):
        chunk = heard[index] if index < len(heard) else ChunkHeard()
        if chunk.played == 0:
            break
        if chunk.complete and chunk.played >= chunk.pushed:
            parts.append(text)
            continue
        fraction = chunk.played / max(chunk.pushed, 1)
        if not chunk.complete:
            fraction *= 0.5  # more audio is coming for this chunk: be conservative
        prefix = text[: int(len(text) * fraction)]
        if joiner:  # cut at a word boundary
            prefix = prefix.rsplit(" ", 1)[0] if " " in prefix else ""
        if prefix:
            parts.append(prefix + "…")
        break
    return joiner.join(parts)
