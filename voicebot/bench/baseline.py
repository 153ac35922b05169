"""The FastRTC cookbook pipeline, as a FastRTC user would write it, on our models.

``ReplyOnPause`` with its default ``AlgoOptions`` and ``SileroVadOptions``, a reply function
that transcribes, waits for the whole LLM reply, then speaks it sentence by sentence (split
on ASCII ``.!?`` like FastRTC's own TTS helpers). The only change from the cookbook is the
VAD model: FastRTC's ``SileroVADModel`` downloads the v4 model from the Hugging Face hub, so
``SileroV6PauseModel`` implements its ``PauseDetectionModel`` protocol over our Silero v6.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastrtc import AlgoOptions, ReplyOnPause, SileroVadOptions
from fastrtc.utils import AudioChunk

from voicebot.audio import Samples, resample, to_mono_float32
from voicebot.conversation import Message
from voicebot.llm import OllamaChat, build_messages
from voicebot.runtime import PersonaStack
from voicebot.vad import VAD_SAMPLE_RATE, WINDOW_SAMPLES, VoiceActivityModel

logger = logging.getLogger(__name__)

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
"""FastRTC's ``stream_tts_sync`` splits text into sentences this way."""


def speech_probabilities(
    vad: VoiceActivityModel, samples: Samples, window_size_samples: int
) -> list[float]:
    """One probability per ``window_size_samples`` window, from a fresh VAD stream.

    Silero v6 takes 512-sample windows only; a larger window (FastRTC's default is 1024, a
    v4 size) gets the mean of its 512-sample parts. The last window is zero-padded.
    """
    stream = vad.stream()
    parts = max(1, window_size_samples // WINDOW_SAMPLES)
    probabilities: list[float] = []
    for start in range(0, samples.size, window_size_samples):
        window = samples[start : start + window_size_samples]
        if window.size < parts * WINDOW_SAMPLES:
            window = np.pad(window, (0, parts * WINDOW_SAMPLES - window.size))
        values = [
            stream.probability(window[i * WINDOW_SAMPLES : (i + 1) * WINDOW_SAMPLES])
            for i in range(parts)
        ]
        probabilities.append(float(np.mean(values)))
    return probabilities


def speech_timestamps(
    probabilities: list[float], audio_length: int, options: SileroVadOptions
) -> list[AudioChunk]:
    """FastRTC's ``SileroVADModel.get_speech_timestamps`` after its model loop, unchanged."""
    window = options.window_size_samples
    rate = VAD_SAMPLE_RATE
    min_speech_samples = rate * options.min_speech_duration_ms / 1000
    speech_pad_samples = rate * options.speech_pad_ms / 1000
    max_speech_samples = rate * options.max_speech_duration_s - window - 2 * speech_pad_samples
    min_silence_samples = rate * options.min_silence_duration_ms / 1000
    min_silence_samples_at_max_speech = rate * 98 / 1000
    threshold = options.threshold
    neg_threshold = threshold - 0.15

    triggered = False
    speeches: list[dict[str, int]] = []
    current: dict[str, int] = {}
    temp_end = prev_end = next_start = 0
    for i, probability in enumerate(probabilities):
        position = window * i
        if probability >= threshold and temp_end:
            temp_end = 0
            if next_start < prev_end:
                next_start = position
        if probability >= threshold and not triggered:
            triggered = True
            current["start"] = position
            continue
        if triggered and position - current["start"] > max_speech_samples:
            if prev_end:
                current["end"] = prev_end
                speeches.append(current)
                current = {}
                if next_start < prev_end:
                    triggered = False
                else:
                    current["start"] = next_start
                prev_end = next_start = temp_end = 0
            else:
                current["end"] = position
                speeches.append(current)
                current = {}
                prev_end = next_start = temp_end = 0
                triggered = False
                continue
        if probability < neg_threshold and triggered:
            if not temp_end:
                temp_end = position
            if position - temp_end > min_silence_samples_at_max_speech:
                prev_end = temp_end
            if position - temp_end < min_silence_samples:
                continue
            current["end"] = temp_end
            if current["end"] - current["start"] > min_speech_samples:
                speeches.append(current)
            current = {}
            prev_end = next_start = temp_end = 0
            triggered = False
            continue
    if current and audio_length - current["start"] > min_speech_samples:
        current["end"] = audio_length
        speeches.append(current)

    for i, speech in enumerate(speeches):
        if i == 0:
            speech["start"] = int(max(0, speech["start"] - speech_pad_samples))
        if i != len(speeches) - 1:
            silence = speeches[i + 1]["start"] - speech["end"]
            if silence < 2 * speech_pad_samples:
                speech["end"] += int(silence // 2)
                speeches[i + 1]["start"] = int(max(0, speeches[i + 1]["start"] - silence // 2))
            else:
                speech["end"] = int(min(audio_length, speech["end"] + speech_pad_samples))
                speeches[i + 1]["start"] = int(
                    max(0, speeches[i + 1]["start"] - speech_pad_samples)
                )
        else:
            speech["end"] = int(min(audio_length, speech["end"] + speech_pad_samples))
    return [AudioChunk(start=s["start"], end=s["end"]) for s in speeches]


class SileroV6PauseModel:
    """FastRTC's ``PauseDetectionModel`` over our Silero v6 VAD, with SileroVADModel's logic.

    Like FastRTC's model, every ``vad`` call starts from a fresh recurrent state.
    """

    def __init__(self, vad: VoiceActivityModel) -> None:
        self._vad = vad

    def vad(
        self, audio: tuple[int, Any], options: SileroVadOptions | None
    ) -> tuple[float, list[AudioChunk]]:
        """``(seconds of speech, speech chunks)`` in ``audio``, as FastRTC's model returns."""
        rate, samples = to_mono_float32(audio)
        samples = resample(samples, rate, VAD_SAMPLE_RATE)
        opts = options or SileroVadOptions()
        probabilities = speech_probabilities(self._vad, samples, opts.window_size_samples)
        chunks = speech_timestamps(probabilities, samples.size, opts)
        speech = sum(chunk["end"] - chunk["start"] for chunk in chunks)
        return speech / VAD_SAMPLE_RATE, chunks

    def warmup(self) -> None:
        """Run the model once, as FastRTC warms its own up."""
        self.vad((VAD_SAMPLE_RATE, np.zeros(VAD_SAMPLE_RATE, np.float32)), None)


@dataclass
class BaselineTurn:
    """What the cookbook reply function did for one detected pause (monotonic seconds, ms)."""

    called_t: float
    user_text: str = ""
    reply_text: str = ""
    stt_ms: float | None = None
    llm_ms: float | None = None
    """Request to the whole reply: the first token the cookbook can use."""
    tts_first_ms: float | None = None
    first_yield_t: float | None = None
    """When the first audio was handed to ReplyOnPause."""
    interrupted: bool = False
    error: str | None = None


@dataclass
class CookbookCall:
    """One call's ``ReplyOnPause`` handler and the turns its reply function recorded."""

    handler: ReplyOnPause
    turns: list[BaselineTurn] = field(default_factory=list)

    def close(self) -> None:
        """End a reply still in progress (FastRTC closes the generator the same way)."""
        generator = self.handler.generator
        if generator is not None and hasattr(generator, "close"):
            try:
                generator.close()
            except ValueError:  # still running in the emit thread; it ends on its own
                pass


def chat_whole(stack: PersonaStack, messages: list[Message]) -> str:
    """The whole LLM reply in one request (``stream=False``), as the cookbook asks for it."""
    chat = stack.chat
    if isinstance(chat, OllamaChat):
        response = chat.client.chat(
            model=chat.name,
            messages=[{"role": m.role, "content": m.content} for m in messages],
            stream=False,
            options=chat.options,
            keep_alive=chat.keep_alive,
        )
        return str(response.message.content or "")
    return "".join(chat.stream(messages))


def cookbook_call(
    stack: PersonaStack,
    pause_model: SileroV6PauseModel,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> CookbookCall:
    """A fresh cookbook handler for one call, instrumented from inside its reply function."""
    persona = stack.persona
    history: list[Message] = []
    turns: list[BaselineTurn] = []

    def reply(audio: tuple[int, Any]) -> Generator[tuple[int, Samples], None, None]:
        record = BaselineTurn(called_t=clock())
        turns.append(record)
        try:
            started = clock()
            text = stack.transcriber.transcribe(to_mono_float32(audio), persona.language)
            record.stt_ms = (clock() - started) * 1000
            record.user_text = text
            messages = build_messages(
                persona.system_prompt, history, text, persona.history_turns * 2
            )
            started = clock()
            answer = chat_whole(stack, messages)
            record.llm_ms = (clock() - started) * 1000
            record.reply_text = answer
            history.extend([Message("user", text), Message("assistant", answer)])
            ready = clock()
            for sentence in _SENTENCE.split(answer):
                for rate, samples in stack.synthesizer.synthesize(sentence):
                    if record.tts_first_ms is None:
                        record.first_yield_t = clock()
                        record.tts_first_ms = (record.first_yield_t - ready) * 1000
                    yield rate, samples
        except GeneratorExit:
            record.interrupted = True
            raise
        except Exception as e:
            record.error = str(e)
            raise

    handler = ReplyOnPause(
        reply,
        algo_options=AlgoOptions(),
        model_options=SileroVadOptions(),
        can_interrupt=True,
        input_sample_rate=VAD_SAMPLE_RATE,
        output_sample_rate=24000,
        model=pause_model,
    )
    return CookbookCall(handler, turns)
