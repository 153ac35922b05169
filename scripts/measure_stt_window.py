"""Choose the short-window padding of the STT adapter by measurement.

For each (model, language) pair of the bench corpus, transcribes every utterance with the
full 30 s window and with the utterance plus each padding, interleaved item by item so
machine noise hits every variant alike, and prints p50 time, WER (CER for Japanese) and how
many short-window transcripts were degenerate (and redone with the full window).

The utterance is cut from the corpus file as the pipeline cuts it: the real Silero VAD and
turn detector (default settings), from the first turn's start (pre-roll included) to where
the last turn closed.

    .venv/bin/python scripts/measure_stt_window.py [--repeats 2] [--paddings 0.5,1,2,3,4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from voicebot.audio import Samples
from voicebot.bench.corpus import load_corpus
from voicebot.bench.metrics import ErrorCount, error_count
from voicebot.bench.models import base_multilingual_model, tiny_en_model
from voicebot.stt import WhisperTranscriber
from voicebot.turns import TurnConfig, TurnDetector, UserTurn
from voicebot.vad import SileroVad

CORPUS = Path(__file__).resolve().parent.parent / "bench" / "corpus"


def utterance(samples: Samples, vad: SileroVad) -> Samples:
    """What the pipeline hands the transcriber: pre-roll + speech + end silence."""
    detector = TurnDetector(TurnConfig(speculative_silence_ms=0), vad.stream())
    tail = np.zeros(16000, np.float32)
    turns = [e for e in detector.push(np.concatenate((samples, tail))) if isinstance(e, UserTurn)]
    if not turns:
        return samples
    padded = np.concatenate((samples, tail))
    return padded[max(0, turns[0].start_sample) : turns[-1].closed_sample]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--paddings", default="0.5,1,1.5,2,3,4")
    parser.add_argument("--threads", type=int, default=0, help="CTranslate2 CPU threads")
    args = parser.parse_args()
    paddings: list[float | None] = [None, *(float(p) for p in args.paddings.split(","))]

    vad = SileroVad()
    items = load_corpus(CORPUS)
    clips = {item.name: utterance(item.audio, vad) for item in items}
    tiny = tiny_en_model()
    cache = Path(tempfile.gettempdir()) / "voicebot-measure"
    base = base_multilingual_model(cache)
    pairs: list[tuple[str, Path, str]] = []
    if tiny is not None:
        pairs.append(("tiny.en", tiny, "en"))
    if base is not None:
        pairs += [("base", base, "en"), ("base", base, "ja")]

    print("model    lang  window   p50 ms  p90 ms  WER/CER  degenerate  (utterances)")
    for model_name, path, language in pairs:
        stt = WhisperTranscriber(str(path), device="cpu", cpu_threads=args.threads)
        stt.warm_up()
        subset = [item for item in items if item.language == language]
        times: dict[float | None, list[float]] = {p: [] for p in paddings}
        errors: dict[float | None, list[ErrorCount]] = {p: [] for p in paddings}
        degenerate: dict[float | None, int] = dict.fromkeys(paddings, 0)
        for repeat in range(args.repeats):
            for item in subset:
                for padding in paddings:
                    started = time.perf_counter()
                    result = stt.decode((16000, clips[item.name]), language, padding_s=padding)
                    times[padding].append(time.perf_counter() - started)
                    if repeat == 0:
                        errors[padding].append(error_count(item.text, result.text, language))
                        degenerate[padding] += result.degenerate is not None
        for padding in paddings:
            total = ErrorCount(
                sum(e.errors for e in errors[padding]), sum(e.length for e in errors[padding])
            )
            window = "full" if padding is None else f"+{padding:g} s"
            ms = sorted(1000 * t for t in times[padding])
            p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
            print(
                f"{model_name:8s} {language:4s}  {window:7s} {statistics.median(ms):7.0f} "
                f"{p90:7.0f}  {100 * (total.rate or 0):6.1f}%  {degenerate[padding]:10d}"
                f"  ({len(subset)})"
            )


if __name__ == "__main__":
    main()
