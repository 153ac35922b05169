"""Run a recording through the very same stream handler as a call, with no browser.

Input frames are fed at real-time pace (20 ms each) and output is played at playback pace,
so every timing means what it means in a call. After the recording ends the simulated caller
keeps sending silence, as a microphone does, until the agent has finished answering.

``drive`` works for any FastRTC ``StreamHandler`` (ours, or FastRTC's ``ReplyOnPause``) and
mirrors what FastRTC's audio track does around it: one thread calls ``receive`` with each
input frame, another calls ``emit`` in a loop and cuts what it returns into 20 ms frames on a
queue, and a player takes frames off that queue at playback pace (restarting its clock after
a gap, as the track does); the handler's ``clear_queue`` empties that queue.

``drive_virtual`` drives a ``Call`` directly on a ``VirtualClock``: the same call, threads and
all, with no sleeps, many times faster than real time (the unit tests use it).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from voicebot.audio import MonoAudio, Samples, resample, to_mono_float32
from voicebot.call.clock import VirtualClock
from voicebot.call.events import AudioOut, CloseCall, TurnUpdate
from voicebot.call.playout import OUTPUT_RATE
from voicebot.call.session import Call
from voicebot.conversation import Message, Turn, turn_dict
from voicebot.runtime import Runtime

if TYPE_CHECKING:
    from voicebot.transports.fastrtc import VoiceHandler

logger = logging.getLogger(__name__)

FRAME_S = 0.02
OUT_FRAME = int(OUTPUT_RATE * FRAME_S)
_PLAYER_GAP_S = 10 * FRAME_S
"""A pause in the output longer than this restarts the player's clock (FastRTC's rule)."""
_EMIT_IDLE_S = 0.002
"""Pause after an ``emit`` that had nothing, so a non-blocking handler is not busy-polled."""


@dataclass
class Interruption:
    """Speech the caller starts saying over the agent's reply."""

    audio: Samples
    """At the same rate as the main audio."""
    after_first_audio_s: float = 1.0
    """Start this long after the first reply audio was played."""
    reply_from: Callable[[], float | None] | None = None
    """When the reply to talk over started to be returned by ``emit`` (None: not yet);
    by default, any audio counts."""


@dataclass
class CallTrace:
    """Everything observable from outside the handler during a driven call.

    Times are ``time.monotonic()`` seconds. The input timeline is the main audio followed by
    what was sent after it (silence, and the interruption if any).
    """

    rate: int
    frame_samples: int
    t0: float
    input_times: list[float] = field(default_factory=list)
    """When input frame ``i`` (samples ``i*frame_samples`` onwards) was handed to ``receive``."""
    played: list[tuple[float, Samples]] = field(default_factory=list)
    """Output frames (24 kHz, 20 ms) with the time the player sent each one."""
    outputs: list[Any] = field(default_factory=list)
    """The ``AdditionalOutputs`` arguments, in order."""
    input_end_sample: int = 0
    """End of the main audio on the input timeline."""
    interruption_start_sample: int | None = None
    """Where the interruption began on the input timeline, once it did."""
    interruption_end_sample: int | None = None
    duration_s: float = 0.0
    queued: list[tuple[float, int]] = field(default_factory=list)
    """``(time, number of the first frame)`` for each piece of audio ``emit`` returned; frames
    are numbered in queue order."""
    played_numbers: list[int] = field(default_factory=list)
    """The number of each frame in ``played``."""

    def first_played_from(self, t: float) -> float | None:
        """When the first frame of audio that ``emit`` returned at or after ``t`` was played.

        Frames queued earlier (and still playing) come first, as a listener hears them.
        """
        number = next((n for at, n in self.queued if at >= t), None)
        if number is None:
            return None
        return next(
            (
                at
                for (at, _), n in zip(self.played, self.played_numbers, strict=True)
                if n >= number
            ),
            None,
        )

    def wall_time(self, sample: int) -> float:
        """When the input frame holding ``sample`` was handed to the handler."""
        index = min(max(sample, 0) // self.frame_samples, len(self.input_times) - 1)
        return self.input_times[index] if index >= 0 else self.t0

    def timeline(self) -> MonoAudio:
        """The played audio placed on the call's timeline, at 24 kHz."""
        audio = np.zeros(int(self.duration_s * OUTPUT_RATE) + OUTPUT_RATE, np.float32)
        cursor = 0
        for at, frame in self.played:
            # A player starts each frame when it is sent or when the previous one ends.
            position = max(int((at - self.t0) * OUTPUT_RATE), cursor)
            end = min(position + frame.size, audio.size)
            audio[position:end] = frame[: end - position]
            cursor = end
        return OUTPUT_RATE, audio


class DrivenHandler(Protocol):
    """The part of a FastRTC ``StreamHandler`` that its audio track uses."""

    _clear_queue: Callable[..., Any] | None

    def receive(self, frame: tuple[int, Any]) -> None: ...

    def emit(self) -> Any: ...

    def start_up(self) -> Any: ...

    def shutdown(self) -> Any: ...


StopRule = Callable[[CallTrace, float], bool]
"""``(trace, tail_s) -> stop?``, asked once per input frame after all scripted input was sent;
``tail_s`` is how long the caller has been sending trailing silence."""


class _Player:
    """The output side of a FastRTC audio track: a frame queue played at real-time pace."""

    def __init__(self, trace: CallTrace, stop: threading.Event) -> None:
        self._trace = trace
        self._stop = stop
        self._queue: queue.Queue[tuple[int, Samples]] = queue.Queue()
        self._numbered = 0
        self._start: float | None = None
        self._count = 0
        self._last = 0.0

    def put(self, audio: MonoAudio) -> None:
        rate, samples = audio
        samples = resample(samples, rate, OUTPUT_RATE)
        self._trace.queued.append((time.monotonic(), self._numbered))
        for start in range(0, samples.size, OUT_FRAME):
            piece = samples[start : start + OUT_FRAME]
            if piece.size < OUT_FRAME:
                piece = np.pad(piece, (0, OUT_FRAME - piece.size))
            self._queue.put((self._numbered, piece))
            self._numbered += 1

    def clear(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._start = None

    @property
    def empty(self) -> bool:
        return self._queue.empty()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                number, frame = self._queue.get(timeout=0.02)
            except queue.Empty:
                continue
            now = time.monotonic()
            if now - self._last > _PLAYER_GAP_S:
                self._start = None
            if self._start is None:
                self._start = now - self._count * FRAME_S
            else:
                wait = self._start + self._count * FRAME_S - now
                if wait > 0:
                    time.sleep(wait)
            self._count += 1
            self._last = time.monotonic()
            self._trace.played.append((self._last, frame))
            self._trace.played_numbers.append(number)


def _pcm16(samples: Samples) -> npt.NDArray[np.int16]:
    # Scaled by 32768, the inverse of reading int16 audio, so a WAV's samples go back unchanged.
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)


def drive(
    handler: DrivenHandler,
    audio: MonoAudio,
    *,
    interruption: Interruption | None = None,
    stop_when: StopRule,
    max_tail_s: float = 30.0,
    as_int16: bool = False,
    on_start: Callable[[CallTrace], None] | None = None,
) -> CallTrace:
    """Play ``audio`` into ``handler`` at real-time pace until ``stop_when`` says so.

    ``as_int16`` sends int16 frames, as FastRTC's resampler hands them to handlers.
    """
    from voicebot.transports.fastrtc import from_fastrtc, install_clear_queue

    rate, samples = to_mono_float32(audio)
    frame_len = max(1, round(rate * FRAME_S))
    stop = threading.Event()
    trace = CallTrace(rate=rate, frame_samples=frame_len, t0=time.monotonic())
    trace.input_end_sample = samples.size
    if on_start is not None:
        on_start(trace)  # lets callers' callbacks read the trace while the call runs
    player = _Player(trace, stop)
    install_clear_queue(handler, player.clear)

    def pump() -> None:
        while not stop.is_set():
            try:
                item: Any = handler.emit()
            except Exception:  # FastRTC's track logs and goes on, too
                logger.exception("emit failed")
                time.sleep(_EMIT_IDLE_S)
                continue
            audio, extra, close = from_fastrtc(item)
            trace.outputs.extend(extra)
            if audio is not None:
                player.put(to_mono_float32(audio))
            elif close:
                stop.set()
            elif item is None:
                time.sleep(_EMIT_IDLE_S)

    threads = [
        threading.Thread(target=player.run, name="simulate-playback", daemon=True),
        threading.Thread(target=pump, name="simulate-emit", daemon=True),
    ]
    for thread in threads:
        thread.start()
    handler.start_up()
    silence = np.zeros(frame_len, np.float32)
    pending = interruption.audio if interruption is not None else None
    index = 0
    try:
        while not stop.is_set():
            due = trace.t0 + index * FRAME_S
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            start = index * frame_len
            frame = silence
            if start < samples.size:
                frame = samples[start : start + frame_len]
            elif pending is not None and interruption is not None:
                anchor = interruption.reply_from() if interruption.reply_from else trace.t0
                first_t = trace.first_played_from(anchor) if anchor is not None else None
                if trace.interruption_start_sample is None and first_t is not None:
                    if time.monotonic() >= first_t + interruption.after_first_audio_s:
                        trace.interruption_start_sample = start
                if trace.interruption_start_sample is not None:
                    offset = start - trace.interruption_start_sample
                    frame = pending[offset : offset + frame_len]
                    if offset + frame_len >= pending.size:
                        trace.interruption_end_sample = (
                            trace.interruption_start_sample + pending.size
                        )
                        pending = None
            if frame.size < frame_len:
                frame = np.pad(frame, (0, frame_len - frame.size))
            trace.input_times.append(time.monotonic())
            handler.receive((rate, _pcm16(frame) if as_int16 else frame))
            index += 1
            if start >= samples.size and pending is None:
                tail_s = (start - max(samples.size, trace.interruption_end_sample or 0)) / rate
                if stop_when(trace, tail_s):
                    break
                if tail_s > max_tail_s:
                    logger.warning(
                        "the agent was still busy %.0f s after the input ended", max_tail_s
                    )
                    break
            elif start > samples.size + max_tail_s * rate:
                logger.warning("no reply audio to interrupt within %.0f s", max_tail_s)
                break
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        handler.shutdown()
    trace.duration_s = time.monotonic() - trace.t0
    return trace


@dataclass
class SimulationResult:
    """What a simulated call produced."""

    turns: list[Turn]
    reply_audio: MonoAudio
    """Everything the agent said at 24 kHz, placed on the input's timeline."""
    updates: list[TurnUpdate] = field(default_factory=list)
    duration_s: float = 0.0
    outputs: list[Any] = field(default_factory=list)
    """Everything sent to the page, in order (turn updates and call states)."""


def drive_virtual(
    call: Call,
    audio: MonoAudio,
    *,
    clock: VirtualClock,
    stop_when: StopRule,
    max_tail_s: float = 30.0,
    on_frame: Callable[[CallTrace], None] | None = None,
) -> CallTrace:
    """Play ``audio`` into ``call`` on virtual time until ``stop_when`` says so.

    The same 20 ms input frames as ``drive``; outputs are taken every 10 ms of virtual time
    and played at once (the call paces them itself). ``on_frame`` runs after each frame, to
    act on the call at a given moment (``trace.t0`` is the start, ``clock.now()`` now).
    """
    rate, samples = to_mono_float32(audio)
    frame_len = max(1, round(rate * FRAME_S))
    trace = CallTrace(rate=rate, frame_samples=frame_len, t0=clock.now())
    trace.input_end_sample = samples.size
    silence = np.zeros(frame_len, np.float32)
    closed = False

    def take_outputs() -> None:
        nonlocal closed
        while (out := call.poll_output()) is not None:
            if isinstance(out, AudioOut):
                trace.queued.append((clock.now(), len(trace.played)))
                trace.played_numbers.append(len(trace.played))
                trace.played.append((clock.now(), out.samples))
            elif isinstance(out, CloseCall):
                closed = True
            else:
                trace.outputs.append(out)

    call.start()
    index = 0
    try:
        while not closed:
            start = index * frame_len
            frame = samples[start : start + frame_len] if start < samples.size else silence
            if frame.size < frame_len:
                frame = np.pad(frame, (0, frame_len - frame.size))
            trace.input_times.append(clock.now())
            call.receive((rate, frame))
            index += 1
            for _ in range(2):
                clock.advance(FRAME_S / 2)
                take_outputs()
            if on_frame is not None:
                on_frame(trace)
            if start >= samples.size:
                tail_s = (start - samples.size) / rate
                if stop_when(trace, tail_s):
                    break
                if tail_s > max_tail_s:
                    logger.warning(
                        "the agent was still busy %.0f s after the input ended", max_tail_s
                    )
                    break
    finally:
        call.shutdown()
        clock.settle()
        take_outputs()
    trace.duration_s = clock.now() - trace.t0
    return trace


def simulate_call(
    runtime: Runtime,
    audio: MonoAudio,
    *,
    persona: str | None = None,
    conversation_id: uuid.UUID | None = None,
    history: list[Message] | None = None,
    sequence_start: int = 0,
    greet: bool = False,
    max_tail_s: float = 30.0,
    settle_s: float = 0.6,
    handler: VoiceHandler | None = None,
    clock: VirtualClock | None = None,
    call: Call | None = None,
    on_frame: Callable[[CallTrace], None] | None = None,
) -> SimulationResult:
    """Play ``audio`` into a fresh call and collect the turns and the reply audio.

    In real time through the FastRTC handler (``handler``, or a new one), as a call runs; or,
    given a virtual ``clock``, straight into a ``Call`` on that clock (``call``, or a new
    one), many times faster.
    """
    if clock is not None:
        target = call or Call(
            runtime,
            channel="simulate",
            persona=persona,
            conversation_id=conversation_id,
            history=history,
            sequence_start=sequence_start,
            greet=greet,
            clock=clock,
        )
        now: Callable[[], float] = clock.now
        idle: Callable[[], bool] = target.idle
    else:
        from voicebot.transports.fastrtc import VoiceHandler

        served = handler or VoiceHandler(
            runtime,
            channel="simulate",
            persona=persona,
            conversation_id=conversation_id,
            history=history,
            sequence_start=sequence_start,
            greet=greet,
        )
        now, idle = time.monotonic, served.idle
    idle_since: list[float] = []

    def settled(trace: CallTrace, tail_s: float) -> bool:
        if not idle():
            idle_since.clear()
            return False
        if not idle_since:
            idle_since.append(now())
        return now() - idle_since[0] >= settle_s

    if clock is not None:
        trace = drive_virtual(
            target, audio, clock=clock, stop_when=settled, max_tail_s=max_tail_s, on_frame=on_frame
        )
        turns = target.completed_turns
    else:
        trace = drive(served, audio, stop_when=settled, max_tail_s=max_tail_s)
        turns = served.completed_turns
    updates = [u for u in trace.outputs if isinstance(u, TurnUpdate)]
    return SimulationResult(turns, trace.timeline(), updates, trace.duration_s, trace.outputs)


def turn_record(turn: Turn) -> dict[str, Any]:
    """The JSON object ``voicebot simulate`` prints for a turn: the one turn contract."""
    return turn_dict(turn)
