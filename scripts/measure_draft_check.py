"""Could the draft be checked, or trusted, more cheaply than by a second full-window pass?

For every clip (the bench corpus and the suite's call clips, as ``measure_stt_window.py``
cuts them; tiny.en, English), the short-window draft and the full-window transcript, and:

- ``align``: CTranslate2 ``Whisper.align`` scoring the draft's tokens on the full window's
  encoder output, a single decoder pass. If every token scored >= 0.5 the draft would be
  the full window's greedy choice at each step, were end-of-text among the scores; the
  script counts the clips where all tokens pass but the full window says something else.
- the draft's own lowest token probability, next to whether it agrees with the full window:
  is there a confidence above which a draft could be trusted without the check?

    .venv/bin/python scripts/measure_draft_check.py [--sets corpus,calls]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_suppressed_tokens
from measure_stt_window import CORPUS, Clip, call_clips, utterance

from voicebot.bench.corpus import load_corpus
from voicebot.bench.models import tiny_en_model
from voicebot.stt import WhisperTranscriber, max_new_tokens, same_words
from voicebot.vad import SileroVad

PADDING_FRAMES = 100  # the draft's +1 s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="corpus,calls")
    args = parser.parse_args()
    vad = SileroVad()
    clips: list[Clip] = []
    if "corpus" in args.sets:
        clips += [
            Clip(i.name, i.language, i.text, utterance(i.audio, vad))
            for i in load_corpus(CORPUS)
            if i.language == "en"
        ]
    if "calls" in args.sets:
        clips += call_clips(vad)
    stt = WhisperTranscriber(str(tiny_en_model()), device="cpu", short_window=False)
    stt.warm_up()
    # The same checkpoint, loaded as the adapter loads it, for the steps it does not expose.
    model: Any = WhisperModel(str(tiny_en_model()), device="cpu", compute_type="int8")
    tokenizer = Tokenizer(model.hf_tokenizer, False, task="transcribe", language="en")
    prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
    suppressed = get_suppressed_tokens(tokenizer, (-1,))

    passed_but_differs, passed_other_words, agree = 0, 0, 0
    full_ms, encode_ms, align_ms = [], [], []
    confidence: list[tuple[float, bool, str]] = []
    for clip in clips:
        started = time.perf_counter()
        full = stt.transcribe((16000, clip.samples), "en")
        full_ms.append(1000 * (time.perf_counter() - started))
        # The draft, with the probability of each token it chose.
        features = model.feature_extractor(clip.samples)[..., :-1]
        short = model.encode(pad_or_trim(features, features.shape[-1] + PADDING_FRAMES))
        budget = max_new_tokens(clip.samples.shape[-1] / 16000)
        result = model.model.generate(
            short,
            [prompt],
            beam_size=1,
            max_length=len(prompt) + budget,
            suppress_blank=True,
            suppress_tokens=suppressed,
            return_logits_vocab=True,
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
        chosen = [*tokens, tokenizer.eot]
        lowest = 1.0
        for step, logits in enumerate(result.logits[0][: len(chosen)]):
            x = np.asarray(logits, dtype=np.float64).ravel()
            p = np.exp(x - x.max())
            lowest = min(lowest, float(p[chosen[step]] / p.sum()))
        draft = str(tokenizer.decode(tokens)).strip()
        same = same_words(draft, full)
        agree += same
        confidence.append((lowest, same, clip.name))
        # The one-pass check on the full window.
        started = time.perf_counter()
        window = model.feature_extractor(clip.samples)
        content = window.shape[-1] - 1
        encoded = model.encode(pad_or_trim(window[:, :content]))
        encode_ms.append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        scores = model.model.align(encoded, prompt, [tokens], content // 2)[0].text_token_probs
        align_ms.append(1000 * (time.perf_counter() - started))
        if tokens and min(scores) >= 0.5 and draft != full:
            passed_but_differs += 1
            passed_other_words += not same
            print(f"align passes, full window differs: {draft!r} / {full!r}")

    print(
        f"{len(clips)} clips: the draft says the full window's words on {agree}; the align"
        f" check passed but the full window wrote otherwise on {passed_but_differs}"
        f" ({passed_other_words} in other words)"
    )
    print(
        f"p50 ms: full pass {statistics.median(full_ms):.0f}, its encoder"
        f" {statistics.median(encode_ms):.0f}, align {statistics.median(align_ms):.0f}"
    )
    worst_differing = max((c for c in confidence if not c[1]), default=None)
    agreeing = sorted(c[0] for c in confidence if c[1])
    if worst_differing is not None and agreeing:
        print(
            f"highest lowest-token probability of a draft that differed: {worst_differing[0]:.2f}"
            f" ({worst_differing[2]}); drafts that agreed: {agreeing[0]:.2f} to"
            f" {agreeing[-1]:.2f}, {sum(p > worst_differing[0] for p in agreeing)} of"
            f" {len(agreeing)} above it"
        )


if __name__ == "__main__":
    main()
