"""Choose the short-window padding of the STT adapter by measurement.

For each (model, language) pair, transcribes every clip with the full 30 s window and with
the utterance plus each padding, interleaved clip by clip so machine noise hits every
variant alike, and prints p50 time, WER (CER for Japanese), how many short-window
transcripts were degenerate (and redone with the full window: their time includes both
passes), on how many clips the short window's final text has more errors than the full
window's, and on how many it says the same words as the full window (``same_words``: where a
draft would be kept).

Two sets of clips:

- ``corpus``: the bench corpus, each file cut as the pipeline cuts it (the real Silero VAD
  and turn detector, default settings: pre-roll, speech, end silence).
- ``calls`` (English): the sentences the test suite's calls say, spoken by the piper joe
  voice at its 22.05 kHz and fed to the turn detector the way a call feeds it — 20 ms frames,
  resampled to 16 kHz as a stream (``CallSession.receive``) — at three frame alignments;
  both the early clip (``EndCandidate``, transcribed speculatively) and the final one
  (``UserTurn``). tiny.en's short window hears some of these differently from the full
  window (where the clip starts matters), which is why the app only uses it as a draft.

    .venv/bin/python scripts/measure_stt_window.py [--repeats 1] [--paddings 1,2,3,4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voicebot.audio import Samples, StreamResampler
from voicebot.bench.corpus import load_corpus
from voicebot.bench.metrics import ErrorCount, error_count
from voicebot.bench.models import base_multilingual_model, joe_voice, tiny_en_model
from voicebot.stt import WhisperTranscriber, same_words
from voicebot.turns import EndCandidate, TurnConfig, TurnDetector, UserTurn
from voicebot.vad import SileroVad

CORPUS = Path(__file__).resolve().parent.parent / "bench" / "corpus"
CALL_SENTENCES = (
    "What is the capital of France?",
    "How tall is the Eiffel Tower?",
    "Please tell me a long story.",
    "Stop, that is enough.",
    "Thank you very much for your help with that.",
    "Yes, please.",
    "Then two people on December thirty first.",
    "Stop, I changed my mind.",
    "Please stop right there.",
    "Please reserve for six people.",
    "Please book it.",
    "I would like a table for two on Friday at seven.",
    "Wait, sorry, let me stop you there.",
    "Which wine goes with trout?",
)
"""What the test suite's calls say (tests/test_*.py)."""
FRAME_ALIGNMENTS = (0, 147, 294)
"""Samples of silence (at 22.05 kHz) added before the speech, to move the 20 ms frame edges."""


@dataclass(frozen=True)
class Clip:
    name: str
    language: str
    reference: str
    samples: Samples


def utterance(samples: Samples, vad: SileroVad) -> Samples:
    """What the pipeline hands the transcriber: pre-roll + speech + end silence."""
    detector = TurnDetector(TurnConfig(speculative_silence_ms=0), vad.stream())
    tail = np.zeros(16000, np.float32)
    turns = [e for e in detector.push(np.concatenate((samples, tail))) if isinstance(e, UserTurn)]
    if not turns:
        return samples
    padded = np.concatenate((samples, tail))
    return padded[max(0, turns[0].start_sample) : turns[-1].closed_sample]


def framed_clips(samples: Samples, rate: int, vad: SileroVad) -> list[tuple[str, Samples]]:
    """The early and final clips a call cuts from ``samples`` at each frame alignment."""
    frame = round(rate * 0.02)
    clips: list[tuple[str, Samples]] = []
    for offset in FRAME_ALIGNMENTS:
        audio = np.concatenate(
            (np.zeros(rate // 2 + offset, np.float32), samples, np.zeros(rate, np.float32))
        )
        detector = TurnDetector(TurnConfig(), vad.stream())
        to_16k = StreamResampler(rate, 16000)
        for start in range(0, audio.size - frame, frame):
            piece = to_16k(audio[start : start + frame])
            for event in detector.push(piece):
                if isinstance(event, EndCandidate):
                    clips.append((f"early@{offset}", event.audio))
                elif isinstance(event, UserTurn):
                    clips.append((f"final@{offset}", event.audio))
    return clips


def call_clips(vad: SileroVad) -> list[Clip]:
    """The test suite's sentences as its calls cut them (empty without the joe voice)."""
    voice = joe_voice()
    if voice is None:
        return []
    from voicebot.tts import PiperSynthesizer

    piper = PiperSynthesizer(str(voice), voices_dir=voice.parent)
    clips: list[Clip] = []
    for sentence in CALL_SENTENCES:
        pieces = list(piper.synthesize(sentence))
        rate = pieces[0][0]
        samples = np.concatenate([s for _, s in pieces])
        for name, clip in framed_clips(samples, rate, vad):
            clips.append(Clip(f"{sentence[:16]}/{name}", "en", sentence, clip))
    return clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--paddings", default="1,2,3,4")
    parser.add_argument("--threads", type=int, default=0, help="CTranslate2 CPU threads")
    parser.add_argument("--sets", default="corpus,calls", help="corpus, calls or both")
    parser.add_argument("--models", default="tiny.en,base", help="tiny.en, base or both")
    args = parser.parse_args()
    paddings: list[float | None] = [None, *(float(p) for p in args.paddings.split(","))]
    sets = args.sets.split(",")
    models = args.models.split(",")

    vad = SileroVad()
    clips: dict[str, list[Clip]] = {}
    if "corpus" in sets:
        clips["corpus"] = [
            Clip(item.name, item.language, item.text, utterance(item.audio, vad))
            for item in load_corpus(CORPUS)
        ]
    if "calls" in sets:
        clips["calls"] = call_clips(vad)
    tiny = tiny_en_model() if "tiny.en" in models else None
    base = (
        base_multilingual_model(Path(tempfile.gettempdir()) / "voicebot-measure")
        if "base" in models
        else None
    )
    pairs: list[tuple[str, Path, str]] = []
    if tiny is not None:
        pairs.append(("tiny.en", tiny, "en"))
    if base is not None:
        pairs += [("base", base, "en"), ("base", base, "ja")]

    print(
        "set     model    lang  window   p50 ms  p90 ms  WER/CER  degenerate  worse  agrees"
        "  (clips)"
    )
    for model_name, path, language in pairs:
        stt = WhisperTranscriber(str(path), device="cpu", cpu_threads=args.threads)
        stt.warm_up()
        for set_name, set_clips in clips.items():
            subset = [clip for clip in set_clips if clip.language == language]
            if subset:
                _measure(stt, model_name, language, set_name, subset, paddings, args.repeats)


def _measure(
    stt: WhisperTranscriber,
    model_name: str,
    language: str,
    set_name: str,
    clips: list[Clip],
    paddings: list[float | None],
    repeats: int,
) -> None:
    times: dict[float | None, list[float]] = {p: [] for p in paddings}
    errors: dict[float | None, list[ErrorCount]] = {p: [] for p in paddings}
    degenerate: dict[float | None, int] = dict.fromkeys(paddings, 0)
    texts: dict[float | None, list[str | None]] = {p: [] for p in paddings}  # None: degenerate
    for repeat in range(repeats):
        for clip in clips:
            for padding in paddings:
                started = time.perf_counter()
                result = stt.decode((16000, clip.samples), language, padding_s=padding)
                times[padding].append(time.perf_counter() - started)
                if repeat == 0:
                    errors[padding].append(error_count(clip.reference, result.text, language))
                    texts[padding].append(None if result.degenerate else result.text)
                    degenerate[padding] += result.degenerate is not None
    for padding in paddings:
        total = ErrorCount(
            sum(e.errors for e in errors[padding]), sum(e.length for e in errors[padding])
        )
        worse = sum(
            short.errors > full.errors
            for short, full in zip(errors[padding], errors[None], strict=True)
        )
        agrees = sum(
            short is not None and full is not None and same_words(short, full)
            for short, full in zip(texts[padding], texts[None], strict=True)
        )
        window = "full" if padding is None else f"+{padding:g} s"
        ms = sorted(1000 * t for t in times[padding])
        p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
        print(
            f"{set_name:7s} {model_name:8s} {language:4s}  {window:7s} "
            f"{statistics.median(ms):7.0f} {p90:7.0f}  {100 * (total.rate or 0):6.1f}%  "
            f"{degenerate[padding]:10d}  {worse:5d}  {agrees:6d}  ({len(clips)})",
            flush=True,
        )


if __name__ == "__main__":
    main()
