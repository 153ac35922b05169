"""Hand-written fakes at the Protocol seams: scripted, real-shaped, able to fail on command.

Their delays pass on a clock: real time by default (divided by ``speed``, as LiveKit's
``fake_session(speed_factor=...)`` does), or a ``VirtualClock`` that a test advances, which
``runtime(clock=...)`` hands to every fake it holds.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import numpy as np

from voicebot.audio import MonoAudio, Samples
from voicebot.call.clock import Clock, RealClock
from voicebot.conversation import Message
from voicebot.errors import StageError
from voicebot.personas import Persona
from voicebot.runtime import PersonaStack, Runtime
from voicebot.turns import TurnConfig


class EnergyVadStream:
    """Speech probability from loudness: tones are speech, silence and faint noise are not."""

    def probability(self, window: Samples) -> float:
        assert window.size == 512
        return 1.0 if float(np.sqrt(np.mean(window**2))) > 0.05 else 0.0


class EnergyVad:
    def stream(self) -> EnergyVadStream:
        return EnergyVadStream()


class Scripted:
    """Sleeps on its clock, ``speed`` times faster than scripted."""

    clock: Clock = RealClock()
    speed: float = 1.0

    def pause(self, seconds: float) -> None:
        self.clock.sleep(seconds / self.speed)


class FakeTranscriber(Scripted):
    name = "fake-stt"

    def __init__(
        self,
        texts: Sequence[str] = ("hello there",),
        delay_s: float = 0.05,
        drafts: Sequence[str | None] = (),
        draft_delay_s: float = 0.01,
    ) -> None:
        self.texts = list(texts)
        self.delay_s = delay_s
        self.drafts = list(drafts)  # per draft asked for, in order; none left: no draft
        self.draft_delay_s = draft_delay_s
        self.drafts_given = 0
        self.fail_drafts = False
        self.calls: list[float] = []  # seconds of audio per call
        self.heard: list[Samples] = []  # the audio of each call
        self.fail = False
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def transcribe(self, audio: MonoAudio, language: str | None = None) -> str:
        rate, samples = audio
        with self._lock:
            self.calls.append(samples.size / rate)
            self.heard.append(samples)
            index = len(self.calls) - 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self.pause(self.delay_s)
        finally:
            with self._lock:
                self.in_flight -= 1
        if self.fail:
            raise StageError("stt", "scripted failure")
        return self.texts[min(index, len(self.texts) - 1)]

    def draft(self, audio: MonoAudio, language: str | None = None) -> str | None:
        if self.drafts_given >= len(self.drafts):
            return None
        self.drafts_given += 1
        self.pause(self.draft_delay_s)
        if self.fail_drafts:
            raise StageError("stt", "scripted draft failure")
        return self.drafts[self.drafts_given - 1]


class FakeChat(Scripted):
    name = "fake-llm"

    def __init__(
        self,
        reply: str = "Sure. This is the first sentence. And here is a second one for you.",
        ttft_s: float = 0.05,
        token_s: float = 0.01,
        later_replies: Sequence[str] = (),
    ) -> None:
        self.reply = reply
        self.later_replies = list(later_replies)
        self.ttft_s = ttft_s
        self.token_s = token_s
        self.requests: list[list[Message]] = []
        self.fail_after: int | None = None  # tokens before a StageError
        self.closed = threading.Event()
        self.tokens_sent = 0  # in the latest request
        self.sent_per_request: list[int] = []

    def stream(self, messages: Sequence[Message]) -> Iterator[str]:
        self.requests.append(list(messages))
        later = self.later_replies
        reply = (
            later[min(len(self.requests) - 2, len(later) - 1)]
            if later and len(self.requests) > 1
            else self.reply
        )
        self.closed.clear()
        self.tokens_sent = 0
        try:
            self.pause(self.ttft_s)
            for i, token in enumerate(reply.split(" ")):
                if self.fail_after is not None and i >= self.fail_after:
                    raise StageError("llm", "Ollama unreachable at http://fake")
                self.tokens_sent += 1
                yield token if i == 0 else " " + token
                self.pause(self.token_s)
        finally:
            self.sent_per_request.append(self.tokens_sent)
            self.closed.set()


class ToneSynthesizer(Scripted):
    """80 ms of a loud tone per character; fast, like a real TTS on a good machine."""

    name = "tone-tts"
    sample_rate = 16000

    def __init__(self, per_char_s: float = 0.03, rtf: float = 0.0) -> None:
        self.per_char_s = per_char_s
        self.rtf = rtf
        """Seconds of synthesis per second of audio (on its clock)."""
        self.texts: list[str] = []

    def synthesize(self, text: str) -> Iterator[MonoAudio]:
        self.texts.append(text)
        if self.rtf:
            self.pause(len(text) * self.per_char_s * self.rtf)
        n = int(len(text) * self.per_char_s * self.sample_rate)
        t = np.arange(n) / self.sample_rate
        yield self.sample_rate, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def persona(language: str = "en", **overrides: object) -> Persona:
    data: dict[str, object] = {
        "name": f"test-{language}",
        "display_name": "Test",
        "language": language,
        "llm_model": "fake",
        "tts_voice": "tone",
        "greeting": "Hello, how can I help?",
        "apology": "Sorry, something went wrong.",
        "system_prompt": "You are a test.",
        "history_turns": 2,
    }
    data.update(overrides)
    return Persona.model_validate(data)


def runtime(
    *,
    transcriber: FakeTranscriber | None = None,
    chat: FakeChat | None = None,
    synthesizer: ToneSynthesizer | None = None,
    config: TurnConfig | None = None,
    store: object | None = None,
    language: str = "en",
    clock: Clock | None = None,
    speed: float = 1.0,
) -> Runtime:
    """A runtime of fakes; ``clock`` and ``speed`` are given to each of them."""
    p = persona(language)
    stack = PersonaStack(
        persona=p,
        transcriber=transcriber or FakeTranscriber(),
        chat=chat or FakeChat(),
        synthesizer=synthesizer or ToneSynthesizer(),
    )
    for fake in (stack.transcriber, stack.chat, stack.synthesizer):
        if isinstance(fake, Scripted):
            if clock is not None:
                fake.clock = clock
            fake.speed = speed
    return Runtime(
        vad=EnergyVad(),
        stacks={p.name: stack},
        turn_config=config or TurnConfig(),
        default_persona=p.name,
        store=store,  # type: ignore[arg-type]
    )


def tone(seconds: float, rate: int = 16000, amplitude: float = 0.4, freq: float = 300.0) -> Samples:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def silence(seconds: float, rate: int = 16000) -> Samples:
    return np.zeros(int(seconds * rate), np.float32)
