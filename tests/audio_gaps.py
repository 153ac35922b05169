"""Gaps in the agent's audio as a caller on FastRTC's websocket receives it, reply by reply.

Used by ``tests/test_store_chaos.py`` and ``scripts/measure_db_gaps.py``. A turn: the caller
asks (at real-time pace), keeps its microphone open (silence: the reply may start during
it), and the reply's frames are timed on arrival. The reply runs from its first loud frame to
its last one (it is over once nothing loud arrived for ``quiet_s``); its gaps are the times
between consecutive frames within it, whatever they hold (a pause in speech is still a
frame; a missing frame is a gap).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from tests.support_served import FastRTCSocket

LOUD = 0.05
"""A frame louder than this (peak, full scale 1.0) is speech."""


@dataclass
class ReplyGaps:
    """One reply as the caller heard it."""

    label: str
    heard: bool
    frames: int = 0
    note: str = ""
    """What the reply was (``scripts/measure_db_gaps.py`` puts the start of its text here)."""
    """Frames from its first loud frame to its last."""
    max_gap_ms: float = 0.0
    p99_gap_ms: float = 0.0
    first_audio_s: float = 0.0
    """From the end of the question to the first loud frame."""
    span_s: float = 0.0
    """From its first frame's arrival to its last one's (real-time pace: frames × 20 ms)."""
    leftover_frames: int = 0
    """Loud frames that arrived while the caller was asking: the previous reply went on past
    ``quiet_s`` of silence (a gap longer than that splits a reply; this catches it)."""

    def line(self) -> str:
        if not self.heard:
            return f"{self.label}: no reply"
        return (
            f"{self.label}: {self.frames} frames, max gap {self.max_gap_ms:.0f} ms, "
            f"p99 {self.p99_gap_ms:.0f} ms, first audio {self.first_audio_s:.2f} s, "
            f"leftover {self.leftover_frames}" + (f" ({self.note})" if self.note else "")
        )


def _loud(frame: np.ndarray) -> bool:
    return bool(frame.size) and float(np.max(np.abs(frame))) > LOUD


async def measured_turn(
    client: FastRTCSocket,
    question: np.ndarray,
    label: str,
    *,
    quiet_s: float = 2.0,
    within_s: float = 30.0,
) -> ReplyGaps:
    """Say ``question`` (16 kHz float32 speech, no trailing silence), keep the microphone
    open, and time the reply."""
    heard = client.heard
    before = len(heard.arrivals)
    await client.speak(question)
    asked_at = time.monotonic()
    asked = len(heard.arrivals)
    leftover = sum(_loud(a) for a in heard.audio[before:asked])
    last: int | None = None
    deadline = asked_at + within_s
    step = np.zeros(1600, np.float32)  # 0.1 s of an open microphone
    while time.monotonic() < deadline:
        await client.speak(step)
        for i in range(asked if last is None else last + 1, len(heard.arrivals)):
            if _loud(heard.audio[i]):
                last = i
        if last is not None and time.monotonic() - heard.arrivals[last] >= quiet_s:
            break
    return reply_gaps(client, label, asked, asked_at, leftover)


def reply_gaps(
    client: FastRTCSocket, label: str, asked: int, asked_at: float, leftover: int = 0
) -> ReplyGaps:
    """The reply in the frames received from index ``asked`` on (the question ended at
    ``asked_at``): from its first loud frame to its last."""
    heard = client.heard
    loud = [i for i in range(asked, len(heard.arrivals)) if _loud(heard.audio[i])]
    if not loud:
        return ReplyGaps(label, heard=False, leftover_frames=leftover)
    first, last = loud[0], loud[-1]
    times = np.array(heard.arrivals[first : last + 1])
    gaps = np.diff(times) * 1000 if times.size > 1 else np.zeros(1)
    return ReplyGaps(
        label,
        heard=True,
        frames=int(times.size),
        max_gap_ms=float(gaps.max()),
        p99_gap_ms=float(np.percentile(gaps, 99)),
        first_audio_s=float(heard.arrivals[first] - asked_at),
        span_s=float(times[-1] - times[0]),
        leftover_frames=leftover,
    )
