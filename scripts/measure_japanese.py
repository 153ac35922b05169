"""Measure Japanese first-audio latency against the chunker's first-chunk length (docs/japanese.md).

For realistic reservation replies streamed at an LLM's pace (``ollama_server`` pseudo-tokens,
two kana/kanji per token, a profile's TTFT and tokens/s), feed the chunker with each
candidate ``first_chunk_min_chars``, note when the first chunk is complete, synthesize it
with Kokoro JA, and report first audio = chunk ready + synthesis time. Also measures Kokoro's
real-time factor on whole sentences.

    python scripts/measure_japanese.py [--profile gpu-8b] [--min-chars 6,8,10,14,20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from voicebot.chunking import Chunker
from voicebot.ollama_server import PROFILES, tokenize
from voicebot.tts import KokoroJaSynthesizer

REPLIES = (
    "かしこまりました、それではお名前をお伺いしてもよろしいでしょうか。",
    "ありがとうございます、山田様ですね。ご希望の日付とお時間をお聞かせください。",
    "承知いたしました、七月十日の午後七時ですね。何名様でお越しになりますか。",
    "二名様ですね、かしこまりました。アレルギーやお祝いなど、何かご要望はございますか。",
    "申し訳ございません、年末年始の十二月三十一日から一月三日まではお休みをいただいております。",
    "はい、平日は午前十一時から午後十時まで、土日祝日は午前十時から午後十一時まで営業しております。",
    "大変申し訳ございませんが、ご予約は四名様までとなっております。",
    "では、ご予約内容を確認いたします。山田太郎様、七月十日午後七時、二名様、窓際のお席ですね。",
    "お誕生日のお祝いですね、承知いたしました。当日はデザートプレートをご用意いたします。",
    "はい、大丈夫です。ご予約が完了いたしました。ご来店を心よりお待ちしております。",
    "恐れ入りますが、もう一度お名前をおっしゃっていただけますか。",
    "その日は満席となっておりまして、午後八時以降でしたらお席をご用意できます。",
)


def first_chunk(
    reply: str, min_chars: int, ttft_s: float, tokens_per_s: float
) -> tuple[str, float]:
    """The first chunk of ``reply`` and when it is complete, streamed at the given pace."""
    chunker = Chunker(language="ja", first_chunk_min_chars=min_chars)
    tokens = tokenize(reply)
    for i, token in enumerate(tokens):
        out = chunker.feed(token)
        if out:
            return out[0], ttft_s + i / tokens_per_s
    return chunker.flush()[0], ttft_s + (len(tokens) - 1) / tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="gpu-8b", choices=sorted(PROFILES))
    parser.add_argument("--min-chars", default="6,8,10,14,20")
    parser.add_argument("--voice", default="jf_alpha")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    profile = PROFILES[args.profile]
    cache = Path(tempfile.gettempdir()) / "voicebot-kokoro"
    started = time.perf_counter()
    tts = KokoroJaSynthesizer(args.voice, cache_dir=cache)
    tts.warm_up()
    print(f"kokoro load + warm-up: {time.perf_counter() - started:.2f} s")

    synth_cache: dict[str, tuple[float, float]] = {}

    def synth(text: str) -> tuple[float, float]:
        """(seconds to the first audio piece, seconds of audio) — best of ``repeats``."""
        if text not in synth_cache:
            best, audio_s = float("inf"), 0.0
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                pieces = iter(tts.synthesize(text))
                rate, samples = next(pieces)
                best = min(best, time.perf_counter() - t0)
                audio_s = samples.size / rate
            synth_cache[text] = (best, audio_s)
        return synth_cache[text]

    print(f"profile {profile.name}: ttft {profile.ttft_s} s, {profile.tokens_per_s} tok/s")
    print(
        "min_chars | mean first chunk chars | chunk ready s | tts s | first audio s (mean/max)"
        " | chunks < 6 chars"
    )
    for n in (int(x) for x in args.min_chars.split(",")):
        rows = []
        for reply in REPLIES:
            text, ready = first_chunk(reply, n, profile.ttft_s, profile.tokens_per_s)
            tts_s, _ = synth(text)
            rows.append((len(text), ready, tts_s, ready + tts_s))
        firsts = [r[3] for r in rows]
        short = sum(1 for r in rows if r[0] < 6)
        print(
            f"{n:9d} | {statistics.mean(r[0] for r in rows):22.1f} | "
            f"{statistics.mean(r[1] for r in rows):13.2f} | "
            f"{statistics.mean(r[2] for r in rows):5.2f} | "
            f"{statistics.mean(firsts):.2f} / {max(firsts):.2f} | {short}"
        )

    # Real-time factor on whole replies (synthesis time / audio time).
    total_synth = total_audio = 0.0
    for reply in REPLIES:
        t0 = time.perf_counter()
        audio = sum(s.size / r for r, s in tts.synthesize(reply))
        total_synth += time.perf_counter() - t0
        total_audio += audio
    print(
        f"kokoro RTF over {len(REPLIES)} replies: {total_synth / total_audio:.3f} "
        f"({total_audio:.1f} s of audio in {total_synth:.1f} s)"
    )


if __name__ == "__main__":
    main()
