"""Run a recording through the very same stream handler as a call, with no browser.

Input frames are fed at real-time pace (20 ms each) and output is pulled at playback pace,
so every timing means what it means in a call. After the recording ends the simulated caller
keeps sending silence, as a microphone does, until the agent has finished answering.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastrtc import AdditionalOutputs, CloseStream

from voicebot.audio import MonoAudio, Samples, to_mono_float32
from voicebot.conversation import Message, Turn
from voicebot.handler import OUTPUT_RATE, TurnUpdate, VoiceHandler
from voicebot.runtime import Runtime

logger = logging.getLogger(__name__)

FRAME_S = 0.02


@dataclass
class SimulationResult:
    """What a simulated call produced."""

    turns: list[Turn]
    reply_audio: MonoAudio
    """Everything the agent said at 24 kHz, placed on the input's timeline."""
    updates: list[TurnUpdate] = field(default_factory=list)
    duration_s: float = 0.0


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
) -> SimulationResult:
    """Play ``audio`` into a fresh call and collect the turns and the reply audio."""
    rate, samples = to_mono_float32(audio)
    call = handler or VoiceHandler(
        runtime,
        channel="simulate",
        persona=persona,
        conversation_id=conversation_id,
        history=history,
        sequence_start=sequence_start,
        greet=greet,
    )
    frame_len = max(1, round(rate * FRAME_S))
    stop = threading.Event()
    out_frames: list[tuple[float, Samples]] = []
    updates: list[TurnUpdate] = []
    t0 = time.monotonic()

    def pull() -> None:
        while not stop.is_set():
            item: Any = call.emit()
            if isinstance(item, tuple):
                out_frames.append((time.monotonic() - t0, np.asarray(item[1], np.float32)))
            elif isinstance(item, AdditionalOutputs):
                updates.extend(a for a in item.args if isinstance(a, TurnUpdate))
            elif isinstance(item, CloseStream):
                stop.set()

    puller = threading.Thread(target=pull, name="simulate-playback", daemon=True)
    puller.start()
    call.start_up()
    silence = np.zeros(frame_len, np.float32)
    index = 0
    idle_since: float | None = None
    try:
        while not stop.is_set():
            due = t0 + index * FRAME_S
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            start = index * frame_len
            if start < samples.size:
                call.receive((rate, samples[start : start + frame_len]))
            else:
                call.receive((rate, silence))
                elapsed_tail = (start - samples.size) / rate
                if call.idle:
                    idle_since = idle_since if idle_since is not None else time.monotonic()
                    if time.monotonic() - idle_since >= settle_s:
                        break
                else:
                    idle_since = None
                if elapsed_tail > max_tail_s:
                    logger.warning(
                        "the agent was still busy %.0f s after the input ended", max_tail_s
                    )
                    break
            index += 1
    finally:
        stop.set()
        puller.join(timeout=2)
        call.shutdown()
    duration = time.monotonic() - t0
    timeline = np.zeros(int(duration * OUTPUT_RATE) + OUTPUT_RATE, np.float32)
    cursor = 0
    for at, frame in out_frames:
        # A player starts each frame when it arrives or when the previous one ends.
        position = max(int(at * OUTPUT_RATE), cursor)
        end = min(position + frame.size, timeline.size)
        timeline[position:end] = frame[: end - position]
        cursor = end
    return SimulationResult(call.completed_turns, (OUTPUT_RATE, timeline), updates, duration)


def turn_record(turn: Turn) -> dict[str, Any]:
    """The JSON object ``voicebot simulate`` prints for a turn."""
    t = turn.timings

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value, 1)

    return {
        "turn": turn.sequence,
        "user_text": turn.user_text,
        "assistant_text": turn.assistant_text,
        "interrupted": turn.interrupted,
        "error": turn.error,
        "timings": {
            "endpoint_ms": ms(t.endpoint_ms),
            "stt_ms": ms(t.stt_ms),
            "llm_ttft_ms": ms(t.llm_ttft_ms),
            "tts_first_ms": ms(t.tts_first_ms),
            "v2v_ms": ms(t.v2v_ms),
            "bargein_stop_ms": ms(t.bargein_stop_ms),
        },
    }
