"""voicebot bench on a tiny corpus with real models: shape and sanity, no timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastrtc import SileroVadOptions
from fastrtc.pause_detection.silero import SileroVADModel

from voicebot.audio import MonoAudio
from voicebot.bench.baseline import SileroV6PauseModel, speech_timestamps
from voicebot.bench.corpus import (
    INTERRUPT_EN,
    Speak,
    UtteranceSpec,
    generate_corpus,
    load_corpus,
)
from voicebot.bench.main import BenchOptions, run_bench
from voicebot.bench.metrics import error_count, percentiles
from voicebot.bench.report import format_table, plot
from voicebot.settings import Settings
from voicebot.vad import SileroVad


def test_error_rates_normalise_case_punctuation_and_japanese_spacing() -> None:
    assert error_count("Hello, there!", "hello there", "en").rate == 0
    count = error_count("What time is it?", "what time it is", "en")
    assert (count.errors, count.length) == (2, 4)
    assert error_count("予約をお願いします。", "予約を お願いします", "ja").rate == 0
    assert error_count("こんにちは。", "こんにちわ", "ja").errors == 1
    assert percentiles([None, 1.0, 3.0]).p50 == 2.0
    assert percentiles([None]).n == 0


class _ScriptedV4(SileroVADModel):
    """FastRTC's own timestamp logic over scripted probabilities (no model, no download)."""

    def __init__(self, probabilities: list[float]) -> None:
        self._probabilities = iter(probabilities)

    def __call__(self, x, state, sr):
        return next(self._probabilities), state


@pytest.mark.parametrize("seed", range(5))
def test_pause_model_timestamps_match_fastrtc(seed: int) -> None:
    rng = np.random.default_rng(seed)
    options = SileroVadOptions(min_silence_duration_ms=300, speech_pad_ms=100)
    n = 80
    # Runs of speech and silence, like a VAD's output.
    runs = np.repeat(rng.random(n // 8) > 0.5, 8).astype(float) * 0.9
    probabilities = [float(p) for p in np.clip(runs + rng.normal(0, 0.05, n), 0, 1)]
    audio = np.zeros(n * options.window_size_samples, np.float32)
    theirs = _ScriptedV4(probabilities).get_speech_timestamps(audio, options)
    assert speech_timestamps(probabilities, audio.size, options) == theirs


def _speaker(voice: Path) -> Speak:
    from piper import PiperVoice, SynthesisConfig

    model = PiperVoice.load(voice)
    config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)

    def speak(text: str) -> MonoAudio:
        chunks = [c.audio_float_array for c in model.synthesize(text, syn_config=config)]
        return model.config.sample_rate, np.concatenate(chunks)

    return speak


def test_pause_model_hears_real_speech(joe_voice_path: Path, silero_model_path: Path) -> None:
    speak = _speaker(joe_voice_path)
    rate, speech = speak("Good morning, how are you?")
    model = SileroV6PauseModel(SileroVad(silero_model_path))
    model.warmup()
    seconds, chunks = model.vad((rate, speech), None)
    assert 0.5 < seconds <= len(speech) / rate + 0.01 and chunks
    silent, none = model.vad((16000, np.zeros(9600, np.float32)), None)
    assert silent == 0 and none == []


def test_bench_tiny_corpus_end_to_end(
    tmp_path: Path, tiny_en_model_dir: Path, joe_voice_path: Path
) -> None:
    speak = _speaker(joe_voice_path)
    corpus = tmp_path / "corpus"
    specs = (
        UtteranceSpec("short", "Hello there.", "en", lead_s=0.3, tail_s=0.3),
        UtteranceSpec(
            "long",
            "Tell me about the history of the old city, please.",
            "en",
            lead_s=0.3,
            tail_s=0.3,
            barge_in=INTERRUPT_EN.name,
        ),
    )
    generate_corpus(corpus, {"en": speak}, specs)
    items = load_corpus(corpus)
    assert [i.name for i in items] == ["short", "long"]
    assert items[1].barge_in is not None and items[0].barge_in is None

    options = BenchOptions(
        corpus=corpus,
        languages=("en",),
        repeats=1,
        llm_profile="instant",
        sessions=2,
        calls_per_level=1,
        stt_model=str(tiny_en_model_dir),
        tts_voice=str(joe_voice_path),
    )
    report = run_bench(options, Settings(data_dir=tmp_path / "data"))

    assert len(report.measurements) == 4  # 2 items x 2 pipelines, interleaved
    assert [m.pipeline for m in report.measurements] == ["ours", "baseline"] * 2
    for m in report.measurements:
        assert m.v2v_ms is not None and m.v2v_ms > 0, m
        assert m.first_sound_ms == m.v2v_ms, m  # no acknowledgement in assistant-en
        assert m.endpoint_ms is not None and m.stt_ms is not None, m
        assert m.llm_ttft_ms is not None and m.tts_first_ms is not None, m
        assert m.transcript, m
        assert m.reference_tokens > 0
    long_runs = [m for m in report.measurements if m.item == "long"]
    assert all(m.bargein_stop_ms is not None for m in long_runs), long_runs
    ours, base = report.summary("ours", "en"), report.summary("baseline", "en")
    assert ours is not None and base is not None
    assert ours.error_rate is not None and ours.error_rate < 0.5
    assert base.metrics["v2v_ms"].p50 is not None
    v2v = next(r for r in report.ratios if r.metric == "v2v_ms")
    assert v2v.p50_ratio is not None and v2v.per_repeat_min == v2v.per_repeat_max
    assert [s.sessions for s in report.sessions] == [1, 2]
    assert all(s.v2v.n >= 1 for s in report.sessions)
    assert {t.name for t in report.targets} >= {"v2v p50 ours/baseline"}

    data = json.loads(report.to_json())
    assert data["summaries"][0]["metrics"]["v2v_ms"]["p50"] is not None
    assert len(data["measurements"]) == 4
    table = format_table(report)
    assert "voice-to-voice" in table and "barge-in stop" in table and "first sound" in table
    png = tmp_path / "bench.png"
    plot(report, png)
    assert png.stat().st_size > 10_000
